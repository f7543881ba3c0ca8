"""Crash recovery of the real `train` flow: a SIGKILLed `fitflow train` process, then `fitflow resume`;
and a training task that crashes and is retried by Prefect. Each ends with the weights, bit for
bit, and the metric steps, exactly once each, of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from custom_models import wait_until_held
from mlflow.tracking import MlflowClient

from flows.cli import main
from flows.environment import fitflow_home
from flows.train import train
from tasks.config import TrainConfig
from tasks.errors import ConfigError

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]
EPOCHS = 6


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """16,000 rows: 350 training steps of 32 per epoch (the crash tests count steps)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16_000, 12)).astype(np.float32)
    y = (x[:, :4].sum(axis=1) + 0.5 * rng.normal(size=len(x)) > 0).astype(int)
    path = tmp_path_factory.mktemp("resume") / "table.csv"
    pd.DataFrame(x, columns=[f"f{i}" for i in range(12)]).assign(label=y).to_csv(path, index=False)
    return path


def _config(table: Path, **overrides) -> TrainConfig:
    settings = {"data": str(table), "target": "label", "epochs": EPOCHS, "batch_size": 32, "patience": 0,
                "dropout": 0.2, "scheduler": "cosine", "experiment": "resume"}
    return TrainConfig(**{**settings, **overrides})


def _steps(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    run = client.get_run(run_id)
    return {key: sorted(m.step for m in client.get_metric_history(run_id, key))
            for key in run.data.metrics if key.startswith(("train_", "val_"))}


def _best_weights(client: MlflowClient, run_id: str, tmp: Path) -> dict[str, torch.Tensor]:
    path = client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp / run_id))
    return torch.load(path, weights_only=True)["model"]


def _learned(metrics: dict[str, float]) -> dict[str, float]:
    """A run's metrics but the machine's (system/*: CPU, memory, disk, network while it ran)."""
    return {key: value for key, value in metrics.items() if not key.startswith("system/")}


def _assert_same_training(client, whole_id, resumed_id, tmp: Path) -> None:
    assert _steps(client, resumed_id) == {key: list(range(1, EPOCHS + 1)) for key in _steps(client, whole_id)}
    whole, resumed = (_learned(client.get_run(run_id).data.metrics) for run_id in (whole_id, resumed_id))
    assert resumed == whole  # last values of every metric, test and baseline metrics included
    a, b = _best_weights(client, whole_id, tmp), _best_weights(client, resumed_id, tmp)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert client.get_run(resumed_id).info.status == "FINISHED"


def test_sigkilled_training_process_resumes_to_bit_identical_weights(table, mlflow_uri, tmp_path, capsys):
    # The model holds training at the start of epoch 3 until released (tests/custom_models.py), so
    # the kill lands inside epoch 3 however fast the machine is; uninterrupted, it never holds.
    hold = tmp_path / "hold"
    model = {"model": "custom_models:HoldAtEpochs", "model_kwargs": {"folder": str(hold), "epochs": [3]}}
    whole = train(_config(table, model=model["model"], model_kwargs={"folder": str(hold), "epochs": []}))

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path(__file__).parent)}
    exe = Path(sys.executable).with_name("fitflow")
    args = ["train", "--data", str(table), "--target", "label", "--epochs", str(EPOCHS), "--batch-size", "32",
            "--patience", "0", "--dropout", "0.2", "--scheduler", "cosine", "--experiment", "resume",
            "--model", model["model"], "--model-kwargs", json.dumps(model["model_kwargs"])]
    checkpoints = fitflow_home() / "checkpoints"
    earlier = set(checkpoints.iterdir())  # other tests' runs share this home
    process = subprocess.Popen([str(exe), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until_held(process, hold, 3)
    process.send_signal(signal.SIGKILL)  # held in epoch 3's first step
    assert process.wait(timeout=30) == -signal.SIGKILL
    # epoch 2's checkpoint may still have been in its writer thread (tasks/checkpoints.py): the run
    # resumes from epoch 2 or 1, to the same weights either way; epoch 1's was written before it
    (killed_dir,) = [p.parent for p in checkpoints.glob("*/epoch-00001.pt") if p.parent not in earlier]
    run_id = killed_dir.name
    assert not (killed_dir / "epoch-00003.pt").exists()  # it really was stopped during epoch 3
    client = MlflowClient(mlflow_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # what a SIGKILL leaves behind
    (hold / "release-3").touch()  # the resumed process counts its epochs from 1: let its 3rd pass

    capsys.readouterr()
    assert main(["resume", run_id]) == 0
    out = capsys.readouterr().out
    assert f"MLflow run: {run_id}" in out  # the same run, continued
    assert client.get_run(run_id).data.tags["fitflow.attempt"] == "2"
    _assert_same_training(client, whole.run_id, run_id, tmp_path)


def test_a_crashed_training_task_is_retried_by_prefect_and_resumes(table, mlflow_uri, tmp_path):
    marker = tmp_path / "crashed"
    kwargs = {"crash_at": 2 * 350 + 50, "marker": str(marker)}  # in epoch 3 (350 steps per epoch)
    marker.touch()  # the reference run must not crash
    whole = train(_config(table, model="custom_models:CrashOnceNet", model_kwargs=kwargs, retries=0))
    marker.unlink()
    retried = train(_config(table, model="custom_models:CrashOnceNet", model_kwargs=kwargs, retries=1))
    assert marker.exists()  # it did crash once
    client = MlflowClient(mlflow_uri)
    assert retried.run_id != whole.run_id
    _assert_same_training(client, whole.run_id, retried.run_id, tmp_path)


def test_resume_refuses_what_it_cannot_continue(table, mlflow_uri, capsys):
    finished = train(_config(table, epochs=1))
    capsys.readouterr()
    for argv, message in [
        (["resume", finished.run_id], "has already finished; there is nothing to resume"),
        (["resume", "0" * 32], "there is no MLflow run 00000000000000000000000000000000"),
        (["resume", "not-a-run-id"], "not an MLflow run id: 'not-a-run-id'"),
        (["resume", finished.run_id, "--device", "cuda:x"], "invalid config value for 'device'"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    # hyperparameters are the run's own: a flag for one is refused with one line, and exit 2
    with pytest.raises(SystemExit) as refused:
        main(["resume", finished.run_id, "--lr", "0.1"])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "unrecognized arguments: --lr 0.1; resume continues a run with the hyperparameters" in err, err
    assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as moved:  # resume was a flag of train: say where it went
        main(["train", "--resume", finished.run_id])
    assert moved.value.code == 2
    assert "; continue a run with `fitflow resume RUN_ID`" in capsys.readouterr().err


def test_an_image_run_that_crashed_resumes_with_fitflow_resume_to_the_same_weights(mlflow_uri, tmp_path, capsys):
    """The same checkpoints for images: augmentation and the decoded cache are functions of
    (seed, epoch), so the continued run ends where an uninterrupted one does, bit for bit."""
    from image_folders import write_class_folders

    folder = write_class_folders(tmp_path / "pets", per_class=20)
    marker = tmp_path / "crashed"
    per_epoch = 6  # 60 images: 42 train rows in batches of 8
    settings = {"data": str(folder), "image_size": 16, "batch_size": 8, "augment": "standard", "epochs": EPOCHS,
                "patience": 0, "scheduler": "cosine", "experiment": "resume-images", "retries": 0, "num_threads": 1,
                "model": "custom_models:CrashOnceCNN", "model_kwargs": {"crash_at": 2 * per_epoch + 3, "marker": str(marker)}}
    marker.touch()  # the reference run must not crash
    whole = train(TrainConfig(**settings))
    marker.unlink()
    with pytest.raises(Exception, match="simulated device failure"):
        train(TrainConfig(**settings))  # crashes in epoch 3; no retry: the run ends FAILED
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("resume-images").experiment_id
    (failed,) = [run for run in client.search_runs([experiment]) if run.info.status == "FAILED"]
    assert marker.exists()
    capsys.readouterr()
    assert main(["resume", failed.info.run_id, "--num-threads", "1"]) == 0
    assert f"MLflow run: {failed.info.run_id}" in capsys.readouterr().out
    _assert_same_training(client, whole.run_id, failed.info.run_id, tmp_path)


def test_a_sigkilled_image_run_with_loader_workers_resumes_to_the_same_weights(mlflow_uri, tmp_path, capsys):
    """The SIGKILL case for images: a `fitflow train` whose loader workers fill the shared decoded
    cache is killed in epoch 3; `fitflow resume`, with workers too, ends where a run never
    interrupted (in this process, no workers) ends, bit for bit."""
    from image_folders import write_class_folders

    folder = write_class_folders(tmp_path / "pets", per_class=20)
    hold = tmp_path / "hold"
    settings = {"data": str(folder), "image_size": 16, "batch_size": 8, "augment": "standard", "epochs": EPOCHS,
                "patience": 0, "scheduler": "cosine", "experiment": "kill-images", "model": "custom_models:HoldAtEpochsCNN"}
    whole = train(TrainConfig(**settings, model_kwargs={"folder": str(hold), "epochs": []}, num_threads=1))

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path(__file__).parent)}
    args = ["train", *[f"--{key.replace('_', '-')}={value}" for key, value in settings.items()],
            "--model-kwargs", json.dumps({"folder": str(hold), "epochs": [3]}), "--num-workers", "2", "--num-threads", "1"]
    checkpoints = fitflow_home() / "checkpoints"
    earlier = set(checkpoints.iterdir())
    process = subprocess.Popen([str(Path(sys.executable).with_name("fitflow")), *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until_held(process, hold, 3)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    (killed_dir,) = [p.parent for p in checkpoints.glob("*/epoch-00001.pt") if p.parent not in earlier]
    run_id = killed_dir.name
    client = MlflowClient(mlflow_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # what a SIGKILL leaves behind
    (hold / "release-3").touch()

    capsys.readouterr()
    assert main(["resume", run_id, "--num-workers", "2", "--num-threads", "1"]) == 0  # launch settings are resume's own
    assert f"MLflow run: {run_id}" in capsys.readouterr().out
    assert client.get_run(run_id).data.tags["fitflow.launch.num_workers"] == "2"
    _assert_same_training(client, whole.run_id, run_id, tmp_path)


def test_a_killed_trainers_run_lock_is_free_while_the_loader_workers_it_forked_live_on(tmp_path):
    """DataLoader workers are forked from the training process and share its open files. A lock
    they shared (flock) outlived a SIGKILLed trainer until its orphaned workers noticed (DataLoader's
    watchdog looks every 5 s), and `fitflow resume` right after the kill was refused, naming the
    dead pid. Here a forked child that lives on stands for those workers."""
    from tasks import run_owner

    folder, ready = tmp_path / "run", tmp_path / "child.pid"
    code = ("import os, sys, time\n"
            "from tasks import run_owner\n"
            "run_owner.claim(sys.argv[1], 'r1')\n"
            "child = os.fork()\n"
            "if child == 0:\n"
            "    time.sleep(300)\n"
            "    os._exit(0)\n"
            "open(sys.argv[2] + '.tmp', 'w').write(str(child))\n"
            "os.replace(sys.argv[2] + '.tmp', sys.argv[2])\n"
            "time.sleep(300)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    trainer = subprocess.Popen([sys.executable, "-c", code, str(folder), str(ready)], env=env)
    deadline = time.monotonic() + 120  # only a guard against a hang
    while not ready.exists():
        assert trainer.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    child = int(ready.read_text())
    try:
        with pytest.raises(ConfigError, match=f"run r1 is being trained by pid {trainer.pid}"):
            run_owner.check_free(folder, "r1")  # held while the trainer lives
        trainer.send_signal(signal.SIGKILL)
        assert trainer.wait(timeout=30) == -signal.SIGKILL
        os.kill(child, 0)  # the child lives on
        run_owner.check_free(folder, "r1")
        run_owner.claim(folder, "r1")
        run_owner.release(folder)
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_run_still_training_cannot_be_resumed_a_second_time(table, mlflow_uri, tmp_path, capsys):
    """A real `fitflow train` held in epoch 2 holds its run's lock: `fitflow resume` of that run is
    refused with one line naming the process, changes nothing, and the first process then finishes."""
    from prefect.settings import PREFECT_API_URL

    hold = tmp_path / "hold"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path(__file__).parent)}
    args = ["train", "--data", str(table), "--target", "label", "--epochs", "3", "--experiment", "resume-twice",
            "--model", "custom_models:HoldAtEpochs",
            "--model-kwargs", json.dumps({"folder": str(hold), "epochs": [2], "wait_s": 90})]
    process = subprocess.Popen([str(Path(sys.executable).with_name("fitflow")), *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until_held(process, hold, 2)
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("resume-twice").experiment_id])
    run_id = run.info.run_id

    capsys.readouterr()
    assert main(["resume", run_id]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fitflow: error: run {run_id} is being trained by pid {process.pid} on host {socket.gethostname()}; "
                   "wait for it to end (or stop that process), then resume it"), err
    assert "fitflow.attempt" not in client.get_run(run_id).data.tags  # not reopened: nothing changed

    (hold / "release-2").touch()
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out.decode()[-3000:]
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and "fitflow.attempt" not in finished.data.tags
    assert _steps(client, run_id)["val_loss"] == [1, 2, 3]


def test_a_run_resumed_on_a_machine_without_its_checkpoints_continues_from_mlflow(table, mlflow_uri, tmp_path, capsys):
    """`checkpoint_to_mlflow`: the epoch checkpoints are logged to the run's artifacts too; a resume where
    the checkpoint folder is missing (another machine) continues from them, each epoch logged once."""
    from tasks import tracking
    from tasks.metrics_journal import Journal

    assert tracking.logs_checkpoints("auto", "http://mlflow:5000") and not tracking.logs_checkpoints("auto", mlflow_uri)
    marker = tmp_path / "crashed"
    config = _config(table, epochs=4, batch_size=256, model="custom_models:CrashOnceNet", retries=0,
                     checkpoint_to_mlflow="on", experiment="resume-elsewhere",
                     model_kwargs={"crash_at": 2 * 44 + 20, "marker": str(marker)})  # in epoch 3 (44 steps per epoch)
    with pytest.raises(Exception, match="simulated device failure"):
        train(config)
    client = MlflowClient(mlflow_uri)
    (failed,) = client.search_runs([client.get_experiment_by_name("resume-elsewhere").experiment_id])
    run_id = failed.info.run_id
    assert failed.info.status == "FAILED"
    assert "checkpoints/resume/slot-a.pt" in [a.path for a in client.list_artifacts(run_id, "checkpoints/resume")]
    shutil.rmtree(fitflow_home() / "checkpoints" / run_id)  # the retry runs on a machine without this folder

    capsys.readouterr()
    assert main(["resume", run_id]) == 0
    assert f"MLflow run: {run_id}" in capsys.readouterr().out
    journal = Journal(fitflow_home() / "checkpoints" / run_id)
    assert [entry.step for entry in journal.entries()] == [3, 4]  # it continued after epoch 2; it did not start over
    assert _steps(client, run_id) == {key: [1, 2, 3, 4] for key in _steps(client, run_id)}
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_checkpoint_upload_still_going_at_fit_end_is_said_once_and_then_silent(tmp_path, monkeypatch, caplog):
    """`checkpoint_to_mlflow` with the server away at fit end: the last upload, given FITFLOW_TRACKING_WAIT_S, is
    still going; fit says so once, and the upload thread, which goes on after fit returned, reports nothing
    more (its warning used to land in whatever the process did next, or on a closed stream: 'Logging error')."""
    import logging

    from tasks.checkpoints import Checkpoints
    from tasks.tracking import MlflowCheckpoints

    with socket.socket() as probe:  # a port nobody listens on: the tracking server is away
        probe.bind(("127.0.0.1", 0))
        away = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("FITFLOW_TRACKING_WAIT_S", "0")
    checkpoint = tmp_path / "epoch-0003.pt"
    checkpoint.write_bytes(b"a checkpoint")
    uploads = MlflowCheckpoints(MlflowClient(away), "0" * 32, Checkpoints(tmp_path, {}))
    caplog.set_level(logging.WARNING, logger="fitflow")
    uploads.on_fit_start(None)
    with uploads.lock:  # holds the upload thread before its upload: it is still going when fit ends
        uploads.newest = checkpoint
        uploads.wake.set()
        uploads.on_fit_end(None)
        at_fit_end = [r.getMessage() for r in caplog.records]
    uploads.thread.join(120)  # the upload runs now, against the absent server, and fails
    assert not uploads.thread.is_alive()
    assert len(at_fit_end) == 1 and "epoch-0003.pt was still being logged to MLflow after 0 s" in at_fit_end[0]
    assert [r.getMessage() for r in caplog.records] == at_fit_end, "the upload thread spoke after fit returned"
