"""The embedded Prefect server's process: `python -m uvicorn ARGS...`, which also stops when the
command that started it is gone, however it ended.

    python -m flows.embedded_server_process FD LOG ARGS...

FD is the read end of a pipe whose write end only the command holds (flows/embedded_server.py).
The command writes one byte to it when it is done with the server; when the command's process
ends without that (SIGKILL, an OOM kill), the kernel closes its end and the read here returns
end-of-file. Either way the server then stops as uvicorn does at SIGTERM (graceful shutdown).
Before, a command killed outright never reached the `finally` that stops its server, which
lived on under pid 1 for good, holding its memory and Prefect's database.

From then on the server's output goes to LOG (appended; LOG.1 holds its previous 10 MiB), not to
the command's terminal: its services log what their shutdown cancels (the task-run recorder logs a
cancelled flush as an error with a traceback, then flushes again), and under a command's last line
("fitflow: error: ...") that read as a crash. What it writes while the command runs still reaches
the terminal.

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
from contextlib import suppress
from pathlib import Path

GRACE_S = 5  # from its SIGTERM to its SIGKILL, should its graceful shutdown hang
# Every command without a stack appends what its server says as it stops (often nothing, at times a
# traceback): past this size the log becomes LOG.1 (the previous LOG.1 replaced), bounding it to twice this.
LOG_ROTATE_BYTES = 10 * 2**20


def _stop_when_the_command_is_done(lifeline: int, log: str) -> None:
    os.read(lifeline, 1)  # the command's byte, or b"" once no process holds the write end
    _output_to(log)
    os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, where uvicorn listens for it
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def _output_to(log: str) -> None:
    for stream in (sys.stdout, sys.stderr):  # what is buffered was written while the command ran
        with suppress(OSError, ValueError):
            stream.flush()
    with suppress(OSError):  # no log (its folder removed): the output stays where it was
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileNotFoundError):  # another command's server may have rotated it a moment ago
            if os.stat(log).st_size > LOG_ROTATE_BYTES:
                os.replace(log, f"{log}.1")
        target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, 1)
        os.dup2(target, 2)
        os.close(target)


def main(argv: list[str]) -> None:
    lifeline, log, uvicorn_args = int(argv[0]), argv[1], argv[2:]
    threading.Thread(target=_stop_when_the_command_is_done, args=(lifeline, log), name="fitflow-lifeline",
                     daemon=True).start()
    import uvicorn

    uvicorn.main(uvicorn_args, prog_name="uvicorn")  # as `python -m uvicorn` does with its arguments


if __name__ == "__main__":
    main(sys.argv[1:])
