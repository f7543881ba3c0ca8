"""Per-epoch metrics from torchmetrics, named as they appear in MLflow (`val_accuracy`, ...).

Multilabel (a sigmoid per class, tasks/labels.py): `accuracy` is the share of right (row, class)
decisions at the 0.5 threshold (1 - Hamming loss), `subset_accuracy` the share of rows whose
whole label set is right, `f1_micro` F1 over every (row, class) decision, `f1_macro` the mean
of the per-class F1, `auroc` the mean of the per-class AUROC.
"""

from __future__ import annotations

import torch
import torchmetrics
from torchmetrics import classification as tmc
from torchmetrics import regression as tmr

CLASSIFICATION = ("accuracy", "f1_macro", "auroc")
MULTILABEL = ("accuracy", "subset_accuracy", "f1_micro", "f1_macro", "auroc")
REGRESSION = ("rmse", "mae", "r2")
METRICS = {"classification": CLASSIFICATION, "multilabel": MULTILABEL, "regression": REGRESSION}


def metric_names(task: str, split: str) -> list[str]:
    """Every metric a split logs for a task: `<split>_loss` plus the task's metrics."""
    return [f"{split}_{name}" for name in ("loss", *METRICS[task])]


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
        elif task == "multilabel":
            collection = {
                "accuracy": tmc.MultilabelAccuracy(num_labels=n_classes, average="micro"),
                "subset_accuracy": tmc.MultilabelExactMatch(num_labels=n_classes),
                "f1_micro": tmc.MultilabelF1Score(num_labels=n_classes, average="micro"),
                "f1_macro": tmc.MultilabelF1Score(num_labels=n_classes, average="macro"),
                "auroc": tmc.MultilabelAUROC(num_labels=n_classes, average="macro"),
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
        elif self.task == "multilabel":  # probabilities, thresholded at 0.5 by the F1 and accuracies
            self.collection.update(outputs.sigmoid(), targets.long())
        else:  # report regression errors in the target's own units, not the scaled ones
            scale = lambda t: t.float().squeeze(-1) * self.target_std + self.target_mean  # noqa: E731
            self.collection.update(scale(outputs), scale(targets))
        values = {name: float(value) for name, value in self.collection.compute().items()}
        self.collection.reset()
        return values
