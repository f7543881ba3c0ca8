"""One GPU per run on a machine with several (tasks/gpu_slots.py), without a GPU: the selection takes
the GPU count and the lock folder, so real processes can claim "GPUs" here. Each process is held at
a known point (it has its device and waits for a release file), never raced against the clock."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.gpu_slots import claim_device

HANG_GUARD_S = 120  # a deadline for a process that never gets there, not a timing assertion

# A run: claims a device among 2 GPUs, says which (and that it waits, if it does), trains until
# told to stop (the release file), then ends and frees it.
RUN = """
import sys, time
from pathlib import Path
from tasks.gpu_slots import claim_device
lock_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
claim = claim_device(sys.argv[3], 2, lock_dir, on_wait=lambda: out.with_suffix(".waiting").touch())
out.with_suffix(".tmp").write_text(claim.device)
out.with_suffix(".tmp").rename(out)
while not out.with_suffix(".release").exists():
    time.sleep(0.05)
claim.release()
"""


class Run:
    def __init__(self, tmp_path: Path, name: str, lock_dir: Path, requested: str = "auto"):
        self.out = tmp_path / f"{name}.device"
        self.popen = subprocess.Popen([sys.executable, "-c", RUN, str(lock_dir), str(self.out), requested])

    def _wait_for(self, path: Path) -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while not path.exists():
            assert self.popen.poll() is None, f"the run exited with {self.popen.returncode} before {path.name}"
            assert time.monotonic() < deadline, f"no {path.name} after {HANG_GUARD_S} s"
            time.sleep(0.05)

    def device(self) -> str:
        self._wait_for(self.out)
        return self.out.read_text()

    def wait_until_waiting(self) -> None:
        self._wait_for(self.out.with_suffix(".waiting"))

    def finish(self) -> None:
        self.out.with_suffix(".release").touch()
        assert self.popen.wait(timeout=HANG_GUARD_S) == 0


@pytest.fixture
def lock_dir(tmp_path):
    return tmp_path / "gpus"


def test_two_concurrent_runs_train_on_different_gpus_and_a_freed_gpu_is_taken_again(tmp_path, lock_dir):
    first, second = Run(tmp_path, "first", lock_dir), Run(tmp_path, "second", lock_dir)
    try:
        assert {first.device(), second.device()} == {"cuda:0", "cuda:1"}  # both hold theirs now
        third = Run(tmp_path, "third", lock_dir)
        third.wait_until_waiting()  # every GPU is taken: it waits, it does not share one
        assert not third.out.exists()
        freed = first.device()
        first.finish()
        assert third.device() == freed
        third.finish()
        fourth = Run(tmp_path, "fourth", lock_dir)
        assert fourth.device() == freed  # released again: the first free one
        fourth.finish()
    finally:
        for run in (first, second):
            run.popen.kill()
            run.popen.wait()


def test_a_killed_run_frees_its_gpu(tmp_path, lock_dir):
    first, second = Run(tmp_path, "first", lock_dir), Run(tmp_path, "second", lock_dir)
    try:
        assert (first.device(), second.device()) in (("cuda:0", "cuda:1"), ("cuda:1", "cuda:0"))
        held = first.device()
        first.popen.send_signal(signal.SIGKILL)  # no release, no cleanup: the kernel drops the lock
        first.popen.wait()
        after = Run(tmp_path, "after", lock_dir)
        assert after.device() == held
        after.finish()
    finally:
        second.finish()


def test_runs_in_threads_of_one_process_exclude_each_other(lock_dir):
    """Sweep trials in threads: each claim opens its own lock file, so they get different GPUs."""
    claims = [claim_device("auto", 3, lock_dir) for _ in range(3)]
    try:
        assert [claim.device for claim in claims] == ["cuda:0", "cuda:1", "cuda:2"]
        claims[1].release()
        again = claim_device("auto", 3, lock_dir)
        assert again.device == "cuda:1"
        again.release()
    finally:
        for claim in claims:
            claim.release()


def test_the_users_device_and_cuda_visible_devices_win(tmp_path, lock_dir):
    holders = [Run(tmp_path, name, lock_dir) for name in ("first", "second")]
    try:
        assert {run.device() for run in holders} == {"cuda:0", "cuda:1"}  # every GPU taken
        chosen = Run(tmp_path, "chosen", lock_dir, requested="cuda:1")
        assert chosen.device() == "cuda:1"  # as asked, at once: no waiting for a lock
        chosen.finish()
        for requested in ("cpu", "cuda"):
            assert claim_device(requested, 2, lock_dir).device == requested
        # CUDA_VISIBLE_DEVICES set by the user (or a scheduler): its GPUs as given, nothing chosen
        pinned = claim_device("auto", 2, lock_dir, environ={"CUDA_VISIBLE_DEVICES": "1"})
        assert pinned.device == "auto" and pinned.lock is None
    finally:
        for run in holders:
            run.finish()


@pytest.mark.parametrize("gpu_count", [0, 1])
def test_one_gpu_or_none_has_nothing_to_choose(lock_dir, gpu_count):
    claim = claim_device("auto", gpu_count, lock_dir)
    assert (claim.device, claim.lock) == ("auto", None) and not lock_dir.exists()
