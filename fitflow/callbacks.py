"""Callbacks for `Trainer.fit(callbacks=[...])`: Keras' names over fitflow's one set of callbacks.

`EarlyStopping` is a setting, not a second early stopper: `fit` puts `monitor`, `patience` and
`min_delta` into the run's config, so the engine's own early stopping, best weights and best
checkpoint (tasks/callbacks.py) use them, a resumed run restores them, and MLflow records them
as params. fitflow always restores the best weights at the end (Keras' restore_best_weights=True).

Your own callbacks subclass `Callback` and get the `FitState` (epoch, step, logs, model,
optimizer; set `state.stop = True` to stop) in `on_fit_start`, `on_epoch_start`,
`on_train_batch_end(state, batch, loss)`, `on_epoch_end` and `on_fit_end` (docs/training-loop.md
says when each runs and what it sees). Their epoch hooks run after the epoch is logged to MLflow
and checkpointed; a batch hook costs nothing unless your class overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.callbacks import Callback, FitState

__all__ = ["Callback", "EarlyStopping", "FitState"]


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when `monitor` (val_loss, val_accuracy, ...) has not improved by `min_delta` for `patience` epochs."""

    monitor: str = "val_loss"
    patience: int = 5
    min_delta: float = 0.0

    def config_fields(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "patience": self.patience, "min_delta": self.min_delta}
