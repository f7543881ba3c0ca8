"""Per-epoch metrics from torchmetrics, named as they appear in MLflow (`val_accuracy`, ...), and yours.

Multilabel (a sigmoid per class, tasks/labels.py): `accuracy` is the share of right (row, class)
decisions at the 0.5 threshold (1 - Hamming loss), `subset_accuracy` the share of rows whose
whole label set is right, `f1_micro` F1 over every (row, class) decision, `f1_macro` the mean
of the per-class F1, `auroc` the mean of the per-class AUROC.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torchmetrics
from torchmetrics import classification as tmc
from torchmetrics import regression as tmr

from tasks.errors import ConfigError

if TYPE_CHECKING:
    from tasks.user_code import UserMetric

CLASSIFICATION = ("accuracy", "f1_macro", "auroc")
MULTILABEL = ("accuracy", "subset_accuracy", "f1_micro", "f1_macro", "auroc")
REGRESSION = ("rmse", "mae", "r2")
METRICS = {"classification": CLASSIFICATION, "multilabel": MULTILABEL, "regression": REGRESSION}


def metric_names(task: str, split: str) -> list[str]:
    """Every metric a split logs for a task: `<split>_loss` plus the task's metrics."""
    return [f"{split}_{name}" for name in ("loss", *METRICS[task])]


class TaskMetrics:
    """Accumulates outputs over an epoch; `compute` gives the task's metrics in label space, then
    `extra` (yours, tasks/user_code.py), which get the same inputs."""

    def __init__(self, task: str, n_classes: int = 0, target_mean: float = 0.0, target_std: float = 1.0,
                 extra: Sequence[UserMetric] = ()) -> None:
        self.task = task
        self.extra = list(extra)
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
        for user in self.extra:
            if isinstance(user.metric, torchmetrics.Metric):
                user.metric.to(device)
        return self

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Keep the batch (on its device); the metrics are computed once, in `compute`."""
        self.outputs.append(outputs.float())
        self.targets.append(targets)

    def compute(self) -> dict[str, float]:
        # One update over the whole split instead of one per batch: torchmetrics' per-call
        # overhead (checks, state bookkeeping) costs a third of the validation pass of a small MLP.
        outputs, targets = torch.cat(self.outputs), torch.cat(self.targets)
        rows = [len(batch) for batch in self.targets]
        self.outputs, self.targets = [], []
        if self.task == "classification":
            preds = outputs.softmax(dim=1)
        elif self.task == "multilabel":  # probabilities, thresholded at 0.5 by the F1 and accuracies
            preds, targets = outputs.sigmoid(), targets.long()
        else:  # report regression errors in the target's own units, not the scaled ones
            scale = lambda t: t.float().squeeze(-1) * self.target_std + self.target_mean  # noqa: E731
            preds, targets = scale(outputs), scale(targets)
        self.collection.update(preds, targets)
        values = {name: float(value) for name, value in self.collection.compute().items()}
        self.collection.reset()
        for user in self.extra:
            values[user.name] = _user_value(user, preds, targets, rows)
        return values


def _user_value(user: UserMetric, preds: torch.Tensor, targets: torch.Tensor, rows: list[int]) -> float:
    """A metric of yours over the split: a torchmetrics Metric in one update (it syncs DDP ranks
    itself), a function per batch, averaged by rows (over every rank's rows under DDP)."""
    try:
        if isinstance(user.metric, torchmetrics.Metric):
            user.metric.update(preds, targets)
            value = user.metric.compute()
            user.metric.reset()
        else:
            total = torch.zeros((), dtype=torch.float64, device=preds.device)
            for p, t in zip(preds.split(rows), targets.split(rows), strict=True):
                total += _one_number(user, user.metric(p, t)) * len(t)
            value = _all_ranks_mean(total, sum(rows))
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - your code: say which metric failed on what inputs
        raise ConfigError(f"metric '{user.source}' failed on {tuple(preds.shape)} predictions and {tuple(targets.shape)} "
                          f"targets ({type(err).__name__}: {err}); it is called as metric(preds, targets)") from None
    return float(_one_number(user, value))


def _one_number(user: UserMetric, value: object) -> torch.Tensor:
    value = torch.as_tensor(value)
    if value.numel() != 1:
        raise ConfigError(f"metric '{user.source}' returned shape {tuple(value.shape)}; a metric must return one "
                          "number per call (average per-class values, e.g. average='macro')")
    return value.reshape(()).double()


def _all_ranks_mean(total: torch.Tensor, rows: int) -> torch.Tensor:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return total / rows
    both = torch.stack([total, torch.tensor(float(rows), dtype=torch.float64, device=total.device)])
    torch.distributed.all_reduce(both)
    return both[0] / both[1]
