"""Per-epoch metrics that reach MLflow even when the tracking server goes away for a while.

Write-ahead: each epoch's metrics are first appended to a journal in the run's checkpoint folder
(flushed and fsync'd, about a millisecond per epoch), then a background thread sends whatever is
pending to MLflow with one `log_batch` and advances a cursor. Per-step values
(`log_every_n_steps`) go the same way, many steps to a line, but the training thread does not wait
for their fsync: the sender fsyncs the journal before each send (and the epoch's own line, written
after them, fsyncs them at the epoch's end), so nothing reaches MLflow before it is on disk; a power
loss may take the last second's step values with it, which the resumed run logs again when they
are after its checkpoint. Training never waits for MLflow and never fails because of it.

While the server is unreachable the sender retries with backoff (0.5 s doubling to 5 s). Each
try is a single HTTP request with a 10 s timeout: MLflow's client would retry one call for about
four minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, backoff factor 2), and it reads that policy only
from process-wide environment variables (mlflow#5744), which would change it for every other
MLflow call of the process too. So the sender posts through the function MLflow's own REST
store uses, with retries off for this one call (tasks/mlflow_private.py). The cursor is advanced
only after the server accepted a batch, under a file lock that `fitflow upload-metrics` takes too:
nothing is skipped, and nothing is sent twice. The one window left, a crash between the server's
answer and the cursor's update, resends a batch that is harmless: the journal keeps each value's
timestamp, and MLflow's SQL stores drop a metric identical in key, step, timestamp and value
(their primary key), so the resend adds no row.

After a crash or a power loss: a torn last line (no newline) is cut when a writer opens the
journal, so the next line is not glued onto it; a damaged line elsewhere is skipped with a
warning; a damaged cursor counts as nothing delivered (the resend is harmless, as above). The
cursor and the other small files are written through tasks/durable_files.py (fsync'd).

Files in `<FITFLOW_HOME>/checkpoints/<run id>/`:

    metrics.jsonl      one line per epoch: {"step": 3, "timestamp": <ms>, "metrics": {"val_loss": 0.41, ...}},
                       and per flush of per-step values: {"per": "steps", "key": "train_loss_step", "steps": [1199,
                       1200, ...], "timestamps": [<ms>, ...], "values": [0.31, 0.3, ...]}, read as one entry per step
                       (earlier fitflow wrote a line per step: {"step": 1200, ..., "per": "step"}, read the same)
    metrics.delivered  how many lines of metrics.jsonl MLflow has (replaced atomically)
    tracking.json      the run id and the tracking URI it lives on (where an upload goes)
    run_end.json       only while a run ended with metrics undelivered: its status and tags
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from tasks.durable_files import write_atomically
from tasks.errors import TrackingError
from tasks.mlflow_private import log_batch_once, sqlite_log_batch

log = logging.getLogger("fitflow")
REQUEST_TIMEOUT_S = 10  # one delivery try against a server that accepts connections but does not answer
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
DELIVERY_INTERVAL_S = 1.0  # the least time between two sends (see Delivery)


class MetricsKeptLocally(TrackingError):
    """Training ended while some epochs' metrics had not reached the tracking server."""


@dataclass(frozen=True)
class Entry:
    step: int  # the epoch; for per-step values, the global optimizer step
    timestamp: int  # ms since the epoch, when the epoch (or the step) ended
    metrics: dict[str, float]
    per: str = "epoch"  # or "step"

    def as_metrics(self) -> list[Metric]:
        return [Metric(key, float(value), self.timestamp, self.step) for key, value in self.metrics.items()]


class Journal:
    """The journal, its cursor and the run's kept end, in one run's checkpoint folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "metrics.jsonl"
        self.cursor = self.folder / "metrics.delivered"
        self.origin_path = self.folder / "tracking.json"
        self.end_path = self.folder / "run_end.json"
        self.opened = False  # this writer has checked the journal's end (a torn line is cut once)
        self.warned = False  # a damaged line was reported

    def append(self, *entries: Entry) -> None:
        self._write("".join(json.dumps({"step": e.step, "timestamp": e.timestamp, "metrics": e.metrics, "per": e.per})
                            + "\n" for e in entries), durable=True)  # on disk before anything is sent: a crash loses no epoch

    def append_steps(self, key: str, steps: list[int], timestamps: list[int], values: list[float]) -> None:
        """Per-step values of `key` as one line: one JSON encoding for hundreds of steps (a line and an
        encoding each cost the training thread about 2.6 us a step). Not fsync'd here (an fsync a
        second on the training thread: 3-10 ms each on a busy disk): the sender's `sync` puts them on
        disk before it sends them."""
        self._write(json.dumps({"per": "steps", "key": key, "steps": steps, "timestamps": timestamps,
                                "values": values}) + "\n", durable=False)

    def _write(self, lines: str, durable: bool) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.opened:
            self._cut_torn_tail()
            self.opened = True
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(lines)
            file.flush()
            if durable:
                os.fsync(file.fileno())

    def sync(self) -> None:
        """Put every line appended so far on disk (before sending them: see `append`)."""
        try:
            with open(self.path, "ab") as file:
                os.fsync(file.fileno())
        except FileNotFoundError:
            return

    def _cut_torn_tail(self) -> None:
        """Cut a last line without its newline: the previous writer was stopped while writing it (a kill,
        power loss, a full disk). Left there, this writer's first line would be glued onto it and every
        later read would fail. The one writer is the training process, so a line this one finds torn is
        never still being written."""
        try:
            with open(self.path, "r+b") as file:
                data = file.read()
                whole = data.rfind(b"\n") + 1
                if whole == len(data):
                    return
                file.truncate(whole)
                file.flush()
                os.fsync(file.fileno())
        except FileNotFoundError:
            return
        log.warning("cut a torn last line (%d bytes, written when a previous attempt was stopped) from %s",
                    len(data) - whole, self.path)

    def entries(self) -> list[Entry]:
        """The journal's whole lines, as entries; a damaged line is skipped with a warning (once per Journal)."""
        if not self.path.exists():
            return []
        return self.parse(self.path.read_bytes(), 1)

    def parse(self, data: bytes, first_line: int) -> list[Entry]:
        """The entries of the whole lines in `data` (the journal's lines from number `first_line` on);
        a line still being written has no newline yet and is left out. A line of per-step values is an
        entry per step."""
        text = data.decode("utf-8", errors="replace")
        lines = text.splitlines()[: text.count("\n")]
        entries, damaged = [], []
        for number, line in enumerate(lines, start=first_line):
            try:
                record = json.loads(line)
                if isinstance(record, dict) and record.get("per") == "steps":
                    key = record["key"]
                    entries += [Entry(step, timestamp, {key: value}, "step") for step, timestamp, value
                                in zip(record["steps"], record["timestamps"], record["values"], strict=True)]
                else:
                    entries.append(Entry(**record))
            except (ValueError, TypeError, KeyError) as err:
                damaged.append((number, err))
        if damaged and not self.warned:
            self.warned = True
            number, err = damaged[0]
            log.warning("metrics journal %s line %d is damaged (%s)%s; its epoch's metrics are not delivered, the "
                        "other lines are", self.path, number, str(err)[:100],
                        f" and {len(damaged) - 1} more line(s)" if len(damaged) > 1 else "")
        return entries

    def delivered(self) -> int:
        """How many entries MLflow has. A damaged cursor (power lost before the file reached the disk)
        counts as none: delivery starts over, and MLflow stores a resent value once (see above)."""
        try:
            text = self.cursor.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return 0
        if text.strip().isdigit() and text.strip().isascii():
            return int(text)
        log.warning("the delivery cursor %s is damaged (%r); sending the journal's metrics again from the start "
                    "(MLflow keeps one copy of a value sent twice)", self.cursor, text[:40])
        return 0

    def mark_delivered(self, count: int) -> None:
        write_atomically(self.cursor, str(count))

    def pending(self) -> list[Entry]:
        return self.entries()[self.delivered():]

    def lock(self) -> FileLock:
        """Held while a batch is sent and the cursor moves (the sender thread, `upload`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return FileLock(self.folder / "metrics.lock")

    def record_origin(self, run_id: str, tracking_uri: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.origin_path, json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}))

    def origin(self) -> dict[str, str]:
        return json.loads(self.origin_path.read_text(encoding="utf-8"))

    def keep_end(self, status: str, end_time: int, tags: dict[str, str]) -> None:
        write_atomically(self.end_path, json.dumps({"status": status, "end_time": end_time, "tags": tags}))

    def kept_end(self) -> dict | None:
        return json.loads(self.end_path.read_text(encoding="utf-8")) if self.end_path.exists() else None


class Unsent:
    """The journal's entries after the cursor, for the sender: each call reads only the lines
    appended since the last one. Reading the whole journal each second would cost the sender time
    that grows with the run (at 391 logged steps an epoch, a 100-epoch run's journal is 39,000
    lines, about 90 ms of CPU per read, holding the GIL beside training).

    The journal only grows while a run writes it (a torn last line is cut before anything is
    appended, and a torn line is never read: it has no newline). If the cursor moves back (a damaged
    cursor counts as none) or the file is shorter than what was read, it reads the journal again.
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._start_over()

    def _start_over(self) -> None:
        self.read_bytes = 0  # of whole lines
        self.read_lines = 0
        self.first = 0  # the index (in the journal's entries) of entries[0]
        self.entries: list[Entry] = []

    def after(self, done: int) -> list[Entry]:
        """The entries from index `done` on (`done`: how many MLflow has, the cursor)."""
        try:
            with open(self.journal.path, "rb") as file:
                if done < self.first or os.fstat(file.fileno()).st_size < self.read_bytes:
                    self._start_over()
                file.seek(self.read_bytes)
                data = file.read()
        except FileNotFoundError:
            return []
        whole = data[: data.rfind(b"\n") + 1]
        self.entries += self.journal.parse(whole, self.read_lines + 1)
        self.read_bytes += len(whole)
        self.read_lines += whole.count(b"\n")
        if done - self.first > len(self.entries):  # the cursor counts more than the journal holds: none pending
            return []
        del self.entries[: done - self.first]  # delivered: never read again
        self.first = done
        return self.entries


def first_batch(entries: list[Entry]) -> list[Entry]:
    """The longest prefix of whole entries within MLflow's batch limit (at least one entry).

    Whole entries only: a batch is delivered entirely or not at all, so the cursor stays exact.
    """
    batch, size = [], 0
    for entry in entries:
        size += len(entry.metrics)
        if batch and size > MAX_METRICS_PER_BATCH:
            break
        batch.append(entry)
    return batch


def sender(client: MlflowClient, run_id: str) -> Callable[[list[Metric]], None]:
    """Send one batch, failing fast: no retries inside the call (the Delivery thread retries)."""
    uri = client.tracking_uri
    if uri.startswith(("http://", "https://")):
        return log_batch_once(uri, run_id, REQUEST_TIMEOUT_S)
    # A local store: no HTTP retries. On sqlite, one INSERT for the batch (MLflow's ORM costs about
    # 54 us of CPU per value, beside training: see tasks/mlflow_private.py).
    return sqlite_log_batch(client, run_id) or (lambda metrics: client.log_batch(run_id, metrics=metrics))


class Delivery:
    """The background sender: sleeps until notified, then sends everything pending, batch by batch.

    After a send it rests `interval_s` (closing cuts the rest short): epochs shorter than that are
    sent together, one `log_batch` (and one lock, journal read and cursor write) for several, so
    the thread's share of the GIL and the cores stays small however short the epochs are. MLflow
    shows an epoch at most that much later.
    """

    def __init__(self, journal: Journal, send: Callable[[list[Metric]], None],
                 interval_s: float = DELIVERY_INTERVAL_S) -> None:
        self.journal, self.send, self.interval_s = journal, send, interval_s
        self.unsent = Unsent(journal)  # read on this thread only
        self.wake, self.closing, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.last_error: str | None = None
        self.thread = threading.Thread(target=self._run, name="fitflow-metrics-delivery", daemon=True)
        self.thread.start()

    def notify(self) -> None:
        self.wake.set()

    def close(self, wait_s: float) -> list[Entry]:
        """Give delivery up to `wait_s` to finish, then stop the thread; returns what is still undelivered."""
        self.closing.set()
        self.wake.set()
        self.thread.join(wait_s)
        self.stop.set()
        # A try in flight ends within its request timeout; after the join no late batch can
        # move the cursor, so the caller's report of what is kept locally is exact.
        self.thread.join(REQUEST_TIMEOUT_S + 5)
        return self.journal.pending()

    def _run(self) -> None:
        backoff = 0.0  # 0 while the server answers
        while not self.stop.is_set():
            if backoff:
                self.stop.wait(backoff)  # an epoch's notification does not cut the backoff short
            else:
                self.wake.wait()
            self.wake.clear()
            try:
                while not self.stop.is_set() and self._send_batch():
                    pass
            # Any failure (unreachable, timed out, refused, a server error): the epochs stay in the
            # journal and are tried again; the thread must outlive every error to report it at the end.
            except Exception as err:  # noqa: BLE001
                self.last_error = f"{type(err).__name__}: {err}"[:300]
                backoff = min(max(2 * backoff, 0.5), 5.0)
                continue
            backoff, self.last_error = 0.0, None
            if self.closing.is_set():
                return
            self.closing.wait(self.interval_s)  # what the next epochs journal meanwhile goes in one send

    def _send_batch(self) -> bool:
        with self.journal.lock():
            done = self.journal.delivered()
            batch = first_batch(self.unsent.after(done))
            if not batch:
                return False
            self.journal.sync()  # the per-step values, appended without an fsync
            self.send([metric for entry in batch for metric in entry.as_metrics()])
            self.journal.mark_delivered(done + len(batch))
        return True


def steps_text(steps: Iterable[int]) -> str:
    """1, 2, 3, 5, 7, 8 -> '1-3, 5, 7-8'."""
    ranges: list[list[int]] = []
    for step in sorted(steps):
        if ranges and step == ranges[-1][1] + 1:
            ranges[-1][1] = step
        else:
            ranges.append([step, step])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def entries_text(entries: list[Entry]) -> str:
    """'epochs 3-10' and/or 'the per-step values of steps 200-940' (both, joined by 'and')."""
    epochs = [e.step for e in entries if e.per == "epoch"]
    steps = [e.step for e in entries if e.per == "step"]
    parts = [f"epochs {steps_text(epochs)}"] if epochs else []
    if steps:
        parts.append(f"the per-step values of steps {min(steps)}-{max(steps)}")
    return " and ".join(parts) or "epochs -"


def kept_locally_message(journal: Journal, run_id: str, tracking_uri: str, pending: list[Entry],
                         cause: str | None) -> str:
    because = f" ({cause})" if cause else ""
    return (f"MLflow tracking server {tracking_uri} is unreachable{because}: the metrics of {entries_text(pending)} "
            f"of run {run_id} are kept locally in {journal.path}; "
            f"once the server is back, upload them with: fitflow upload-metrics {run_id}")


@dataclass
class Uploaded:
    sent: list[Entry]  # entries sent (all their metrics, or those the server lacked)
    present: list[Entry]  # entries the server already had in full
    ended: str | None  # the status recorded for the run, if its end was kept locally


def upload(journal: Journal, client: MlflowClient, run_id: str) -> Uploaded:
    """Deliver the undelivered epochs (skipping values the server has) and the kept end of the run."""
    with journal.lock():
        journal.sync()
        done = journal.delivered()
        pending = journal.entries()[done:]
        keys = {key for entry in pending for key in entry.metrics}
        on_server = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in keys}
        sent, present, metrics = [], [], []
        for entry in pending:
            missing = [m for m in entry.as_metrics() if m.step not in on_server[m.key]]
            (sent if missing else present).append(entry)
            metrics.extend(missing)
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])
        journal.mark_delivered(done + len(pending))
        end = journal.kept_end()
        if end is not None:
            client.log_batch(run_id, tags=[RunTag(key, value) for key, value in end["tags"].items()])
            client.set_terminated(run_id, end["status"], end["end_time"])
            end_path = journal.end_path
            os.replace(end_path, end_path.with_name(end_path.name + ".recorded"))  # kept for the record
    return Uploaded(sent, present, end["status"] if end else None)
