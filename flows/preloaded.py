"""The preloaded process of `fitflow up`: `fitflow train`, `resume`, `sweep` and `predict` start in
a fork of a process that has already imported torch, MLflow, Prefect and pandas.

Without it each command spends most of a small run importing (about 2.5 s of CPU of a 6-8 s
`fitflow train` on the shipped table, docs/benchmarks.md). `fitflow up` starts this process
(`python -m flows.preloaded SOCKET`); it imports the libraries once, then waits on a Unix socket in
a private folder (0700) whose path is in stack.json. A command of the same FITFLOW_HOME connects,
sends its arguments, working directory, environment, umask and its stdin, stdout and stderr (the
descriptors themselves, SCM_RIGHTS), and the process forks a child that becomes that command: it
writes to the user's terminal, reads fitflow's code fresh from disk (only third-party libraries
are preloaded, so an edited fitflow is never stale), and its exit status goes back to the
command, which exits with it. Ctrl-C, SIGTERM and SIGHUP sent to the command are passed on to the
child; a command that dies (SIGKILL) or `fitflow down` interrupts its child as Ctrl-C does (SIGINT:
the run ends with a reason, not left RUNNING).

The process declines, and the command runs in its own process as without `fitflow up`, when the
two could differ in what was read at import: another Python, other interpreter flags, another value
of an environment variable the libraries read when imported (PREFECT_*, MLFLOW_*, FITFLOW_*,
PYTHON*, torch's, CUDA's, the thread pools', the locale, HOME), or packages installed or removed
since it started. FITFLOW_PRELOADED=0 turns it off for a command. Each request and its outcome are
logged in $FITFLOW_HOME/logs/preloaded.log.

Ordering constraints: the process must not start a thread or touch CUDA before it forks (a fork
copies only the forking thread; CUDA cannot be used in a child forked after it was initialised),
so it waits with one thread on `selectors` and learns of a child's end from its pidfd.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from flows.preloaded_client import SWITCH, import_time_environment, interpreter, send_signal

# What the commands import, in the order they import it (the order decides which library sets up
# logging first: Prefect's format is kept only when Prefect configures it before mlflow.pytorch adds
# a root handler): fitflow's modules of each command, then what a run imports later (flows/early_work.py).
# Preloading imports them, then forgets fitflow's own, which each child reads fresh; the
# third-party modules they pulled in stay.
COMMAND_MODULES = ["flows.embedded_server", "flows.train", "flows.log_filter", "tasks.baseline", "flows.predict",
                   "flows.sweep", "tasks.tracking", "tasks.pytorch_flavor", "tasks.plots", "tasks.system_metrics"]
MAX_REQUEST_BYTES = 1 << 22


class Preloaded:
    """One thread: accepts commands on the socket, forks a child per accepted command, reports
    each child's exit status to its command, and stops a child whose command went away."""

    def __init__(self, path: Path, log, environment: dict[str, str]) -> None:
        self.log = log
        self.environment = environment  # as the libraries saw it when imported
        self.interpreter = interpreter()
        self.installed = _installed_stamp()
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, tuple[socket.socket, int]] = {}  # pid -> (the command's connection, pidfd)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        os.chmod(path, 0o600)
        self.listener.listen(16)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        # a signal wakes the selector (SIGTERM sets `stopping` while it waits)
        self.wakeup_read, self.wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wakeup_write)
        self.selector.register(self.wakeup_read, selectors.EVENT_READ, "signal")
        self.stopping = self.stop_requested = False

    def serve(self) -> dict | None:
        """Until SIGTERM; in a forked child, returns the request it is to run."""
        while not (self.stopping and not self.children):
            if self.stop_requested and not self.stopping:
                self.stop()
                continue  # with no command running, nothing would wake the select below: it waited for good
            for key, _ in self.selector.select():
                kind = key.data
                if kind == "signal":
                    os.read(self.wakeup_read, 512)
                    break  # a SIGTERM may have closed the listener: select again
                elif kind == "accept":
                    request = self._accept()
                    if request is not None:  # in the child
                        return request
                elif kind[0] == "command":  # the command's connection: only EOF is expected
                    self._command_gone(kind[1])
                else:
                    self._child_ended(kind[1])
        return None

    def stop(self) -> None:
        """SIGTERM (`fitflow down`): stop accepting, interrupt running commands as Ctrl-C would (their
        runs end with a reason, their commands exit 130), exit once they have ended."""
        self.stopping = True
        self.selector.unregister(self.listener)
        self.listener.close()
        for pid in self.children:
            self.write_log(f"pid {pid}: stopping, sending SIGINT")
            send_signal(pid, signal.SIGINT)

    def _accept(self) -> dict | None:
        conn, _ = self.listener.accept()
        try:
            request, fds = self._read_request(conn)
        except (OSError, ValueError) as err:
            self.write_log(f"refused a request: {err}")
            conn.close()
            return None
        declined = self._why_not(request)
        if declined:
            self.write_log(f"declined {' '.join(request['argv'][:1])}: {declined}; it runs in its own process")
            _send(conn, {"declined": declined})
            conn.close()
            _close_all(fds)
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._become(request, fds, conn)
            return request
        try:
            os.setpgid(pid, pid)  # as the child does first thing: whichever runs first, no SIGTERM of the group reaches it
        except OSError:
            pass
        _close_all(fds)  # the child has its copies
        pidfd = os.pidfd_open(pid)  # readable once the child has ended
        self.children[pid] = (conn, pidfd)
        self.selector.register(conn, selectors.EVENT_READ, ("command", pid))
        self.selector.register(pidfd, selectors.EVENT_READ, ("child", pid))
        self.write_log(f"pid {pid}: fitflow {' '.join(request['argv'])} (in {request['cwd']})")
        _send(conn, {"pid": pid})
        return None

    def _read_request(self, conn: socket.socket) -> tuple[dict, list[int]]:
        """The request and its three descriptors; on any error none of the descriptors received stays open."""
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _peer_pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            raise ValueError(f"a process of user id {uid} connected; only this user's commands are run")
        conn.settimeout(10)  # the command sends its request as it connects; none stalls the others for long
        data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 3)
        try:
            while not data.endswith(b"\n"):
                more = conn.recv(MAX_REQUEST_BYTES)
                if not more or len(data) > MAX_REQUEST_BYTES:
                    raise ValueError("an incomplete request")
                data += more
            conn.settimeout(None)
            if len(fds) != 3:
                raise ValueError(f"a request with {len(fds)} descriptors instead of stdin, stdout and stderr")
            return json.loads(data), fds  # malformed JSON: a ValueError
        except BaseException:
            _close_all(fds)
            raise

    def _why_not(self, request: dict) -> str | None:
        if request.get("interpreter") != self.interpreter:
            return "another Python or other interpreter options"
        theirs = import_time_environment(request.get("env", {}))
        if theirs != self.environment:
            names = sorted(k for k in theirs.keys() | self.environment.keys() if theirs.get(k) != self.environment.get(k))
            return f"environment variables read at import differ: {', '.join(names)}"
        if _installed_stamp() != self.installed:
            return "packages were installed or removed since `fitflow up` started (restart it to preload them)"
        return None

    def _become(self, request: dict, fds: list[int], conn: socket.socket) -> None:
        """In the forked child: drop the server's state and take the command's place."""
        os.setpgid(0, 0)  # a group of its own: `fitflow down` signals the process group, the child gets SIGINT
        self.selector.close()
        self.listener.close()
        conn.close()
        signal.set_wakeup_fd(-1)
        os.close(self.wakeup_read)
        os.close(self.wakeup_write)
        for other, pidfd in self.children.values():
            other.close()
            os.close(pidfd)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        self.log.close()
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[SWITCH] = "0"  # the command runs here: it must not hand itself over again
        sys.argv = [request["argv0"], *request["argv"]]
        sys.path[:] = request["path"]
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=stream.isatty())
        import tempfile

        tempfile.tempdir = None  # TMPDIR is the command's
        _fresh_random_state()
        from flows.prefect_private import refresh_settings

        refresh_settings()  # the command's working directory may hold a prefect.toml or .env
        _consoles_for_this_terminal()

    def _command_gone(self, pid: int) -> None:
        conn, _ = self.children[pid]
        try:
            gone = conn.recv(1) == b""
        except OSError:
            gone = True
        if gone:  # the command was killed: its run stops as on Ctrl-C, and ends with a reason
            self.selector.unregister(conn)
            self.write_log(f"pid {pid}: its command went away; sending SIGINT")
            send_signal(pid, signal.SIGINT)

    def _child_ended(self, pid: int) -> None:
        conn, pidfd = self.children.pop(pid)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code  # killed by a signal: as a shell reports it
        self.write_log(f"pid {pid}: exit {code}")
        try:
            _send(conn, {"exit": code})
        except OSError:
            pass
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def write_log(self, line: str) -> None:
        self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self.log.flush()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _installed_stamp() -> dict[str, int]:
    """The modification times of the site-packages folders: installing or removing a package changes them."""
    stamp = {}
    for entry in sys.path:
        if entry.endswith(("site-packages", "dist-packages")) and os.path.isdir(entry):
            stamp[entry] = os.stat(entry).st_mtime_ns
    return stamp


def _consoles_for_this_terminal() -> None:
    """Prefect's console log handlers chose their colours when the preloaded process configured them,
    for its log file (none); the child writes to the command's stderr: a terminal gets colours, as in
    a process of its own. Each handler gets the console Prefect builds for that stream now."""
    import logging

    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    for handler in {h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)}:
        styles = PROCESS_LOGGING_CONFIG.get("handlers", {}).get(handler.get_name() or "", {}).get("styles")
        handler.console = PrefectConsoleHandler(stream=handler.stream, styles=styles).console


def _fresh_random_state() -> None:
    """A fresh process draws its seeds from the OS; forked children would all share the parent's."""
    import numpy as np
    import torch

    np.random.seed()
    torch.seed()


def _preload() -> tuple[list[str], Path, dict[str, str]]:
    """Set the environment up as a command does, import what the commands import and do the work a
    run does first (flows/early_work.py: imports, MLflow's map of installed packages); returns what
    could not be imported, FITFLOW_HOME and the import-time environment (taken before the imports:
    torch adds variables of its own)."""
    import importlib

    from flows.environment import configure_environment, fitflow_home

    configure_environment()
    home, environment = fitflow_home(), import_time_environment(dict(os.environ))
    missing = []
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as err:  # an optional extra not installed: the command imports it, or fails, itself
            missing.append(f"{name} ({err})")
    from flows.early_work import work_before_a_run

    for work in work_before_a_run():
        work()
    for name in [n for n in sys.modules if n.split(".")[0] in ("flows", "tasks", "fitflow") and n != "flows"]:
        del sys.modules[name]
    return missing, home, environment


def main(socket_path: str) -> int:
    started = time.monotonic()
    missing, home, environment = _preload()
    log = open(home / "logs" / "preloaded.log", "a", encoding="utf-8")
    import gc

    gc.freeze()  # the preloaded objects stay out of the children's collections: fewer pages copied
    preloaded = Preloaded(Path(socket_path), log, environment)
    import threading

    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    preloaded.write_log(f"ready in {time.monotonic() - started:.1f} s, pid {os.getpid()}"
                        + (f"; not importable, left to the commands: {', '.join(missing)}" if missing else "")
                        + (f"; WARNING: threads a fork does not copy: {', '.join(others)}" if others else ""))
    signal.signal(signal.SIGTERM, lambda *_: setattr(preloaded, "stop_requested", True))  # acted on by serve()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # `fitflow up` stops it with SIGTERM
    request = preloaded.serve()
    if request is None:
        preloaded.write_log("stopped")
        return 0
    from flows.cli import main as fitflow  # the child: fitflow's code as it is on disk now

    return fitflow(request["argv"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
