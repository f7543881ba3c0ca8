"""Which process runs a training run: its pid and host, kept in the run's checkpoint folder.

A process killed outright (SIGKILL, the OOM killer) runs no code on its way out, and a CLI run
sends Prefect no heartbeats, so its flow run looks Running forever. `fitflow doctor` reads this
file to decide: on the same host, a pid that no longer exists means the run's process is gone.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

OWNER_FILE = "owner.json"


@dataclass(frozen=True)
class Owner:
    pid: int
    host: str

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}"

    def is_gone(self) -> bool | None:
        """True when the process has exited, False while it runs, None when it is on another host."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)  # signal 0: only asks whether the pid exists
        except ProcessLookupError:
            return True
        except PermissionError:  # exists, owned by another user
            return False
        return False


def claim(folder: Path) -> None:
    """Record this process as the run's owner (written whole: a reader never sees half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{OWNER_FILE}.{os.getpid()}"
    partial.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}), encoding="utf-8")
    os.replace(partial, folder / OWNER_FILE)


def owner_of(folder: Path) -> Owner | None:
    """The recorded owner, or None when there is none (a run trained before owners were recorded,
    or on a machine whose checkpoint folder is not here)."""
    try:
        data = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
        return Owner(int(data["pid"]), str(data["host"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
