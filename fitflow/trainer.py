"""`fitflow.compile(model, ...)` -> Trainer: Keras' compile/fit/evaluate/predict over the flow's engine.

One code path: `fit` prepares the data as the flow does (fitflow/inputs.py), starts the MLflow
run with the flow's `start_run` (params, config.json, launch tags, the dataset), trains with the
flow's training step (`train_model`: the same callbacks, epoch checkpoints and metrics journal)
and ends the run FINISHED, or FAILED with the error. `evaluate` logs test metrics into that run
and `log_model` the flow's pyfunc model, registered behind the flow's champion gate. With
`flow=True` the same `fit` runs as a Prefect flow run (its steps as task runs), visible in the UI.

The config (tasks/config.py TrainConfig) stays the single source of truth: every setting is one
of its fields and is validated there; what a config cannot hold (the model object, an optimizer
or loss object) goes to the engine as `Given` (tasks/trainer.py).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from prefect import flow
from pydantic import ValidationError

from fitflow.callbacks import EarlyStopping
from fitflow.inputs import LABELS, TABLE, FitData, fit_data, kind_of, model_inputs, seen_frames, split_for, test_record
from flows.registry import Decision, register_model
from flows.resume import config_of_run
from flows.steps import build_loaders_task, on_own_device, run_step
from flows.train import log_test_metrics, log_trained_model, start_run, train_in_run
from tasks import run_owner, system_metrics, tracking
from tasks.baseline import baseline_sentence, linear_baseline
from tasks.callbacks import Callback
from tasks.config import IMPORT_PATH, TrainConfig, check_run_id, describe_validation_error
from tasks.data import Prepared
from tasks.errors import ConfigError
from tasks.metrics import METRICS
from tasks.models import build_model
from tasks.trainer import (
    Given,
    Run,
    Trained,
    build_loaders,
    check_before_run,
    lower_is_better,
    task_metrics,
    training_loss,
    your_metrics,
)
from tasks.training import History, call_model, evaluate, predict_outputs, to_device
from tasks.user_code import user_callbacks

if TYPE_CHECKING:
    from tasks.rescoring import GivenRowsRescorer

log = logging.getLogger("fitflow")

# Set by the data given to fit, or by fit's own arguments: never compile's.
_FIT_FIELDS = {"data", "data_kind", "data_kwargs", "target", "validation_data", "val_fraction", "epochs", "batch_size"}


def compile(model: torch.nn.Module | str, optimizer: str | torch.optim.Optimizer = "adam",
            loss: str | Callable = "auto", metrics: Sequence[str | Any] | None = None, lr: float | None = None,
            experiment: str = "fitflow", **fields: Any) -> Trainer:
    """A Trainer for `model` (an nn.Module, trained in place; or a model name as the config takes it).

    `optimizer`: adam, adamw, sgd, or an optimizer object over the model's parameters. `loss`: a
    name as the config takes it (auto, cross_entropy, mse, ..., or 'pkg.mod:name') or any callable
    loss(outputs, targets). `metrics`: the task's own names (tasks/metrics.py METRICS: every one of
    them is computed and logged; these are checked against the task), and your metrics, logged
    as val_<name>/test_<name> and usable as `monitor`: import paths ('pkg.mod:name', the config's
    `metrics`), torchmetrics Metric classes or instances, or functions metric(preds, targets).
    `fields`: any other TrainConfig field (scheduler, warmup_steps, accumulate_grad_batches,
    log_every_n_steps, weight_decay, seed, monitor, patience, register_model, device, ...).
    """
    given = Given()
    settings: dict[str, Any] = {"experiment": experiment, **fields}
    if isinstance(model, torch.nn.Module):
        given.model = model
        name = f"{type(model).__module__}:{type(model).__name__}"
        settings["model"] = name if IMPORT_PATH.match(name) else "auto"  # the params name the class when they can
    elif isinstance(model, str):
        settings["model"] = model
    else:
        raise TypeError(f"model must be a torch nn.Module or a model name ('auto', 'mlp', 'pkg.mod:Class'); got {_type(model)}")
    if isinstance(optimizer, torch.optim.Optimizer):
        if given.model is None:
            raise TypeError("optimizer: an optimizer object needs the model object it optimizes; pass the model, "
                            "or the optimizer's name")
        if lr is not None:
            raise ValueError("lr: the optimizer object has its own learning rate; set it there")
        theirs = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not theirs <= {id(p) for p in given.model.parameters()}:
            raise ValueError("optimizer holds parameters that are not the model's; build it on model.parameters()")
        given.optimizer = optimizer
        settings["lr"] = optimizer.param_groups[0]["lr"]  # the params show the rate it trains with
    elif isinstance(optimizer, str):
        settings["optimizer"] = optimizer
    else:
        raise TypeError(f"optimizer must be a name (adam, adamw, sgd) or a torch.optim.Optimizer; got {_type(optimizer)}")
    if isinstance(loss, str):
        settings["loss"] = loss
    elif callable(loss):
        given.loss_fn = loss
    else:
        raise TypeError(f"loss must be a name (auto, cross_entropy, mse, huber, l1, bce), an import path "
                        f"'package.module:name' or a callable; got {_type(loss)}")
    if lr is not None:
        settings["lr"] = lr
    builtin: list[str] = []
    if metrics is not None:
        if isinstance(metrics, str) or not isinstance(metrics, Sequence):
            raise TypeError(f"metrics must be a list of metric names, import paths or metric objects; got {_type(metrics)}")
        paths = [name for name in metrics if isinstance(name, str) and IMPORT_PATH.match(name)]
        builtin = [name for name in metrics if isinstance(name, str) and name not in paths]
        given.metrics = [metric for metric in metrics if not isinstance(metric, str)]  # checked for the task at fit
        not_metrics = [metric for metric in given.metrics if not callable(metric)]
        if not_metrics:
            raise TypeError(f"metrics: {_type(not_metrics[0])} is not a metric; give a name, an import path, a "
                            "torchmetrics Metric or a function metric(preds, targets)")
        unknown = [name for name in builtin if not any(name in names for names in METRICS.values())]
        if unknown:
            raise ValueError(f"metrics: unknown metric {unknown[0]!r}; fitflow logs "
                             + "; ".join(f"{', '.join(names)} ({task})" for task, names in METRICS.items())
                             + "; name yours as 'package.module:name' or pass the metric object")
        if paths:
            settings["metrics"] = [*fields.get("metrics", []), *paths]
    taken = sorted(_FIT_FIELDS & fields.keys())
    if taken:
        raise ValueError(f"{taken[0]}: give the data, epochs and batch_size to fit, not to compile")
    if fields.get("strategy", "single") != "single":
        raise ValueError("strategy: the Python API trains in this process; for DDP run the flow, fitflow.train(config)")
    config = _config(settings)
    return Trainer(given, config, builtin)


class Trainer:
    """A compiled model: `fit`, `evaluate`, `predict`, `log_model`; `model` holds the trained weights."""

    def __init__(self, given: Given, config: TrainConfig, metrics: list[str]) -> None:
        self.model, self.metrics = given.model, metrics
        self.config = self._compiled = config  # after fit: the run's config (its data, epochs, batch size)
        self._given = given
        self.history: History | None = None
        self.run_id: str | None = None
        self.registered: Decision | None = None
        self._data: FitData | None = None
        self._run: Run | None = None
        self._trained: Trained | None = None
        self._tested = False
        self._evaluated: tuple[pd.DataFrame, Prepared] | None = None  # a table's evaluate: its frame, it encoded
        self.baseline_metrics: dict[str, float] = {}  # after evaluate on a DataFrame: the linear baseline's

    def fit(self, x: Any, y: Any = None, *, target: str | None = None, validation_data: Any = None,
            validation_split: float | None = None, epochs: int | None = None, batch_size: int | None = None,
            callbacks: Sequence[Callback | EarlyStopping | str] = (), resume: str | None = None,
            flow: bool = False) -> History:
        """Train on `x` (and `y`), validating each epoch; returns the History (also `self.history`).

        `callbacks`: Callback objects, EarlyStopping (it sets monitor, patience and min_delta), or
        import paths 'pkg.mod:Class' (the config's `callbacks`, created with no arguments).
        `resume`: the id of a run of this trainer's settings that stopped early (an error, an
        interrupt): it continues from its last epoch checkpoint, with the same data. `flow`: run
        as a Prefect flow run (the Prefect API: PREFECT_API_URL, or a temporary local server).
        """
        fields = {"epochs": epochs, "batch_size": batch_size}
        own: list[Callback] = []
        if isinstance(callbacks, (Callback, EarlyStopping)) or not isinstance(callbacks, Sequence):
            raise TypeError(f"callbacks must be a list of callbacks; got {_type(callbacks)}")
        for callback in callbacks:
            if isinstance(callback, EarlyStopping):
                if "monitor" in fields:
                    raise ValueError("callbacks: one EarlyStopping is enough")
                fields.update(callback.config_fields())
            elif isinstance(callback, Callback):
                own.append(callback)
            elif isinstance(callback, str) and IMPORT_PATH.match(callback):
                fields["callbacks"] = [*fields.get("callbacks", self._compiled.callbacks), callback]
            else:
                raise TypeError(f"callbacks: {_type(callback) if not isinstance(callback, str) else repr(callback)} "
                                "is not a fitflow.callbacks.Callback nor an import path 'package.module:Class'")
        if validation_split is not None and not isinstance(validation_split, (int, float)):
            raise TypeError(f"validation_split must be a number; got {_type(validation_split)}")
        if resume is not None:
            if not isinstance(resume, str):
                raise TypeError(f"resume must be an MLflow run id; got {_type(resume)}")
            _as_value_error(check_run_id, resume)
        kind = kind_of(x, y, target)
        call = _FitCall(self._compiled, self._given, self.metrics, (x, y, target, validation_data, validation_split),
                        fields, own, resume)
        fitted = call.as_flow({"data": LABELS[kind], **call.settings}) if flow else call.run()
        self.config, self._data, self._run, self._trained = fitted.config, fitted.data, fitted.run, fitted.trained
        self.model, self.history, self.run_id = fitted.trained.model, fitted.trained.history, fitted.run.run_id
        self._tested, self._evaluated = False, None
        return self.history

    def evaluate(self, x: Any, y: Any = None, *, target: str | None = None, batch_size: int | None = None) -> dict[str, float]:
        """Loss and metrics on `x` (and `y`), as `test_<metric>`; logged to the fit's run (the registry compares them).

        A dict, not Keras' list: the names travel with the values. For a DataFrame, the linear baseline fitted
        on fit's training split is scored on the same rows: `baseline_metrics` (baseline_test_<metric>, logged
        beside them), and a warning says when the network does not beat it.
        """
        data, trained, run = self._fitted("evaluate")
        prepared = _as_value_error(split_for, data, x, y, target, "x")
        config = self.config if batch_size is None else _config({**self.config.flat(), "batch_size": batch_size})
        loader = build_loaders(config, prepared).val
        device = next(trained.model.parameters()).device
        metrics = evaluate(trained.model, loader, training_loss(config, prepared, self._given, device),
                           task_metrics(prepared, your_metrics(config, self._given)), device, "test")
        # A DataFrame, as every table run of the flow: the linear baseline fitted on fit's training split, on these rows
        baseline = (linear_baseline(config, prepared, loader, device, self._given, trained.linear_start)
                    if data.kind == TABLE and config.baseline else None)
        log_test_metrics(self.config, run, trained, metrics, baseline)
        self.baseline_metrics = baseline.metrics if baseline else {}
        sentence = baseline and baseline_sentence({**metrics, **baseline.metrics}, config.monitor,
                                                  lower_is_better(config, prepared, self._given), baseline.model)
        if sentence:
            log.warning(sentence)
        record = test_record(x, y, target)
        digest = tracking.log_dataset(run.client, run.run_id, record.frame, record.source, record.target, record.source,
                                      context="testing")
        run.client.set_tag(run.run_id, "fitflow.test_digest", digest)
        self._tested = True
        self._evaluated = (x, prepared) if data.kind == TABLE else None
        return metrics

    def predict(self, x: Any, *, batch_size: int = 4096) -> np.ndarray:
        """Class probabilities (rows, classes) for classification (multi-label: each class's own probability);
        values (rows,) in the target's units for regression."""
        data, trained, _ = self._fitted("predict")
        inputs = _as_value_error(model_inputs, data, x)
        if isinstance(inputs, torch.Tensor):
            outputs = predict_outputs(trained.model, inputs, batch_size)
        else:  # a Dataset or DataLoader of (x, y) items: the loader the model was validated with
            loader = build_loaders(self.config, split_for(data, inputs, None, None, "x")).val
            device = next(trained.model.parameters()).device
            trained.model.eval()
            with torch.inference_mode():
                outputs = torch.cat([call_model(trained.model, to_device(batch, device)).float().cpu() for batch, _ in loader])
        p = data.prepared.preprocessor
        if p.task == "classification":
            return outputs.softmax(dim=1).numpy()
        if p.task == "multilabel":  # one independent probability per class
            return outputs.sigmoid().numpy()
        mean, std = (p.target_mean, p.target_std) if p.target_mean is not None else (0.0, 1.0)
        return outputs[:, 0].numpy() * std + mean

    def log_model(self, name: str | None = None) -> str:
        """Log the pyfunc model into the fit's run, as the flow does; returns its URI.

        With `name` it becomes a version of that registered model, behind the champion gate
        (flows/registry.py): the URI is then the version's (`models:/name/3`), `self.registered` says
        which alias it got and why. The gate compares test metrics: `evaluate` first.
        """
        data, trained, run = self._fitted("log_model")
        if name is not None:
            _config({**self.config.flat(), "register_model": name})  # the config's rule for registry names
            if not self._tested:
                raise RuntimeError("log_model(name=...) registers behind the champion gate, which compares test "
                                   "metrics: call evaluate(test_data) first")
        if self._given.model is not None:
            _check_rebuilds(trained)
        model_uri = log_trained_model(self.config, data.prepared, data.record, run, trained)
        if name is None:
            return model_uri
        self.registered = register_model(run.client, name, run.run_id, model_uri, self.config.monitor, self._rescorer())
        return self.registered.uri

    def _rescorer(self) -> GivenRowsRescorer | None:
        """For the gate, as the flow's: a champion tested on other data is scored on evaluate's rows less
        those it trained or was validated on; this version's own seen rows (fit's) are recorded. Tables only."""
        if self._evaluated is None:
            return None
        from tasks.rescoring import GivenRowsRescorer  # loads the model-loading code: only when registering

        frame, prepared = self._evaluated
        loss = self._given.loss_fn  # the figures compared are then all of the loss this model was tested with
        if isinstance(loss, torch.nn.Module):  # scored on the CPU; the trainer's own stays where it trains
            loss = copy.deepcopy(loss).cpu()
        return GivenRowsRescorer(self.config, replace(prepared, test=prepared.val), frame, seen_frames(self._data), loss)

    def _fitted(self, method: str) -> tuple[FitData, Trained, Run]:
        if self._trained is None:
            raise RuntimeError(f"{method} needs a trained model: call fit first")
        return self._data, self._trained, self._run


@dataclass
class _Fitted:
    config: TrainConfig  # the run's: compile's settings with fit's data, epochs and batch size
    data: FitData
    run: Run
    trained: Trained


class _FitCall:
    """One `fit`: its config, data and callbacks. As a Prefect flow, it is the flow's bound `self`,
    which Prefect never serialises; the flow run's parameters are the JSON settings."""

    def __init__(self, compiled: TrainConfig, given: Given, metrics: list[str], data: tuple, fields: dict[str, Any],
                 callbacks: list[Callback], resume: str | None) -> None:
        self.compiled, self.given, self.metrics = compiled, given, metrics
        self.data, self.callbacks, self.resume = data, callbacks, resume
        self.settings = {name: value for name, value in fields.items() if value is not None}

    @flow(name="fit", description="fitflow.compile(...).fit(...): train Python objects, tracked in MLflow.",
          validate_parameters=False)
    def as_flow(self, settings: dict[str, Any]) -> _Fitted:
        return self.run()

    def run(self) -> _Fitted:
        x, y, target, validation_data, validation_split = self.data
        config = _config({**self.compiled.flat(), **self.settings})
        data = fit_data(x, y, target, validation_data, validation_split, config)
        config = _config({**config.flat(), "data": LABELS[data.kind], "target": target or config.target,
                          "validation_data": LABELS[data.kind] if data.validation_given else None,
                          **({"val_fraction": validation_split} if validation_split is not None else {})})
        _check_metrics(self.metrics, data.prepared.preprocessor.task)
        # The model, the monitor, your metrics and callbacks by import path resolve now, before a run starts: a bad
        # one is an argument error
        _as_value_error(check_before_run, config, data.prepared, self.given)
        _as_value_error(user_callbacks, config.callbacks)
        if self.resume:
            _check_same_settings(self.resume, config)
        with on_own_device(config) as config:  # several GPUs: one no other run trains on
            loaders = run_step(build_loaders_task, config, data.prepared)
            run = run_step(start_run, config, data.prepared, data.record, resume=self.resume, from_python=True,
                           given=self.given)
            objects = {name: _type(value) for name, value in vars(self.given).items() if value is not None and value != []}
            if self.given.metrics:
                objects["metrics"] = [_type(metric) for metric in self.given.metrics]
            with (run_owner.released_at_end(run.checkpoint_dir),
                  tracking.finished_or_failed(run.client, run.run_id, run.checkpoint_dir),
                  system_metrics.sampled(run.client, run.run_id)):
                run.client.set_tag(run.run_id, "fitflow.objects", json.dumps(objects))  # what replaced config fields
                trained = train_in_run(config, data.prepared, loaders, run, self.callbacks, self.given)
        return _Fitted(config, data, run, trained)


def _check_metrics(metrics: list[str], task: str) -> None:
    known = METRICS[task]
    wrong = [name for name in metrics if name not in known]
    if wrong:
        raise ValueError(f"metrics: {wrong[0]!r} is not a {task} metric; a {task} run logs {', '.join(known)}")


def _check_same_settings(run_id: str, config: TrainConfig) -> None:
    """resume continues a run with its own settings: the trainer's must be the same."""
    logged = _as_value_error(config_of_run, run_id, config.launch, from_python=True)
    ours, theirs = config.model_dump(exclude={"launch"}), logged.model_dump(exclude={"launch"})
    differ = [f"{name} ({ours[name]!r}, the run has {theirs[name]!r})" for name in ours if ours[name] != theirs[name]]
    if differ:
        raise ValueError(f"resume: run {run_id} was trained with other settings: {'; '.join(differ)}; "
                         "compile and fit as it was, or start a new run")


def _check_rebuilds(trained: Trained) -> None:
    """The logged model rebuilds the model's class from its import path, sizes and model_kwargs: try it now."""
    spec = trained.spec
    try:
        rebuilt = build_model(spec)
        rebuilt.load_state_dict(trained.model.state_dict())
    except (ConfigError, RuntimeError, TypeError) as err:
        sizes = ", ".join(name for name in ("in_features", "out_features", "in_shape") if spec.get(name)) or "no sizes"
        raise ValueError(f"log_model rebuilds the model as {spec['model']} with {sizes} (those its constructor names) "
                         f"and model_kwargs {spec['kwargs']}; that failed: {err}. Define the model as an nn.Module "
                         "subclass in an importable module and pass its other constructor arguments as "
                         "compile(..., model_kwargs={...})") from None


def _config(settings: dict[str, Any]) -> TrainConfig:
    """TrainConfig(**settings); a bad value is a ValueError that names the argument."""
    try:
        return TrainConfig(**settings)
    except ValidationError as err:
        message = describe_validation_error(err)
        raise ValueError(message.replace("config field", "argument").replace("config value", "value")) from None


def _as_value_error(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """fitflow's own ConfigError (a bad run id, a run that cannot resume) as the ValueError Python callers expect."""
    try:
        return function(*args, **kwargs)
    except ConfigError as err:
        raise ValueError(str(err)) from None


def _type(value: Any) -> str:
    return type(value).__name__ if value is not None else "None"
