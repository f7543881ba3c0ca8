"""The embedded Prefect server's process: `python -m uvicorn ARGS...`, which also stops when the
command that started it is gone, however it ended.

    python -m flows.embedded_server_process FD ARGS...

FD is the read end of a pipe whose write end only the command holds (flows/embedded_server.py).
Nothing is ever written to it: when the command's process ends, the kernel closes its end and
the read here returns end-of-file, at a SIGKILL or an OOM kill as at a normal exit. The server
then stops as it does at a command's normal end (SIGTERM: uvicorn's graceful shutdown). Before,
a command killed outright never reached the `finally` that stops its server, which lived on
under pid 1 for good, holding its memory and Prefect's database.

Not PR_SET_PDEATHSIG: it fires when the *thread* that started the process ends, and the command
starts it from a short-lived thread. Not a poll of os.getppid(): a wakeup every interval and a
delay; the blocked read costs nothing until the end.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

GRACE_S = 5  # as the command's own stop: SIGTERM, then SIGKILL 5 s later if still running


def _stop_when_the_command_is_gone(lifeline: int) -> None:
    while os.read(lifeline, 1):  # nothing is written: returns b"" once no process holds the write end
        pass
    os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, where uvicorn listens for it
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    lifeline, uvicorn_args = int(argv[0]), argv[1:]
    threading.Thread(target=_stop_when_the_command_is_gone, args=(lifeline,), name="fitflow-lifeline",
                     daemon=True).start()
    import uvicorn

    uvicorn.main(uvicorn_args, prog_name="uvicorn")  # as `python -m uvicorn` does with its arguments


if __name__ == "__main__":
    main(sys.argv[1:])
