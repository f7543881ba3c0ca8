"""Epoch checkpoints that a killed run resumes from exactly.

After every epoch `Checkpoints` writes `epoch-NNNNN.pt` (atomically: a partial file renamed
into place) and keeps the newest `keep`. The training thread only copies the state into CPU
buffers kept from the last epoch (a memory copy); a writer thread serialises and writes it while
the next epoch trains, one write at a time: each epoch end first waits for the previous write, and
so does the end of `fit`. A checkpoint under its real name is always whole, and it is the state
at its epoch's end. A run killed while a write is in flight resumes from the epoch before (its
metrics journal may already hold the epoch being written: tasks/tracking.py sends each epoch
once). A checkpoint holds everything the next epoch depends on, so a resumed run ends with the
same weights, bit for bit on CPU, as one never stopped:

- model, optimizer and AMP scaler state; the callbacks' state (best score and best weights,
  patience left, the LR scheduler), through their `state_dict`;
- every random generator: python, numpy, torch, and CUDA's when it is in use (dropout draws
  from torch's);
- the data order: the shuffle is a function of (seed, epoch) (tasks/loaders.py), so the
  completed epoch is the position; there is no generator state to save;
- the epoch, the global optimizer step, the epoch's logs and the whole history, and the MLflow
  run id it belongs to.

Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain containers only,
never arbitrary pickled objects, so a tampered file cannot run code. A damaged newest file (cut
short by a power loss or a full disk) falls back to the one before, with a warning; a tampered,
foreign or incomplete one, or one that names no run or another run, is a TrainingError naming
the file and what to do, never a silent fresh start. Files are fsync'd before the rename and
the folder after it (tasks/durable_files.py), and the oldest is deleted only after that.
"""

from __future__ import annotations

import copy
import logging
import pickle
import random
import re
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from zipfile import BadZipFile

import numpy as np
import torch

from tasks.callbacks import Callback, FitState, save_checkpoint
from tasks.errors import TrainingError

log = logging.getLogger("fitflow")
FORMAT = 2  # 2: the global optimizer step
_NAME = re.compile(r"^epoch-(\d+)\.pt$")


class DamagedCheckpoint(TrainingError):
    """A checkpoint file that cannot be read (cut short, zero-filled, not a torch file)."""


class Checkpoints(Callback):
    """Writes the full training state after every epoch; resumes from the newest one at the start.

    `stateful`: the callbacks whose state a resumed run needs, by a stable name.
    """

    def __init__(self, directory: str | Path, stateful: dict[str, Callback], keep: int = 2,
                 run_id: str | None = None) -> None:
        self.directory, self.stateful, self.keep, self.run_id = Path(directory), stateful, keep, run_id
        self.writer = CheckpointWriter()
        self.written: list[Callable[[Path], None]] = []  # told each new checkpoint, on the writer thread: be quick

    def on_fit_start(self, state: FitState) -> None:
        found = self.newest()
        if found is not None:
            self.restore(state, *found)

    def newest(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from, and its contents (this run's newest whole one), or None."""
        found = newest_whole_checkpoint(self.directory)
        if found is not None and found[1]["run_id"] != self.run_id:
            raise TrainingError(f"checkpoint {found[0]} belongs to run {found[1]['run_id']}, not {self.run_id}; "
                                "move it away or resume that run")
        return found

    def restore(self, state: FitState, path: Path, saved: dict[str, Any]) -> None:
        restore(state, saved, self.stateful, path)
        log.info("resumed from %s: epoch %d of %d", path, state.epoch, state.epochs)

    def on_epoch_end(self, state: FitState) -> None:
        checkpoint = {
            "format": FORMAT,
            "run_id": self.run_id,
            "epoch": state.epoch,
            "step": state.step,
            "stop": state.stop,
            "logs": dict(state.logs),
            "history": [dict(logs) for logs in state.history],
            "model": state.model.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict() if state.scaler is not None else {},
            "callbacks": {name: callback.state_dict() for name, callback in self.stateful.items()},
            "rng": rng_state(),
        }
        path = self.directory / f"epoch-{state.epoch:05d}.pt"
        self.writer.write(path, checkpoint, lambda: self._in_place(path))

    def _in_place(self, path: Path) -> None:
        """On the writer thread, once the new checkpoint is in place: only then is an old one deleted."""
        for old in checkpoint_files(self.directory)[: -self.keep]:
            old.unlink(missing_ok=True)
        for listener in self.written:
            listener(path)

    def on_fit_end(self, state: FitState) -> None:
        failing = sys.exc_info()[1] is not None  # fit's `finally`: training raised, this must not hide it
        try:
            self.writer.close()
        except Exception as err:
            if not failing:
                raise
            log.warning("the checkpoint of epoch %d was not written: %s", state.epoch, err)


class CheckpointWriter:
    """Writes checkpoints on one background thread, one at a time, from a copy of the state.

    `write` waits for the previous write (raising its error, if it failed), copies every tensor of
    the checkpoint into CPU buffers it reuses from write to write (plain data is deep-copied), and
    hands the copy to the thread: training may change the model and optimizer the moment `write`
    returns. `close` waits for the last write.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.executor: ThreadPoolExecutor | None = None
        self.pending: Future | None = None

    def write(self, path: Path, checkpoint: dict[str, Any], then=None) -> None:
        self.wait()  # the buffers are free again, and a failed write stops training here
        snapshot = _copy_into(checkpoint, self.buffers, ())
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fitflow-checkpoint-writer")
        self.pending = self.executor.submit(self._write, path, snapshot, then)

    @staticmethod
    def _write(path: Path, snapshot: dict[str, Any], then) -> None:
        save_checkpoint(path, snapshot)
        if then is not None:
            then()

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self.executor is not None:
                self.executor.shutdown()
                self.executor = None


def _copy_into(value: Any, buffers: dict[tuple, torch.Tensor], key: tuple) -> Any:
    """`value` with every tensor copied into `buffers[key path]` (on the CPU; allocated when the
    shape or dtype is new), containers copied (a state dict's OrderedDict with its `_metadata`)
    and other objects deep-copied."""
    if isinstance(value, torch.Tensor):
        buffer = buffers.get(key)
        if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
            buffer = buffers[key] = torch.empty(value.shape, dtype=value.dtype)
        return buffer.copy_(value.detach())
    if isinstance(value, _PLAIN):
        return value  # immutable
    if isinstance(value, dict):
        copied = copy.copy(value)
        for k, v in value.items():
            copied[k] = _copy_into(v, buffers, (*key, k))
        return copied
    if type(value) in (list, tuple):
        if all(isinstance(v, _PLAIN) for v in value):  # e.g. python's random state: 625 ints
            return type(value)(value)
        return type(value)(_copy_into(v, buffers, (*key, i)) for i, v in enumerate(value))
    return copy.deepcopy(value)


_PLAIN = (int, float, bool, str, bytes, type(None))


def restore(state: FitState, saved: dict[str, Any], stateful: dict[str, Callback], path: Path | None = None) -> None:
    """Put a checkpoint back: model, optimizer, scaler, callbacks, history and random generators."""
    for name in stateful:
        if name not in saved["callbacks"]:
            raise TrainingError(f"the checkpoint has no state for '{name}': it was written with another config; "
                                "resume with the run's own config (fitflow resume <run id>)")
    try:
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        if state.scaler is not None and saved["scaler"]:
            state.scaler.load_state_dict(saved["scaler"])
        for name, callback in stateful.items():
            callback.load_state_dict(saved["callbacks"][name])
        state.epoch, state.step, state.stop, state.logs = saved["epoch"], saved["step"], saved["stop"], dict(saved["logs"])
        state.history[:] = [dict(logs) for logs in saved["history"]]
        set_rng_state(saved["rng"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise TrainingError(f"checkpoint {path or ''} does not fit this run's model and settings "
                            f"({type(err).__name__}: {reason}); resume with the run's own config "
                            "(fitflow resume <run id>), or start a new run") from None


def checkpoint_files(directory: Path) -> list[Path]:
    """The epoch checkpoints in a folder, oldest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME.match(p.name)), key=lambda p: int(_NAME.match(p.name)[1]))


def newest_whole_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that can be read, and its contents; None when there is none.

    A damaged newest one (a power loss, a full disk) falls back to the one before, with a warning:
    the resumed run trains that epoch again, to the same weights, and its metrics are not logged
    twice (tasks/tracking.py MlflowMetrics). A foreign or tampered file is an error, never skipped.
    """
    files = checkpoint_files(directory)
    for index in range(len(files) - 1, -1, -1):
        try:
            return files[index], load_checkpoint(files[index])
        except DamagedCheckpoint as err:
            if index == 0:
                raise DamagedCheckpoint(f"{err}, and there is no earlier checkpoint to resume from; start a new run") from None
            log.warning("%s; resuming from the one before it, %s", err, files[index - 1].name)
    return None


# What a checkpoint must hold, and of what type: anything else is refused with a clear error.
_FIELDS = {"epoch": int, "step": int, "stop": bool, "logs": dict, "history": list, "model": dict, "optimizer": dict,
           "scaler": dict, "callbacks": dict, "rng": dict}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; a damaged or foreign file is a clear TrainingError."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused a global: not a file fitflow wrote
        reason = str(err).strip().splitlines()[0][:200]
        raise TrainingError(f"refusing to load checkpoint {path}: it holds objects other than tensors and plain data "
                            f"({reason}); move it away to resume from the previous epoch, or start a new run") from None
    except (RuntimeError, EOFError, BadZipFile, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DamagedCheckpoint(f"checkpoint {path} is damaged ({reason})") from None
    if isinstance(saved, dict) and isinstance(saved.get("format"), int) and saved["format"] < FORMAT:
        raise TrainingError(f"checkpoint {path} was written by an earlier fitflow (format {saved['format']}; this one "
                            f"reads {FORMAT}); finish that run with the fitflow that started it, or start a new run")
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise TrainingError(f"checkpoint {path} is not a fitflow epoch checkpoint (format {FORMAT}); "
                            "move it away to resume from the previous epoch, or start a new run")
    if not isinstance(saved.get("run_id"), str):
        raise TrainingError(f"checkpoint {path} names no run: it is not accepted for any run; "
                            "move it away to resume from the previous epoch, or start a new run")
    wrong = [name for name, kind in _FIELDS.items() if not isinstance(saved.get(name), kind)]
    if wrong:
        raise TrainingError(f"checkpoint {path} is not a whole fitflow epoch checkpoint ({', '.join(wrong)} missing or "
                            "of the wrong type); move it away to resume from the previous epoch, or start a new run")
    return saved


def rng_state() -> dict[str, Any]:
    """Every generator training draws from, as tensors and plain data (loadable with weights_only)."""
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [name, torch.from_numpy(mt.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialise CUDA just to save it
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, mt.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
