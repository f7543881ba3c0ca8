"""Per-epoch metrics, named as they appear in MLflow (`val_accuracy`, ...), and yours.

The built-in metrics are plain torch: each is a ratio of sums (per-class counts of right and
predicted labels, error sums), so under DDP one all-reduce of those sums gives every rank the
value of the whole split. torchmetrics (and the scipy, torchvision and matplotlib it imports,
about 1 s of CPU per command, docs/benchmarks.md) is imported only by a metric of yours that is
one. Values equal torchmetrics' (`MulticlassAccuracy(average="micro")`, `MulticlassF1Score(average=
"macro")`, `MulticlassAUROC`, their multilabel forms, `MeanSquaredError(squared=False)`,
`MeanAbsoluteError`, `R2Score`) within float rounding (tests/test_metrics_values.py).

Multilabel (a sigmoid per class, tasks/labels.py): `accuracy` is the share of right (row, class)
decisions at the 0.5 threshold (1 - Hamming loss), `subset_accuracy` the share of rows whose
whole label set is right, `f1_micro` F1 over every (row, class) decision, `f1_macro` the mean
of the per-class F1, `auroc` the mean of the per-class AUROC.

`auroc` (both tasks) over more than 5,000 rows is `BinnedAUROC`: the AUROC of the scores rounded
to 9 significant bits, from per-class histograms instead of sorts; see its docstring for how far
it can differ from the exact value (docs/benchmarks.md has the measured differences). Up to
5,000 rows, and for more than 64 classes, it is the exact value (`exact_auroc`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from tasks.errors import ConfigError
from tasks.user_code import is_torchmetrics_metric

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
    """Keeps the outputs over an epoch; `compute` gives the task's metrics in label space, then
    `extra` (yours, tasks/user_code.py), which get the same inputs."""

    def __init__(self, task: str, n_classes: int = 0, target_mean: float = 0.0, target_std: float = 1.0,
                 extra: Sequence[UserMetric] = ()) -> None:
        self.task, self.n_classes = task, n_classes
        self.extra = list(extra)
        self.target_mean, self.target_std = target_mean, target_std
        self.outputs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def to(self, device: torch.device) -> TaskMetrics:
        for user in self.extra:  # the built-in metrics compute where the outputs are
            if is_torchmetrics_metric(user.metric):
                user.metric.to(device)
        return self

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Keep the batch (on its device); the metrics are computed once, in `compute`."""
        self.outputs.append(outputs.float())
        self.targets.append(targets)

    def compute(self) -> dict[str, float]:
        # One pass over the whole split instead of one per batch: per-call overhead (checks,
        # small kernels) cost a third of the validation pass of a small MLP when it was per batch.
        outputs, targets = torch.cat(self.outputs), torch.cat(self.targets)
        rows = [len(batch) for batch in self.targets]
        self.outputs, self.targets = [], []
        if self.task == "classification":
            preds = outputs.softmax(dim=1)
            values = self._classification(preds, targets)
        elif self.task == "multilabel":  # probabilities, thresholded at 0.5 by the F1 and accuracies
            preds, targets = outputs.sigmoid(), targets.long()
            values = self._multilabel(preds, targets)
        else:  # report regression errors in the target's own units, not the scaled ones
            scale = lambda t: t.float().squeeze(-1) * self.target_std + self.target_mean  # noqa: E731
            preds, targets = scale(outputs), scale(targets)
            values = _regression(preds, targets)
        for user in self.extra:
            values[user.name] = _user_value(user, preds, targets, rows)
        return values

    def _classification(self, preds: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        targets = targets.long()
        values, rows = class_counts(preds, targets, self.n_classes)
        return {**values, "auroc": self.auroc(preds, torch.nn.functional.one_hot(targets, self.n_classes).bool(), rows)}

    def _multilabel(self, preds: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        decided, positive = preds > 0.5, targets == 1
        sums = torch.stack([(decided & positive).sum(0), decided.sum(0), positive.sum(0)])
        whole_rows = torch.stack([(decided == positive).all(dim=1).sum(), torch.tensor(len(preds), device=preds.device)])
        counts = all_ranks_sum(torch.cat([sums.flatten(), whole_rows])).cpu().double()
        hits, said, truth = counts[:-2].view(3, -1)
        exact_rows, rows = counts[-2:]
        wrong = (said + truth - 2 * hits).sum()  # false positives and false negatives
        per_label_f1 = torch.where(said + truth > 0, 2 * hits / (said + truth), 0.0)  # every label counts, as in torchmetrics
        return {"accuracy": 1 - _ratio(wrong, rows * self.n_classes) if rows else 0.0,
                "subset_accuracy": _ratio(exact_rows, rows),
                "f1_micro": _ratio(2 * hits.sum(), (said + truth).sum()), "f1_macro": float(per_label_f1.mean()),
                "auroc": self.auroc(preds, positive, int(rows))}

    def auroc(self, scores: torch.Tensor, positive: torch.Tensor, rows: int) -> float:
        """Macro one-vs-rest AUROC over every rank's rows (`rows` counts them all, so every rank decides alike)."""
        if rows <= BinnedAUROC.EXACT_BELOW_ROWS or self.n_classes > BinnedAUROC.MAX_CLASSES:
            return float(exact_auroc(all_ranks_rows(scores), all_ranks_rows(positive.long()).bool()).mean())
        binned = BinnedAUROC(self.n_classes, multilabel=True, device=scores.device)
        binned.update(scores, positive)
        binned.counts = all_ranks_sum(binned.counts)
        return float(binned.compute())


def class_counts(preds: torch.Tensor, targets: torch.Tensor, n_classes: int) -> tuple[dict[str, float], int]:
    """Accuracy and macro F1 from per-class counts (right, predicted, true), and every rank's rows."""
    predicted = preds.argmax(dim=1)
    right = targets[predicted == targets]
    counts = all_ranks_sum(torch.stack([torch.bincount(right, minlength=n_classes),
                                        torch.bincount(predicted, minlength=n_classes),
                                        torch.bincount(targets, minlength=n_classes)])).cpu().double()
    hits, said, truth = counts.unbind()
    # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (predicted + true); a class neither predicted nor
    # present is left out of the macro mean, as torchmetrics leaves it out
    present = (said + truth) > 0
    f1 = 2 * hits[present] / (said + truth)[present]
    rows = int(truth.sum())
    return {"accuracy": _ratio(hits.sum(), rows), "f1_macro": float(f1.mean()) if len(f1) else 0.0}, rows


def _regression(preds: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """RMSE, MAE and R2 from sums: errors, squared errors, targets, squared targets, rows."""
    wide = torch.float32 if preds.device.type == "mps" else torch.float64  # MPS has no float64
    errors, truth = (preds - targets).to(wide), targets.to(wide)
    sums = all_ranks_sum(torch.stack([errors.square().sum(), errors.abs().sum(), truth.sum(), truth.square().sum(),
                                      torch.tensor(len(preds), dtype=wide, device=preds.device)])).cpu().double()
    squared, absolute, total, total_squared, rows = (float(value) for value in sums)
    return {"rmse": (squared / rows) ** 0.5 if rows else float("nan"), "mae": _ratio(absolute, rows, float("nan")),
            "r2": _r2(squared, total, total_squared, rows)}


def _r2(squared_errors: float, total: float, total_squared: float, rows: float) -> float:
    """1 - residual / total sum of squares, with torchmetrics' rules for near-zero sums (atol 1e-4)."""
    if rows < 2:
        return float("nan")  # no variance to explain (torchmetrics raises here)
    spread = total_squared - total * (total / rows)
    if abs(squared_errors) <= 1e-4:
        return 1.0
    return 0.0 if abs(spread) <= 1e-4 else 1 - squared_errors / spread


def _ratio(part: torch.Tensor | float, whole: torch.Tensor | float, empty: float = 0.0) -> float:
    return float(part) / float(whole) if float(whole) else empty


def exact_auroc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Each column's AUROC of (rows, classes) scores against (rows, classes) bool labels, exactly
    (float64, on the CPU): the Mann-Whitney U of the positives' ranks, equal scores sharing their
    average rank (so a tied (positive, negative) pair counts 1/2, as under the ROC curve's
    trapezoids). A class with no positives or no negatives counts 0, as torchmetrics counts it."""
    chunk = max(1, 2**22 // max(len(scores), 1))  # columns per pass: a few (rows, chunk) tensors at a time
    parts = [_auroc_columns(scores[:, i : i + chunk], positive[:, i : i + chunk]) for i in range(0, scores.shape[1], chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _auroc_columns(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    ordered, order = scores.sort(dim=0)
    is_positive = positive.gather(0, order)
    rows = len(ordered)
    index = torch.arange(rows, device=scores.device).unsqueeze(1).expand_as(ordered)
    starts = torch.ones_like(is_positive)
    starts[1:] = ordered[1:] != ordered[:-1]  # the first row of each run of equal scores
    ends = starts.roll(-1, dims=0)  # the last row of each run
    ends[-1:] = True
    first = torch.where(starts, index, 0).cummax(dim=0).values
    last = torch.where(ends, index, rows - 1).flip(0).cummin(dim=0).values.flip(0)
    # twice each positive's 1-based average rank, summed: integers, exact at any size
    twice_ranks = torch.where(is_positive, first + last + 2, 0).sum(0).cpu()
    positives = is_positive.sum(0).cpu()
    u = (twice_ranks - positives * (positives + 1)).double() / 2
    return (u / (positives * (rows - positives)).double()).nan_to_num(0.0, posinf=0.0)


def all_ranks_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Under DDP, the elementwise sum over every rank (each holds its shard's sums); else `tensor`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def all_ranks_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Under DDP, every rank's rows of `tensor` (shards may differ in length by a row); else `tensor`."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    world = torch.distributed.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([len(tensor)], device=tensor.device))
    longest = int(max(sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: len(tensor)] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([rows[: int(size)] for rows, size in zip(gathered, sizes, strict=True)])


class BinnedAUROC:
    """Macro AUROC, one class (or label) against the rest, from per-class histograms of the scores.

    The exact AUROC sorts every class's scores: about 30 ms per epoch over 20k rows and 10 classes
    here (torchmetrics'), the largest single cost of fitflow's epoch (docs/benchmarks.md). This one
    counts the scores of each class's positives and negatives into bins (one `bincount`, O(rows),
    about 2 ms) and takes the AUROC of the binned scores: each (positive, negative) pair counts 1
    when the positive's bin is higher, 1/2 when the bins are equal, the rule the exact AUROC applies
    to equal scores. The bins are 9 significant bits (a float32's exponent and top 8 mantissa bits)
    of the score up to 0.5 and of 1 - score above it: scores share a bin only when they are within
    2^-8 (0.4%) of each other relatively, or of 1, at any scale. So the value differs from the exact
    one only through the pairs of a positive and a negative in one bin, by at most half their share
    of all pairs (the bound `per_class` returns): measured, under 3e-5 on splits over 5,000 rows
    (tests/test_metrics_auroc.py, docs/benchmarks.md); smaller splits get the exact value.

    A class with no positives or no negatives counts 0 in the mean, as torchmetrics counts it. The
    histograms add up across DDP ranks (TaskMetrics sums them; no gathering of every rank's scores).
    """

    SHIFT = 23 - 8  # float32: 23 mantissa bits; keep 8 (sign, exponent and those order it as the value)
    LOW = 126 << 8  # the bin of 0.5; every score up to it has its own bits' bin
    # Above 0.5, 1 - score is exact and a multiple of 2^-24 (the float32 spacing there): its bins run
    # from that of 2^-24 (1) to that of 0.5 (TOP), 0 is 1.0's; they count down from the top bin.
    TOP = LOW - (103 << 8) + 1
    BINS = LOW + TOP + 1
    MAX_CLASSES = 64  # 2 x 64 x BINS counts = 39 MB; more classes get the exact AUROC
    # Splits up to this many rows report the exact AUROC (TaskMetrics): a few ms to sort there,
    # and on a small split one tied pair is a large share of all pairs (up to 6e-3 measured on a
    # 27-row split of an untrained model); above it, the binned value's differences measured
    # were under 3e-5 (docs/benchmarks.md)
    EXACT_BELOW_ROWS = 5000

    def __init__(self, num_classes: int, multilabel: bool = False, device: torch.device | None = None) -> None:
        self.num_classes, self.multilabel = num_classes, multilabel
        self.counts = torch.zeros(num_classes, 2, self.BINS, dtype=torch.long, device=device)

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
        return self.per_class()[0].mean()

    def per_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each class's AUROC, and the most it can differ from the exact AUROC (half the share of
        (positive, negative) pairs that share a bin)."""
        counts = self.counts.cpu() if self.counts.device.type == "mps" else self.counts  # MPS has no float64
        negatives, positives = counts.double().unbind(1)
        below = negatives.cumsum(1) - negatives  # negatives in lower bins than each bin
        pairs = positives.sum(1) * negatives.sum(1)
        auroc = (positives * (below + 0.5 * negatives)).sum(1) / pairs
        bound = 0.5 * (positives * negatives).sum(1) / pairs
        return auroc.nan_to_num(0.0), bound.nan_to_num(0.0)


def _user_value(user: UserMetric, preds: torch.Tensor, targets: torch.Tensor, rows: list[int]) -> float:
    """A metric of yours over the split: a torchmetrics Metric in one update (it syncs DDP ranks
    itself), a function per batch, averaged by rows (over every rank's rows under DDP)."""
    try:
        if is_torchmetrics_metric(user.metric):
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
