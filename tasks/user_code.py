"""Your own loss, metrics and callbacks, named by import path ('package.module:name') or given as objects.

Each resolver takes the config's import paths or the objects a Python caller already holds:

- loss: an nn.Module class (created with no arguments), an nn.Module, or a function
  `loss(outputs, targets) -> scalar tensor`; it gets what fitflow's own losses get: the model's
  raw outputs and the targets as the loader yields them.
- metrics: a torchmetrics `Metric` class (created with `task` and `num_classes` or `num_labels`
  when its constructor takes them: multiclass or multilabel), a Metric, or a function
  `metric(preds, targets) -> number`; each is
  logged as `val_<name>` and `test_<name>`, `<name>` the class or function name in snake_case
  (`MulticlassPrecision` -> `multiclass_precision`). They get what the built-in metrics get:
  class probabilities (batch, classes) and integer labels; for multilabel a probability per class
  and 0/1 labels, both (batch, classes); predictions and targets in the target's own units
  (regression). A function's values are averaged over the batches, weighed
  by their rows. Which way is better comes from a Metric's `higher_is_better`, or a function's
  attribute of that name; without one, names ending in loss, error, rmse or mae go down. The run
  records it for its monitor (`monitor_lower_is_better`, tag fitflow.monitor_mode), and everything
  that judges the run later (baseline, registry gate, sweep, `fitflow runs`) goes by that record.
- callbacks: a `tasks.callbacks.Callback` subclass (created with no arguments) or a Callback.

Settings go in the class as defaults (`class Focal(FocalLoss): def __init__(self): super().__init__(gamma=2)`).
A path that does not import, or an object of the wrong kind, is a ConfigError naming the field.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from tasks.callbacks import Callback, Monitor
from tasks.errors import ConfigError


def import_object(path: str, field: str) -> Any:
    """The object at 'package.module:name'; a ConfigError naming `field` when it cannot be imported."""
    module_name, _, name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"cannot import {field} '{path}' ({err}); make sure its package is importable "
                          "(installed, or on PYTHONPATH)") from None
    if not hasattr(module, name):
        raise ConfigError(f"cannot import {field} '{path}': module {module_name} has no '{name}'; check the name")
    return getattr(module, name)


def _created(cls: type, path: str, field: str) -> Any:
    try:
        return cls()
    except TypeError as err:
        raise ConfigError(f"cannot create {field} '{path}' with no arguments ({err}); give its parameters defaults "
                          "(a subclass that sets them)") from None


def loss_module(loss: str | nn.Module | Callable) -> nn.Module:
    """Your loss as a module the loop calls as `loss(outputs, targets)` (and moves to the device)."""
    path = loss if isinstance(loss, str) else _name_of(loss)
    found = import_object(loss, "loss") if isinstance(loss, str) else loss
    if isinstance(found, type) and issubclass(found, nn.Module):
        found = _created(found, path, "loss")
    if isinstance(found, nn.Module):
        return found
    if callable(found) and not isinstance(found, type):
        return LossFunction(found)
    raise ConfigError(f"loss '{path}' is {_kind(found)}; name an nn.Module class or a function loss(outputs, targets)")


class LossFunction(nn.Module):
    """A plain function as a loss module."""

    def __init__(self, function: Callable) -> None:
        super().__init__()
        self.function = function

    def forward(self, outputs: Any, targets: Any) -> Any:
        return self.function(outputs, targets)


@dataclass
class UserMetric:
    """One metric of yours: a torchmetrics Metric, or a function of (preds, targets)."""

    name: str  # logged as val_<name>, test_<name>
    source: str  # the import path or the object's name, for messages
    metric: Any  # a torchmetrics.Metric or a callable
    lower_is_better: bool | None  # None: unknown (Monitor decides by the name)


def user_metrics(metrics: Sequence[str | Any], task: str, n_classes: int, taken: Sequence[str] = ()) -> list[UserMetric]:
    """Your metrics, created for this task; `taken`: the names fitflow logs already (loss, accuracy, ...)."""
    resolved: list[UserMetric] = []
    for spec in metrics:
        source = spec if isinstance(spec, str) else _name_of(spec)
        found = import_object(spec, "metric") if isinstance(spec, str) else spec
        # the name you wrote: torchmetrics.Accuracy creates a MulticlassAccuracy, and is still "accuracy"
        name = snake_case(type(found).__name__ if is_torchmetrics_metric(found)
                          else getattr(found, "__name__", type(found).__name__))  # a functools.partial has no __name__
        if isinstance(found, type) and is_torchmetrics_metric(found, as_class=True):
            found = _metric_for_task(found, source, task, n_classes)
        elif isinstance(found, type) or not callable(found):
            raise ConfigError(f"metric '{source}' is {_kind(found)}; name a torchmetrics Metric class or a function "
                              "metric(preds, targets) -> number")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ConfigError(f"metric '{source}' has no usable name ({name!r}); name it as a def or a class")
        if name in taken or name in [m.name for m in resolved]:
            raise ConfigError(f"metric '{source}' would be logged as val_{name}, which this run logs already; drop it")
        higher = getattr(found, "higher_is_better", None)
        resolved.append(UserMetric(name, source, found, None if higher is None else not higher))
    return resolved


def monitor_lower_is_better(monitor: str, metrics: Sequence[UserMetric]) -> bool:
    """Which way `monitor` improves: as your metric of that name declares it, else by its name (Monitor).
    Early stopping, the kept weights, the run's record of it (tasks/tracking.py MONITOR_MODE_TAG) and so the
    baseline sentence, the registry gate, a sweep and `fitflow runs` all take it from here."""
    declared = [m.lower_is_better for m in metrics if f"val_{m.name}" == monitor]
    return Monitor(monitor, lower_is_better=declared[0] if declared else None).lower_is_better


def is_torchmetrics_metric(obj: Any, as_class: bool = False) -> bool:
    """Whether `obj` is a torchmetrics Metric (a subclass of it, with `as_class`), without importing
    torchmetrics (about 1 s with what it imports): a Metric exists only once torchmetrics is imported."""
    torchmetrics = sys.modules.get("torchmetrics")
    if torchmetrics is None:
        return False
    return issubclass(obj, torchmetrics.Metric) if as_class else isinstance(obj, torchmetrics.Metric)


def _metric_for_task(cls: type, path: str, task: str, n_classes: int) -> Any:
    """A torchmetrics class with the task arguments its constructor names (none for regression)."""
    names = inspect.signature(cls).parameters
    offered = {"classification": {"task": "multiclass", "num_classes": n_classes},
               "multilabel": {"task": "multilabel", "num_labels": n_classes}}.get(task, {})
    kwargs = {key: value for key, value in offered.items() if key in names}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot create metric '{path}' with {kwargs or 'no arguments'} ({err}); "
                          "give its other parameters defaults (a subclass that sets them)") from None


def user_callbacks(callbacks: Sequence[str | Callback]) -> list[Callback]:
    """Your callbacks, created with no arguments (a path) or as given (a Callback)."""
    resolved = []
    for spec in callbacks:
        source = spec if isinstance(spec, str) else _name_of(spec)
        found = import_object(spec, "callback") if isinstance(spec, str) else spec
        if isinstance(found, type) and issubclass(found, Callback):
            found = _created(found, source, "callback")
        if not isinstance(found, Callback):
            raise ConfigError(f"callback '{source}' is {_kind(found)}, not a Callback; derive it from "
                              "tasks.callbacks.Callback and override the hooks it needs")
        resolved.append(found)
    return resolved


def snake_case(name: str) -> str:
    """MulticlassF1Score -> multiclass_f1_score; balanced_error stays."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _name_of(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def _kind(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__name__}"
    return f"a {type(obj).__name__}"
