"""`fitflow up` / `fitflow down`: the whole local stack of one machine, started and stopped as one.

`up` starts a Prefect server with its UI, an MLflow server with its UI (the store under
$FITFLOW_HOME: `mlflow.db`, artifacts served from `mlartifacts/`) and `fitflow serve` (the
deployments of prefect.yaml with their schedules and triggers), each in a process group of its
own, all on 127.0.0.1; prints both URLs once both answer, and that the deployments are served once
serve has registered them; then waits. Ctrl-C, SIGTERM or
`fitflow down` stop every process it started, children included. An `up` killed outright
(SIGKILL, an OOM kill) leaves them running: `fitflow down`, or the next `up` of the same home,
stops them (stack.json lists them).

It also starts the preloaded process (flows/preloaded.py): torch, MLflow and Prefect imported once,
so that `fitflow train`, `resume`, `sweep` and `predict` start in a fork of it instead of importing
them again.

While it runs, $FITFLOW_HOME/stack.json says where the servers are: every fitflow command of the
same FITFLOW_HOME reads it (flows/environment.py), so `fitflow train`, `sweep` and `predict` use
these servers instead of an embedded Prefect server and the sqlite file, and show up in both UIs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

from flows.deployments import deployment_specs
from tasks.errors import ConfigError, ServerError

log = logging.getLogger("fitflow")

STACK_FILE = "stack.json"
START_TIMEOUT_S = 240  # a cold Prefect database migrates in 20-30 s on 2 shared cores; generous for slower ones
STOP_TIMEOUT_S = 30


@dataclass
class Service:
    name: str
    argv: list[str]
    health_url: str | None
    popen: subprocess.Popen | None = None

    def start(self, env: dict[str, str], logs: Path) -> None:
        with open(logs / f"{self.name}.log", "ab") as out:  # the child keeps its own handle
            self.popen = subprocess.Popen(self.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)

    def answers(self) -> bool:
        return self.health_url is None or _answers(self.health_url)


def stack_file(home: Path) -> Path:
    return home / STACK_FILE


def up(home: Path, prefect_port: int, mlflow_port: int, limit: int) -> None:
    """Start the stack, print where it is, wait until interrupted or `fitflow down`; then stop it all."""
    state = stack_file(home)
    running = read_stack(home)
    if running is not None:
        raise ConfigError(f"the stack is already up (process {running['pid']}): {running['prefect_ui_url']} and "
                          f"{running['mlflow_url']}; stop it with `fitflow down`")
    if state.exists():  # an `up` killed outright: its servers would hold the ports and the databases
        try:
            left, written = json.loads(state.read_text(encoding="utf-8")), state.stat().st_mtime
        except ValueError:  # cut short: nothing in it can be trusted to name a process
            state.unlink()
        else:
            _stop_what_up_left(state, left, written)
            print(f"stopped what the killed `fitflow up` (process {left.get('pid')}) left running", flush=True)
    for port, flag in ((prefect_port, "--prefect-port"), (mlflow_port, "--mlflow-port")):
        if not _port_free(port):
            raise ConfigError(f"port {port} on 127.0.0.1 is in use; stop what listens there or choose {flag}")
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (home / "mlartifacts").mkdir(exist_ok=True)
    env = _service_env(home, prefect_api, mlflow_url)
    bin_dir = Path(sys.executable).parent
    servers = [
        Service("prefect-server", [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1",
                                   "--port", str(prefect_port)], f"{prefect_api}/ready"),
        Service("mlflow-server", [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                                  "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
                                  "--artifacts-destination", str(home / "mlartifacts"), "--serve-artifacts",
                                  "--workers", "1"], f"{mlflow_url}/health"),
    ]
    serve = Service("serve", [sys.executable, "-m", "flows.cli", "serve", "--limit", str(limit)], None)
    # a Unix socket's path is limited to 107 bytes: a short private folder, not FITFLOW_HOME
    socket_dir = Path(tempfile.mkdtemp(prefix="fitflow-"))
    preloaded = Service("preloaded", [sys.executable, "-m", "flows.preloaded", str(socket_dir / "socket")], None)
    started: list[Service] = []
    stop_requested = _stop_on_sigterm()
    try:
        for service in servers:  # both at once: neither needs the other to start
            service.start(env, logs)
            started.append(service)
        _wait_until_answering(servers, logs)
        serve_started = time.time()
        serve.start(env, logs)  # needs the Prefect API to register the deployments and their triggers
        started.append(serve)
        stack = {"pid": os.getpid(), "prefect_api_url": prefect_api, "prefect_ui_url": f"http://127.0.0.1:{prefect_port}",
                 "mlflow_url": mlflow_url, "children": [s.popen.pid for s in started]}
        _write_atomically(state, stack)
        # with the environment of a command of this shell, which it compares with each command's:
        # it reads stack.json as they do
        preloaded.start(dict(os.environ), logs)
        started.append(preloaded)
        _write_atomically(state, {**stack, "children": [s.popen.pid for s in started]})
        print(f"Prefect UI:  http://127.0.0.1:{prefect_port}   (API {prefect_api})", flush=True)
        print(f"MLflow UI:   {mlflow_url}", flush=True)
        _wait_until_served(serve, prefect_api, len(deployment_specs()), serve_started, logs)
        _wait_until_preloaded(preloaded, socket_dir / "socket", logs)
        _write_atomically(state, {**stack, "children": [s.popen.pid for s in started],
                                  "preloaded_socket": str(socket_dir / "socket")})
        print(f"serving the deployments of prefect.yaml; logs in {logs}; Ctrl-C or `fitflow down` stops it all",
              flush=True)
        while not stop_requested.is_set():
            for service in started:
                if service.popen.poll() is not None:
                    raise ServerError(f"{service.name} exited with code {service.popen.returncode}; "
                                      f"see {logs / (service.name + '.log')}")
            stop_requested.wait(1.0)
    except KeyboardInterrupt:  # Ctrl-C: the way to stop it, not an error
        pass
    finally:
        state.unlink(missing_ok=True)
        for service in reversed(started):
            stop_process_group(service.popen.pid)
            service.popen.wait(timeout=STOP_TIMEOUT_S)
        shutil.rmtree(socket_dir, ignore_errors=True)
        print("stopped the Prefect server, the MLflow server, serve and the preloaded process", flush=True)


def down(home: Path) -> str:
    """Stop the stack `fitflow up` started under this FITFLOW_HOME; returns what was done."""
    state = stack_file(home)
    if not state.exists():
        return f"no stack is up (no {state})"
    stack, written = json.loads(state.read_text(encoding="utf-8")), state.stat().st_mtime
    owner, killed = _process(stack["pid"]), ""
    if owner is not None:  # `up` stops its own children on SIGTERM, then exits
        owner.send_signal(signal.SIGTERM)
        if not _exits(owner, timeout=STOP_TIMEOUT_S * 3):
            owner.kill()
            killed = f"; it had not exited {STOP_TIMEOUT_S * 3} s after SIGTERM: killed, see {home / 'logs'}"
    _stop_what_up_left(state, stack, written)
    return f"stopped the stack of process {stack['pid']} ({stack['prefect_ui_url']}, {stack['mlflow_url']}){killed}"


def _stop_what_up_left(state: Path, stack: dict, written: float) -> None:
    """What an `up` killed outright leaves: its children, the preloaded process's socket folder and
    the stack file. A pid of the file that now names a process started after the file was written
    (`written`, its mtime; an `up` that stopped normally has removed it) is not one of them (the pid
    was reused) and is left alone."""
    for pid in stack.get("children", []):
        child = _process(pid)
        if child is not None and child.create_time() <= written + 1:  # create_time: in clock ticks
            stop_process_group(pid)
    if "preloaded_socket" in stack:  # the socket and its private folder, and nothing else (never a tree)
        socket_path = Path(stack["preloaded_socket"])
        with suppress(OSError):
            socket_path.unlink(missing_ok=True)
            socket_path.parent.rmdir()
    state.unlink(missing_ok=True)


def read_stack(home: Path) -> dict | None:
    """The running stack of this FITFLOW_HOME, or None (no stack file, or its `up` process is gone)."""
    try:
        stack = json.loads(stack_file(home).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stack if _process(stack.get("pid", -1)) is not None else None


def stop_process_group(pid: int) -> None:
    """SIGTERM to the process group `pid` leads (a server and its workers), SIGKILL what outlives the timeout."""
    leader = _process(pid)
    family = [leader, *leader.children(recursive=True)] if leader is not None else []
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        for proc in family:  # the group is gone; a child that left it still gets the signal
            _signal(proc, signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=STOP_TIMEOUT_S)
    for proc in alive:
        _signal(proc, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=10)


def _service_env(home: Path, prefect_api: str, mlflow_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FITFLOW_HOME=str(home), PREFECT_HOME=str(home / "prefect"), PREFECT_API_URL=prefect_api,
               PREFECT_UI_API_URL=prefect_api, MLFLOW_TRACKING_URI=mlflow_url, PYTHONUNBUFFERED="1")
    env.pop("PREFECT_SERVER_EPHEMERAL_ENABLED", None)
    return env


def _wait_until_answering(services: list[Service], logs: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    waiting = list(services)
    while waiting:
        for service in list(waiting):
            if service.popen.poll() is not None:
                raise ServerError(f"{service.name} exited with code {service.popen.returncode} while starting; "
                                  f"see {logs / (service.name + '.log')}")
            if service.answers():
                waiting.remove(service)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(s.name for s in waiting)
            raise ServerError(f"{names} did not answer within {START_TIMEOUT_S} s; see the logs in {logs}")
        if waiting:
            time.sleep(0.5)


def _wait_until_served(serve: Service, prefect_api: str, count: int, since: float, logs: Path) -> None:
    """Until `serve` has registered the `count` deployments of prefect.yaml (it imports the flows first,
    10-30 s here): before that, `prefect deployment run` answers "Deployment not found"."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while _deployments_registered_since(prefect_api, since) < count:
        if serve.popen.poll() is not None:
            raise ServerError(f"serve exited with code {serve.popen.returncode} while starting; see {logs / 'serve.log'}")
        if time.monotonic() > deadline:
            raise ServerError(f"serve registered no deployments within {START_TIMEOUT_S} s; see {logs / 'serve.log'}")
        time.sleep(0.5)


def _wait_until_preloaded(preloaded: Service, socket_path: Path, logs: Path) -> None:
    """Until the preloaded process listens (it imports torch, MLflow and Prefect first: 5-10 s here)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not socket_path.exists():
        if preloaded.popen.poll() is not None:
            raise ServerError(f"the preloaded process exited with code {preloaded.popen.returncode} while starting; "
                              f"see {logs / 'preloaded.log'}")
        if time.monotonic() > deadline:
            raise ServerError(f"the preloaded process was not ready within {START_TIMEOUT_S} s; see {logs / 'preloaded.log'}")
        time.sleep(0.5)


def _write_atomically(path: Path, content: dict) -> None:
    """Commands read stack.json at any moment: never half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(content), encoding="utf-8")
    os.replace(partial, path)


def _deployments_registered_since(prefect_api: str, since: float) -> int:
    """Deployments on the Prefect server created or updated after `since` (epoch seconds): this serve's,
    not those an earlier serve or `prefect deploy` left in the same database."""
    request = urllib.request.Request(f"{prefect_api}/deployments/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            deployments = json.load(response)
    except OSError:
        return 0
    return sum(max(datetime.fromisoformat(d["created"]), datetime.fromisoformat(d["updated"])).timestamp() >= since
               for d in deployments)


def _stop_on_sigterm():
    """An event set by SIGTERM (`fitflow down`); Ctrl-C arrives as KeyboardInterrupt and stops the same way."""
    import threading

    requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: requested.set())
    return requested


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        # as the servers bind: a port whose last connections are still in TIME_WAIT (a `fitflow up`
        # stopped a moment ago) is free to them
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _process(pid: int) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        return proc if proc.status() != psutil.STATUS_ZOMBIE else None
    except (psutil.NoSuchProcess, ValueError):
        return None


def _exits(proc: psutil.Process, timeout: float) -> bool:
    """Whether `proc` exits within `timeout` s. Exited counts once it is a zombie: `up` is not this
    process's child, and its parent (a shell, a supervisor, a test) may reap it only later."""
    deadline = time.monotonic() + timeout
    while proc.is_running() and _process(proc.pid) is not None:  # is_running: False once the pid is reused
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        pass
