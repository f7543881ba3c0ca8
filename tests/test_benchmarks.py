"""The benchmark suite's quick mode: every benchmark runs and reports finite figures.

Speed is never asserted here (shared, noisy machines); docs/benchmarks.md has the measured
ratios of the full run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_benchmarks_smoke_mode_runs_every_benchmark():
    before = set((REPO / "benchmarks" / "results").glob("*.json"))
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--only", "loaders", "epoch", "tracking",
                          "threads", "prepare", "scaling", "images", "api", "hooks", "step-logging",
                          "baseline", "system-metrics", "imports"], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (written,) = set((REPO / "benchmarks" / "results").glob("*.json")) - before
    report = json.loads(written.read_text())
    written.unlink()
    names = [r["name"] for r in report["results"]]
    for expected in ("loader N=10,000 batch=256", "epoch vs tutorial loop", "epoch vs best hand loop",
                     "epoch vs hand loop with fused Adam and the same metrics", "where the epoch goes: Checkpoints",
                     "metrics over the validation split (1k rows): auroc",
                     "epoch with MLflow logging vs without", "model logging", "threads", "prepare 20,000 rows",
                     "epoch time", "prepare 4k vs 2k rows", "image loader",
                     "CNN epoch vs mnist-style loop", "API fit epoch vs flow engine epoch", "API fit: once per fit",
                     "batch hooks, nothing registered", "A/A control: fit", "one registered no-op batch callback",
                     "per-step logging", "run with system metrics vs without", "system metrics sampler time per sample",
                     "linear baseline / default run, breast_cancer", "linear baseline / default run, customers",
                     "import CPU: prefect", "import CPU: torchmetrics itself"):
        assert any(name.startswith(expected) for name in names), expected
    for r in report["results"]:
        value = r["median"] if "ratios" in r else r["value"]
        assert math.isfinite(value) and value > 0, r


def test_quality_report_smoke_mode_writes_a_row_per_table(tmp_path):
    out = tmp_path / "quality.md"
    done = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and " rows" in line]
    assert [row[0].removeprefix("| ") for row in rows] == ["wine", "breast_cancer", "diabetes", "digits", "customers"]
    families = {"SVM", "random forest", "gradient boosting", "5 neighbours"}
    for row in rows:  # defaults, linear baseline, scikit-learn, the best other family (named), sweep: a finite mean each
        family, other = row[7].split(": ")
        assert family in families, row
        assert all(math.isfinite(float(cell.split()[0])) for cell in [*row[4:7], other, row[8]]), row


@pytest.mark.slow
def test_the_end_to_end_baseline_is_torch_and_mlflow_only_and_logs_what_fitflow_logs(tmp_path):
    """The script `fitflow train` is measured against (benchmarks/pipeline.py BARE_SCRIPT) imports
    neither Prefect nor fitflow, and logs the per-epoch and test metrics of a fitflow run and a model."""
    from mlflow.tracking import MlflowClient

    from benchmarks.pipeline import BARE_SCRIPT, SMALL_TABLE
    from tasks.metrics import metric_names

    uri = f"sqlite:///{tmp_path / 'bare.db'}"
    check = "\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'flows', 'tasks', 'fitflow'}))"
    data, target = SMALL_TABLE
    # in a folder of its own: with a sqlite store MLflow writes the model to ./mlruns of the working directory
    done = subprocess.run([sys.executable, "-c", BARE_SCRIPT + check, str(REPO / data), target, "2", uri], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bare").experiment_id])
    expected = {"train_loss", *metric_names("classification", "val"), *metric_names("classification", "test")}
    assert expected <= set(run.data.metrics)
    assert run.info.status == "FINISHED" and client.search_logged_models([run.info.experiment_id])
