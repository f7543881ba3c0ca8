"""A command's side of the preloaded process of `fitflow up` (flows/preloaded.py): hand the command
over to a fork of it, or say that it runs here."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

SWITCH = "FITFLOW_PRELOADED"
# Environment variables read at import by the preloaded libraries (or by fitflow's environment set-up):
# a command whose values differ from the process's runs in its own process.
IMPORT_TIME_ENV = ("PREFECT_", "MLFLOW_", "FITFLOW_", "PYTHON", "TORCH", "PYTORCH_", "CUDA_", "NVIDIA_", "OMP_",
                   "MKL_", "OPENBLAS_", "KMP_", "LD_", "MPL", "LANG", "LC_", "HOME", "DO_NOT_TRACK")
NOT_IMPORT_TIME = {"PYTHONUNBUFFERED"}  # stdout's buffering is set per child


def import_time_environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV) and k not in NOT_IMPORT_TIME}


def interpreter() -> dict[str, object]:
    """What a command and the process must share besides the environment: the same Python, flags and options."""
    return {"executable": sys.executable, "prefix": sys.prefix, "flags": list(sys.flags), "warnoptions": sys.warnoptions,
            "xoptions": {name: str(value) for name, value in sys._xoptions.items()}}  # -X, e.g. tracemalloc


def run_preloaded(argv: list[str]) -> int | None:
    """Run this command in a fork of the preloaded process of `fitflow up`, if one runs for this
    FITFLOW_HOME and accepts it: returns the command's exit status. None: run it here."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    from flows.environment import configure_environment, fitflow_home, running_stack

    stack = running_stack(fitflow_home())
    if stack is None or not stack.get("preloaded_socket"):
        return None
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:  # a closed stdin, stdout or stderr cannot be handed over
        return None
    configure_environment()  # as the command would, before comparing the environments
    request = {"argv": argv, "argv0": sys.argv[0], "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path,
               "umask": _umask(), "interpreter": interpreter()}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(stack["preloaded_socket"])
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        replies = conn.makefile("rb")
        reply = json.loads(replies.readline() or b"{}")
    except (OSError, ValueError):
        conn.close()
        return None
    if "pid" not in reply:  # declined (the reason is in its log) or gone: run here
        conn.close()
        return None
    child = int(reply["pid"])
    forward = {sig: signal.signal(sig, lambda signum, _frame: send_signal(child, signum))
               for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        line = replies.readline()
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)
        conn.close()
    if not line:
        print("fitflow: error: the preloaded process of `fitflow up` ended before the command did "
              f"(see {fitflow_home() / 'logs' / 'preloaded.log'})", file=sys.stderr)
        return 1
    return int(json.loads(line)["exit"])


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def send_signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
