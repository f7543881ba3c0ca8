"""fitflow doctor closes MLflow runs whose Prefect flow run is over, and only those."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
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
REPO = Path(__file__).resolve().parents[1]


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
    _sigkill_then_doctor(process, mlflow_uri, "doctor-kill")


def _sigkill_then_doctor(process: subprocess.Popen, mlflow_uri: str, experiment: str) -> None:
    """SIGKILL a held fitflow command whose one MLflow run is in `experiment`; that run is left RUNNING,
    and `fitflow doctor` closes it FAILED naming the dead pid, its flow run Crashed."""
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "RUNNING"  # what the SIGKILL left

    assert main(["doctor"]) == 0

    closed = client.get_run(run.info.run_id)
    assert closed.info.status == "FAILED" and f"pid {process.pid}" in closed.data.tags.get("fitflow.closed_by", "")
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


def _held_process(args: list[str], tmp_path: Path, hold: Path, epoch: int, python: str = "") -> subprocess.Popen:
    """A real fitflow command on the session's Prefect server, held at a known point (tests/custom_models.py)."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-c", python, *args] if python else [str(Path(sys.executable).with_name("fitflow")), *args]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until_held(process, hold, epoch)
    return process


def _sweep_held_in_its_trials(tmp_path: Path, experiment: str) -> tuple[subprocess.Popen, MlflowClient]:
    """`fitflow sweep` of two trials at once, both held at the start of their epoch 2 (their runs exist)."""
    hold = tmp_path / "hold"
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps({
        "base": {"epochs": 3, "patience": 0, "experiment": experiment, "model": "custom_models:HoldAtEpochs",
                 "model_kwargs": {"folder": str(hold), "epochs": [2]}},
        "space": {"lr": {"choices": [0.01, 0.02]}}, "sampler": "grid", "n_trials": 2, "parallelism": 2,
        "prune": False}))  # JSON is YAML
    process = _held_process(["sweep", "--config", str(config)], tmp_path, hold, 2)
    client = MlflowClient()
    deadline = time.monotonic() + 120  # the second trial reaches its hold too: both child runs exist
    while len(client.search_runs([client.get_experiment_by_name(experiment).experiment_id])) < 3:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return process, client


def _parent(client: MlflowClient, experiment: str):
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    return parent


def _runs_of(client: MlflowClient, experiment: str) -> dict[str, str]:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {("trial-" + r.data.tags["fitflow.trial"]) if "fitflow.trial" in r.data.tags else "parent": r.info.status
            for r in runs}


@pytest.mark.slow
def test_a_sigkilled_sweep_ends_its_parent_and_started_trials_failed(mlflow_uri, tmp_path):
    """SIGKILL of a real `fitflow sweep` while both its trials train: no code of its own runs, and
    `fitflow doctor` closes the parent run and each trial run FAILED, its flow run Crashed."""
    process, client = _sweep_held_in_its_trials(tmp_path, "sweep-kill")
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert _runs_of(client, "sweep-kill") == {"parent": "RUNNING", "trial-0": "RUNNING", "trial-1": "RUNNING"}

    assert main(["doctor"]) == 0

    assert _runs_of(client, "sweep-kill") == {"parent": "FAILED", "trial-0": "FAILED", "trial-1": "FAILED"}
    parent = _parent(client, "sweep-kill")
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(parent.data.tags["prefect.flow_run_id"]).state.type.value == "CRASHED"


@pytest.mark.slow
def test_a_cancelled_sweep_whose_process_is_gone_ends_its_runs_killed(mlflow_uri, tmp_path):
    """A sweep's flow run cancelled from Prefect after its process was killed (what `fitflow serve` or a
    worker does): the flow's on_cancellation hook, run as the runner runs it, ends every run KILLED."""
    from prefect.states import Cancelled

    from flows.sweep import sweep

    process, client = _sweep_held_in_its_trials(tmp_path, "sweep-cancel")
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    parent = _parent(client, "sweep-cancel")
    with get_client(sync_client=True) as prefect:
        flow_run_id = parent.data.tags["prefect.flow_run_id"]
        prefect.set_flow_run_state(flow_run_id, Cancelled(message="cancelled from the UI"), force=True)
        flow_run = prefect.read_flow_run(flow_run_id)
    for hook in sweep.on_cancellation_hooks:
        hook(sweep, flow_run, flow_run.state)

    assert _runs_of(client, "sweep-cancel") == {"parent": "KILLED", "trial-0": "KILLED", "trial-1": "KILLED"}
    assert "ended Cancelled: cancelled from the UI" in client.get_run(parent.info.run_id).data.tags["fitflow.closed_by"]


# Holds `fitflow predict` where its prediction run exists and its summary is about to be logged:
# an audit hook (no code of fitflow's replaced) waits for a file when the summary is opened to be read.
HOLD_PREDICT_AT_SUMMARY = """
import pathlib, sys, time
from flows.cli import main
folder = pathlib.Path(sys.argv[1])
def hold(event, args):
    if event == "open" and str(args[0]).endswith(".summary.json") and "r" in str(args[1] or "r") \\
            and not (folder / "reached-1").exists():
        (folder / "reached-1").touch()
        while not (folder / "release-1").exists():
            time.sleep(0.02)
sys.addaudithook(hold)
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_sigkilled_predict_ends_its_prediction_run_failed(mlflow_uri, tmp_path):
    """SIGKILL of a real `fitflow predict` after its prediction run was created (held while it logs
    the summary): `fitflow doctor` closes the prediction run FAILED, its flow run Crashed."""
    from flows.train import train
    from tasks.config import TrainConfig

    trained = train(TrainConfig(epochs=1, patience=0, experiment="predict-kill-model"))
    hold = tmp_path / "hold"
    hold.mkdir()
    process = _held_process([str(hold), "predict", "--model", trained.run_id, "--data", str(REPO / "data" / "breast_cancer.csv"),
                             "--out", str(tmp_path / "p.csv"), "--experiment", "predict-kill"],
                            tmp_path, hold, 1, python=HOLD_PREDICT_AT_SUMMARY)
    _sigkill_then_doctor(process, mlflow_uri, "predict-kill")
