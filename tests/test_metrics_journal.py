"""The metrics journal after a crash: a torn last line, a damaged cursor, a damaged line.

Real torch, a real MLflow store (sqlite in tmp_path), no Prefect: the journal, its delivery
thread and the run's end as the training step and `fitflow upload-metrics` use them.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import types

import pytest
from mlflow.tracking import MlflowClient
from user_code_examples import CrashAt

from tasks import tracking
from tasks.config import TrainConfig
from tasks.metrics_journal import Delivery, Entry, Journal, sender, upload
from tasks.trainer import Run, build_loaders, train_model


@pytest.fixture
def run(mlflow_uri, tmp_path, monkeypatch) -> Run:
    monkeypatch.setenv("FITFLOW_TRACKING_WAIT_S", "5")  # a local store answers at once; never wait long
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("journal")
    run_id = client.create_run(experiment).info.run_id
    return Run(client, run_id, experiment, tmp_path / "checkpoints" / run_id)


def _train(config, prepared, run, extra=()):
    return train_model(config, prepared, build_loaders(config, prepared), run, extra_callbacks=extra, progress=False)


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_torn_last_line_is_cut_on_open_and_the_rest_delivered(prepared, run):
    config = TrainConfig(epochs=4, batch_size=32)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(config, prepared, run, extra=[CrashAt(2)])
    journal = Journal(run.checkpoint_dir)
    with open(journal.path, "ab") as file:  # the power went while epoch 3's line was being written
        file.write(b'{"step": 3, "timestamp": 17000000')

    _train(config, prepared, run)  # resumes from epoch 2: the next line must not be glued onto the torn one

    assert [entry.step for entry in journal.entries()] == [1, 2, 3, 4]
    assert journal.path.read_bytes().endswith(b"\n") and journal.delivered() == 4
    for key in ("train_loss", "val_loss", "lr"):
        assert _steps(run.client, run.run_id, key) == [1, 2, 3, 4], key
    with open(journal.path, "ab") as file:  # torn again, then `fitflow upload-metrics`: nothing left to send
        file.write(b'{"step": 5, "time')
    assert upload(journal, run.client, run.run_id).sent == []


def test_a_run_resumed_from_an_older_checkpoint_logs_each_epoch_once(prepared, run):
    """The newest checkpoint was damaged (and skipped, or moved away as the error advises): the resumed
    run trains that epoch again, and its metrics, already journaled, are not logged a second time."""
    config = TrainConfig(epochs=4, batch_size=32, keep_checkpoints=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(config, prepared, run, extra=[CrashAt(3)])
    (run.checkpoint_dir / "epoch-00003.pt").unlink()

    _train(config, prepared, run)  # from epoch 2's checkpoint: epochs 3 and 4

    assert [entry.step for entry in Journal(run.checkpoint_dir).entries()] == [1, 2, 3, 4]
    for key in ("train_loss", "val_loss", "lr"):
        assert _steps(run.client, run.run_id, key) == [1, 2, 3, 4], key


def test_a_damaged_line_is_skipped_with_a_warning_and_the_run_still_ends_failed(run, caplog):
    """A journal glued by an earlier fitflow (or damaged on disk) in the middle: the other lines are
    delivered, and a failing run still ends FAILED (reading the journal must not fail its handler)."""
    journal = Journal(run.checkpoint_dir)
    journal.append(Entry(1, 1000, {"val_loss": 0.5}))
    with open(journal.path, "ab") as file:
        file.write(b'{"step": 2, "timestamp": 2{"step": 2, "timestamp": 2000, "metrics": {"val_loss": 0.4}}\n')
    journal.append(Entry(3, 3000, {"val_loss": 0.3}))

    assert [entry.step for entry in journal.entries()] == [1, 3]
    assert any(f"{journal.path} line 2 is damaged" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="the training failed"):
        with tracking.fail_on_error(run.client, run.run_id, run.checkpoint_dir):
            raise ValueError("the training failed")
    # the undelivered epochs were kept with the run's end; the upload sends them and ends the run
    ended = upload(journal, run.client, run.run_id)
    assert [entry.step for entry in ended.sent] == [1, 3] and ended.ended == "FAILED"
    assert _steps(run.client, run.run_id, "val_loss") == [1, 3]
    assert run.client.get_run(run.run_id).info.status == "FAILED"


@pytest.mark.parametrize("cursor", ["", "  \n", "3\x00\x00", "-1", "garbage"])
def test_a_damaged_cursor_resends_the_journal_once(run, caplog, cursor):
    """An empty or unreadable `metrics.delivered` (power lost between its write and its rename before
    writes were fsync'd): delivery starts over, and the store keeps one copy of each value."""
    journal = Journal(run.checkpoint_dir)
    journal.append(Entry(1, 1000, {"val_loss": 0.5}), Entry(2, 2000, {"val_loss": 0.4}))
    assert upload(journal, run.client, run.run_id).sent
    journal.cursor.write_text(cursor)

    assert journal.delivered() == 0
    assert any(f"{journal.cursor} is damaged" in r.getMessage() for r in caplog.records)
    delivery = Delivery(journal, sender(run.client, run.run_id))
    delivery.notify()
    assert delivery.close(wait_s=30) == [] and journal.delivered() == 2
    assert _steps(run.client, run.run_id, "val_loss") == [1, 2]  # sent again, stored once


def test_delivery_sends_what_was_journaled_while_it_rested_in_one_batch(run):
    """Epochs shorter than the delivery interval go to MLflow together: one send for the three
    journaled after the first send, made when the run closes delivery (which cuts the rest short)."""
    journal = Journal(run.checkpoint_dir)
    sent: list[list[int]] = []
    send = sender(run.client, run.run_id)

    def recording(metrics) -> None:
        send(metrics)
        sent.append(sorted({metric.step for metric in metrics}))

    class Closing(threading.Event):
        """The delivery thread's `closing`, which also says when the thread starts its rest."""

        def __init__(self) -> None:
            super().__init__()
            self.resting = threading.Event()

        def wait(self, timeout=None):
            if timeout is not None:
                self.resting.set()
            return super().wait(timeout)

    delivery = Delivery(journal, recording, interval_s=600)
    delivery.closing = closing = Closing()
    journal.append(Entry(1, 1000, {"val_loss": 0.5}))
    delivery.notify()
    assert closing.resting.wait(60)  # epoch 1 sent; the thread rests (bounded only so a thread that never rests fails)
    for epoch in (2, 3, 4):
        journal.append(Entry(epoch, 1000 * epoch, {"val_loss": 0.5 - epoch / 100}))
        delivery.notify()
    assert delivery.close(wait_s=30) == []
    assert sent == [[1], [2, 3, 4]]
    assert _steps(run.client, run.run_id, "val_loss") == [1, 2, 3, 4]


def test_a_run_resumed_where_it_has_neither_checkpoints_nor_journal_is_refused(run, tmp_path):
    """Another machine, and the run logged no checkpoint to MLflow: starting over at epoch 0 in the same
    run would log its epochs twice, so the resume is refused with one line (before anything trains)."""
    from tasks.errors import ConfigError
    from tasks.tracking import restore_checkpoints

    run.client.log_metric(run.run_id, "train_loss", 0.5, step=1)
    run.client.log_metric(run.run_id, "train_loss", 0.4, step=2)
    with pytest.raises(ConfigError, match=f"run {run.run_id} trained 2 epoch\\(s\\) on another machine"):
        restore_checkpoints(run.client, run.run_id, tmp_path / "elsewhere")
    Journal(tmp_path / "here").append(Entry(1, 1000, {"train_loss": 0.5}))  # this machine's journal: resumed here
    assert restore_checkpoints(run.client, run.run_id, tmp_path / "here") is None


def _holds(line: dict, key: str, step: int) -> bool:
    """Whether a journal line holds the value of `key` at `step` (an epoch's line, or a line of per-step values)."""
    if line.get("per") == "steps":
        return line["key"] == key and step in line["steps"]
    return line["step"] == step and key in line["metrics"]


def test_per_step_values_are_on_disk_before_they_are_sent_and_the_training_thread_fsyncs_only_epoch_lines(
        prepared, run, monkeypatch):
    """Power lost after a send must not lose what MLflow has (the cursor would count lines the journal
    lacks): the sender fsyncs the journal before each send. The training thread writes the per-step
    values without waiting for the disk: its only journal fsync is each epoch's own line."""
    from tasks import metrics_journal

    journal = Journal(run.checkpoint_dir)
    on_disk = {"bytes": 0}  # how much of the journal the last fsync covered
    training_fsyncs: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if journal.path.exists() and os.path.samestat(os.fstat(fd), os.stat(journal.path)):
            on_disk["bytes"] = os.fstat(fd).st_size
            if threading.current_thread() is threading.main_thread():
                training_fsyncs.append(on_disk["bytes"])

    checked: list[int] = []
    real_sender = metrics_journal.sender

    def checking_sender(client, run_id):
        send = real_sender(client, run_id)

        def checked_send(metrics) -> None:
            last = metrics[-1]
            data = journal.path.read_bytes()
            lines = data.splitlines(keepends=True)
            ends = [sum(len(line) for line in lines[: i + 1]) for i, line in enumerate(lines)
                    if _holds(json.loads(line), last.key, last.step)]
            assert ends and on_disk["bytes"] >= ends[0], "a value was sent before its journal line was on disk"
            checked.append(len(metrics))
            send(metrics)

        return checked_send

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(metrics_journal, "sender", checking_sender)
    config = TrainConfig(epochs=3, batch_size=32, log_every_n_steps=1, patience=0)
    _train(config, prepared, run)

    steps_per_epoch = len(build_loaders(config, prepared).train)
    assert _steps(run.client, run.run_id, "train_loss_step") == list(range(1, 3 * steps_per_epoch + 1))
    assert sum(checked) == 3 * steps_per_epoch + 3 * len(run.client.get_run(run.run_id).data.metrics) - 3
    assert len(training_fsyncs) == 3  # the epochs' lines; the steps' lines waited for no fsync


def test_the_sender_reads_each_journal_line_once(run, monkeypatch):
    """Each send reads only the lines appended since the previous one: the whole journal each time
    would cost the delivery thread time growing with the run (100 epochs of 391 logged steps: 39,000
    values). A cursor that moves back (damaged) makes it read the journal again from the start.
    Per-step values are a line per flush; the line per step of earlier fitflow is read the same."""
    from tasks import metrics_journal

    on_delivery_thread = []
    real_loads = json.loads

    def loads(text, *args, **kwargs):
        if threading.current_thread().name == "fitflow-metrics-delivery":
            on_delivery_thread.append(text)
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(metrics_journal, "json", types.SimpleNamespace(loads=loads, dumps=json.dumps))
    journal = Journal(run.checkpoint_dir)
    send, sent = sender(run.client, run.run_id), queue.Queue()

    def recording(metrics) -> None:
        send(metrics)
        sent.put(len(metrics))

    def wait_until_sent(count: int) -> None:
        while count > 0:
            count -= sent.get(timeout=60)  # the timeout bounds a hang only

    delivery = Delivery(journal, recording, interval_s=0)
    for epoch in range(1, 6):
        steps = range(10 * epoch - 9, 10 * epoch + 1)
        if epoch <= 2:  # as earlier fitflow wrote them
            journal.append(*(Entry(step, step, {"train_loss_step": 1 / step}, per="step") for step in steps))
        else:
            journal.append_steps("train_loss_step", list(steps), list(steps), [1 / step for step in steps])
        journal.append(Entry(epoch, 1000 + epoch, {"val_loss": 1 / epoch}))
        delivery.notify()
        wait_until_sent(11)
    assert len(on_delivery_thread) == 2 * 11 + 3 * 2  # lines
    with journal.lock():  # after the last send's cursor update
        journal.cursor.write_text("")  # damaged: counts as nothing delivered
    delivery.notify()
    wait_until_sent(55)
    assert delivery.close(wait_s=30) == []
    assert len(on_delivery_thread) == 2 * 28
    logged = sorted((m.step, m.timestamp, m.value) for m in run.client.get_metric_history(run.run_id, "train_loss_step"))
    assert logged == [(step, step, 1 / step) for step in range(1, 51)]  # sent twice, stored once
