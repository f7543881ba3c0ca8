"""Four `fitflow train` processes started at once share one MLflow store and lose nothing.

(a) The default user path: no servers at all. The four processes share one fresh FITFLOW_HOME,
    so they create and migrate the same sqlite MLflow store (`<FITFLOW_HOME>/mlflow.db`) and the
    same Prefect home at once, each with its own embedded Prefect server on that database.
(b) The team path: one real `mlflow server` (sqlite backend) started here on a free loopback
    port, and one Prefect server (the session's test harness).

Each run must exit 0, end FINISHED in the one experiment they all get-or-create at once, hold
every per-epoch metric at steps 1..N exactly once (a retried write would duplicate a step, a
lost one leave a gap), and no output may mention "database is locked".
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from stack import Process, free_port, wait_http

from tasks import tracking
from tasks.metrics import metric_names

pytestmark = pytest.mark.slow  # starts real processes: minutes on 2 cores

BIN = Path(sys.executable).parent
EPOCHS = 4
SEEDS = (1, 2, 3, 4)
EXPERIMENT = "conc"
RUN_DEADLINE_S = 900  # a guard against a hung run on 2 shared cores, not a timing assertion
# Per-epoch metrics of a classification run (the shipped breast-cancer data, README "Metrics in MLflow");
# the others are test_*/best_*.
EPOCH_METRICS = {"train_loss", *metric_names("classification", "val"), "lr"}


def user_env(fitflow_home: Path, **settings: str) -> dict[str, str]:
    """The environment of a fresh shell: none of the test session's Prefect or MLflow settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "MLFLOW_"))}
    return {**env, "FITFLOW_HOME": str(fitflow_home), **settings}


def train_at_once(env: dict[str, str], logs: Path) -> dict[int, tuple[int, str]]:
    """Start one `fitflow train` per seed, all at once; seed -> (exit code, its whole output)."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: dict[int, subprocess.Popen] = {}
    for seed in SEEDS:
        # Output to files, not pipes: a full pipe would stall a process until the test reads it.
        with open(logs / f"seed-{seed}.log", "wb") as out:
            procs[seed] = subprocess.Popen(
                [str(BIN / "fitflow"), "train", "--epochs", str(EPOCHS), "--patience", "0", "--experiment", EXPERIMENT,
                 "--seed", str(seed), "--run-name", f"seed-{seed}"],
                env=env, cwd=logs, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        codes = {seed: proc.wait(timeout=RUN_DEADLINE_S) for seed, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {seed: (codes[seed], (logs / f"seed-{seed}.log").read_text(errors="replace")) for seed in SEEDS}


def get_or_create_at_once(uri: str, name: str, callers: int = 8) -> list[str]:
    """`tracking.experiment_id` from threads released together: all find no experiment, all create it.

    The start of four runs seldom lines up this closely (loading and preparing the data spread
    them out), so the race that a naive get-or-create loses every time is forced here.
    """
    barrier = threading.Barrier(callers)

    def call() -> str:
        client = MlflowClient(uri)
        barrier.wait()
        return tracking.experiment_id(client, name)

    with ThreadPoolExecutor(callers) as pool:
        futures = [pool.submit(call) for _ in range(callers)]
    return [future.result() for future in futures]


def assert_one_experiment_per_name_when_created_at_once(uri: str) -> None:
    for trial in range(3):
        ids = get_or_create_at_once(uri, f"race-{trial}")
        assert len(set(ids)) == 1, ids
        assert [e.experiment_id for e in MlflowClient(uri).search_experiments(filter_string=f"name = 'race-{trial}'")] == ids[:1]


def assert_all_tracked(uri: str, results: dict[int, tuple[int, str]]) -> None:
    tails = "\n".join(f"--- seed {seed} (exit {code})\n{out[-3000:]}" for seed, (code, out) in results.items())
    assert {seed: code for seed, (code, _) in results.items()} == dict.fromkeys(SEEDS, 0), tails
    locked = [seed for seed, (_, out) in results.items() if "database is locked" in out]
    assert not locked, f"'database is locked' in the output of seeds {locked}:\n{tails}"
    # Embedded Prefect servers migrating one fresh database at once fail their start (and are restarted)
    restarted = [seed for seed, (_, out) in results.items() if "Application startup failed" in out]
    assert not restarted, f"a Prefect server failed its start-up in the output of seeds {restarted}:\n{tails}"

    client = MlflowClient(uri)
    experiments = client.search_experiments(filter_string=f"name = '{EXPERIMENT}'")
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id], max_results=100)
    assert sorted(run.info.run_name for run in runs) == [f"seed-{seed}" for seed in SEEDS]
    for run in runs:
        seed = int(run.info.run_name.removeprefix("seed-"))
        assert f"MLflow run: {run.info.run_id}" in results[seed][1]  # the process reported this run
        assert run.info.status == "FINISHED", run.info
        assert run.data.params["seed"] == str(seed)
        # not the test split's, the linear baseline's (on the test split) nor the machine's (system/*)
        per_epoch = {key for key in run.data.metrics if not key.startswith(("test_", "best_", "baseline_", "system/"))}
        assert per_epoch == EPOCH_METRICS
        for key in run.data.metrics.keys() - {key for key in run.data.metrics if key.startswith(("baseline_", "system/"))}:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            if key in EPOCH_METRICS:
                assert steps == list(range(1, EPOCHS + 1)), f"{run.info.run_name} {key}: steps {steps}"
            else:  # test_*/best_*: once, at the best epoch's step
                assert len(steps) == 1 and 1 <= steps[0] <= EPOCHS, f"{run.info.run_name} {key}: steps {steps}"


def test_experiment_get_or_create_when_callers_race_on_a_local_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    assert_one_experiment_per_name_when_created_at_once(uri)


def test_runs_log_the_same_dataset_at_once(tmp_path):
    """Runs of one experiment logging the same table at one moment: each gets it, once.

    MLflow's store looks a dataset up and then inserts it; two runs between those steps broke
    the (experiment, name, digest) key and failed their start (CI on ac16b6a). Threads
    released together force that race.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    client = MlflowClient(uri)
    table = pd.read_csv(Path(__file__).parents[1] / "data" / "breast_cancer.csv")
    callers = 8

    def log(run_id: str) -> str:
        barrier.wait()
        return tracking.log_dataset(MlflowClient(uri), run_id, table, "breast_cancer.csv", "diagnosis", "breast_cancer")

    for trial in range(3):  # the race is lost most times, not every time, without the retry
        experiment = tracking.experiment_id(client, f"datasets-race-{trial}")
        run_ids = [client.create_run(experiment).info.run_id for _ in range(callers)]
        barrier = threading.Barrier(callers)
        with ThreadPoolExecutor(callers) as pool:
            digests = list(pool.map(log, run_ids))
        assert len(set(digests)) == 1
        for run_id in run_ids:
            inputs = client.get_run(run_id).inputs.dataset_inputs
            assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("breast_cancer", digests[0])]


def test_four_runs_at_once_on_the_default_local_store(tmp_path):
    """The default path with no servers: a fresh FITFLOW_HOME that four processes create at once."""
    home = tmp_path / "home"
    results = train_at_once(user_env(home), tmp_path / "runs")
    assert_all_tracked(f"sqlite:///{home / 'mlflow.db'}", results)


def test_four_runs_at_once_against_an_mlflow_server(tmp_path, prefect_server):
    """One `mlflow server` (sqlite backend) and one Prefect server take four runs at once."""
    from prefect.settings import PREFECT_API_URL

    root = tmp_path / "mlflow-server"
    root.mkdir()
    uri = f"http://127.0.0.1:{free_port()}"
    log = root / "server.log"
    with open(log, "wb") as out:  # cwd root: its artifacts (./mlartifacts) stay in tmp_path
        popen = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1], "--workers", "1"],
            cwd=root, env=user_env(tmp_path / "unused", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = Process("mlflow", popen, log)
    try:
        wait_http(server, f"{uri}/health")
        assert_one_experiment_per_name_when_created_at_once(uri)
        # Prefect keeps its own home when PREFECT_API_URL is set: a throwaway one, not ~/.prefect.
        env = user_env(tmp_path / "home", MLFLOW_TRACKING_URI=uri, PREFECT_API_URL=PREFECT_API_URL.value(),
                       PREFECT_HOME=str(tmp_path / "prefect-home"))
        results = train_at_once(env, tmp_path / "runs")
        assert_all_tracked(uri, results)
        assert server.alive(), server.log_tail()
        assert "database is locked" not in log.read_text(errors="replace"), server.log_tail()
    finally:
        server.stop()
