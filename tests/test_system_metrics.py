"""System metrics and the code version of a run, against a real MLflow store (sqlite) and real git."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from tasks import system_metrics, tracking
from tasks.code_version import code_version_tags

DEADLINE_S = 120  # bounds a hang only; every wait below ends as soon as its condition holds


def _run(uri: str) -> str:
    tracking.prepare_store(uri)
    client = MlflowClient(uri)
    return client.create_run(tracking.experiment_id(client, "system")).info.run_id


def _steps(client: MlflowClient, run_id: str, name: str = "system/cpu_utilization_percentage") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, name))


def test_samples_come_from_a_thread_of_their_own_and_a_resumed_run_goes_on_counting(mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's setting wins over fitflow's 5 s
    client, run_id = MlflowClient(mlflow_uri), _run(mlflow_uri)
    with system_metrics.sampled(client, run_id) as sampler:
        assert sampler.interval_s == 0.2 and sampler.thread is not threading.current_thread()
        deadline = time.monotonic() + DEADLINE_S
        while len(_steps(client, run_id)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    first = _steps(client, run_id)
    assert len(first) >= 3 and first == list(range(len(first)))  # two or more in the block, one at its end
    names = set(client.get_run(run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage", "system/disk_usage_megabytes"} <= names
    assert not sampler.thread.is_alive()
    with system_metrics.sampled(client, run_id):  # the same run again (fitflow resume): its series continues
        pass
    assert _steps(client, run_id) == list(range(len(first) + 1))


def test_a_run_shorter_than_the_interval_still_has_one_sample(mlflow_uri):
    client, run_id = MlflowClient(mlflow_uri), _run(mlflow_uri)
    assert system_metrics.SAMPLING_INTERVAL_S >= 1
    started = time.monotonic()
    with system_metrics.sampled(client, run_id):
        pass
    assert time.monotonic() - started < system_metrics.SAMPLING_INTERVAL_S  # stopping does not wait out the interval
    assert _steps(client, run_id) == [0]


def test_an_unreachable_tracking_server_drops_samples_and_never_holds_the_run(mlflow_uri, caplog):
    import socket

    with socket.socket() as free:  # a port nothing listens on: connections are refused at once
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    client = MlflowClient(f"http://127.0.0.1:{port}")
    sampler = system_metrics.SystemMetrics(client, "0" * 32)
    started = time.monotonic()
    sampler.close()
    assert time.monotonic() - started < 30  # one request without retries, not MLflow's minutes of them
    assert sampler.dropped == 1 and not sampler.thread.is_alive()
    assert "could not be logged" in caplog.text


def _git(folder, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True, text=True).stdout.strip()


def test_the_code_version_is_the_commit_and_whether_the_checkout_has_changes(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "model.py").write_text("WIDTH = 64\n")
    _git(tmp_path, "add", "model.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert code_version_tags(tmp_path) == {"mlflow.source.git.commit": head, "fitflow.git.dirty": "false"}
    (tmp_path / "model.py").write_text("WIDTH = 128\n")  # an edit not committed: the commit alone is not what ran
    assert code_version_tags(tmp_path) == {"mlflow.source.git.commit": head, "fitflow.git.dirty": "true"}
    _git(tmp_path, "checkout", "-q", "model.py")
    (tmp_path / "new_layer.py").write_text("")  # an untracked file counts too
    assert code_version_tags(tmp_path)["fitflow.git.dirty"] == "true"


@pytest.mark.parametrize("make", ["plain folder", "no git"])
def test_no_git_repository_or_no_git_no_code_version_tags(tmp_path, monkeypatch, make):
    if make == "no git":
        monkeypatch.setenv("PATH", str(tmp_path))
    assert code_version_tags(tmp_path) == {}
