"""A user's own callbacks, losses and metrics, named by import path in tests (`user_code_examples:RecordCalls`)."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from tasks.callbacks import Callback, FitState


class RecordCalls(Callback):
    """Appends one JSON line per hook call, with what the state holds, to the file $RECORD_CALLS_TO."""

    def _record(self, hook: str, state: FitState, **more) -> None:
        line = {"hook": hook, "epoch": state.epoch, "step": state.step, "batches": state.batches,
                "logs": sorted(state.logs), **more}
        with open(os.environ["RECORD_CALLS_TO"], "a", encoding="utf-8") as file:
            file.write(json.dumps(line) + "\n")

    def on_fit_start(self, state: FitState) -> None:
        self._record("on_fit_start", state)

    def on_epoch_start(self, state: FitState) -> None:
        self._record("on_epoch_start", state)

    def on_train_batch_end(self, state: FitState, batch: int, loss: torch.Tensor) -> None:
        self._record("on_train_batch_end", state, batch=batch, loss=float(loss), loss_shape=list(loss.shape),
                     requires_grad=loss.requires_grad, training=state.model.training,
                     lr=state.optimizer.param_groups[0]["lr"])

    def on_epoch_end(self, state: FitState) -> None:
        self._record("on_epoch_end", state, history=len(state.history))

    def on_fit_end(self, state: FitState) -> None:
        self._record("on_fit_end", state)


class CrashAt(Callback):
    """Raises after an epoch is journaled and checkpointed: a crash between two epochs."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, state) -> None:
        if state.epoch == self.epoch:
            raise RuntimeError(f"simulated crash after epoch {self.epoch}")


class NotACallback:
    def on_epoch_end(self, state) -> None: ...


def label_smoothed_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, label_smoothing=0.1)


class NeedsArguments(nn.Module):
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight


def error_rate(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Share of rows whose most probable class is wrong."""
    return (preds.argmax(dim=1) != targets).float().mean()


error_rate.higher_is_better = False


def per_class_hits(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One value per class: not one number, so not a metric fitflow can log."""
    return torch.stack([(preds.argmax(dim=1) == c).float().mean() for c in range(preds.shape[1])])
