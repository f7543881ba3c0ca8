"""Files that are whole after a power loss, not only after a killed process.

A partial file renamed over the real name is atomic against a kill: a reader sees the old file
or the new one. After a power loss it is not: the rename may reach the disk before the data
(an empty or zero-filled file under the real name), or the rename itself may be lost. So the
partial file is fsync'd before the rename, and the folder after it. Costs two fsyncs per file,
milliseconds on a local disk; an epoch checkpoint or the journal's cursor is written once per
epoch or per delivered batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file to write `path` through: it takes the real name, on disk, only when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the name points at it
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    fsync_folder(path.parent)  # the rename itself is on disk


def write_atomically(path: Path, text: str) -> None:
    with atomic_file(path) as file:
        file.write(text.encode("utf-8"))


def fsync_folder(folder: Path) -> None:
    """Make the folder's entries (a rename, a new or deleted file) durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
