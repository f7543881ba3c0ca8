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


# What a PyTorch user writes by hand for fitflow's default run on a table, without fitflow or
# Prefect (torch, numpy, pandas and MLflow only): read the CSV, one-hot the text columns, split
# 70/15/15, standardise on the training rows, fitflow's default MLP (64-32, ReLU, dropout 0.1),
# Adam (lr 1e-3, weight decay 0.01), batches of 64; logged to MLflow: the hyperparameters, per
# epoch the training loss and the validation loss, accuracy, macro F1 and AUROC (by hand, in
# torch), the same four on the test rows, and the model (MLflow's pytorch flavor, input example).
# argv: data target epochs tracking-uri [batch size, default 64]
BARE_SCRIPT = """
import sys, mlflow, mlflow.pytorch, numpy as np, pandas as pd, torch
from torch import nn
data, target, epochs, uri = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
batch_size = int(sys.argv[5]) if len(sys.argv) > 5 else 64
mlflow.set_tracking_uri(uri); mlflow.set_experiment("bare")
table = pd.read_csv(data)
classes, y = np.unique(table.pop(target).astype(str), return_inverse=True)
x = pd.get_dummies(table, dtype=np.float32).to_numpy(np.float32)
rng = np.random.default_rng(42); order = rng.permutation(len(x)); n_test = n_val = round(len(x) * 0.15)
test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
x = np.nan_to_num((x - x[train].mean(0)) / (x[train].std(0) + 1e-8))
X, Y = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
torch.manual_seed(42)
model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1),
                      nn.Linear(32, len(classes)))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.01); loss_fn = nn.CrossEntropyLoss()
def scores(rows):
    model.eval()
    with torch.no_grad():
        out, truth = model(X[rows]), Y[rows]
        prob = out.softmax(1); pred = prob.argmax(1); f1, auroc = [], []
        for c in range(len(classes)):  # one class against the rest; AUROC as the share of pairs ranked right
            hit, pos = pred == c, truth == c
            f1.append(2 * (hit & pos).sum() / (hit.sum() + pos.sum()).clamp(min=1))
            ranks = prob[:, c].argsort().argsort().double() + 1; n_pos = pos.sum(); n_neg = len(truth) - n_pos
            auroc.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
        return {"loss": loss_fn(out, truth).item(), "accuracy": (pred == truth).float().mean().item(),
                "f1_macro": torch.stack(f1).mean().item(), "auroc": torch.stack(auroc).mean().item()}
with mlflow.start_run():
    mlflow.log_params({"data": data, "target": target, "epochs": epochs, "batch_size": batch_size, "lr": 1e-3, "optimizer": "adam",
                       "weight_decay": 0.01, "hidden_sizes": "[64, 32]", "dropout": 0.1, "seed": 42})
    for epoch in range(1, epochs + 1):
        model.train(); perm = torch.from_numpy(train)[torch.randperm(len(train))]; total = 0.0
        for i in range(0, len(perm), batch_size):
            batch = perm[i:i + batch_size]; optimizer.zero_grad(); loss = loss_fn(model(X[batch]), Y[batch]); loss.backward()
            optimizer.step(); total += loss.item() * len(batch)
        mlflow.log_metrics({"train_loss": total / len(perm), **{f"val_{k}": v for k, v in scores(val).items()}}, step=epoch)
    mlflow.log_metrics({f"test_{k}": v for k, v in scores(test).items()}, step=epochs)
    mlflow.pytorch.log_model(model.eval(), name="model", input_example=x[:5],
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"])
"""

SMALL_TABLE = ("data/breast_cancer.csv", "diagnosis")  # 569 rows, 30 numeric columns: the shipped example


def _lightning_note() -> str:
    """A warning for the per-command figures when Lightning is installed: `import mlflow.pytorch`
    (both sides) then imports pytorch_lightning too, about 2 s each, which flattens the ratios."""
    import importlib.util

    if importlib.util.find_spec("pytorch_lightning") is None:
        return ""
    return ("pytorch_lightning is installed: import mlflow.pytorch pulls it into both sides (about 2 s each); "
            "measure per-command figures in a venv without the bench extra")


def _clean_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FITFLOW_"))}
    return {**base, **extra}


def _run(argv: list[str], env: dict[str, str], timeout: int = 900, cwd: str | Path = REPO) -> None:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {done.returncode}: {done.stderr[-2000:]}")


def _fitflow_train(data: str, target: str, epochs: int, batch_size: int = 64) -> list[str]:
    return [str(Path(sys.executable).with_name("fitflow")), "train", "--data", data, "--target", target,
            "--epochs", str(epochs), "--patience", "0", "--batch-size", str(batch_size)]


def _bare(data: str, target: str, epochs: int, uri: str, batch_size: int = 64) -> list[str]:
    """The script's command line. Run it in a folder of its own (`cwd`): with a sqlite store, MLflow
    puts its artifacts in ./mlruns of the working directory, as it does for a user's script."""
    return [sys.executable, "-c", BARE_SCRIPT, str(REPO / data), target, str(epochs), uri, str(batch_size)]


def end_to_end(rounds: int, epochs: int) -> list:
    """Warm `fitflow train` without `fitflow up` (its embedded Prefect server, the sqlite MLflow
    store under FITFLOW_HOME) against BARE_SCRIPT logging to a sqlite file, each a fresh process,
    on the shipped small table; then the cold first run and `--help`."""
    fitflow = str(Path(sys.executable).with_name("fitflow"))
    with tempfile.TemporaryDirectory() as tmp:
        env = _clean_env(FITFLOW_HOME=str(Path(tmp) / "home"))
        bare_env, sqlite = _clean_env(), f"sqlite:///{tmp}/bare.db"
        train, bare = _fitflow_train(*SMALL_TABLE, epochs), _bare(*SMALL_TABLE, epochs, sqlite)
        cold_start = time.perf_counter()
        _run(train, env)  # fresh Prefect home: migrations; the prepared data is cached from here on
        cold = time.perf_counter() - cold_start
        _run(bare, bare_env, cwd=tmp)  # its sqlite store migrates once
        result = compare(f"end to end: fitflow train (embedded Prefect server) vs bare torch + MLflow script, "
                         f"{epochs} epochs, breast_cancer (warm)",
                         ("bare script -> sqlite", lambda: _run(bare, bare_env, cwd=tmp)),
                         ("fitflow train", lambda: _run(train, env)), rounds, warmup=False, target="<= 1.3",
                         note=_lightning_note())
        help_s = min(_wall([fitflow, "--help"], env) for _ in range(3))
    return [result, Measurement("fitflow train, cold first run (fresh Prefect home)", cold, "s"),
            Measurement("fitflow --help", help_s, "s", target="< 1")]


def memory_on_a_large_table(rows: int, batch_size: int) -> list:
    """Peak RSS of `fitflow train` (embedded Prefect server, sqlite MLflow store) and of BARE_SCRIPT
    (sqlite) on the same generated table, one epoch each (the peak is the data's, not the epochs':
    `batch_size` keeps the epoch short), fitflow warm (its prepared data cached by one run before);
    with each one's wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        env, bare_env = _clean_env(FITFLOW_HOME=str(Path(tmp) / "home")), _clean_env()
        table = str(write_table(Path(tmp) / f"table-{rows}.csv", rows))
        train = _fitflow_train(table, "label", 1, batch_size)
        bare = _bare(table, "label", 1, f"sqlite:///{tmp}/bare.db", batch_size)
        _run(train, env, timeout=1800)  # the first run prepares and caches, as any first run of a table does
        _run(bare, bare_env, timeout=1800, cwd=tmp)  # and the script's store migrates
        fitflow_s, fitflow_peak = _peak_rss(train, env)
        bare_s, bare_peak = _peak_rss(bare, bare_env, cwd=tmp)
    return [Measurement(f"peak RSS, fitflow train / bare script, {rows:,} rows", fitflow_peak / bare_peak, "x",
                        target="<= 1.5", note=f"fitflow {fitflow_peak / 1e9:.2f} GB in {fitflow_s:.1f} s, bare script {bare_peak / 1e9:.2f} GB "
                                              f"in {bare_s:.1f} s (1 epoch of batch {batch_size} each) {_lightning_note()}".strip())]


def _peak_rss(argv: list[str], env: dict[str, str], cwd: str | Path = REPO) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes of a process: the kernel's high-water mark (wait4's
    ru_maxrss), the largest of the process and its children, not their sum."""
    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: a full pipe would block the process
        start = time.perf_counter()
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(argv[:3])} ... exited {process.returncode}: {errors.read()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports kilobytes


def _wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=60)
    return time.perf_counter() - start


def end_to_end_with_the_stack(rounds: int, epochs: int) -> list:
    """Warm `fitflow train` with `fitflow up` running against BARE_SCRIPT logging to the same
    MLflow server, each a fresh process, on the shipped small table: as it runs by default (in a
    fork of the stack's preloaded process, flows/preloaded.py), and in a process of its own
    (FITFLOW_PRELOADED=0), each against the script in rounds of its own."""
    import json as json_module

    fitflow = str(Path(sys.executable).with_name("fitflow"))
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        with_stack, bare_env = _clean_env(FITFLOW_HOME=str(home)), _clean_env()
        ports = [_free_port(), _free_port()]
        up = subprocess.Popen([fitflow, "up", "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1])],
                              cwd=REPO, env=with_stack, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in up.stdout:  # the last line: the deployments are served, the preloaded process listens
                if line.startswith("serving the deployments"):
                    break
            stack = json_module.loads((home / "stack.json").read_text())
            train, bare = _fitflow_train(*SMALL_TABLE, epochs), _bare(*SMALL_TABLE, epochs, stack["mlflow_url"])
            own_process = {**with_stack, "FITFLOW_PRELOADED": "0"}
            _run(train, with_stack)  # warm: the experiment exists, the prepared data is cached
            _run(bare, bare_env)  # and the bare script's experiment
            forked = compare(f"end to end: fitflow train with `fitflow up` vs bare torch + MLflow script, {epochs} epochs, "
                             "breast_cancer (warm)",
                             ("bare script -> MLflow server", lambda: _run(bare, bare_env)),
                             ("fitflow train, stack up", lambda: _run(train, with_stack)), rounds, warmup=False,
                             target="<= 1.2", note=_lightning_note())
            forks = (home / "logs" / "preloaded.log").read_text().count(": exit 0")
            if forks != rounds + 1:
                raise RuntimeError(f"{forks} of {rounds + 1} runs of fitflow train ran in the preloaded process; "
                                   f"see {home / 'logs' / 'preloaded.log'}")
            own = compare(f"end to end: fitflow train with `fitflow up`, in a process of its own (FITFLOW_PRELOADED=0), "
                          f"vs bare torch + MLflow script, {epochs} epochs, breast_cancer (warm)",
                          ("bare script -> MLflow server", lambda: _run(bare, bare_env)),
                          ("fitflow train, stack up, own process", lambda: _run(train, own_process)), rounds,
                          warmup=False, target="reported", note=_lightning_note())
            return [forked, own]
        finally:
            up.terminate()  # `fitflow up` stops its servers on SIGTERM
            up.wait(timeout=120)


# Each import after the ones before it, in a fresh process, as CPU seconds (getrusage): what the
# bare script pays (torch, pandas, MLflow, torch._dynamo through torch.optim), what `fitflow train`
# adds (Prefect, fitflow's own modules and what they import), and last what a plain run no longer
# imports (torchmetrics and the scipy.signal it imports: only for a metric of yours that is one).
IMPORTS_SCRIPT = """
import json, resource
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF); return usage.ru_utime + usage.ru_stime
steps = {"torch": "import torch", "numpy, pandas": "import numpy, pandas",
         "mlflow, mlflow.pytorch, mlflow.pyfunc": "import mlflow, mlflow.pytorch, mlflow.pyfunc",
         "torch._dynamo (every torch.optim optimizer imports it)": "import torch._dynamo",
         "prefect": "from flows.environment import configure_environment; configure_environment(); import prefect.main",
         "torchvision (fitflow's image modules import it)": "import torchvision",
         "matplotlib.figure (the learning-curve plot)": "import matplotlib.figure",
         "fitflow's modules (flows.train)": "import flows.train",
         "scipy.signal (torchmetrics imports it; not a plain run since the built-in metrics are plain torch)":
             "import scipy.signal",
         "torchmetrics itself (only for a metric of yours that is one)": "import torchmetrics"}
costs = {}
for name, code in steps.items():
    before = cpu(); exec(code); costs[name] = cpu() - before
print(json.dumps(costs))
"""


def import_costs(rounds: int) -> list[Measurement]:
    """CPU seconds of each import `fitflow train` and the bare script make, median of `rounds` fresh processes."""
    import json as json_module
    import statistics

    with tempfile.TemporaryDirectory() as tmp:
        env = _clean_env(FITFLOW_HOME=tmp)
        runs = [json_module.loads(subprocess.run([sys.executable, "-c", IMPORTS_SCRIPT], cwd=REPO, env=env, check=True,
                                                 capture_output=True, text=True, timeout=600).stdout.splitlines()[-1])
                for _ in range(rounds)]
    return [Measurement(f"import CPU: {name}", statistics.median(run[name] for run in runs), "s",
                        note=f"median of {rounds} fresh processes, each import after the ones above")
            for name in runs[0]]


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
