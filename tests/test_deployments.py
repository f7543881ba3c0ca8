"""Deployments on a real Prefect server: prefect.yaml, parameter validation, serve, cancel.

The harness server is a real Prefect API in a subprocess; `prefect deploy` and `fitflow serve`
run as real processes against it, the way a user runs them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from prefect import get_client
from prefect.deployments import run_deployment
from prefect.flows import load_flow_from_entrypoint
from prefect.states import Cancelling

from flows.deployments import GPU_POOL, GPU_TAG, deployment_specs
from flows.train import train
from tasks.config import TrainConfig
from tasks.errors import TrackingError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]


@pytest.fixture
def server_env(tmp_path) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "FITFLOW_REPO": str(REPO),
            "FITFLOW_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "PYTHONPATH": str(REPO / "tests")}  # the flow runs of `fitflow serve` import tests' models by name


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _delete_deployment(name: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.delete_deployment(client.read_deployment_by_name(name).id)
        except Exception:  # not there
            pass


def test_setup_and_deploy_all_from_prefect_yaml(server_env):
    setup = _cli(str(BIN / "fitflow"), "setup", "--gpus", "2", env=server_env)
    assert setup.returncode == 0, setup.stderr[-2000:]
    deploy = _cli(str(BIN / "prefect"), "--no-prompt", "deploy", "--all", env=server_env)
    assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(GPU_POOL).concurrency_limit == 2
        assert client.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit == 2
        names = {f"{load_flow_from_entrypoint(str(REPO / spec['entrypoint'])).name}/{spec['name']}" for spec in deployment_specs()}
        assert names == {"train/default", "sweep/default", "predict/batch", "watch/default"}
        for name in names:
            deployment = client.read_deployment_by_name(name)
            assert deployment.work_pool_name == GPU_POOL and deployment.enforce_parameter_schema
            assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        (schedule,) = client.read_deployment_by_name("train/default").schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
        assert schedule.parameters == {"experiment": "nightly", "epochs": 50}
        (watch_schedule,) = client.read_deployment_by_name("watch/default").schedules
        assert watch_schedule.schedule.cron == "*/10 * * * *"
        # the retrain trigger: an automation linked to train/default that runs it on fitflow.data.changed
        train_id = client.read_deployment_by_name("train/default").id
        automations = client.read_resource_related_automations(f"prefect.deployment.{train_id}")
        starts = {next(iter(a.trigger.expect)): a.actions[0].parameters["data"] for a in automations}
        assert starts == {"fitflow.data.changed": "{{ event.payload.source }}",  # the watch flow's event
                          "fitflow.drift.detected": "{{ event.payload.training_data }}"}  # predict's
        schema = client.read_deployment_by_name("train/default").parameter_openapi_schema["properties"]
        assert schema["epochs"]["minimum"] == 1 and "description" in schema["batch_size"]

    bad = _cli(str(BIN / "prefect"), "deployment", "run", "train/default", "--param", "epochs=-1", env=server_env)
    assert "Validation failed for field 'epochs'" in " ".join((bad.stdout + bad.stderr).split())
    choice = _cli(str(BIN / "prefect"), "deployment", "run", "train/default", "--param", "optimizer=adamax", env=server_env)
    assert "is not one of ['adam', 'adamw', 'sgd']" in " ".join((choice.stdout + choice.stderr).split())
    good = _cli(str(BIN / "prefect"), "deployment", "run", "train/default", "--param", "epochs=3", "--param", "lr=0.01",
                env=server_env)
    assert good.returncode == 0 and "'epochs': 3" in good.stdout


def test_serve_runs_triggered_runs_and_cancels_promptly(server_env, tmp_path):
    for name in ("train/default", "sweep/default", "predict/batch"):
        _delete_deployment(name)  # a work-pool deployment of the same name would shadow the served one
    serve = subprocess.Popen([str(BIN / "fitflow"), "serve"], cwd=REPO, env=server_env,
                             stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_served_deployment("train/default")
        done = run_deployment("train/default", parameters={"epochs": 3, "patience": 0, "experiment": "served"}, timeout=300)
        assert done.state.is_completed(), (tmp_path / "serve.log").read_text()[-3000:]
        client = MlflowClient(server_env["MLFLOW_TRACKING_URI"])
        (run,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
        assert run.info.status == "FINISHED" and run.data.params["epochs"] == "3"
        assert run.data.tags["prefect.flow_run_id"] == str(done.id)

        # The same deployment runs any data kind: the shipped image folder, and your own Datasets
        # (the dataset example of the README), each through the form's fields alone.
        for experiment, parameters, logged in (
                ("served-images", {"data": "digits", "image_size": 8, "epochs": 1}, {"data.data_kind": "images"}),
                ("served-dataset", {"data": "examples.digits_gru:make_datasets", "model": "examples.digits_gru:DigitsGRU",
                                    "epochs": 1}, {"model": "examples.digits_gru:DigitsGRU"})):
            kind = run_deployment("train/default", parameters={**parameters, "patience": 0, "experiment": experiment},
                                  timeout=300)
            assert kind.state.is_completed(), (tmp_path / "serve.log").read_text()[-3000:]
            (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
            assert run.info.status == "FINISHED" and run.data.params["data"] == parameters["data"]
            assert {k: run.data.params.get(k) for k in logged} == logged and "test_accuracy" in run.data.metrics

        # A long run, cancelled while it trains: it stops, keeps its last epoch, ends KILLED.
        long = run_deployment("train/default", parameters={"epochs": 100000, "patience": 0, "experiment": "cancelled"},
                              timeout=0)
        run_id = _wait_for_epochs(client, "cancelled", at_least=2)
        with get_client(sync_client=True) as prefect:
            prefect.set_flow_run_state(long.id, Cancelling(), force=True)
            deadline = time.monotonic() + 120
            while not prefect.read_flow_run(long.id).state.is_final() and time.monotonic() < deadline:
                time.sleep(1)
            assert prefect.read_flow_run(long.id).state.is_cancelled()
        run = client.get_run(run_id)
        assert run.info.status == "KILLED", run.data.tags.get("fitflow.error")
        # Training has stopped: the flow run's process is gone (no sleep-then-compare), and MLflow
        # holds every epoch it journaled (fit's end delivers them before the run ends KILLED).
        _wait_until_gone(serve, long.id)
        folder = Path(server_env["FITFLOW_HOME"]) / "checkpoints" / run_id
        journaled = (folder / "metrics.jsonl").read_text().count("\n")
        assert len(client.get_metric_history(run_id, "val_loss")) == journaled >= 2
        kept = list(folder.glob("epoch-*.pt"))
        assert kept  # what `fitflow resume <run id>` continues from

        # A flow-run process SIGKILLed while it trains (the OOM killer, a lost node): no code of
        # its own runs; serve's runner marks it Crashed and the flow's on_crashed hook closes the
        # MLflow run FAILED. `fitflow resume` then continues the same run to the end.
        # The model holds training at the start of epoch 3 until released (tests/custom_models.py):
        # the kill lands during training however fast the machine is.
        hold = tmp_path / "hold"
        crashed = run_deployment("train/default", parameters={
            "epochs": 300, "patience": 0, "experiment": "crashed", "model": "custom_models:HoldAtEpochs",
            "model_kwargs": {"folder": str(hold), "epochs": [3]}}, timeout=0)
        deadline = time.monotonic() + 180  # only a guard against a hang
        while not (hold / "reached-3").exists():
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.1)
        run_id = _wait_for_epochs(client, "crashed", at_least=2)
        (engine,) = _flow_run_processes(serve, crashed.id)
        engine.kill()
        with get_client(sync_client=True) as prefect:
            deadline = time.monotonic() + 120
            while not prefect.read_flow_run(crashed.id).state.is_final() and time.monotonic() < deadline:
                time.sleep(1)
            assert prefect.read_flow_run(crashed.id).state.is_crashed()
        deadline = time.monotonic() + 120  # the runner loads the flow to run its hooks
        while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.5)
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and "ended Crashed" in run.data.tags.get("fitflow.closed_by", ""), (
            run.info.status, run.data.tags, (tmp_path / "serve.log").read_text()[-4000:])
        (hold / "release-3").touch()  # the resumed process counts its epochs from 1: let its 3rd pass
        resumed = _cli(str(BIN / "fitflow"), "resume", run_id, env=server_env)
        assert resumed.returncode == 0 and f"MLflow run: {run_id}" in resumed.stdout, resumed.stderr[-3000:]
        assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == list(range(1, 301))
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)


def _wait_for_served_deployment(name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                client.read_deployment_by_name(name)
                return
            except Exception:
                time.sleep(1)
    raise AssertionError(f"fitflow serve did not register {name}")


def _flow_run_processes(serve: subprocess.Popen, flow_run_id) -> list[psutil.Process]:
    """The live processes under `fitflow serve` that run this flow run (`python -m prefect.engine`)."""
    found = []
    for process in psutil.Process(serve.pid).children(recursive=True):
        try:
            if (process.environ().get("PREFECT__FLOW_RUN_ID") == str(flow_run_id) and "prefect.engine" in process.cmdline()
                    and process.status() != psutil.STATUS_ZOMBIE):
                found.append(process)
        except psutil.Error:  # gone meanwhile
            continue
    return found


def _wait_until_gone(serve: subprocess.Popen, flow_run_id, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout  # only a guard against a hang
    while _flow_run_processes(serve, flow_run_id):
        assert time.monotonic() < deadline, f"flow run {flow_run_id} still has a process after {timeout:.0f} s"
        time.sleep(0.5)


def _wait_for_epochs(client: MlflowClient, experiment: str, at_least: int, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = client.get_experiment_by_name(experiment) if Path(client.tracking_uri.removeprefix("sqlite:///")).exists() else None
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "val_loss")) >= at_least:
            return runs[0].info.run_id
        time.sleep(0.5)
    raise AssertionError(f"no run in '{experiment}' reached {at_least} epochs")


def test_unreachable_tracking_server_fails_fast_naming_it(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    # This message is fitflow's own check before the run is created (tasks/tracking.py check_server):
    # MLflow's retries, minutes per call, never start. No clock is read: that would race the machine.
    with pytest.raises(TrackingError, match=r"MLflow tracking server http://127\.0\.0\.1:9 is unreachable"):
        train(TrainConfig(epochs=2))
