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


def end_to_end_with_the_stack(rounds: int, epochs: int) -> list:
    """Warm `fitflow train` with `fitflow up` running and without it (an embedded Prefect server),
    each against a bare torch + MLflow script that imports neither prefect nor fitflow, doing the
    same work: read the CSV, standardise, split, train the same MLP, log params, per-epoch and test
    metrics and the model to MLflow (a server with the stack; the sqlite file without it)."""
    import json as json_module

    fitflow = str(Path(sys.executable).with_name("fitflow"))
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FITFLOW_"))}
        embedded = {**base, "FITFLOW_HOME": str(Path(tmp) / "embedded")}
        train = [fitflow, "train", "--epochs", str(epochs), "--patience", "0"]

        def run(argv: list[str], env: dict[str, str]) -> None:
            subprocess.run(argv, cwd=REPO, env=env, check=True, capture_output=True, timeout=900)

        run(train, embedded)  # a fresh embedded home migrates once: warm from here on
        ports = [_free_port(), _free_port()]
        up = subprocess.Popen([fitflow, "up", "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1])],
                              cwd=REPO, env={**base, "FITFLOW_HOME": str(home)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        try:
            for line in up.stdout:  # the URLs are printed once both servers answer
                if line.startswith("MLflow UI"):
                    break
            stack = json_module.loads((home / "stack.json").read_text())
            with_stack = {**base, "FITFLOW_HOME": str(home)}
            run(train, with_stack)  # warm: the experiment exists, the prepared data is cached
            bare = [sys.executable, "-c", TRULY_BARE_SCRIPT, str(epochs)]
            up_ratio = compare("end to end: fitflow train with `fitflow up` vs bare torch + MLflow script (warm)",
                               ("bare script -> MLflow server", lambda: run([*bare, stack["mlflow_url"]], base)),
                               ("fitflow train, stack up", lambda: run(train, with_stack)), rounds, warmup=False,
                               target="<= 1.2")
        finally:
            up.terminate()  # `fitflow up` stops its servers on SIGTERM
            up.wait(timeout=120)
        sqlite = f"sqlite:///{tmp}/bare.db"
        run([sys.executable, "-c", TRULY_BARE_SCRIPT, str(epochs), sqlite], base)  # its store migrated once
        embedded_ratio = compare("end to end: fitflow train without the stack vs bare torch + MLflow script (warm)",
                                 ("bare script -> sqlite", lambda: run([sys.executable, "-c", TRULY_BARE_SCRIPT,
                                                                        str(epochs), sqlite], base)),
                                 ("fitflow train, embedded server", lambda: run(train, embedded)), rounds,
                                 warmup=False, target="<= 1.5")
    return [up_ratio, embedded_ratio]


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# What a PyTorch user writes by hand for the same run, without fitflow or Prefect: no tasks/ import.
TRULY_BARE_SCRIPT = """
import sys, mlflow, mlflow.pytorch, numpy as np, pandas as pd, torch
from torch import nn
epochs, uri = int(sys.argv[1]), sys.argv[2]
mlflow.set_tracking_uri(uri); mlflow.set_experiment("bare")
table = pd.read_csv("data/breast_cancer.csv")
y = (table.pop("diagnosis") == "malignant").to_numpy().astype(np.int64); x = table.to_numpy(np.float32)
rng = np.random.default_rng(42); order = rng.permutation(len(x)); n_test = n_val = round(len(x) * 0.15)
test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
mean, std = x[train].mean(0), x[train].std(0) + 1e-8; x = (x - mean) / std
X, Y = torch.from_numpy(x), torch.from_numpy(y)
torch.manual_seed(42)
model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3); loss_fn = nn.CrossEntropyLoss()
def scores(rows):
    model.eval()
    with torch.no_grad():
        out = model(X[rows]); return loss_fn(out, Y[rows]).item(), (out.argmax(1) == Y[rows]).float().mean().item()
with mlflow.start_run():
    mlflow.log_params({"epochs": epochs, "lr": 1e-3, "batch_size": 64, "hidden_sizes": "[64, 32]"})
    for epoch in range(1, epochs + 1):
        model.train(); perm = torch.from_numpy(train)[torch.randperm(len(train))]
        for i in range(0, len(perm), 64):
            batch = perm[i:i + 64]; optimizer.zero_grad(); loss = loss_fn(model(X[batch]), Y[batch]); loss.backward(); optimizer.step()
        val_loss, val_accuracy = scores(val)
        mlflow.log_metrics({"train_loss": loss.item(), "val_loss": val_loss, "val_accuracy": val_accuracy}, step=epoch)
    test_loss, test_accuracy = scores(test)
    mlflow.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy}, step=epochs)
    mlflow.pytorch.log_model(model.eval(), name="model", input_example=x[:5],
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"])
"""