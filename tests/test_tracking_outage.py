"""The MLflow server goes away in the middle of a run: training goes on and no metric is lost.

A real `mlflow server` (sqlite store in tmp_path) is stopped while the real train flow runs and
started again on the same port and store, either during training (delivery catches up, the run
ends FINISHED) or only after the flow has ended (`fitflow upload-metrics` delivers the epochs
kept locally and ends the run FAILED with the reason).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from stack import Process, free_port, wait_http

from flows.cli import main
from flows.train import train
from tasks.config import TrainConfig
from tasks.metrics_journal import MetricsKeptLocally

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]
BIN = Path(sys.executable).parent
WATCH_TIMEOUT_S = 240  # only a guard against a hang (training that blocks on the dead server)


class MlflowServer:
    """`mlflow server` on a fixed port and sqlite store, so it can be stopped and started again."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: Process | None = None

    def start(self) -> None:
        log = self.root / "mlflow-server.log"
        argv = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1"]
        with open(log, "ab") as out:
            popen = subprocess.Popen(argv, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                                     start_new_session=True)
        self.process = Process("mlflow-server", popen, log)
        wait_http(self.process, f"{self.uri}/health")

    def stop(self) -> None:
        """The server dies at once (SIGTERM and SIGKILL): connections are refused from now on."""
        if self.process is not None and self.process.alive():
            self.process.stop(timeout=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One store for the module: a cold start migrates a fresh sqlite database (tens of seconds on 2 cores)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def home(server, tmp_path, monkeypatch) -> Path:
    """This test's FITFLOW_HOME (so its journal is the only one), tracking to the running server."""
    if not server.process.alive():
        server.start()
    monkeypatch.setenv("FITFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    return tmp_path / "home"


def write_table(path: Path, rows: int = 2_000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 16))
    label = (x[:, :4].sum(axis=1) + rng.normal(scale=0.5, size=rows) > 0).astype(int)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(16)])
    frame["label"] = label
    frame.to_csv(path, index=False)
    return path


def config(tmp_path: Path, epochs: int, hold_at: list[int]) -> TrainConfig:
    """Training that waits at the start of each epoch in `hold_at` until `release` lets it go on."""
    return TrainConfig(data=str(write_table(tmp_path / "table.csv")), target="label", epochs=epochs, batch_size=32,
                       patience=0, experiment="outage", model="custom_models:HoldAtEpochs",
                       model_kwargs={"folder": str(tmp_path / "hold"), "epochs": hold_at})


def reached(tmp_path: Path, epoch: int, training: Future) -> None:
    """Wait until training is held at the start of `epoch` (epochs before it are journaled)."""
    deadline = time.monotonic() + WATCH_TIMEOUT_S
    while not (tmp_path / "hold" / f"reached-{epoch}").exists():
        if training.done():
            raise AssertionError(f"training ended before epoch {epoch}: {training.exception()!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"training did not reach epoch {epoch} in {WATCH_TIMEOUT_S} s: it is stuck")
        time.sleep(0.02)


def release(tmp_path: Path, epoch: int) -> None:
    (tmp_path / "hold" / f"release-{epoch}").touch()


def journal_lines(home: Path, at_least: int, training: Future) -> tuple[Path, int]:
    """Wait until the run's journal holds `at_least` epochs; returns it and its count."""
    deadline = time.monotonic() + WATCH_TIMEOUT_S
    while time.monotonic() < deadline:
        journals = list((home / "checkpoints").glob("*/metrics.jsonl"))
        lines = journals[0].read_text().count("\n") if journals else 0
        if lines >= at_least:
            return journals[0], lines
        if training.done():
            raise AssertionError(f"training ended at epoch {lines}, before epoch {at_least}: {training.exception()!r}")
        time.sleep(0.05)
    raise AssertionError(f"no epoch {at_least} in the journal after {WATCH_TIMEOUT_S} s: training is stuck")


def delivered(home: Path, count: int, training: Future) -> None:
    """Wait until the server has accepted `count` epochs (the journal's cursor): no batch is in flight."""
    deadline = time.monotonic() + WATCH_TIMEOUT_S
    while True:
        marks = list((home / "checkpoints").glob("*/metrics.delivered"))
        if marks and int(marks[0].read_text()) >= count:
            return
        if training.done():
            raise AssertionError(f"training ended before epoch {count} was delivered: {training.exception()!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"epoch {count} not delivered after {WATCH_TIMEOUT_S} s: delivery is stuck")
        time.sleep(0.05)


def assert_every_step_once(client: MlflowClient, run_id: str, names: list[str], epochs: int) -> None:
    for name in names:
        steps = sorted(m.step for m in client.get_metric_history(run_id, name))
        assert steps == list(range(1, epochs + 1)), f"{name}: {steps}"


def test_training_goes_on_while_the_server_is_down_and_delivery_catches_up(server, home, tmp_path):
    epochs = 16
    with ThreadPoolExecutor(1) as pool:
        training = pool.submit(train, config(tmp_path, epochs, hold_at=[3, 7]))
        reached(tmp_path, 3, training)  # epochs 1-2 are journaled; epoch 3 waits
        server.stop()
        journal, at_stop = journal_lines(home, 2, training)
        release(tmp_path, 3)
        # Epochs keep coming while nothing answers: training does not wait for tracking.
        reached(tmp_path, 7, training)
        _, at_restart = journal_lines(home, 6, training)
        server.start()
        release(tmp_path, 7)
        result = training.result(timeout=WATCH_TIMEOUT_S)

    assert (at_stop, at_restart) == (2, 6) and result.epochs_trained == epochs
    client = MlflowClient(server.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert_every_step_once(client, result.run_id, [*result.history, "lr"], epochs)
    assert "test_accuracy" in run.data.metrics and run.data.tags["fitflow.model_uri"] == result.model_uri
    assert journal.parent.name == result.run_id
    assert (journal.parent / "metrics.delivered").read_text() == str(epochs)


def test_server_back_only_after_the_run_then_upload_metrics_delivers_and_ends_it(server, home, tmp_path, monkeypatch,
                                                                                 capsys, caplog):
    epochs = 10
    monkeypatch.setenv("FITFLOW_TRACKING_WAIT_S", "2")  # the server will not come back: do not wait 30 s for it
    with ThreadPoolExecutor(1) as pool:
        training = pool.submit(train, config(tmp_path, epochs, hold_at=[3]))
        reached(tmp_path, 3, training)
        # Epochs 1-2 reached the server before it stops: a batch in flight at the kill could be
        # stored by the server without the cursor moving, and the upload would then start later.
        delivered(home, 2, training)
        server.stop()
        journal, at_stop = journal_lines(home, 2, training)
        release(tmp_path, 3)
        with pytest.raises(MetricsKeptLocally) as failure:
            training.result(timeout=WATCH_TIMEOUT_S)

    run_id = journal.parent.name
    # One warning when training ends, and the flow's error: both name the epochs, the file and the command.
    warnings = [r.getMessage() for r in caplog.records if r.name == "fitflow" and "kept locally" in r.getMessage()]
    assert len(warnings) == 1, warnings
    for text in (warnings[0], str(failure.value)):
        assert f"of run {run_id} are kept locally in {journal}" in text, text
        assert f"fitflow upload-metrics {run_id}" in text
    assert (journal.parent / "metrics.delivered").read_text() == str(at_stop) == "2"
    assert f"epochs 3-{epochs} of run" in str(failure.value)
    assert (journal.parent / "run_end.json").exists()

    capsys.readouterr()
    assert main(["upload-metrics", run_id]) == 2  # still down: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fitflow: error: MLflow tracking server") and "unreachable" in err[0]
    assert main(["upload-metrics", "0" * 32]) == 2
    assert "has no metrics journal" in capsys.readouterr().err

    server.start()
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing could end it while the server was down
    assert main(["upload-metrics", run_id]) == 0
    out = capsys.readouterr().out
    assert f"sent epochs 3-{epochs} of run {run_id}" in out, out
    assert f"run {run_id} ended FAILED" in out
    names = [*pd.read_json(journal, lines=True)["metrics"][0]]
    assert "val_loss" in names and "lr" in names
    assert_every_step_once(client, run_id, names, epochs)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "MetricsKeptLocally" in run.data.tags["fitflow.error"]
    assert "unreachable" in run.data.tags["fitflow.closed_by"]

    assert main(["upload-metrics", run_id]) == 0  # a second upload sends nothing again
    assert f"nothing left to send of run {run_id}" in capsys.readouterr().out
    assert_every_step_once(client, run_id, names, epochs)


def test_a_run_whose_end_the_server_fails_is_not_left_running(server, home, monkeypatch, capsys):
    """The server goes away after the last step, when only the run's end (FINISHED) is left to record:
    the end is kept locally, and `fitflow upload-metrics` ends the run FAILED with the reason."""
    from tasks import tracking
    from tasks.metrics_journal import Entry, Journal

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each call fails at once, not after minutes
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("end-fails")).info.run_id
    folder = home / "checkpoints" / run_id
    journal = Journal(folder)
    journal.record_origin(run_id, server.uri)
    journal.append(Entry(1, 1000, {"val_loss": 0.5}))
    journal.mark_delivered(1)

    with pytest.raises(Exception, match="127.0.0.1"):  # the refused FINISHED call, raised after the end is kept
        with tracking.finished_or_failed(client, run_id, folder):
            server.stop()  # the block's work is done; the server is gone before the run's end is recorded
    assert journal.kept_end()["status"] == "FAILED"

    server.start()
    assert client.get_run(run_id).info.status == "RUNNING"
    capsys.readouterr()
    assert main(["upload-metrics", run_id]) == 0
    assert f"run {run_id} ended FAILED" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "the tracking server failed the run's end" in run.data.tags["fitflow.closed_by"]
