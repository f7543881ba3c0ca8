"""The embedded Prefect server a CLI command starts in the background (flows/embedded_server.py).

Each case is a real process on a Prefect home of this module: it starts a real server, runs a
real flow on it, and must leave no server process and no listening port behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import psutil
import pytest
import yaml
from custom_models import wait_until_held

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # real processes and servers: the first migrates a fresh Prefect database

# A command's shape: configure, start the server, import (here: Prefect's flow API) while it
# starts, run a flow on it. The flow returns the API URL it ran against.
COMMAND = """
import json, psutil
from flows.environment import configure_environment
configure_environment()
from flows.embedded_server import prefect_server_starting

with prefect_server_starting() as on_server:
    from prefect import flow
    from prefect.settings import PREFECT_API_URL

    @flow
    def where() -> str:
        return PREFECT_API_URL.value()

    url = on_server(where)
    children = [p.pid for p in psutil.Process().children(recursive=True)]
print(json.dumps({"url": url, "children": children}))
"""


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedded-home")


def _run(code: list[str], home: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return subprocess.run(code, cwd=REPO, env={**clean, "FITFLOW_HOME": str(home), **env},
                          capture_output=True, text=True, timeout=300)


def _gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


def _servers_on(home: Path) -> list[psutil.Process]:
    """Prefect server processes running on this Prefect home (orphans included)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "prefect.server.api.server:create_app" not in " ".join(process.info["cmdline"] or []):
            continue
        try:
            if process.environ().get("FITFLOW_HOME") == str(home) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:  # gone meanwhile, or another user's
            continue
    return found


def _refused(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _port_of(server: psutil.Process) -> int:
    return int(server.cmdline()[server.cmdline().index("--port") + 1])


def _servers_left_after_waiting(home: Path) -> list[psutil.Process]:
    """The server processes still on `home` once they are gone, or after 60 s (a guard, not a
    speed limit: a server ends about as fast as it stops at a command's normal end). Any left are
    killed, so a failing run leaves none behind."""
    deadline = time.monotonic() + 60
    while _servers_on(home) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _servers_on(home)
    for server in left:
        server.kill()
    return left


def test_a_server_that_does_not_come_up_is_one_line_and_leaves_no_process(home):
    """Runs first on the fresh home: the database is prepared, then the server gets 0 s."""
    done = _run([sys.executable, "-m", "flows.cli", "train", "--epochs", "1"], home,
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "fitflow: error: the embedded Prefect server did not answer within 0 s; raise PREFECT_SERVER_"
        "EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL to a running server"]
    assert _servers_on(home) == []


def test_the_flow_runs_on_the_commands_own_server_which_stops_with_it(home):
    done = _run([sys.executable, "-c", COMMAND], home)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    url = urlparse(seen["url"])
    assert (url.scheme, url.hostname, url.path) == ("http", "127.0.0.1", "/api")
    assert seen["children"], "the server runs as a child process of the command"
    assert _gone(seen["children"]) and _servers_on(home) == []
    assert _refused(url.port)


def test_what_the_server_writes_once_the_command_is_done_goes_to_its_log(home):
    """Prefect's services log what their shutdown cancels (a cancelled task-run flush: an error
    with a traceback); under a command's last line that read as a crash (a refused `fitflow train`,
    CI). At DEBUG the task-run recorder says when it starts and when it stops: the first line
    reaches the command's stderr, the second only the log. A log past LOG_ROTATE_BYTES is moved to
    .1 first: every command appends to it."""
    from flows.embedded_server_process import LOG_ROTATE_BYTES

    path = home / "logs" / "embedded-prefect-server.log"
    path.parent.mkdir(parents=True, exist_ok=True)  # the module's home: earlier tests' commands made it
    earlier = "earlier commands' lines\n" * (LOG_ROTATE_BYTES // 24 + 1)
    path.write_text(earlier)
    done = _run([sys.executable, "-c", COMMAND], home, PREFECT_SERVER_LOGGING_LEVEL="DEBUG")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TaskRunRecorder started" in done.stderr
    assert "TaskRunRecorder stopped" not in done.stderr + done.stdout
    log = path.read_text()
    assert "TaskRunRecorder stopped" in log and "TaskRunRecorder started" not in log
    assert "earlier commands" not in log and (home / "logs" / "embedded-prefect-server.log.1").read_text() == earlier
    assert _servers_on(home) == []


def test_work_the_run_does_anyway_is_done_while_the_server_starts(home, tmp_path):
    """`meanwhile` (the CLI passes: import MLflow's sqlite store, map the installed packages, import
    torch._dynamo, torch.export's tracer, matplotlib's Figure): done before the flow runs on the embedded server, a failure left for the flow;
    with a running server nothing waits, and nothing is done early."""
    code = ("import importlib, json, sys\nfrom flows.environment import configure_environment\nconfigure_environment()\n"
            "from flows.embedded_server import prefect_server_starting\n"
            "work = [lambda: importlib.import_module('no_such_module_here'), lambda: importlib.import_module('wave')]\n"
            "with prefect_server_starting(meanwhile=work) as on_server:\n"
            "    print(json.dumps(on_server(lambda: 'wave' in sys.modules)))\n")
    embedded = _run([sys.executable, "-c", code], home)
    running = _run([sys.executable, "-c", code], tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert embedded.returncode == 0 and running.returncode == 0, embedded.stderr[-2000:] + running.stderr[-2000:]
    assert json.loads(embedded.stdout.strip().splitlines()[-1]) is True  # after a failing piece, the rest
    assert json.loads(running.stdout.strip().splitlines()[-1]) is False


def test_with_prefect_api_url_set_nothing_is_started(home, tmp_path):
    """A team server is used as it is: `run` calls the function at once, no server, no database."""
    code = ("import os, json\nfrom flows.embedded_server import prefect_server_starting\n"
            "with prefect_server_starting() as on_server:\n"
            "    print(json.dumps(on_server(lambda: os.environ['PREFECT_API_URL'])))\n")
    done = _run([sys.executable, "-c", code], tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == "http://127.0.0.1:9/api"
    assert list(tmp_path.iterdir()) == []


def test_flows_on_the_local_stack_send_no_heartbeats_and_on_a_team_server_keep_prefects_default(tmp_path):
    """Nothing reads heartbeats on `fitflow up`'s server (as on the embedded one), and ending the
    heartbeat thread cost each `fitflow train` up to 1 s; a team server's automations may read them."""
    code = ("import json\nfrom flows.embedded_server import prefect_server_starting\n"
            "from prefect.settings import get_current_settings\n"
            "with prefect_server_starting() as on_server:\n"
            "    print(json.dumps(on_server(lambda: get_current_settings().flows.heartbeat_frequency)))\n")
    url = "http://127.0.0.1:9/api"  # nothing is called: the settings the flow would run under
    (tmp_path / "stack.json").write_text(json.dumps({"pid": os.getpid(), "prefect_api_url": url}))  # `fitflow up` lives
    local = _run([sys.executable, "-c", code], tmp_path, PREFECT_API_URL=url)
    team = _run([sys.executable, "-c", code], tmp_path, PREFECT_API_URL="http://127.0.0.1:8/api")
    assert local.returncode == 0 and team.returncode == 0, local.stderr[-2000:] + team.stderr[-2000:]
    assert json.loads(local.stdout) is None
    assert json.loads(team.stdout) == 180  # Prefect's default


# `fitflow predict` and `fitflow sweep` run their flows on the same kind of server as `fitflow train`.

FITFLOW = [sys.executable, "-m", "flows.cli"]


@pytest.fixture(scope="module")
def model_run(home) -> str:
    """A model trained on this module's home (by `fitflow train`, on its own server)."""
    done = _run([*FITFLOW, "train", "--epochs", "1", "--experiment", "embedded"], home)
    assert done.returncode == 0, done.stderr[-3000:]
    return re.search(r"MLflow run: ([0-9a-f]{32})", done.stdout).group(1)


def test_predict_runs_on_a_server_of_its_own_and_leaves_nothing(home, model_run, tmp_path):
    """Not Prefect's ephemeral mode (it prints 'Starting temporary server on ...:8xxx'); a server
    that cannot start says so in fitflow's one line."""
    args = [*FITFLOW, "predict", "--model", model_run, "--data", str(REPO / "data" / "breast_cancer.csv")]
    done = _run([*args, "--out", str(tmp_path / "p.csv")], home)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "temporary server" not in done.stderr and (tmp_path / "p.csv").exists()
    assert _servers_on(home) == []

    late = _run([*args, "--out", str(tmp_path / "q.csv")], home, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert late.returncode == 2, late.stderr[-2000:]
    assert late.stderr.strip().splitlines() == [
        "fitflow: error: the embedded Prefect server did not answer within 0 s; raise PREFECT_SERVER_"
        "EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL to a running server"]
    assert _servers_on(home) == [] and not (tmp_path / "q.csv").exists()


def test_a_predict_refused_in_its_flow_ends_stderr_with_its_one_line(home, model_run, tmp_path):
    """A problem the flow finds (a missing column) after the server started: its line is the last."""
    rows = pd.read_csv(REPO / "data" / "breast_cancer.csv").drop(columns=["mean_radius"])
    rows.to_csv(tmp_path / "rows.csv", index=False)
    done = _run([*FITFLOW, "predict", "--model", model_run, "--data", str(tmp_path / "rows.csv"),
                 "--out", str(tmp_path / "p.csv")], home)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "fitflow: error: input is missing column(s) 'mean_radius' that the model was trained on; "
        "add them (values may be empty)"), done.stderr[-2000:]
    assert _servers_on(home) == []


def test_a_sweep_runs_on_a_server_that_is_its_own_child_on_a_port_the_os_gave(home, tmp_path):
    """Held in its trial's second epoch (tests/custom_models.py): the sweep's flow run is running on
    a server process under the command, on a port from the OS's ephemeral range (Prefect's own
    ephemeral mode picks 8000-8999); after the command, no process and no port are left."""
    hold = tmp_path / "hold"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "base": {"epochs": 2, "patience": 0, "experiment": "embedded-sweep", "model": "custom_models:HoldAtEpochs",
                 "model_kwargs": {"folder": str(hold), "epochs": [2]}},
        "space": {"lr": {"choices": [0.01]}}, "sampler": "grid", "n_trials": 1, "parallelism": 1, "prune": False}))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    process = subprocess.Popen([*FITFLOW, "sweep", "--config", str(config)], cwd=REPO,
                               env={**clean, "FITFLOW_HOME": str(home), "PYTHONPATH": str(REPO / "tests")},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until_held(process, hold, 2)
        (server,) = _servers_on(home)
        assert server.ppid() == process.pid
        port = int(server.cmdline()[server.cmdline().index("--port") + 1])
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        assert low <= port <= high and port not in range(8000, 9000)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/flow_runs/filter", method="POST",
                                         data=json.dumps({"flows": {"name": {"any_": ["sweep"]}}}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert [run["state_type"] for run in json.load(response)] == ["RUNNING"]
    finally:
        (hold / "release-2").touch()
        out = process.communicate(timeout=300)[0].decode()
    assert process.returncode == 0, out[-3000:]
    assert "temporary server" not in out
    assert _servers_on(home) == [] and _refused(port)


# A command killed outright (SIGKILL, the OOM killer) runs no `finally`: its server ends on its own.

def test_a_sigkilled_train_takes_its_server_with_it(home, tmp_path):
    """A real `fitflow train` held in epoch 2, SIGKILLed: its server process, until then its child,
    exits by itself (before, it lived on under pid 1, holding its memory and Prefect's database)."""
    hold = tmp_path / "hold"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    process = subprocess.Popen(
        [*FITFLOW, "train", "--epochs", "2", "--patience", "0", "--experiment", "embedded-kill",
         "--model", "custom_models:HoldAtEpochs", "--model-kwargs", json.dumps({"folder": str(hold), "epochs": [2]})],
        cwd=REPO, env={**clean, "FITFLOW_HOME": str(home), "PYTHONPATH": str(REPO / "tests")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until_held(process, hold, 2)
        (server,) = _servers_on(home)
        assert server.ppid() == process.pid
        port = _port_of(server)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        left = _servers_left_after_waiting(home)
        process.communicate(timeout=60)  # the server holds the command's stdout until it ends
    assert left == [] and _refused(port)


FORKS_AND_DIES = """
import os, signal, sys, time
from pathlib import Path
from flows.environment import configure_environment
configure_environment()
from flows.embedded_server import prefect_server_starting

hold = Path(sys.argv[1])
with prefect_server_starting() as on_server:
    from prefect.settings import PREFECT_API_URL

    url = on_server(PREFECT_API_URL.value)
    child = os.fork()  # as DataLoader forks its workers (no exec): every descriptor is copied
    if child == 0:
        while not (hold / "release").exists():
            time.sleep(0.05)
        os._exit(0)
    (hold / "seen").write_text(f"{url} {child}")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_process_the_command_forked_does_not_keep_its_server_alive(home, tmp_path):
    """A child the command forked (a DataLoader worker, user code) outlives the SIGKILLed command:
    the server ends all the same, while that child still runs."""
    hold = tmp_path / "hold"
    hold.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    with (tmp_path / "out").open("wb") as out:  # not a pipe: the forked child holds it to the end
        command = subprocess.run([sys.executable, "-c", FORKS_AND_DIES, str(hold)], cwd=REPO, stdout=out,
                                 stderr=subprocess.STDOUT, env={**clean, "FITFLOW_HOME": str(home)}, timeout=300)
    try:
        assert command.returncode == -signal.SIGKILL, (tmp_path / "out").read_text()[-3000:]
        url, child = (hold / "seen").read_text().split()
        left = _servers_left_after_waiting(home)
        assert psutil.Process(int(child)).status() != psutil.STATUS_ZOMBIE  # holding all it was forked with
    finally:
        (hold / "release").touch()
        _servers_left_after_waiting(home)
    assert left == [] and _refused(urlparse(url).port)
