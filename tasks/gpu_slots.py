"""One GPU per training run on a machine with several: a lock file per GPU, held while the run trains.

A run with `device: auto` on a machine with N > 1 GPUs takes the first free one of
`<lock_dir>/cuda-<i>.lock` (`$FITFLOW_HOME/gpus/`, shared by every run of the machine: the
worker's flow runs, CLI runs, sweep trials in threads) with `fcntl.flock` and trains on `cuda:<i>`;
the lock goes with the run (its file is closed on return, on an error, and by the kernel when the
process dies, so a killed run frees its GPU at once). When every GPU is taken the run waits for
one. A device the user chose wins: a named device (`cuda:1`, `cpu`) and a set CUDA_VISIBLE_DEVICES
are used as given. With one GPU or none there is nothing to choose (the work pool's limit keeps
runs from sharing it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger("fitflow")

WAIT_POLL_S = 1.0  # how often a run that waits for a GPU tries the locks again


@dataclass
class DeviceClaim:
    """The device a run trains on and the lock that reserves it (None: nothing was chosen)."""

    device: str
    lock: IO | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the file drops its flock
            self.lock = None


def claim_device(requested: str, gpu_count: int, lock_dir: Path, environ: Mapping[str, str] = os.environ,
                 on_wait: Callable[[], None] | None = None) -> DeviceClaim:
    """The device for one run: `requested` when the user chose one (or CUDA_VISIBLE_DEVICES is set, or
    there are fewer than two GPUs), else `cuda:<i>` of the first GPU no other run holds, waiting for
    one when all are taken (`on_wait` is called once, when the wait starts)."""
    if requested != "auto" or gpu_count < 2 or environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return DeviceClaim(requested)
    lock_dir.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        for index in range(gpu_count):
            lock = _try_lock(lock_dir / f"cuda-{index}.lock")
            if lock is not None:
                if waiting:
                    log.info("cuda:%d is free now", index)
                return DeviceClaim(f"cuda:{index}", lock)
        if not waiting:
            waiting = True
            log.info("all %d GPUs are training other runs (locks in %s); waiting for one", gpu_count, lock_dir)
            if on_wait is not None:
                on_wait()
        time.sleep(WAIT_POLL_S)


def _try_lock(path: Path) -> IO | None:
    """The locked file, or None when another run holds it; the file names its holder (pid@host)."""
    handle = open(path, "a+")  # a new open file description per claim: threads of one process exclude each other too
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.truncate(0)
    handle.write(f"{os.getpid()}@{socket.gethostname()}\n")
    handle.flush()
    return handle


@contextlib.contextmanager
def claimed_device(requested: str, lock_dir: Path, strategy: str = "single") -> Iterator[str]:
    """`claim_device` for this machine's visible GPUs, released on leaving the block. DDP runs use every
    device they are given (one process each) and choose nothing here."""
    import torch

    gpu_count = torch.cuda.device_count() if strategy == "single" and torch.cuda.is_available() else 0
    claim = claim_device(requested, gpu_count, lock_dir)
    try:
        if claim.lock is not None:
            log.info("training on %s (one run per GPU; %d GPUs)", claim.device, gpu_count)
        yield claim.device
    finally:
        claim.release()
