"""The built-in metrics (plain torch, tasks/metrics.py) against torchmetrics' values on the same
inputs: the names and values fitflow logged when they were torchmetrics objects stay the same,
within float rounding (docs/benchmarks.md, "Which metric values change")."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchmetrics.functional as tmf
import torchmetrics.functional.classification as tmc

from tasks.metrics import BinnedAUROC, TaskMetrics, exact_auroc

TOLERANCE = 1e-6  # float32 sums and trapezoids in torchmetrics, float64 sums and ranks here
REPO = Path(__file__).resolve().parents[1]


def _classification(rows: int, classes: int, seed: int, absent: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that lean towards the true class; `absent`: a class no row has (it is still predicted)."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (rows,), generator=generator)
    if absent is not None:
        targets[targets == absent] = (absent + 1) % classes
    logits = torch.randn(rows, classes, generator=generator) * 2
    logits[torch.arange(rows), targets] += 1.5
    return logits, targets


def _computed(metrics: TaskMetrics, outputs: torch.Tensor, targets: torch.Tensor, batch: int = 64) -> dict[str, float]:
    for o, t in zip(outputs.split(batch), targets.split(batch), strict=True):
        metrics.update(o, t)
    return metrics.compute()


def _expected_classification(logits: torch.Tensor, targets: torch.Tensor, classes: int) -> dict[str, float]:
    preds = logits.softmax(dim=1)
    return {"accuracy": float(tmc.multiclass_accuracy(preds, targets, classes, average="micro")),
            "f1_macro": float(tmc.multiclass_f1_score(preds, targets, classes, average="macro")),
            "auroc": float(tmc.multiclass_auroc(preds, targets, classes))}


@pytest.mark.parametrize(("rows", "classes", "absent"), [(300, 2, None), (1000, 5, None), (777, 6, 3), (40, 3, None),
                                                         (2000, 80, None)])
def test_multiclass_metrics_equal_torchmetrics(rows, classes, absent):
    logits, targets = _classification(rows, classes, seed=rows + classes, absent=absent)
    got = _computed(TaskMetrics("classification", classes), logits, targets)
    with torch.no_grad(), pytest.warns(UserWarning) if absent is not None else _nothing():  # torchmetrics warns of the class
        expected = _expected_classification(logits, targets, classes)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=TOLERANCE), name


def test_a_class_neither_present_nor_predicted_is_left_out_of_the_macro_f1():
    targets = torch.tensor([0, 1, 1, 0, 1])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 0, 1]), 4).float() * 5  # classes 2, 3 never occur
    got = _computed(TaskMetrics("classification", 4), logits, targets)
    assert got["f1_macro"] == pytest.approx(float(tmc.multiclass_f1_score(logits.softmax(1), targets, 4, average="macro")))
    assert got["f1_macro"] == pytest.approx((0.8 + 0.8) / 2)  # the mean over classes 0 and 1 only


def test_ties_count_half_as_in_torchmetrics():
    """Scores on a coarse grid: many equal scores across positives and negatives."""
    generator = torch.Generator().manual_seed(11)
    targets = torch.randint(0, 4, (900,), generator=generator)
    scores = torch.randint(0, 5, (900, 4), generator=generator).float() / 4
    positive = torch.nn.functional.one_hot(targets, 4).bool()
    expected = tmc.multiclass_auroc(scores, targets, 4, average=None).double()
    assert torch.allclose(exact_auroc(scores, positive), expected, atol=TOLERANCE)


def test_a_class_without_negatives_or_positives_counts_zero():
    scores = torch.rand(50, 2, generator=torch.Generator().manual_seed(12))
    positive = torch.zeros(50, 2, dtype=torch.bool)
    positive[:, 1] = True  # column 0: no positives; column 1: no negatives
    assert exact_auroc(scores, positive).tolist() == [0.0, 0.0]


def test_multilabel_metrics_equal_torchmetrics():
    generator = torch.Generator().manual_seed(13)
    truth = (torch.rand(600, 5, generator=generator) < 0.3).float()
    truth[:, 4] = 0  # a label no row has: counts 0 in the macro F1 and AUROC, as in torchmetrics
    logits = torch.randn(600, 5, generator=generator) * 2 + truth * 1.5
    got = _computed(TaskMetrics("multilabel", 5), logits, truth)
    preds, target = logits.sigmoid(), truth.long()
    with pytest.warns(UserWarning):
        expected = {"accuracy": tmc.multilabel_accuracy(preds, target, 5, average="micro"),
                    "subset_accuracy": tmc.multilabel_exact_match(preds, target, 5),
                    "f1_micro": tmc.multilabel_f1_score(preds, target, 5, average="micro"),
                    "f1_macro": tmc.multilabel_f1_score(preds, target, 5, average="macro"),
                    "auroc": tmc.multilabel_auroc(preds, target, 5, average="macro")}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(float(value), abs=TOLERANCE), name


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (250.0, 40.0)])
def test_regression_metrics_equal_torchmetrics_in_the_targets_units(mean, std):
    generator = torch.Generator().manual_seed(14)
    targets = torch.randn(500, 1, generator=generator)
    outputs = targets * 0.8 + torch.randn(500, 1, generator=generator) * 0.3
    got = _computed(TaskMetrics("regression", target_mean=mean, target_std=std), outputs, targets)
    preds, truth = outputs.squeeze(-1) * std + mean, targets.squeeze(-1) * std + mean
    expected = {"rmse": tmf.mean_squared_error(preds, truth, squared=False), "mae": tmf.mean_absolute_error(preds, truth),
                "r2": tmf.r2_score(preds, truth)}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(float(value), rel=1e-5, abs=TOLERANCE), name


def test_r2_keeps_torchmetrics_rules_for_constant_targets():
    constant = torch.full((10, 1), 3.0)
    assert _computed(TaskMetrics("regression"), constant, constant)["r2"] == float(tmf.r2_score(constant[:, 0], constant[:, 0]))
    off = constant + torch.linspace(0, 1, 10).unsqueeze(1)
    assert _computed(TaskMetrics("regression"), off, constant)["r2"] == float(tmf.r2_score(off[:, 0], constant[:, 0]))


def test_the_binned_auroc_above_5000_rows_is_computed_from_histograms():
    logits, targets = _classification(6000, 4, seed=15)
    got = _computed(TaskMetrics("classification", 4), logits, targets, batch=1000)["auroc"]
    binned = BinnedAUROC(4)
    binned.update(logits.softmax(dim=1), targets)
    assert got == float(binned.compute())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# Two gloo processes, uneven shards (one row more on rank 0): every rank gets the whole split's
# metrics, equal to one process computing them over all rows.
DDP_WORKER = """
import json, os, sys, torch, torch.distributed as dist
from tasks.metrics import TaskMetrics
dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2, init_method=f"tcp://127.0.0.1:{sys.argv[2]}")
rank, out = dist.get_rank(), {}
g = torch.Generator().manual_seed(0)
splits = {"small": (301, 5), "large": (6001, 5), "many": (403, 70)}
for name, (rows, classes) in splits.items():
    targets = torch.randint(0, classes, (rows,), generator=g)
    logits = torch.randn(rows, classes, generator=g); logits[torch.arange(rows), targets] += 1
    half = (rows + 1) // 2
    mine = slice(0, half) if rank == 0 else slice(half, rows)
    m = TaskMetrics("classification", classes); m.update(logits[mine], targets[mine])
    whole = TaskMetrics("classification", classes); whole.update(logits, targets)
    out[name] = [m.compute(), whole.compute()]
truth = (torch.rand(801, 4, generator=g) < 0.4).float(); logits = torch.randn(801, 4, generator=g) + truth
m = TaskMetrics("multilabel", 4); m.update(logits[:401] if rank == 0 else logits[401:], truth[:401] if rank == 0 else truth[401:])
whole = TaskMetrics("multilabel", 4); whole.update(logits, truth)
out["multilabel"] = [m.compute(), whole.compute()]
y = torch.randn(501, 1, generator=g); p = y + torch.randn(501, 1, generator=g) * 0.5
m = TaskMetrics("regression", target_mean=3.0, target_std=2.0); m.update(p[:251] if rank == 0 else p[251:], y[:251] if rank == 0 else y[251:])
whole = TaskMetrics("regression", target_mean=3.0, target_std=2.0); whole.update(p, y)
out["regression"] = [m.compute(), whole.compute()]
print(json.dumps(out))
dist.destroy_process_group()
"""


def test_under_ddp_every_rank_gets_the_whole_splits_metrics():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ranks = [subprocess.Popen([sys.executable, "-c", DDP_WORKER, str(rank), port], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [rank.communicate(timeout=300) for rank in ranks]
    import json

    for rank, (stdout, stderr) in zip(ranks, outs, strict=True):
        assert rank.returncode == 0, stderr[-3000:]
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outs]
    for name in ("small", "large", "many", "multilabel", "regression"):
        for shard, whole in (result[name] for result in results):
            assert shard.keys() == whole.keys()
            for metric in whole:
                assert shard[metric] == pytest.approx(whole[metric], rel=1e-9, abs=1e-12), (name, metric)
