"""Per-epoch metrics from torchmetrics, named as they appear in MLflow (`val_accuracy`, ...), and yours.

Multilabel (a sigmoid per class, tasks/labels.py): `accuracy` is the share of right (row, class)
decisions at the 0.5 threshold (1 - Hamming loss), `subset_accuracy` the share of rows whose
whole label set is right, `f1_micro` F1 over every (row, class) decision, `f1_macro` the mean
of the per-class F1, `auroc` the mean of the per-class AUROC.

`auroc` (both tasks) over more than 5,000 rows is `BinnedAUROC`: the AUROC of the scores rounded
to 9 significant bits, from per-class histograms instead of sorts; see its docstring for how far
it can differ from torchmetrics' exact value (docs/benchmarks.md has the measured differences).
Up to 5,000 rows it is torchmetrics' exact value.
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
                "auroc": BinnedAUROC(n_classes) if n_classes <= BinnedAUROC.MAX_CLASSES else tmc.MulticlassAUROC(num_classes=n_classes),
            }
        elif task == "multilabel":
            collection = {
                "accuracy": tmc.MultilabelAccuracy(num_labels=n_classes, average="micro"),
                "subset_accuracy": tmc.MultilabelExactMatch(num_labels=n_classes),
                "f1_micro": tmc.MultilabelF1Score(num_labels=n_classes, average="micro"),
                "f1_macro": tmc.MultilabelF1Score(num_labels=n_classes, average="macro"),
                "auroc": (BinnedAUROC(n_classes, multilabel=True) if n_classes <= BinnedAUROC.MAX_CLASSES
                          else tmc.MultilabelAUROC(num_labels=n_classes, average="macro")),
            }
        else:
            collection = {
                "rmse": tmr.MeanSquaredError(squared=False),
                "mae": tmr.MeanAbsoluteError(),
                "r2": tmr.R2Score(),
            }
        self.collection = torchmetrics.MetricCollection(collection)
        # BinnedAUROC's ties weigh most on small splits: there the exact AUROC, cheap at that size, is reported
        self.exact_auroc = (None if not isinstance(collection.get("auroc"), BinnedAUROC) else
                            tmc.MultilabelAUROC(num_labels=n_classes) if task == "multilabel" else
                            tmc.MulticlassAUROC(num_classes=n_classes))
        self.outputs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def to(self, device: torch.device) -> TaskMetrics:
        self.collection.to(device)
        if self.exact_auroc is not None:
            self.exact_auroc.to(device)
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
        if self.exact_auroc is not None and self.collection["auroc"].rows <= BinnedAUROC.EXACT_BELOW_ROWS:
            self.exact_auroc.update(preds, targets)  # every rank decides alike: `rows` counts all of them
            values["auroc"] = float(self.exact_auroc.compute())
            self.exact_auroc.reset()
        self.collection.reset()
        for user in self.extra:
            values[user.name] = _user_value(user, preds, targets, rows)
        return values


class BinnedAUROC(torchmetrics.Metric):
    """Macro AUROC, one class (or label) against the rest, from per-class histograms of the scores.

    torchmetrics' exact AUROC sorts every class's scores: about 30 ms per epoch over 20k rows and 10
    classes here, the largest single cost of fitflow's epoch (docs/benchmarks.md). This one counts the
    scores of each class's positives and negatives into bins (one `bincount`, O(rows), about 2 ms)
    and takes the AUROC of the binned scores: each (positive, negative) pair counts 1 when the
    positive's bin is higher, 1/2 when the bins are equal, the rule the exact AUROC applies to
    equal scores. The bins are 9 significant bits (a float32's exponent and top 8 mantissa bits)
    of the score up to 0.5 and of 1 - score above it: scores share a bin only when they are within
    2^-8 (0.4%) of each other relatively, or of 1, at any scale. So the value differs from the exact
    one only through the pairs of a positive and a negative in one bin, by at most half their share
    of all pairs (the bound `per_class` returns): measured, under 3e-5 on splits over 5,000 rows
    (tests/test_metrics_auroc.py, docs/benchmarks.md); smaller splits get the exact value.

    A class with no positives or no negatives counts 0 in the mean, as torchmetrics counts it. The
    histograms add up across DDP ranks (no gathering of every rank's scores).
    """

    higher_is_better = True
    full_state_update = False
    SHIFT = 23 - 8  # float32: 23 mantissa bits; keep 8 (sign, exponent and those order it as the value)
    LOW = 126 << 8  # the bin of 0.5; every score up to it has its own bits' bin
    # Above 0.5, 1 - score is exact and a multiple of 2^-24 (the float32 spacing there): its bins run
    # from that of 2^-24 (1) to that of 0.5 (TOP), 0 is 1.0's; they count down from the top bin.
    TOP = LOW - (103 << 8) + 1
    BINS = LOW + TOP + 1
    MAX_CLASSES = 64  # 2 x 64 x BINS counts = 39 MB; more classes use torchmetrics' exact AUROC
    # Splits up to this many rows report torchmetrics' exact AUROC (TaskMetrics): a few ms to sort
    # there, and on a small split one tied pair is a large share of all pairs (up to 6e-3 measured
    # on a 27-row split of an untrained model); above it, the binned value's differences measured
    # were under 3e-5 (docs/benchmarks.md)
    EXACT_BELOW_ROWS = 5000

    def __init__(self, num_classes: int, multilabel: bool = False) -> None:
        super().__init__()
        self.num_classes, self.multilabel, self.rows = num_classes, multilabel, 0
        self.add_state("counts", torch.zeros(num_classes, 2, self.BINS, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        """`scores`: (rows, classes) probabilities; `targets`: class indices, or (rows, labels) 0/1."""
        positive = targets.long() if self.multilabel else torch.nn.functional.one_hot(targets, self.num_classes)
        scores = scores.float()
        low = self._bits(scores).clamp_(0, self.LOW)
        high = self.LOW + self.TOP - (self._bits(1 - scores) - (103 << 8) + 1).clamp_(0, self.TOP)
        bins = torch.where(scores > 0.5, high, low)
        offsets = torch.arange(self.num_classes, device=scores.device) * (2 * self.BINS)
        index = bins + positive * self.BINS + offsets
        self.counts += torch.bincount(index.flatten(), minlength=self.counts.numel()).view_as(self.counts)

    def _bits(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.contiguous().view(torch.int32) >> self.SHIFT

    def compute(self) -> torch.Tensor:
        self.rows = int(self.counts[0].sum())  # under DDP, every rank's (compute sees the summed counts)
        return self.per_class()[0].mean()

    def per_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each class's AUROC, and the most it can differ from the exact AUROC (half the share of
        (positive, negative) pairs that share a bin)."""
        negatives, positives = self.counts.double().unbind(1)
        below = negatives.cumsum(1) - negatives  # negatives in lower bins than each bin
        pairs = positives.sum(1) * negatives.sum(1)
        auroc = (positives * (below + 0.5 * negatives)).sum(1) / pairs
        bound = 0.5 * (positives * negatives).sum(1) / pairs
        return auroc.nan_to_num(0.0), bound.nan_to_num(0.0)


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
