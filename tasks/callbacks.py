"""Callbacks: everything around the training loop that is not the loop itself.

A callback sees the `FitState` after each epoch (the epoch's logs, the model, the optimizer)
and may set `state.stop`. Order matters only where noted in `fit`'s caller. A callback with
state that a resumed run needs (best score, patience left, the LR schedule) saves it through
`state_dict`/`load_state_dict`; `Checkpoints` (tasks/checkpoints.py) writes it every epoch.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tasks.errors import ConfigError

log = logging.getLogger("fitflow")


@dataclass
class FitState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    epoch: int = 0  # the last completed epoch: 0 at the start, k after resuming from epoch k
    logs: dict[str, float] = field(default_factory=dict)
    stop: bool = False
    history: list[dict[str, float]] = field(default_factory=list)  # every completed epoch's logs
    scaler: torch.amp.GradScaler | None = None


class Callback:
    def on_fit_start(self, state: FitState) -> None: ...

    def on_epoch_end(self, state: FitState) -> None: ...

    def on_fit_end(self, state: FitState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, saved: dict[str, Any]) -> None: ...


class Monitor:
    """Is this value of the monitored metric an improvement? Losses and errors go down."""

    def __init__(self, metric: str, min_delta: float = 0.0) -> None:
        self.metric, self.min_delta = metric, min_delta
        self.lower_is_better = metric.endswith(("loss", "rmse", "mae"))
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
        self.monitor = Monitor(monitor.metric)  # improvement without min_delta: any better epoch is kept
        self.path = Path(checkpoint_path) if checkpoint_path else None
        self.best_state: dict[str, Any] | None = None

    def on_epoch_end(self, state: FitState) -> None:
        if self.monitor.update(state.logs, state.epoch):
            self.best_state = copy.deepcopy(state.model.state_dict())

    def on_fit_end(self, state: FitState) -> None:
        if self.best_state is None:
            return
        state.model.load_state_dict(self.best_state)
        log.info("restored the best weights: epoch %d, %s=%.4f", self.monitor.best_epoch, self.monitor.metric, self.monitor.best)
        if self.path is not None:  # once, at the end: the epoch checkpoints already hold the best state
            best_logs = state.history[self.monitor.best_epoch - 1] if state.history else {}
            save_checkpoint(self.path, {"epoch": self.monitor.best_epoch, "logs": best_logs, "model": self.best_state,
                                        "monitor": self.monitor.metric, "score": self.monitor.best})

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "best_state": self.best_state}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.monitor.load_state_dict(saved["monitor"])
        self.best_state = saved["best_state"]


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """torch.save, atomically: write a partial file, then rename it over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(checkpoint, partial)
    os.replace(partial, path)  # a crash never leaves a half-written checkpoint under the real name


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


def deciding_callbacks(monitor: str, min_delta: float, patience: int, scheduler: Any,
                       best_path: Path | None) -> dict[str, Callback]:
    """Best weights, early stopping (patience > 0) and the LR schedule (a scheduler), by the names
    an epoch checkpoint stores their state under: single-process and DDP training both build them
    here, so either resumes the other's checkpoints. The three share one Monitor."""
    shared = Monitor(monitor, min_delta)
    deciding: dict[str, Callback] = {"best_weights": BestWeights(shared, best_path)}
    if patience > 0:
        deciding["early_stopping"] = EarlyStopping(shared, patience)
    if scheduler is not None:
        deciding["lr_schedule"] = LRSchedule(scheduler, shared)
    return deciding


class Progress(Callback):
    """A progress bar on a terminal; one plain log line per epoch otherwise (CI, Prefect)."""

    def __init__(self, interactive: bool | None = None) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar: Any = None

    def on_fit_start(self, state: FitState) -> None:
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("epoch"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                           TextColumn("{task.description}"), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("", total=state.epochs)

    def on_epoch_end(self, state: FitState) -> None:
        text = "  ".join(f"{k}={v:.4f}" for k, v in state.logs.items())
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=text)
        else:
            log.info("epoch %d/%d  %s", state.epoch, state.epochs, text)

    def on_fit_end(self, state: FitState) -> None:
        if self.bar is not None:
            self.bar.stop()
