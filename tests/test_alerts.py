"""Alerts: `fitflow setup --notify-url` on a real `prefect server start` (its triggers and actions
services running), a local HTTP receiver as the webhook; a failing training run and a new champion
each deliver a message naming the flow run, the MLflow run and the reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEADLINE_S = 300  # bounds a hang only
pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Receiver:
    """A webhook on loopback that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        bodies = self.bodies = []

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, *words: str) -> str:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            for body in list(self.bodies):
                if all(word in body["text"] for word in words):
                    return body["text"]
            time.sleep(0.5)
        raise AssertionError(f"no message with {words} within {DEADLINE_S} s; got {self.bodies}")


@pytest.fixture
def prefect_api(tmp_path):
    """`prefect server start` on a loopback port, stopped with everything it started."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    family = []
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=5):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        family = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(family or [psutil.Process(server.pid)], timeout=60)
        for proc in alive:
            proc.kill()
        server.wait(timeout=60)


def test_setup_creates_the_alerts_once_and_failures_and_champions_reach_the_webhook(prefect_api, tmp_path):
    receiver = Receiver()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FITFLOW_"))}
    env.update(PREFECT_API_URL=prefect_api, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               FITFLOW_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO / "tests"))

    def fitflow(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "fitflow"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=DEADLINE_S)

    for _ in range(2):  # a second setup updates in place
        done = fitflow("setup", "--notify-url", receiver.url)
        assert done.returncode == 0, done.stderr[-3000:]
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        names = [a.name for a in client.read_automations()]
    assert sorted(names) == ["fitflow: champion changed", "fitflow: drift detected", "fitflow: flow run failed"]
    missing = fitflow("setup", "--notify-block", "slack-webhook/nobody")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such block" in missing.stderr

    failing = fitflow("train", "--model", "custom_models:NaNAfterFirstStep", "--experiment", "failing", "--epochs", "2")
    assert failing.returncode != 0
    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("failing").experiment_id])
    flow_run_name = run.data.tags["prefect.flow_run_name"]
    message = receiver.wait_for(flow_run_name, run.info.run_id)
    assert "flow 'train'" in message and "Failed" in message and "loss became nan" in message

    champion = fitflow("train", "--epochs", "1", "--register-model", "alerted", "--experiment", "champions")
    assert champion.returncode == 0, champion.stderr[-3000:]
    (first,) = mlflow.search_runs([mlflow.get_experiment_by_name("champions").experiment_id])
    message = receiver.wait_for("alerted", "version 1", first.info.run_id)
    assert "new champion" in message and "first version" in message
    receiver.server.shutdown()
