"""The embedded Prefect server a CLI command starts in the background (flows/embedded_server.py).

Each case is a real process on a Prefect home of this module: it starts a real server, runs a
real flow on it, and must leave no server process and no listening port behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest

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
