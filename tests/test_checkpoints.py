"""Epoch checkpoints: exact resume of the plain training step, and damaged or foreign files.

Real torch, no Prefect, no MLflow. The killed-process version (SIGKILL of `fitflow train`, then
`fitflow resume`) is tests/test_resume.py.
"""

from __future__ import annotations

import copy
import os
import pickle
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from user_code_examples import CrashAt

from tasks.callbacks import Callback
from tasks.checkpoints import checkpoint_files, load_checkpoint, rng_state, set_rng_state
from tasks.config import TrainConfig
from tasks.errors import TrainingError
from tasks.trainer import Run, build_loaders, train_model


class Epochs(Callback):
    """Records which epochs this process trained."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_epoch_end(self, state) -> None:
        self.seen.append(state.epoch)


def _run(tmp_path, name: str) -> Run:
    # MlflowMetrics is only added with a client; these tests check the training state alone
    return Run(client=None, run_id=name.ljust(32, "0"), experiment_id="0", checkpoint_dir=tmp_path / name)


def _train(config, prepared, run, extra=()):
    loaders = build_loaders(config, prepared)
    return train_model(config, prepared, loaders, run, extra_callbacks=extra, progress=False)


@pytest.mark.parametrize("options", [
    {"scheduler": "cosine", "dropout": 0.3, "patience": 0},
    # the MLP alone from random weights: it improves for the 9 epochs, so patience has state to resume (from the
    # linear baseline's fit, this run stops at epoch 5)
    {"scheduler": "plateau", "optimizer": "sgd", "patience": 3, "batch_norm": True, "linear_path": False},
])
def test_resume_after_a_crash_gives_bit_identical_weights(tmp_path, prepared, options):
    config = TrainConfig(epochs=9, batch_size=32, keep_checkpoints=3, **options)
    whole = _train(config, prepared, _run(tmp_path, "a"))

    crashed = _run(tmp_path, "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(config, prepared, crashed, extra=[CrashAt(4)])
    random.random(), np.random.rand(), torch.rand(3)  # the crashed process' generators moved on
    assert [p.name for p in checkpoint_files(crashed.checkpoint_dir)] == [f"epoch-0000{i}.pt" for i in (2, 3, 4)]
    epochs = Epochs()
    resumed = _train(config, prepared, crashed, extra=[epochs])

    assert epochs.seen == [5, 6, 7, 8, 9]  # it continued; it did not start over
    assert resumed.history.history == whole.history.history  # every epoch, the ones before the crash too
    assert resumed.best_epoch == whole.best_epoch
    for key, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[key]), key
    last_a = load_checkpoint(checkpoint_files(tmp_path / "a")[-1])
    last_b = load_checkpoint(checkpoint_files(crashed.checkpoint_dir)[-1])
    assert last_a["epoch"] == last_b["epoch"]
    for key, tensor in last_a["model"].items():  # the last epoch's weights, not only the restored best
        assert torch.equal(tensor, last_b["model"][key]), key
    assert len(checkpoint_files(crashed.checkpoint_dir)) == 3  # the newest `keep_checkpoints` only


def test_a_run_that_stopped_early_resumes_as_stopped(tmp_path, prepared):
    config = TrainConfig(epochs=200, patience=2, lr=0.05)
    run = _run(tmp_path, "c")
    first = _train(config, prepared, run)
    assert len(first.history) < 200
    epochs = Epochs()
    again = _train(config, prepared, run, extra=[epochs])  # e.g. a retry after a crash in testing or model logging
    assert epochs.seen == []
    assert again.history.history == first.history.history and again.best_epoch == first.best_epoch


def test_rng_state_round_trips_through_weights_only_files(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(2), expected[2])


def test_damaged_and_foreign_checkpoints_are_clear_errors(tmp_path, prepared):
    config = TrainConfig(epochs=2, keep_checkpoints=1)  # no earlier checkpoint to fall back to
    run = _run(tmp_path, "d")
    _train(config, prepared, run)
    newest = checkpoint_files(run.checkpoint_dir)[-1]

    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(TrainingError, match=r"epoch-00002.pt is damaged .*no earlier checkpoint to resume from"):
        _train(config, prepared, run)

    class Payload:  # what a tampered file would carry: a global that runs code when unpickled
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": 1, "model": Payload()}, newest)
    with pytest.raises(TrainingError, match="refusing to load checkpoint .*objects other than tensors"):
        _train(config, prepared, run)

    with open(newest, "wb") as f:
        pickle.dump({"format": 1}, f)  # a plain pickle, not a torch zip file
    with pytest.raises(TrainingError, match="epoch-00002.pt"):
        _train(config, prepared, run)

    torch.save({"weights": torch.zeros(1)}, newest)
    with pytest.raises(TrainingError, match="not a fitflow epoch checkpoint"):
        _train(config, prepared, run)


def _whole_checkpoint(tmp_path, prepared, name: str) -> tuple[Run, dict]:
    run = _run(tmp_path, name)
    _train(TrainConfig(epochs=1), prepared, run)
    return run, load_checkpoint(checkpoint_files(run.checkpoint_dir)[-1])


@pytest.mark.parametrize("change, message", [
    (lambda saved: saved.pop("optimizer"), r"not a whole fitflow epoch checkpoint \(optimizer missing"),
    (lambda saved: saved.update(history={"val_loss": 1.0}), r"not a whole fitflow epoch checkpoint \(history"),
    (lambda saved: saved.update(epoch="3"), r"not a whole fitflow epoch checkpoint \(epoch"),
    (lambda saved: saved["rng"].pop("numpy"), "does not fit this run's model and settings \\(KeyError"),
    (lambda saved: saved["model"].pop(next(iter(saved["model"]))), "does not fit this run's model and settings"),
    (lambda saved: saved.pop("run_id"), "names no run: it is not accepted for any run"),
    (lambda saved: saved.update(run_id=None), "names no run: it is not accepted for any run"),
], ids=["no optimizer", "history not a list", "epoch not a number", "rng incomplete", "model incomplete",
        "no run id", "run id None"])
def test_a_checkpoint_of_the_wrong_structure_or_of_no_run_is_a_clear_error(tmp_path, prepared, change, message):
    run, saved = _whole_checkpoint(tmp_path, prepared, "s")
    change(saved)
    torch.save(saved, checkpoint_files(run.checkpoint_dir)[-1])
    with pytest.raises(TrainingError, match=message):
        _train(TrainConfig(epochs=2), prepared, run)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, prepared, caplog):
    config = TrainConfig(epochs=6, batch_size=32, dropout=0.3, keep_checkpoints=2)
    whole = _train(config, prepared, _run(tmp_path, "g"))
    crashed = _run(tmp_path, "h")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(config, prepared, crashed, extra=[CrashAt(4)])
    newest = checkpoint_files(crashed.checkpoint_dir)[-1]
    newest.write_bytes(b"\0" * 4096)  # the data never reached the disk: a zero-filled file under the real name

    epochs = Epochs()
    resumed = _train(config, prepared, crashed, extra=[epochs])
    assert epochs.seen == [4, 5, 6]  # epoch 4 again, from epoch 3's checkpoint
    assert any("epoch-00004.pt is damaged" in r.getMessage() and "resuming from the one before it, epoch-00003.pt"
               in r.getMessage() for r in caplog.records)
    assert resumed.history.history == whole.history.history
    for key, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[key]), key


def test_a_new_checkpoint_is_on_disk_before_the_one_it_replaces_is_deleted(tmp_path, prepared, monkeypatch):
    """fsync of the file before its rename, of the folder after it, and only then the delete (keep_checkpoints 1):
    a power loss at any point leaves one whole checkpoint. The real calls, recorded in the order they happen."""
    calls: list[tuple[str, ...]] = []
    real = {name: getattr(os, name) for name in ("fsync", "replace", "unlink")}

    def fsync(descriptor):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        return real["fsync"](descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b, **kw: (calls.append(("replace", str(a), str(b))), real["replace"](a, b, **kw))[1])
    monkeypatch.setattr(os, "unlink", lambda path, **kw: (calls.append(("unlink", str(path))), real["unlink"](path, **kw))[1])
    run = _run(tmp_path, "k")
    _train(TrainConfig(epochs=2, keep_checkpoints=1), prepared, run)

    folder = str(run.checkpoint_dir)
    first, second = f"{folder}/epoch-00001.pt", f"{folder}/epoch-00002.pt"
    renamed = calls.index(("replace", second + ".partial", second))
    deleted = calls.index(("unlink", first))
    assert ("fsync", second + ".partial") in calls[:renamed]  # the data, before the name points at it
    assert ("fsync", folder) in calls[renamed:deleted]  # the rename, before the old checkpoint goes
    assert [p.name for p in checkpoint_files(run.checkpoint_dir)] == ["epoch-00002.pt"]


def test_a_checkpoint_of_another_run_is_refused(tmp_path, prepared):
    config = TrainConfig(epochs=1)
    _train(config, prepared, _run(tmp_path, "e"))
    other = Run(client=None, run_id="f" * 32, experiment_id="0", checkpoint_dir=tmp_path / "e")
    with pytest.raises(TrainingError, match="belongs to run e0+, not f+"):
        _train(config, prepared, other)


class MoveOnWhileWriting(Callback):
    """Holds the checkpoint writer thread inside epoch `epoch`'s write until this training thread has
    taken an optimizer step of the next epoch: the weights the write must not see. Records the
    state at every epoch end (after the checkpoint callback) to compare the file with."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.moved_on = epoch, threading.Event()
        self.states: dict[int, dict] = {}
        self.held = False

    def on_epoch_end(self, state) -> None:
        self.states[state.epoch] = copy.deepcopy({"model": state.model.state_dict(),
                                                  "optimizer": state.optimizer.state_dict()})

    def on_train_batch_end(self, state, batch, loss) -> None:
        if state.epoch == self.epoch + 1 and batch == 1:
            self.moved_on.set()

    def hold(self, save):
        def held_save(path, checkpoint):
            if path.name == f"epoch-{self.epoch:05d}.pt":
                # bounded only so that a writer on the training thread (no thread) fails instead of hanging
                self.held = self.moved_on.wait(60)
            return save(path, checkpoint)
        return held_save


def test_a_checkpoint_written_while_training_goes_on_holds_its_epochs_state(tmp_path, prepared, monkeypatch):
    from tasks import checkpoints

    probe = MoveOnWhileWriting(epoch=2)
    monkeypatch.setattr(checkpoints, "save_checkpoint", probe.hold(checkpoints.save_checkpoint))
    run = _run(tmp_path, "g")
    _train(TrainConfig(epochs=3, batch_size=32, patience=0), prepared, run, extra=[probe])

    assert probe.held  # epoch 2 was written while epoch 3 trained, after its first steps changed the weights
    for epoch in (2, 3):
        saved = load_checkpoint(run.checkpoint_dir / f"epoch-{epoch:05d}.pt")
        expected = probe.states[epoch]
        assert saved["epoch"] == epoch
        for key, tensor in expected["model"].items():
            assert torch.equal(saved["model"][key], tensor), (epoch, key)
        for index, values in expected["optimizer"]["state"].items():
            for name, value in values.items():
                assert torch.equal(torch.as_tensor(saved["optimizer"]["state"][index][name]), torch.as_tensor(value))
    assert not torch.equal(probe.states[2]["model"]["mlp.0.weight"], probe.states[3]["model"]["mlp.0.weight"])


CRASH_IN_A_WRITE = """
import io, os, sys
import torch
from tasks.config import TrainConfig
from tasks.data import load_table, prepare
from tasks.trainer import Run, build_loaders, prep_spec, train_model

real_save = torch.save

def save(obj, f, *args, **kwargs):  # the process dies halfway through writing epoch 3's file
    name = os.path.basename(str(getattr(f, "name", f)))
    if name.startswith("epoch-00003"):
        data = io.BytesIO()
        real_save(obj, data, *args, **kwargs)
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else f as out:
            out.write(data.getvalue()[: len(data.getvalue()) // 2])
            out.flush()
            os.fsync(out.fileno())
        os._exit(3)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
config = TrainConfig(**{config!r})
prepared = prepare(load_table(config.data), prep_spec(config))
run = Run(client=None, run_id="c" * 32, experiment_id="0", checkpoint_dir=__import__("pathlib").Path(sys.argv[1]))
train_model(config, prepared, build_loaders(config, prepared), run, progress=False)
"""


@pytest.mark.slow
def test_a_process_that_dies_inside_a_checkpoint_write_resumes_from_the_epoch_before(tmp_path, prepared):
    settings = {"epochs": 5, "batch_size": 32, "patience": 0, "scheduler": "cosine", "dropout": 0.2, "keep_checkpoints": 3}
    config = TrainConfig(**settings)
    whole = _train(config, prepared, _run(tmp_path, "a"))

    folder = tmp_path / ("c" * 32)
    script = CRASH_IN_A_WRITE.format(config=settings)
    died = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=600)
    assert died.returncode == 3, died.stderr[-3000:]
    assert [p.name for p in checkpoint_files(folder)] == ["epoch-00001.pt", "epoch-00002.pt"]  # no torn file among them
    epochs = Epochs()
    resumed = _train(config, prepared, Run(client=None, run_id="c" * 32, experiment_id="0", checkpoint_dir=folder),
                     extra=[epochs])

    assert epochs.seen == [3, 4, 5]
    assert resumed.history.history == whole.history.history
    for key, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[key]), key



def test_the_writer_copies_each_epoch_into_the_same_buffers(tmp_path):
    """No allocation per epoch for the state's copy; the state dict keeps its per-module versions."""
    from tasks.checkpoints import CheckpointWriter

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    writer = CheckpointWriter()
    buffers, expected = [], []
    for epoch in (1, 2):
        writer.write(tmp_path / f"epoch-{epoch:05d}.pt", {"model": model.state_dict(), "rng": rng_state()})
        writer.wait()
        buffers.append({key: tensor.data_ptr() for key, tensor in writer.buffers.items()})
        expected.append(copy.deepcopy(model.state_dict()))
        with torch.no_grad():
            model[0].weight.add_(1.0)
    writer.close()
    assert ("model", "0.weight") in writer.buffers and buffers[0] == buffers[1]
    for epoch in (1, 2):
        saved = torch.load(tmp_path / f"epoch-{epoch:05d}.pt", weights_only=True)
        assert all(torch.equal(saved["model"][k], v) for k, v in expected[epoch - 1].items())
        assert saved["model"]._metadata == model.state_dict()._metadata  # BatchNorm's version: read on load
