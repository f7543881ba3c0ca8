"""The embedded Prefect server of one CLI command, started while the command imports its libraries.

Without PREFECT_API_URL a flow needs a Prefect server of its own: a process that imports
Prefect's server and starts its services, 5-9 s here. Importing torch, MLflow and pandas for the
flow takes about 5 s in the command's own process. The two do not depend on each other, so the
server process starts as soon as Prefect's database is ready, and the imports run meanwhile on
the other core. Measured on a warm home (this machine, 2 cores): the flow could start 16.7 s
after the command began with the server started after the imports through Prefect's
`SubprocessASGIServer`, and 6.9 s after with this module (docs/benchmarks.md, benchmark 5).

The server listens on a port the OS hands out, not one picked by Prefect's own ephemeral mode:
that mode picks a random port in 8000-8999 and takes any server answering there for its own, so
of several `fitflow train` started at once, one could run on another's server and crash when
that one stopped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from flows.embedded_server_process import GRACE_S
from flows.environment import fitflow_home, running_stack
from flows.prefect_private import EPHEMERAL_SERVER_ENV, SERVER_APP_FACTORY
from tasks.checkout import REPO
from tasks.errors import ServerError

T = TypeVar("T")
RunOnServer = Callable[..., Any]


@contextmanager
def prefect_server_starting(meanwhile: Sequence[Callable[[], object]] = ()) -> Iterator[RunOnServer]:
    """Start this command's embedded Prefect server in the background; yields `run(fn, *args)`,
    which waits for the server, then calls `fn(*args)` with the Prefect API pointed at it.

    `meanwhile`: work `fn` does anyway (imports, opening the tracking store); `run` does it first,
    while the server is still starting (the main thread would only wait: about 1 s on a quiet
    machine here, more under load), so `fn` finds it done. A failure there is left for `fn` to
    meet where it reports it. Not with a running server (nothing to wait for).

    With PREFECT_API_URL set there is nothing to start and `run` calls `fn` at once (without
    heartbeats when it is the server of `fitflow up`). Call after `configure_environment()` (it
    sets the Prefect home the server uses, and the API URL of a running `fitflow up`). On exit
    the server stops.
    """
    api_url = os.environ.get("PREFECT_API_URL")
    if api_url:
        stack = running_stack(fitflow_home())
        if stack is not None and stack["prefect_api_url"] == api_url:  # fitflow up's server: as the embedded one
            yield lambda fn, *args: _without_heartbeats(api_url, fn, *args)
        else:  # a team server, used as it is: its automations may watch heartbeats
            yield lambda fn, *args: fn(*args)
        return
    from flows.prefect_database import migrate_embedded_prefect_database

    migrate_embedded_prefect_database()  # before any server opens the database (several commands may start at once)
    server = _EmbeddedServer()
    failure: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as err:  # handed to the main thread by `run`
            failure.append(err)

    # The thread mostly waits (on the server process, then on its health endpoint); the main
    # thread's imports keep the GIL without slowing the server, which is another process.
    starting = threading.Thread(target=start, name="fitflow-prefect-server", daemon=True)
    starting.start()

    def run(fn: Callable[..., T], *args: Any) -> T:
        for work in meanwhile:
            with suppress(Exception):  # `fn` meets it again, and says what is wrong in its own words
                work()
        starting.join()
        if failure:
            raise failure[0]
        return _without_heartbeats(server.api_url, fn, *args)

    try:
        yield run
    finally:
        starting.join()  # a server still starting would outlive the command
        server.stop()


class _EmbeddedServer:
    """The process Prefect's own temporary server runs (`SubprocessASGIServer`: uvicorn on
    `create_app`, ephemeral, no UI), started without importing Prefect's server package here:
    that import alone took 3 s of the command's own start-up.

    It runs under flows/embedded_server_process.py, which stops it at the byte `stop` writes to
    a pipe, or once this process is gone (killed outright, `stop` never called): it holds the
    read end of that pipe, whose write end, the lifeline, only this process holds. Nothing else
    may hold that end, or a killed command's server would outlive it: it is not inherited by
    programs this process starts (os.pipe), and a process forked from this one without a new
    program (DataLoader workers) closes it at once.
    """

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.api_url = ""
        self.lifeline: int | None = None

    def start(self) -> None:
        import prefect
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings

        with socket.socket() as probe:  # port 0: the OS picks a free port, a different one for each process
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", **EPHEMERAL_SERVER_ENV,
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        # the checkout on the path: `-m` finds it from any working directory, installed or not
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        server_end, self.lifeline = os.pipe()
        _closed_in_forked_children(self.lifeline)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flows.embedded_server_process", str(server_end), str(server_log()),
                 "--app-dir", str(Path(prefect.__file__).parents[1]), "--factory", SERVER_APP_FACTORY,
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                env=env, stdin=subprocess.DEVNULL, pass_fds=(server_end,),
            )
        finally:
            os.close(server_end)
        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"the embedded Prefect server exited with code {self.process.returncode} while "
                                   "starting (its error is above); set PREFECT_API_URL to use a running server")
            if _healthy(self.api_url):
                return
            time.sleep(0.1)
        raise ServerError(f"the embedded Prefect server did not answer within {timeout} s; raise PREFECT_SERVER_"
                           "EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL to a running server")

    def stop(self) -> None:
        """The byte on the lifeline: the server sends its further output to `server_log()`, then
        stops as at SIGTERM, and kills itself GRACE_S later if still running."""
        if self.lifeline is not None:
            with suppress(OSError):  # BrokenPipeError: the server has ended already
                os.write(self.lifeline, b"\0")
            _lifelines.discard(self.lifeline)
            os.close(self.lifeline)
            self.lifeline = None
        if self.process is not None:
            try:
                self.process.wait(timeout=GRACE_S + 5)
            except subprocess.TimeoutExpired:  # its lifeline thread did not get to run
                self.process.kill()
                self.process.wait()
            self.process = None


def server_log() -> Path:
    """Where the embedded servers of this FITFLOW_HOME write once their command is done with them."""
    return fitflow_home() / "logs" / "embedded-prefect-server.log"


_lifelines: set[int] = set()  # the write ends held by this process, closed in each child forked from it


def _closed_in_forked_children(lifeline: int) -> None:
    _close_lifelines_at_fork()
    _lifelines.add(lifeline)


@cache
def _close_lifelines_at_fork() -> None:
    os.register_at_fork(after_in_child=_close_lifelines)  # once: a handler cannot be removed


def _close_lifelines() -> None:
    for lifeline in _lifelines:
        with suppress(OSError):
            os.close(lifeline)
    _lifelines.clear()


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:  # refused while it starts; URLError and timeouts are OSErrors
        return False


def _without_heartbeats(api_url: str, fn: Callable[..., T], *args: Any) -> T:
    """Run on the server at `api_url`, without flow-run heartbeats: nothing watches them on a
    server that dies with this process, nor on `fitflow up`'s (none of fitflow's automations
    reads them), and ending the heartbeat thread costs each flow up to 1 s of pure waiting (it
    sleeps in 1 s steps)."""
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        try:
            return fn(*args)
        finally:
            APILogHandler().flush()  # the run's last log lines (5 s at most), before their server goes
