"""BinnedAUROC against torchmetrics' exact AUROC: within its bound, and within the documented 1e-4
on scores a model gives (docs/benchmarks.md says which values change and by how much)."""

from __future__ import annotations

import pytest
import torch
import torchmetrics.functional.classification as exact

from tasks.metrics import BinnedAUROC, TaskMetrics

TOLERANCE = 1e-4  # the documented one, for softmax/sigmoid outputs of logits up to a spread of 15


def _scores(rows: int, classes: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities of logits that lean towards the true class, `spread` their scale."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (rows,), generator=generator)
    logits = torch.randn(rows, classes, generator=generator) * spread
    logits[torch.arange(rows), targets] += spread
    return logits.softmax(dim=1), targets


@pytest.mark.parametrize("spread", [0.3, 1.0, 3.0, 8.0, 15.0])
@pytest.mark.parametrize("classes", [2, 10])
def test_multiclass_matches_the_exact_auroc_within_its_bound(spread, classes):
    scores, targets = _scores(5000, classes, spread, seed=classes)
    binned = BinnedAUROC(classes)
    binned.update(scores, targets)
    values, bounds = binned.per_class()
    exact_values = exact.multiclass_auroc(scores, targets, classes, average=None).double()
    assert torch.all((values - exact_values).abs() <= bounds + 1e-12), (values - exact_values, bounds)
    assert float(binned.compute()) == pytest.approx(float(exact_values.mean()), abs=TOLERANCE)


def test_multilabel_matches_the_exact_auroc():
    generator = torch.Generator().manual_seed(3)
    targets = (torch.rand(4000, 6, generator=generator) < 0.3).long()
    scores = torch.sigmoid(torch.randn(4000, 6, generator=generator) * 3 + targets * 2.0)
    binned = BinnedAUROC(6, multilabel=True)
    binned.update(scores, targets)
    assert float(binned.compute()) == pytest.approx(float(exact.multilabel_auroc(scores, targets, 6)), abs=TOLERANCE)


def test_equal_scores_count_as_the_exact_auroc_counts_them():
    """Scores on a coarse grid (many exact ties, no two distinct values in one bin): the same value."""
    generator = torch.Generator().manual_seed(4)
    targets = torch.randint(0, 4, (3000,), generator=generator)
    scores = torch.randint(0, 9, (3000, 4), generator=generator).float() / 8  # 0, 1/8, ..., 1 (1 - s exact too)
    scores[torch.arange(3000), targets] = torch.maximum(scores[torch.arange(3000), targets], torch.tensor(0.5))
    binned = BinnedAUROC(4)
    binned.update(scores, targets)
    assert float(binned.per_class()[1].max()) > 0.01  # there are tied pairs
    expected = exact.multiclass_auroc(scores, targets, 4, average=None).double()
    assert torch.allclose(binned.per_class()[0], expected, atol=1e-6)


def test_scores_near_one_and_near_zero_keep_their_order():
    """Bins are relative at both ends: 1 - 1e-6 above 1 - 2e-6, 1e-30 above 1e-31 (no tie)."""
    scores = torch.tensor([[1 - 2e-6, 1e-31], [1 - 1e-6, 1e-30], [0.5, 0.5], [1.0, 0.0]])
    for column, positive in ((0, [0, 1, 0, 1]), (1, [0, 1, 0, 0])):
        binned = BinnedAUROC(1, multilabel=True)
        binned.update(scores[:, column : column + 1], torch.tensor(positive).unsqueeze(1))
        values, bounds = binned.per_class()
        assert float(bounds) == 0.0  # no positive shares a bin with a negative
        assert float(values) == pytest.approx(float(exact.binary_auroc(scores[:, column], torch.tensor(positive))))


def test_a_class_without_positives_counts_zero_as_in_torchmetrics():
    scores, targets = _scores(2000, 5, 2.0, seed=5)
    targets[targets == 4] = 0  # class 4 never occurs
    binned = BinnedAUROC(5)
    binned.update(scores, targets)
    with pytest.warns(UserWarning):  # torchmetrics warns about the class and counts it 0
        expected = float(exact.multiclass_auroc(scores, targets, 5))
    assert float(binned.per_class()[0][4]) == 0.0
    assert float(binned.compute()) == pytest.approx(expected, abs=TOLERANCE)


def test_batches_add_up_to_the_whole_split():
    scores, targets = _scores(3000, 10, 2.0, seed=6)
    whole, batched = BinnedAUROC(10), BinnedAUROC(10)
    whole.update(scores, targets)
    for s, t in zip(scores.split(700), targets.split(700), strict=True):
        batched.update(s, t)
    assert torch.equal(whole.counts, batched.counts)


def test_the_task_metrics_report_it_as_auroc_above_5000_rows():
    scores, targets = _scores(6000, 10, 2.0, seed=7)
    logits = scores.log()  # TaskMetrics takes the model's outputs and applies the softmax itself
    metrics = TaskMetrics("classification", 10)
    for s, t in zip(logits.split(1024), targets.split(1024), strict=True):
        metrics.update(s, t)
    value = metrics.compute()["auroc"]
    assert value == pytest.approx(float(exact.multiclass_auroc(logits.softmax(dim=1), targets, 10)), abs=TOLERANCE)


def test_a_small_split_reports_the_exact_auroc():
    """Near-equal scores on 40 rows: binned, many pairs tie; the task metrics give the exact value."""
    generator = torch.Generator().manual_seed(8)
    targets = torch.randint(0, 3, (40,), generator=generator)
    logits = torch.randn(40, 3, generator=generator) * 1e-3  # an untrained model: scores within 0.1% of 1/3
    binned = BinnedAUROC(3)
    binned.update(logits.softmax(dim=1), targets)
    exact_value = float(exact.multiclass_auroc(logits.softmax(dim=1), targets, 3))
    assert abs(float(binned.compute()) - exact_value) > 1e-3  # what the exact fallback is for
    metrics = TaskMetrics("classification", 3)
    metrics.update(logits, targets)
    assert metrics.compute()["auroc"] == pytest.approx(exact_value, abs=1e-6)  # torchmetrics sums in float32
