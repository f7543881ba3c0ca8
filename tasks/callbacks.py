"""Callbacks: everything around the training loop that is not the loop itself.

`fit` calls the hooks in this order: `on_fit_start`; per epoch `on_epoch_start`, then
`on_train_batch_end` after each training batch, then `on_epoch_end` after validation (the
epoch's logs are complete); `on_fit_end` always, also after an error. A callback may set
`state.stop`. Order matters only where noted in `fit`'s caller. A callback with state that a
resumed run needs (best score, patience left, the LR schedule) saves it through
`state_dict`/`load_state_dict`; `Checkpoints` (tasks/checkpoints.py) writes it every epoch.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tasks.durable_files import atomic_file
from tasks.errors import ConfigError

log = logging.getLogger("fitflow")


@dataclass
class FitState:
    """What the hooks see; `fit` keeps it current."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    # The epoch running, from on_epoch_start to on_epoch_end (then completed); before the first,
    # 0 at the start and k after resuming from epoch k's checkpoint.
    epoch: int = 0
    step: int = 0  # optimizer steps taken over all epochs: the global step (one per accumulate_grad_batches batches)
    batches: int = 0  # training batches per epoch
    logs: dict[str, float] = field(default_factory=dict)
    stop: bool = False
    history: list[dict[str, float]] = field(default_factory=list)  # every completed epoch's logs
    scaler: torch.amp.GradScaler | None = None


class Callback:
    def on_fit_start(self, state: FitState) -> None: ...

    def on_epoch_start(self, state: FitState) -> None: ...

    def on_train_batch_end(self, state: FitState, batch: int, loss: torch.Tensor) -> None:
        """After training batch `batch` (0-based within the epoch): its backward has run and, when it
        ended a group of `accumulate_grad_batches` batches, the optimizer step too (`state.step`
        counts them). `loss` is the batch's mean loss, detached, still on the device: `float(loss)`
        waits for the device (a sync per call), so read it only when it is needed.

        Costs nothing unless overridden: `fit` calls it only on the callbacks whose class overrides it.
        """

    def on_epoch_end(self, state: FitState) -> None: ...

    def on_fit_end(self, state: FitState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, saved: dict[str, Any]) -> None: ...


def uses_hook(callback: Callback, hook: str) -> bool:
    """Whether the callback's class overrides `hook` (the base class's hooks do nothing)."""
    return getattr(type(callback), hook) is not getattr(Callback, hook)


class Monitor:
    """Is this value of the monitored metric an improvement? Losses and errors go down.

    `lower_is_better` None: from the name (loss, rmse, mae, error: lower); a metric of your own
    says it (a torchmetrics Metric's `higher_is_better`, tasks/user_code.py).
    """

    def __init__(self, metric: str, min_delta: float = 0.0, lower_is_better: bool | None = None) -> None:
        self.metric, self.min_delta = metric, min_delta
        named_lower = metric.endswith(("loss", "rmse", "mae", "error"))
        self.lower_is_better = named_lower if lower_is_better is None else lower_is_better
        self.best = math.inf if self.lower_is_better else -math.inf
        self.best_epoch = 0

    def value(self, logs: dict[str, float]) -> float:
        if self.metric not in logs:
            raise ConfigError(f"monitor '{self.metric}' is not a metric of this run; use one of {', '.join(sorted(logs))}")
        return logs[self.metric]

    def update(self, logs: dict[str, float], epoch: int) -> bool:
        value = self.value(logs)
        better = value < self.best - self.min_delta if self.lower_is_better else value > self.best + self.min_delta
        if better:
            self.best, self.best_epoch = value, epoch
        return better

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.best, self.best_epoch = saved["best"], saved["best_epoch"]


class BestWeights(Callback):
    """Keeps the best weights; at the end restores them and writes the best checkpoint."""

    def __init__(self, monitor: Monitor, checkpoint_path: str | Path | None = None) -> None:
        self.monitor = Monitor(monitor.metric, lower_is_better=monitor.lower_is_better)  # any better epoch is kept
        self.path = Path(checkpoint_path) if checkpoint_path else None
        self.best_state: dict[str, Any] | None = None
        self.start_logs: dict[str, float] = {}  # the validation logs of the weights before epoch 1, when given

    def consider_start(self, logs: dict[str, float], model: torch.nn.Module) -> None:
        """The weights before the first epoch as epoch 0, a candidate like any epoch: for a network that starts
        at a fitted model (the linear baseline's), a run none of whose epochs does better ends where it started."""
        self.start_logs = dict(logs)
        if self.monitor.update(logs, 0):
            self.best_state = copy.deepcopy(model.state_dict())

    def on_epoch_end(self, state: FitState) -> None:
        if self.monitor.update(state.logs, state.epoch):
            weights = state.model.state_dict()
            if _same_layout(self.best_state, weights):  # into the copy kept so far: no allocation per better epoch
                for key, tensor in weights.items():
                    self.best_state[key].copy_(tensor)
            else:
                self.best_state = copy.deepcopy(weights)

    def on_fit_end(self, state: FitState) -> None:
        if self.best_state is None:
            return
        state.model.load_state_dict(self.best_state)
        log.info("restored the best weights: epoch %d%s, %s=%.4f", self.monitor.best_epoch,
                 "" if self.monitor.best_epoch else " (the start)", self.monitor.metric, self.monitor.best)
        if self.path is not None:  # once, at the end: the epoch checkpoints already hold the best state
            best_epoch = self.monitor.best_epoch
            best_logs = state.history[best_epoch - 1] if best_epoch and state.history else self.start_logs
            save_checkpoint(self.path, {"epoch": self.monitor.best_epoch, "logs": best_logs, "model": self.best_state,
                                        "monitor": self.monitor.metric, "score": self.monitor.best})

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "best_state": self.best_state, "start_logs": self.start_logs}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.monitor.load_state_dict(saved["monitor"])
        self.best_state = saved["best_state"]
        self.start_logs = saved.get("start_logs", {})  # checkpoints written before the start was a candidate


def _same_layout(kept: dict[str, Any] | None, weights: dict[str, Any]) -> bool:
    """Whether `weights` can be copied into `kept` tensor by tensor (same keys, shapes and dtypes)."""
    return kept is not None and kept.keys() == weights.keys() and all(
        isinstance(t, torch.Tensor) and isinstance(kept[k], torch.Tensor) and kept[k].shape == t.shape
        and kept[k].dtype == t.dtype for k, t in weights.items())


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """torch.save, atomically and durably (tasks/durable_files.py): a crash or a power loss never
    leaves a half-written checkpoint under the real name; on return the file is on disk."""
    with atomic_file(path) as file:
        torch.save(checkpoint, file)


class EarlyStopping(Callback):
    """Stops when the monitored metric has not improved by min_delta for `patience` epochs."""

    def __init__(self, monitor: Monitor, patience: int) -> None:
        self.monitor, self.patience, self.waited = monitor, patience, 0

    def on_epoch_end(self, state: FitState) -> None:
        self.waited = 0 if self.monitor.update(state.logs, state.epoch) else self.waited + 1
        if self.waited >= self.patience:
            log.info("early stopping at epoch %d: %s has not improved for %d epochs", state.epoch, self.monitor.metric, self.patience)
            state.stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "waited": self.waited}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.monitor.load_state_dict(saved["monitor"])
        self.waited = saved["waited"]


class LRSchedule(Callback):
    """Steps the learning-rate scheduler once per epoch (plateau: on the monitored metric)."""

    def __init__(self, scheduler: Any, monitor: Monitor) -> None:
        self.scheduler, self.monitor = scheduler, monitor

    def on_epoch_end(self, state: FitState) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(self.monitor.value(state.logs))
        else:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(saved["scheduler"])


class StepLRSchedule(LRSchedule):
    """Steps a per-step scheduler (warmup_cosine, onecycle) after each optimizer step, as
    `scheduler.step()` right after `optimizer.step()` in a hand-written loop. Its step count is its
    state: a resumed run continues the schedule where the checkpointed epoch left it."""

    def on_train_batch_end(self, state: FitState, batch: int, loss: torch.Tensor) -> None:
        if state.step > self.scheduler.last_epoch:  # this batch ended a group: the optimizer stepped
            self.scheduler.step()

    def on_epoch_end(self, state: FitState) -> None:
        """Nothing at the epoch's end: the schedule moved with every step."""


def deciding_callbacks(monitor: str, min_delta: float, patience: int, scheduler: Any, best_path: Path | None,
                       per_step: bool = False, lower_is_better: bool | None = None) -> dict[str, Callback]:
    """Best weights, early stopping (patience > 0) and the LR schedule (a scheduler; `per_step`: it
    steps with the optimizer, not per epoch), by the names an epoch checkpoint stores their state
    under: single-process and DDP training both build them here, so either resumes the other's
    checkpoints. The three share one Monitor."""
    shared = Monitor(monitor, min_delta, lower_is_better)
    deciding: dict[str, Callback] = {"best_weights": BestWeights(shared, best_path)}
    if patience > 0:
        deciding["early_stopping"] = EarlyStopping(shared, patience)
    if scheduler is not None:
        deciding["lr_schedule"] = (StepLRSchedule if per_step else LRSchedule)(scheduler, shared)
    return deciding


def start_as_epoch_zero(deciding: dict[str, Callback], logs: dict[str, float], model: torch.nn.Module) -> None:
    """The validation `logs` of the weights before training count as epoch 0: for the best weights (the start is
    kept unless an epoch does better) and for early stopping (patience counts from the start)."""
    if isinstance(best := deciding["best_weights"], BestWeights):
        best.consider_start(logs, model)
    if isinstance(early := deciding.get("early_stopping"), EarlyStopping):
        early.monitor.update(logs, 0)


def progress_callback(mode: str) -> Callback | None:
    """The progress display of `progress`: auto is the bar on a terminal (stderr), lines elsewhere."""
    if mode == "off":
        return None
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return ProgressBar()
    return Progress()


class Progress(Callback):
    """One plain log line per epoch: what CI, Prefect's logs and files get."""

    def on_epoch_end(self, state: FitState) -> None:
        log.info("epoch %d/%d  %s", state.epoch, state.epochs, _logs_text(state.logs))


class ProgressBar(Callback):
    """A bar that moves with each training batch of the epoch, on a terminal; each finished epoch
    leaves its line of metrics above it. Each batch only advances a counter; rich redraws from
    its own thread, ten times a second."""

    def __init__(self, console: Any = None) -> None:
        self.console = console  # rich's Console; None: stderr
        self.bar: Any = None

    def on_fit_start(self, state: FitState) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                       MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=True)
        self.bar.start()
        self.task = self.bar.add_task("", total=state.batches, epoch=state.epoch + 1, epochs=state.epochs)

    def on_epoch_start(self, state: FitState) -> None:
        self.bar.reset(self.task, total=state.batches, epoch=state.epoch, epochs=state.epochs)  # reset replaces the fields

    def on_train_batch_end(self, state: FitState, batch: int, loss: torch.Tensor) -> None:
        self.bar.advance(self.task)

    def on_epoch_end(self, state: FitState) -> None:
        self.bar.console.print(f"epoch {state.epoch}/{state.epochs}  {_logs_text(state.logs)}", highlight=False)

    def on_fit_end(self, state: FitState) -> None:
        if self.bar is not None:
            self.bar.stop()


def _logs_text(logs: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in logs.items())
