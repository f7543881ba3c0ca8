"""Callbacks: everything around the training loop that is not the loop itself.

A callback sees the `FitState` after each epoch (the epoch's logs, the model, the optimizer)
and may set `state.stop`. Order matters only where noted in `fit`'s caller.
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
    epoch: int = 0
    logs: dict[str, float] = field(default_factory=dict)
    stop: bool = False


class Callback:
    def on_fit_start(self, state: FitState) -> None: ...

    def on_epoch_end(self, state: FitState) -> None: ...

    def on_fit_end(self, state: FitState) -> None: ...


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


class BestWeights(Callback):
    """Keeps the best weights (restored at the end) and saves the best checkpoint to disk."""

    def __init__(self, monitor: Monitor, checkpoint_path: str | Path | None = None) -> None:
        self.monitor = Monitor(monitor.metric)  # improvement without min_delta: any better epoch is kept
        self.path = Path(checkpoint_path) if checkpoint_path else None
        self.best_state: dict[str, Any] | None = None

    def on_epoch_end(self, state: FitState) -> None:
        if not self.monitor.update(state.logs, state.epoch):
            return
        self.best_state = copy.deepcopy(state.model.state_dict())
        if self.path is not None:
            save_checkpoint(self.path, state, monitor=self.monitor.metric, score=self.monitor.best)

    def on_fit_end(self, state: FitState) -> None:
        if self.best_state is not None:
            state.model.load_state_dict(self.best_state)
            log.info("restored the best weights: epoch %d, %s=%.4f", self.monitor.best_epoch, self.monitor.metric, self.monitor.best)


class LastCheckpoint(Callback):
    """Writes the state after every epoch: a cancelled or crashed run keeps its last epoch."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_epoch_end(self, state: FitState) -> None:
        save_checkpoint(self.path, state)


def save_checkpoint(path: Path, state: FitState, **extra: Any) -> None:
    """Model and optimizer state dicts, the epoch and its logs; written atomically."""
    checkpoint = {
        "epoch": state.epoch,
        "logs": dict(state.logs),
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(checkpoint, partial)
    os.replace(partial, path)  # atomic: a crash never leaves a half-written checkpoint


class EarlyStopping(Callback):
    """Stops when the monitored metric has not improved by min_delta for `patience` epochs."""

    def __init__(self, monitor: Monitor, patience: int) -> None:
        self.monitor, self.patience, self.waited = monitor, patience, 0

    def on_epoch_end(self, state: FitState) -> None:
        self.waited = 0 if self.monitor.update(state.logs, state.epoch) else self.waited + 1
        if self.waited >= self.patience:
            log.info("early stopping at epoch %d: %s has not improved for %d epochs", state.epoch, self.monitor.metric, self.patience)
            state.stop = True


class LRSchedule(Callback):
    """Steps the learning-rate scheduler once per epoch (plateau: on the monitored metric)."""

    def __init__(self, scheduler: Any, monitor: Monitor) -> None:
        self.scheduler, self.monitor = scheduler, monitor

    def on_epoch_end(self, state: FitState) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(self.monitor.value(state.logs))
        else:
            self.scheduler.step()


class Progress(Callback):
    """A progress bar on a terminal; one plain log line per epoch otherwise (CI, Prefect)."""

    def __init__(self, interactive: bool | None = None) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar: Any = None

    def on_fit_start(self, state: FitState) -> None:
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

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
