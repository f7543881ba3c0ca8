"""Sweeps on Dask: real worker processes, the same MLflow runs as with threads, the GPU limit held.

The trials of a `task_runner: dask` sweep run in a local Dask cluster of two worker processes
(spawned, so they import fitflow afresh and see only what is sent to them). They report to the
session's Prefect test server and write to this test's sqlite MLflow store.
"""

from __future__ import annotations

import itertools
import os

import dask
import distributed
import pytest
from mlflow.tracking import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

from flows.cli import main
from flows.deployments import GPU_TAG
from flows.sweep import sweep
from flows.sweep_config import load_sweep_config

pytestmark = pytest.mark.slow  # starts real processes: minutes on 2 cores

# A grid of four learning rates: every trial is known in advance, so both runners train the same four configs.
CONFIG = {
    "base": {"epochs": 2, "patience": 0, "hidden_sizes": [16], "monitor": "val_accuracy", "experiment": "sweep-dask"},
    "space": {"lr": {"choices": [0.001, 0.003, 0.01, 0.03]}},
    "sampler": "grid", "n_trials": 4, "parallelism": 2, "prune": False,
}


def children(client: MlflowClient, parent_run_id: str) -> dict[str, object]:
    """The parent's child runs by their searched lr."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {run.data.params["lr"]: run for run in runs}


@pytest.fixture
def gpu_limit_of_one(prefect_server):
    """The 'gpu' tag limit `fitflow setup --gpus 1` creates, for one test; the session's previous limit after."""
    with get_client(sync_client=True) as client:
        previous = next((limit.concurrency_limit for limit in client.read_concurrency_limits(limit=100, offset=0)
                         if limit.tag == GPU_TAG), None)
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=1)
    yield
    with get_client(sync_client=True) as client:
        if previous is None:
            client.delete_concurrency_limit_by_tag(GPU_TAG)
        else:
            client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=previous)


def test_dask_sweep_matches_threads_in_worker_processes_under_the_gpu_limit(mlflow_uri, gpu_limit_of_one):
    # Threads with parallelism 1: each trial is what the same config trains alone (no shared RNG).
    threads = sweep(load_sweep_config(None, **{**CONFIG, "parallelism": 1, "name": "threads"}))
    on_dask = sweep(load_sweep_config(None, **{**CONFIG, "task_runner": "dask", "name": "dask"}))

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(on_dask.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.task_runner"] == "dask"
    expected, trials = children(client, threads.parent_run_id), children(client, on_dask.parent_run_id)
    assert sorted(trials) == sorted(expected) == ["0.001", "0.003", "0.01", "0.03"]
    for lr, trial in trials.items():
        assert trial.info.status == "FINISHED" and trial.data.tags["fitflow.trial_state"] == "complete"
        assert trial.data.tags["fitflow.dataset_digest"] == parent.data.tags["fitflow.dataset_digest"]
        assert trial.data.tags["fitflow.model_uri"].startswith("models:/")
        history = client.get_metric_history(trial.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1, 2]
        # seeded, one torch thread: a worker process trains exactly what the threads sweep trained
        for name in ("best_val_accuracy", "test_accuracy", "test_loss"):
            assert trial.data.metrics[name] == pytest.approx(expected[lr].data.metrics[name], rel=1e-6), (lr, name)
    # the best trial is recorded on the parent, as with threads
    assert parent.data.tags["fitflow.best_run_id"] == on_dask.best_run_id
    assert trials[parent.data.params["best.lr"]].info.run_id == on_dask.best_run_id
    assert on_dask.best_params == threads.best_params and on_dask.best_value == pytest.approx(threads.best_value)
    assert parent.data.metrics["trials_complete"] == 4

    # Two worker processes trained them, none of them this one.
    workers = {trial.data.tags["fitflow.worker"].rsplit(":", 1)[1] for trial in trials.values()}
    assert len(workers) == 2 and str(os.getpid()) not in workers
    assert {t.data.tags["fitflow.worker"] for t in children(client, threads.parent_run_id).values()} == {
        f"{os.uname().nodename}:{os.getpid()}"}

    # The gpu limit of 1 held across the processes: the train_model task runs never overlapped.
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent.data.tags["prefect.flow_run_id"]])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train_model")))
    spans = sorted((run.start_time, run.end_time) for run in runs)
    assert len(spans) == 4 and all(run.state.is_completed() for run in runs)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans)), spans


@pytest.fixture
def prefect_api_url(prefect_server, monkeypatch) -> str:
    """The session's Prefect server as PREFECT_API_URL: what a sweep on an existing cluster needs."""
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    return PREFECT_API_URL.value()


def test_workers_that_track_elsewhere_fail_the_sweep_in_one_line(prefect_api_url, mlflow_uri, tmp_path, capsys):
    # An existing scheduler whose worker was started without this sweep's MLFLOW_TRACKING_URI.
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  env={"MLFLOW_TRACKING_URI": elsewhere}) as cluster:
        (worker,) = [nanny.worker_address for nanny in cluster.workers.values()]
        args = ["sweep", "--n-trials", "1", "--task-runner", "dask", "--cluster-address", cluster.scheduler_address,
                "--experiment", "sweep-dask-misconfigured"]
        assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fitflow: error: Dask worker {worker} tracks to {elsewhere}, this sweep to {mlflow_uri}; "
        "start the workers with this MLFLOW_TRACKING_URI")
    # it failed before the sweep's parent run was created: nothing to clean up in MLflow
    assert MlflowClient(mlflow_uri).get_experiment_by_name("sweep-dask-misconfigured") is None


def test_an_unreachable_scheduler_fails_in_one_line(prefect_api_url, mlflow_uri, capsys):
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        assert main(["sweep", "--n-trials", "1", "--task-runner", "dask", "--cluster-address", "tcp://127.0.0.1:9"]) == 2
    assert "cannot reach the dask cluster at tcp://127.0.0.1:9" in capsys.readouterr().err


def test_an_existing_cluster_needs_a_prefect_server_its_workers_can_reach(mlflow_uri, capsys):
    """Without PREFECT_API_URL the command's own server listens on loopback only: refused before it starts."""
    assert main(["sweep", "--n-trials", "1", "--task-runner", "dask", "--cluster-address", "tcp://10.0.0.7:8786"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fitflow: error: a sweep on an existing cluster needs a Prefect server its workers can reach; "
        "set PREFECT_API_URL (docs/scaling-sweeps.md)"]


def test_cluster_address_needs_a_cluster_runner(capsys):
    assert main(["sweep", "--cluster-address", "tcp://127.0.0.1:8786"]) == 2
    assert "cluster_address needs task_runner: dask or ray" in capsys.readouterr().err
