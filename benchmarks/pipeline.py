"""Data preparation speed and memory, and the end-to-end run against a bare script."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.harness import Comparison, Measurement, compare

REPO = Path(__file__).resolve().parents[1]


def write_table(path: Path, rows: int, seed: int = 0) -> Path:
    """32 numeric + 2 categorical feature columns and a class label, as CSV."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(rows, 32)).astype(np.float32), columns=[f"x{i}" for i in range(32)])
    frame["city"] = rng.choice([f"city{i}" for i in range(40)], size=rows)
    frame["channel"] = rng.choice(["web", "store", "phone"], size=rows)
    frame["label"] = np.where(frame["x0"] + frame["x1"] > 0, "yes", "no")
    frame.to_csv(path, index=False)
    return path


def prepare_cost(rows: int) -> list[Measurement]:
    """Rows/s through `prepare` and its peak memory over the in-memory DataFrame (fresh process)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_table(Path(tmp) / "table.csv", rows)
        out = subprocess.run([sys.executable, "-c", PREPARE_SCRIPT, str(path)], cwd=REPO, capture_output=True,
                             text=True, timeout=900, check=True)
    seconds, peak, frame_bytes = map(float, out.stdout.split()[-3:])
    return [
        Measurement(f"prepare {rows:,} rows: throughput", rows / seconds, "rows/s", note=f"{seconds:.2f} s"),
        Measurement(f"prepare {rows:,} rows: peak memory / DataFrame", peak / frame_bytes, "x", target="<= 3",
                    note=f"peak {peak / 1e6:.0f} MB held during prepare (DataFrame included) over the "
                         f"{frame_bytes / 1e6:.0f} MB DataFrame; RSS sampled every 2 ms"),
    ]


# Runs in a fresh process: RSS before the table exists is the zero; a thread samples RSS while
# `prepare` runs (tracemalloc would be exact but slows pandas 15x).
PREPARE_SCRIPT = """
import os, sys, threading, time
from tasks.data import PrepSpec, load_table, prepare
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
zero = rss()
table = load_table(sys.argv[1])
frame_bytes = table.memory_usage(deep=True).sum()
peak, done = [rss()], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.002)
sampler = threading.Thread(target=sample); sampler.start()
start = time.perf_counter(); prepared = prepare(table, PrepSpec(target="label")); seconds = time.perf_counter() - start
done.set(); sampler.join()
assert prepared.train.features.dtype.name == "float32"
print(seconds, peak[0] - zero, frame_bytes)
"""


def prepare_scaling(rounds: int, sizes: tuple[int, int]) -> Comparison:
    from tasks.data import PrepSpec, load_table, prepare

    with tempfile.TemporaryDirectory() as tmp:
        small, large = (load_table(str(write_table(Path(tmp) / f"t{n}.csv", n))) for n in sizes)
    spec = PrepSpec(target="label")
    return compare(f"prepare {sizes[1] // 1000}k vs {sizes[0] // 1000}k rows", (f"{sizes[0] // 1000}k", lambda: prepare(small, spec)),
                   (f"{sizes[1] // 1000}k", lambda: prepare(large, spec)), rounds, target=f"~{sizes[1] / sizes[0]:.0f} (linear)")


BARE_SCRIPT = """
import sys, tempfile, pandas as pd, mlflow
from mlflow.tracking import MlflowClient
from tasks.config import TrainConfig
from tasks.trainer import Run, build_loaders, evaluate_on_test, prep_spec, train_model
from tasks import tracking
from tasks.data import load_table, prepare
config = TrainConfig(epochs=int(sys.argv[1]), patience=0)
uri = sys.argv[2]
mlflow.set_tracking_uri(uri); tracking.prepare_store(uri)
client = MlflowClient(uri)
table = load_table(config.data); prepared = prepare(table, prep_spec(config)); loaders = build_loaders(config, prepared)
run_id = client.create_run(tracking.experiment_id(client, "bare")).info.run_id
tracking.log_params(client, run_id, config.params())
tracking.log_dataset(client, run_id, table, config.data, config.target, "breast_cancer")
run = Run(client, run_id, "0", __import__("pathlib").Path(tempfile.mkdtemp()))
trained = train_model(config, prepared, loaders, run)
tracking.log_metrics(client, run_id, evaluate_on_test(config, prepared, loaders, trained), step=trained.best_epoch)
tracking.log_pyfunc_model(client, run_id, trained.model, trained.spec, prepared.preprocessor,
                          table.drop(columns=[config.target]).head(5))
client.set_terminated(run_id, "FINISHED")
"""


def end_to_end(rounds: int, epochs: int) -> list:
    """`fitflow train` (Prefect's embedded server) vs the same steps as a bare script, warm."""
    fitflow = str(Path(sys.executable).with_name("fitflow"))
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update(FITFLOW_HOME=str(Path(tmp) / "home"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")

        def run(argv: list[str]) -> None:
            subprocess.run(argv, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)

        cold_start = time.perf_counter()
        run([fitflow, "train", "--epochs", str(epochs), "--patience", "0"])  # fresh Prefect home: migrations
        cold = time.perf_counter() - cold_start
        result = compare("end to end: fitflow train vs bare script (warm)",
                         ("bare script", lambda: run([sys.executable, "-c", BARE_SCRIPT, str(epochs), env["MLFLOW_TRACKING_URI"]])),
                         ("fitflow train", lambda: run([fitflow, "train", "--epochs", str(epochs), "--patience", "0"])),
                         rounds, warmup=False, target="<= 1.5")
        help_s = min(_wall([fitflow, "--help"], env) for _ in range(3))
    return [result, Measurement("fitflow train, cold first run (fresh Prefect home)", cold, "s"),
            Measurement("fitflow --help", help_s, "s", target="< 1")]


def _wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=60)
    return time.perf_counter() - start
