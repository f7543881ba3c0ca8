"""Per-epoch metrics from torchmetrics, named as they appear in MLflow (`val_accuracy`, ...)."""

from __future__ import annotations

import torch
import torchmetrics
from torchmetrics import classification as tmc
from torchmetrics import regression as tmr

CLASSIFICATION = ("accuracy", "f1_macro", "auroc")
REGRESSION = ("rmse", "mae", "r2")


def metric_names(task: str, split: str) -> list[str]:
    """Every metric a split logs for a task: `<split>_loss` plus the task's metrics."""
    return [f"{split}_{name}" for name in ("loss", *(CLASSIFICATION if task == "classification" else REGRESSION))]


class TaskMetrics:
    """Accumulates outputs over an epoch; `compute` gives the task's metrics in label space."""

    def __init__(self, task: str, n_classes: int = 0, target_mean: float = 0.0, target_std: float = 1.0) -> None:
        self.task = task
        self.target_mean, self.target_std = target_mean, target_std
        if task == "classification":
            collection = {
                "accuracy": tmc.MulticlassAccuracy(num_classes=n_classes, average="micro"),
                "f1_macro": tmc.MulticlassF1Score(num_classes=n_classes, average="macro"),
                "auroc": tmc.MulticlassAUROC(num_classes=n_classes),
            }
        else:
            collection = {
                "rmse": tmr.MeanSquaredError(squared=False),
                "mae": tmr.MeanAbsoluteError(),
                "r2": tmr.R2Score(),
            }
        self.collection = torchmetrics.MetricCollection(collection)
        self.outputs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def to(self, device: torch.device) -> TaskMetrics:
        self.collection.to(device)
        return self

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Keep the batch (on its device); the metrics are computed once, in `compute`."""
        self.outputs.append(outputs.float())
        self.targets.append(targets)

    def compute(self) -> dict[str, float]:
        # One update over the whole split instead of one per batch: torchmetrics' per-call
        # overhead (checks, state bookkeeping) costs a third of the validation pass of a small MLP.
        outputs, targets = torch.cat(self.outputs), torch.cat(self.targets)
        self.outputs, self.targets = [], []
        if self.task == "classification":
            self.collection.update(outputs.softmax(dim=1), targets)
        else:  # report regression errors in the target's own units, not the scaled ones
            scale = lambda t: t.float().squeeze(-1) * self.target_std + self.target_mean  # noqa: E731
            self.collection.update(scale(outputs), scale(targets))
        values = {name: float(value) for name, value in self.collection.compute().items()}
        self.collection.reset()
        return values
