"""fitflow doctor closes MLflow runs whose Prefect flow run is over, and only those."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from custom_models import wait_until_held
from mlflow.tracking import MlflowClient
from prefect import flow, get_client
from prefect.states import Cancelled, Crashed, Running

from flows.cli import main
from flows.doctor import check_runs, close_runs_of_flow_run
from flows.environment import fitflow_home
from tasks import run_owner

pytestmark = pytest.mark.usefixtures("prefect_server")


@flow(name="doctor-probe")
def probe() -> None:
    """Never called: gives the flow runs below a flow."""


def test_doctor_closes_runs_of_finished_flow_runs(mlflow_uri, capsys):
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("doctor")
    runs = {}
    with get_client(sync_client=True) as prefect:
        for name, state in (("crashed", Crashed(message="process killed")), ("cancelled", Cancelled()),
                            ("running", Running())):
            flow_run = prefect.create_flow_run(probe, state=state)
            runs[name] = client.create_run(experiment, tags={"prefect.flow_run_id": str(flow_run.id)}).info.run_id
    runs["unlinked"] = client.create_run(experiment).info.run_id
    finished = client.create_run(experiment).info.run_id
    client.set_terminated(finished, "FINISHED")

    dry = {f.run_id: f.action for f in check_runs(mlflow_uri, fix=False)}
    assert dry[runs["crashed"]] == "would close FAILED"
    assert client.get_run(runs["crashed"]).info.status == "RUNNING"

    assert main(["doctor"]) == 0
    assert runs["crashed"] in capsys.readouterr().out
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"crashed": "FAILED", "cancelled": "KILLED", "running": "RUNNING", "unlinked": "RUNNING"}
    assert "ended Crashed: process killed" in client.get_run(runs["crashed"]).data.tags["fitflow.closed_by"]
    assert client.get_run(finished).info.status == "FINISHED"


def _linked_run(client: MlflowClient, experiment: str, prefect, state) -> tuple[str, str]:
    flow_run = prefect.create_flow_run(probe, state=state)
    run_id = client.create_run(experiment, tags={"prefect.flow_run_id": str(flow_run.id)}).info.run_id
    return run_id, str(flow_run.id)


def test_doctor_closes_a_run_whose_recorded_process_is_gone(mlflow_uri, capsys):
    """A CLI run sends no heartbeats: after a SIGKILL its flow run stays Running. The owner the run
    recorded decides: a pid gone from this host closes it; a live one or another host's is left."""
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("doctor-owner")
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()  # reaped: its pid no longer exists
    owners = {"gone": {"pid": exited.pid, "host": socket.gethostname()},
              "alive": {"pid": os.getpid(), "host": socket.gethostname()},
              "elsewhere": {"pid": exited.pid, "host": "another-machine"}}
    runs = {}
    with get_client(sync_client=True) as prefect:
        for name, owner in owners.items():
            runs[name] = _linked_run(client, experiment, prefect, Running())
            folder = fitflow_home() / "checkpoints" / runs[name][0]
            folder.mkdir(parents=True)
            (folder / run_owner.OWNER_FILE).write_text(json.dumps(owner))

        assert main(["doctor"]) == 0

        out = capsys.readouterr().out
        status = {name: client.get_run(run_id).info.status for name, (run_id, _) in runs.items()}
        assert status == {"gone": "FAILED", "alive": "RUNNING", "elsewhere": "RUNNING"}, out
        closed_by = client.get_run(runs["gone"][0]).data.tags["fitflow.closed_by"]
        assert f"pid {exited.pid} on host {socket.gethostname()}" in closed_by and "is gone" in closed_by
        assert prefect.read_flow_run(runs["gone"][1]).state.type.value == "CRASHED"
        assert prefect.read_flow_run(runs["alive"][1]).state.type.value == "RUNNING"
    assert "run fitflow doctor there" in out


@pytest.mark.slow
def test_doctor_closes_a_sigkilled_fitflow_train(mlflow_uri, tmp_path):
    """The whole path: a real `fitflow train` records its owner, is SIGKILLed mid-epoch, and
    `fitflow doctor` closes its MLflow run FAILED and its flow run Crashed."""
    from prefect.settings import PREFECT_API_URL

    hold = tmp_path / "hold"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path(__file__).parent)}
    args = ["train", "--epochs", "4", "--experiment", "doctor-kill", "--model", "custom_models:HoldAtEpochs",
            "--model-kwargs", json.dumps({"folder": str(hold), "epochs": [2]})]
    process = subprocess.Popen([str(Path(sys.executable).with_name("fitflow")), *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until_held(process, hold, 2)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("doctor-kill").experiment_id])
    assert run.info.status == "RUNNING"  # what the SIGKILL left

    assert main(["doctor"]) == 0

    closed = client.get_run(run.info.run_id)
    assert closed.info.status == "FAILED" and f"pid {process.pid}" in closed.data.tags["fitflow.closed_by"]
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(run.data.tags["prefect.flow_run_id"]).state.type.value == "CRASHED"


@pytest.mark.parametrize("name", ["train", "sweep", "predict"])
def test_every_flow_closes_its_runs_when_it_crashes_or_is_cancelled(name):
    from flows.predict import predict
    from flows.sweep import sweep
    from flows.train import train_flow

    flow_object = {"train": train_flow, "sweep": sweep, "predict": predict}[name]
    assert close_runs_of_flow_run in flow_object.on_crashed_hooks
    assert close_runs_of_flow_run in flow_object.on_cancellation_hooks
