"""Which process trains a run: an exclusive lock on its checkpoint folder, and its pid and host.

While a process trains a run it holds a POSIX record lock (`fcntl.lockf`) on `train.lock` in
the run's checkpoint folder: a second `fitflow resume` of the same run (or a retry elsewhere) is
refused with one line naming the owner, instead of two processes writing the same checkpoints
and journal. The kernel drops the lock when the process dies, however it dies. A record lock
belongs to the process, not to the open file: the DataLoader workers forked from the trainer,
which share its open files, do not hold it (a `flock` they shared outlived a SIGKILLed trainer
until the orphaned workers noticed, up to 5 s). The cost of that kind of lock: closing any
descriptor of the file in the process drops it, so the holder never opens the file again
(`_held`). The lock holds between processes of one machine, and between machines on a shared
file system with POSIX locks (NFS, most cluster file systems).

A process killed outright (SIGKILL, the OOM killer) runs no code on its way out, and a CLI run
sends Prefect no heartbeats, so its flow run looks Running forever. `fitflow doctor` reads the
owner file to decide: on the same host, a pid that no longer exists means the run's process is gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.durable_files import write_atomically
from tasks.errors import ConfigError

OWNER_FILE = "owner.json"
LOCK_FILE = "train.lock"
_held: dict[Path, int] = {}  # checkpoint folder -> the descriptor of its lock file, held by this process


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


def claim(folder: Path, run_id: str) -> None:
    """Take the run's lock and record this process as its owner; ConfigError (exit 2) naming the
    owner when another process trains it. Again in the process that holds it: nothing more to take."""
    folder = Path(folder).resolve()
    if folder not in _held:
        folder.mkdir(parents=True, exist_ok=True)
        _held[folder] = _lock(folder, run_id)
    write_atomically(folder / OWNER_FILE, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def check_free(folder: Path, run_id: str) -> None:
    """The same refusal as `claim`, taking nothing: a resume is refused before it loads any data."""
    folder = Path(folder).resolve()
    if folder not in _held and (folder / LOCK_FILE).exists():
        os.close(_lock(folder, run_id))


def _lock(folder: Path, run_id: str) -> int:
    descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(descriptor)
        if err.errno not in (errno.EACCES, errno.EAGAIN):  # EACCES or EAGAIN: another process holds it
            raise
        owner = owner_of(folder)
        raise ConfigError(f"run {run_id} is being trained by {owner or 'another process'}; wait for it to end "
                          "(or stop that process), then resume it") from None
    return descriptor


def release(folder: Path) -> None:
    """Give the run's lock up (the run ended, or its start failed); nothing when this process holds none."""
    descriptor = _held.pop(Path(folder).resolve(), None)
    if descriptor is not None:
        os.close(descriptor)  # closing the file drops its lock


@contextmanager
def released_at_end(folder: Path) -> Iterator[None]:
    """The block that trains a claimed run: its lock is given up when the block ends, however it ends."""
    try:
        yield
    finally:
        release(folder)


@contextmanager
def recorded_while_open(folder: Path, run_id: str) -> Iterator[None]:
    """A run that keeps no checkpoints (a prediction run): its owner is recorded while the block
    runs, so `fitflow doctor` can close the run if the process dies outright; the folder, which
    holds nothing else, goes when the block ends."""
    claim(folder, run_id)
    try:
        yield
    finally:
        release(folder)
        shutil.rmtree(folder, ignore_errors=True)


def owner_of(folder: Path) -> Owner | None:
    """The recorded owner, or None when there is none (a run trained before owners were recorded,
    or on a machine whose checkpoint folder is not here)."""
    try:
        data = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
        return Owner(int(data["pid"]), str(data["host"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
