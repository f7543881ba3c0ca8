"""MLflow tracking: one run per training, addressed by its run id (no thread-local active run).

Everything goes through an explicit `MlflowClient` and `run_id`: MLflow's fluent API keeps the
active run in a thread-local stack, which Prefect's worker threads, other processes and
notebooks do not share, so an explicit run id is the one address that works from all of them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks import metrics_journal
from tasks.callbacks import Callback, FitState, Monitor
from tasks.checkpoints import Checkpoints, DamagedCheckpoint, checkpoint_files, load_checkpoint
from tasks.durable_files import atomic_file
from tasks.errors import ConfigError, TrackingError
from tasks.redaction import redact_text, redact_uri

log = logging.getLogger("fitflow")
MODEL_CODE = Path(__file__).with_name("model_code.py")


# Which way the run's monitor improves, "min" or "max", as it trained (tasks/user_code.py monitor_lower_is_better):
# written once when the run is created, read by whatever judges the run later from the run alone.
MONITOR_MODE_TAG = "fitflow.monitor_mode"


def monitor_mode(lower_is_better: bool) -> str:
    return "min" if lower_is_better else "max"


def recorded_lower_is_better(monitor: str, tags: dict[str, str]) -> bool:
    """Which way a run's `monitor` improves, as the run recorded it; a run logged before fitflow recorded it
    (no MONITOR_MODE_TAG) goes by the metric's name, as it trained then."""
    mode = tags.get(MONITOR_MODE_TAG)
    return Monitor(monitor).lower_is_better if mode not in ("min", "max") else mode == "min"


def prepare_store(uri: str) -> None:
    """Make sure the store can take a run before any training starts.

    A tracking server is asked one cheap question with a short timeout: MLflow's client would
    otherwise retry for minutes before failing. A local sqlite store is created or migrated
    under a file lock: several processes opening a fresh one at once race in MLflow's
    migrations and crash; the first through the lock migrates.
    """
    if uri.startswith(("http://", "https://")):
        check_server(uri)
        return
    if not uri.startswith("sqlite:///"):
        return
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=300):
        MlflowClient(uri).search_experiments(max_results=1)


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Raise TrackingError (naming the URI and the cause) unless the server answers an API call."""
    import requests

    server = redact_uri(uri)  # the messages reach the terminal, Prefect's logs and run tags

    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    headers = {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"} if os.environ.get("MLFLOW_TRACKING_TOKEN") else {}
    try:
        response = requests.get(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                                auth=(user, password) if user else None, headers=headers, timeout=timeout)
    except requests.Timeout:
        raise TrackingError(f"MLflow tracking server {server} did not answer within {timeout:.0f} s; check that it is up (MLFLOW_TRACKING_URI)") from None
    except requests.RequestException as err:
        cause = type(err).__name__ + (": connection refused" if "refused" in str(err).lower() else "")
        raise TrackingError(f"MLflow tracking server {server} is unreachable ({cause}); start it or fix MLFLOW_TRACKING_URI") from None
    if response.status_code in (401, 403):
        raise TrackingError(f"MLflow tracking server {server} refused the credentials (HTTP {response.status_code}); "
                            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of that server")
    if response.status_code >= 400:
        raise TrackingError(f"MLflow tracking server {server} answered HTTP {response.status_code} ({response.text[:200].strip()}); check MLFLOW_TRACKING_URI")


def experiment_id(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The id of the named experiment, created on first use (safe against a concurrent create), its
    artifacts in `artifact_location` (None: the store's default)."""
    for _ in range(2):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise ConfigError(f"MLflow experiment '{name}' is deleted; restore it (mlflow experiments restore) or use another --experiment")
            if (experiment.artifact_location.startswith("mlflow-artifacts:")
                    and not client.tracking_uri.startswith(("http://", "https://"))):
                # a store opened directly (the sqlite file), an experiment an MLflow server made: its
                # artifacts need that server; found after training, it would fail the run at its model
                raise ConfigError(f"MLflow experiment '{name}' keeps its artifacts on an MLflow server "
                                  f"({experiment.artifact_location}), which this local store cannot reach; start that "
                                  "server (`fitflow up`) or set MLFLOW_TRACKING_URI to it, or use another --experiment")
            return experiment.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    raise RuntimeError(f"could not create or find experiment {name}")


@contextmanager
def fail_on_error(client: MlflowClient, run_id: str, folder: Path | None = None) -> Iterator[None]:
    """On an error, end the run FAILED (KILLED on interrupt) with the error as a tag, and re-raise.

    With the run's checkpoint `folder`: if its metrics journal holds undelivered epochs, the
    tracking server was unreachable when training ended, so the end is kept in the journal too
    (asking the server would wait out MLflow's retries, minutes per call, and then fail);
    `fitflow upload-metrics <run id>` records both once the server is back. The same when the
    server refuses or fails the calls that end the run.
    """
    try:
        yield
    except BaseException as err:
        # Not an Exception: an interrupt, exit, or Prefect's TerminationSignal on cancellation.
        status = "FAILED" if isinstance(err, Exception) else "KILLED"
        error = redact_text(f"{type(err).__name__}: {err}")[:5000]  # MLflow's errors quote request URLs
        journal = metrics_journal.Journal(folder) if folder is not None else None
        if journal is not None and _undelivered(journal):
            _keep_end(journal, run_id, status, error, "the tracking server was unreachable when the run ended")
            raise
        try:
            client.set_tag(run_id, "fitflow.error", error)
            client.set_terminated(run_id, status)
        except Exception as closing:  # noqa: BLE001 - the run's own error is the one to raise
            reason = redact_text(f"{type(closing).__name__}: {closing}")[:300]
            if journal is None:
                log.warning("run %s could not be ended %s on the tracking server (%s)", run_id, status, reason)
            else:
                _keep_end(journal, run_id, status, error, f"the tracking server failed the run's end ({reason})")
        raise


def _keep_end(journal: metrics_journal.Journal, run_id: str, status: str, error: str, why: str) -> None:
    journal.keep_end(status, int(time.time() * 1000), {"fitflow.error": error, "fitflow.closed_by": f"fitflow upload-metrics: {why}"})
    log.warning("run %s ends %s once `fitflow upload-metrics %s` reaches the tracking server (kept in %s)",
                run_id, status, run_id, journal.end_path)


def _undelivered(journal: metrics_journal.Journal) -> bool:
    try:
        return bool(journal.pending())
    except OSError as err:  # an unreadable journal must not keep the run from ending
        log.warning("could not read the metrics journal %s (%s); ending the run on the server", journal.path, err)
        return False


@contextmanager
def finished_or_failed(client: MlflowClient, run_id: str, folder: Path | None = None) -> Iterator[None]:
    """End the run FINISHED when the block completes, FAILED/KILLED when it raises (see fail_on_error)."""
    with fail_on_error(client, run_id, folder):
        yield
        client.set_terminated(run_id, "FINISHED")  # inside the guard: a run whose end fails ends FAILED, not RUNNING


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit is 100 params
        client.log_batch(run_id, params=items[start : start + 100])


CONFIG_ARTIFACT = "config.json"


def log_config(client: MlflowClient, run_id: str, config_json: str) -> None:
    """The run's validated config, whole, as the artifact `config.json`: what resume reads back."""
    client.log_text(run_id, config_json, CONFIG_ARTIFACT)


def logged_config(client: MlflowClient, run_id: str) -> str | None:
    """The text of the run's `config.json`, or None when the run has none."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            return Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, folder)).read_text(encoding="utf-8")
        except (MlflowException, OSError):
            return None


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])


def log_dataset(client: MlflowClient, run_id: str, table: pd.DataFrame, source: str, target: str | None, name: str,
                context: str = "training") -> str:
    """Log the raw table as the run's input (`context`: training, or prediction); returns its digest."""
    dataset = _pandas_dataset(table, source, target, name)
    tags = [InputTag(key="mlflow.data.context", value=context)]
    with warnings.catch_warnings():  # the schema's hint on integer columns is advice for serving inputs
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        fields = dataset.to_dict()  # public; the run's dataset entity is made of these fields
    entity = DatasetEntity(name=fields["name"], digest=fields["digest"], source_type=fields["source_type"],
                           source=fields["source"], schema=fields.get("schema"), profile=fields.get("profile"))
    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=[DatasetInput(dataset=entity, tags=tags)])
            break
        except MlflowException as err:
            # MLflow's store looks the dataset up, then inserts it, in one transaction that is
            # rolled back whole: a run in the same experiment logging the same data between the two
            # makes the insert break the (experiment, name, digest) key. Asked again, the store finds it.
            if attempt == 2 or not _lost_dataset_insert_race(err):
                raise
    return dataset.digest


def _lost_dataset_insert_race(err: MlflowException) -> bool:
    message = str(err.message)
    return "datasets" in message and ("UNIQUE constraint failed" in message or "duplicate key" in message)


def dataset_digest(table: pd.DataFrame, source: str, target: str | None) -> str:
    """The digest `log_dataset` logs for this table (a resumed run checks its data is the same)."""
    return _pandas_dataset(table, source, target, "digest").digest


def _pandas_dataset(table: pd.DataFrame, source: str, target: str | None, name: str):
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about it
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_pandas(table, source=source, targets=target, name=name)


class MlflowMetrics(Callback):
    """Logs each epoch's metrics with step = epoch: journaled locally first, sent off the training thread.

    The journal and its delivery thread are in tasks/metrics_journal.py. At fit end (success,
    failure or cancellation alike: fit's finally) delivery gets up to FITFLOW_TRACKING_WAIT_S
    (default 30 s: enough to ride out a tracking server's restart, far less than the minutes
    MLflow's own retries would hold each later call). What is still undelivered then is kept in
    the journal and named in one warning, with the command that uploads it.
    """

    def __init__(self, client: MlflowClient, run_id: str, folder: Path) -> None:
        self.client, self.run_id = client, run_id
        self.journal = metrics_journal.Journal(folder)
        self.wait_s = _seconds("FITFLOW_TRACKING_WAIT_S", 30.0)
        self.delivery: metrics_journal.Delivery | None = None
        self.journaled = 0  # the last epoch in the journal

    def on_fit_start(self, state: FitState) -> None:
        self.journal.record_origin(self.run_id, redact_uri(self.client.tracking_uri))  # never a password on disk
        self.journal.end_path.unlink(missing_ok=True)  # a resumed run is going again: its kept end is void
        epochs = [entry.step for entry in self.journal.entries() if entry.per == "epoch"]
        self.journaled = max(epochs, default=0)
        if not epochs and state.epoch:  # resumed without this machine's journal (checkpoints from MLflow)
            self.journaled = max((m.step for m in self.client.get_metric_history(self.run_id, "train_loss")), default=0)
        if state.epoch > self.journaled:  # resumed from a checkpoint written just before a crash
            self._append(state)
        self.delivery = metrics_journal.Delivery(self.journal, metrics_journal.sender(self.client, self.run_id))
        self.delivery.notify()  # epochs a previous attempt left undelivered

    def on_epoch_end(self, state: FitState) -> None:
        # Resumed from a checkpoint older than the journal (the newest was damaged, or moved away):
        # the epochs trained again are in the journal already, with the same values.
        if state.epoch > self.journaled:
            self._append(state)
            self.delivery.notify()

    def _append(self, state: FitState) -> None:
        logs = {**state.logs, "lr": state.optimizer.param_groups[0]["lr"]}
        self.journal.append(metrics_journal.Entry(state.epoch, int(time.time() * 1000), logs))
        self.journaled = state.epoch

    def on_fit_end(self, state: FitState) -> None:
        if self.delivery is None:
            return
        pending = self.delivery.close(self.wait_s)
        if pending:
            log.warning(metrics_journal.kept_locally_message(self.journal, self.run_id, redact_uri(self.client.tracking_uri),
                                                             pending, self.delivery.last_error))


class MlflowCheckpoints(Callback):
    """Each epoch checkpoint to the run's artifacts too (`checkpoint_to_mlflow`), so that a retry on a
    machine without this checkpoint folder resumes from it (`restore_checkpoints`).

    `Checkpoints` tells it each checkpoint once the file is in place (from its writer thread); after
    `Checkpoints` in the callbacks, so that at fit end the last one is written. A thread uploads the newest
    file, one at a time: when uploads are slower than epochs, the epochs in between are skipped,
    never queued, and training never waits. The artifacts are two slots, written in turn
    (`checkpoints/resume/slot-a.pt`, `slot-b.pt`): storage stays at two checkpoints, and an upload
    cut short spoils one slot while the other still holds a whole, older checkpoint. At fit end
    (a failure too) the last upload gets up to FITFLOW_TRACKING_WAIT_S; one still going then (the
    server is away: MLflow retries for minutes) is left to finish on its own, said once there, and
    from then on the thread reports nothing: fit has returned, and its warnings would land in
    whatever the process does next.
    """

    FOLDER = "checkpoints/resume"

    def __init__(self, client: MlflowClient, run_id: str, checkpoints: Checkpoints) -> None:
        self.client, self.run_id = client, run_id
        checkpoints.written.append(self.offer)
        self.wait_s = _seconds("FITFLOW_TRACKING_WAIT_S", 30.0)
        self.newest: Path | None = None  # the checkpoint to upload next (guarded by `lock`: set on the writer thread)
        self.lock = threading.Lock()
        self.uploads = 0
        self.wake, self.closing, self.abandoned = threading.Event(), threading.Event(), threading.Event()
        self.uploading: Path | None = None  # the checkpoint on its way (for the message at fit end)
        self.thread: threading.Thread | None = None

    def on_fit_start(self, state: FitState) -> None:
        self.thread = threading.Thread(target=self._run, name="fitflow-checkpoint-upload", daemon=True)
        self.thread.start()

    def offer(self, path: Path) -> None:
        with self.lock:
            self.newest = path
        self.wake.set()

    def on_fit_end(self, state: FitState) -> None:
        if self.thread is not None:
            self.closing.set()
            self.wake.set()
            self.thread.join(self.wait_s)
            if self.thread.is_alive():
                self.abandoned.set()
                log.warning("epoch checkpoint %s was still being logged to MLflow after %.0f s "
                            "(FITFLOW_TRACKING_WAIT_S); it goes on in the background until this process ends, "
                            "and a resume on a machine without this checkpoint folder may start from an earlier "
                            "epoch", (self.newest or self.uploading or Path("?")).name, self.wait_s)  # unlocked: a name for a message

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            with self.lock:
                path, self.newest = self.newest, None
            if path is not None:
                self.uploading = path
                self._upload(path)
            with self.lock:
                if self.closing.is_set() and self.newest is None:
                    return

    def _upload(self, path: Path) -> None:
        slot = f"slot-{'ab'[self.uploads % 2]}.pt"
        with tempfile.TemporaryDirectory() as tmp:
            try:  # a copy: the checkpoint callback may delete the file while it uploads
                shutil.copyfile(path, Path(tmp) / slot)
                self.client.log_artifact(self.run_id, str(Path(tmp) / slot), self.FOLDER)
            except FileNotFoundError:  # a newer epoch replaced it already; that one is next
                return
            # Any failure (the server is away): training goes on; the next epoch tries again.
            except Exception as err:  # noqa: BLE001
                if not self.abandoned.is_set():
                    log.warning("epoch checkpoint %s not logged to MLflow: %s", path.name, redact_text(str(err))[:200])
                return
        self.uploads += 1


def logs_checkpoints(setting: str, tracking_uri: str) -> bool:
    """`checkpoint_to_mlflow`: auto logs them when the store is a server (reachable from another machine)."""
    return setting == "on" or (setting == "auto" and tracking_uri.startswith(("http://", "https://")))


def restore_checkpoints(client: MlflowClient, run_id: str, folder: Path) -> Path | None:
    """The run's epoch checkpoints from its MLflow artifacts (MlflowCheckpoints), put in `folder` when
    it has none: a run resumed on another machine continues where it was, not at epoch 0. Returns the
    newest one restored, None when there was nothing to restore."""
    if checkpoint_files(folder):
        return None
    try:
        logged = [item.path for item in client.list_artifacts(run_id, MlflowCheckpoints.FOLDER) if not item.is_dir]
    except MlflowException:
        return None
    restored = []
    with tempfile.TemporaryDirectory() as tmp:
        for artifact in logged:
            path = Path(client.download_artifacts(run_id, artifact, tmp))
            try:
                epoch = load_checkpoint(path)["epoch"]
            except DamagedCheckpoint as err:  # an upload cut short: the other slot is whole
                log.warning("%s (logged to MLflow); using the other one", err)
                continue
            with atomic_file(folder / f"epoch-{epoch:05d}.pt") as file:
                file.write(path.read_bytes())
            restored.append(folder / f"epoch-{epoch:05d}.pt")
    if restored:
        log.info("no epoch checkpoint of run %s here: restored %s from its MLflow artifacts", run_id,
                 ", ".join(p.name for p in sorted(restored)))
        return max(restored)
    trained = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    if trained and not metrics_journal.Journal(folder).path.exists():
        # Neither its checkpoints nor its journal are here: starting over would log epochs 1.. twice
        raise ConfigError(f"run {run_id} trained {max(trained)} epoch(s) on another machine, and neither its "
                          "checkpoints nor its MLflow artifacts are here (checkpoint_to_mlflow was off); resume it "
                          "on the machine that trained it, or start a new run")
    return None


class MlflowStepLoss(Callback):
    """`train_loss_step` every `every` optimizer steps, with step = the global step: the mean loss of
    the batches since the last logged step or the epoch's start (under DDP, rank 0's share of them).

    Costs per batch a list append and no device sync: the losses stay on the device until a flush,
    at most once per `flush_s` and at each epoch's end, which reads them in one sync and journals
    them in one write, delivered with the epoch metrics (`MlflowMetrics`' journal and thread; the
    delivery thread fsyncs them before it sends them, so the training thread never waits for the disk). Before `MlflowMetrics` in the callbacks, so that its last flush precedes the end of
    delivery. A resumed run journals only the steps after those the journal holds: a crashed
    attempt may have got past its last checkpoint, and no step reaches MLflow twice.
    """

    KEY = "train_loss_step"

    def __init__(self, epoch_metrics: MlflowMetrics, every: int, flush_s: float = 1.0) -> None:
        self.epoch_metrics, self.every, self.flush_s = epoch_metrics, every, flush_s
        self.journaled = 0  # the last step in the journal
        self.last_step = 0  # the global step at the previous batch: a batch that moved it ended a step
        self.losses: list[torch.Tensor] = []  # the batches' losses since the last logged step
        self.pending: list[tuple[int, int, torch.Tensor]] = []  # (step, time in ms, mean loss) to journal
        self.next_flush = 0.0

    def on_fit_start(self, state: FitState) -> None:
        steps = [e.step for e in self.epoch_metrics.journal.entries() if e.per == "step"]
        self.journaled, self.last_step = max(steps, default=0), state.step
        self.next_flush = time.monotonic() + self.flush_s

    def on_epoch_start(self, state: FitState) -> None:
        self.losses = []  # each epoch starts afresh, as a run resumed at its start does

    def on_train_batch_end(self, state: FitState, batch: int, loss: torch.Tensor) -> None:
        self.losses.append(loss)
        if state.step == self.last_step:  # within an accumulation group: no step yet
            return
        self.last_step = state.step
        if state.step % self.every:
            return
        if state.step > self.journaled:
            mean = self.losses[0] if len(self.losses) == 1 else torch.stack(self.losses).mean()
            self.pending.append((state.step, int(time.time() * 1000), mean))
        self.losses = []
        if time.monotonic() >= self.next_flush:
            self._flush()

    def on_epoch_end(self, state: FitState) -> None:
        self._flush()

    def on_fit_end(self, state: FitState) -> None:
        try:
            self._flush()
        except Exception as err:  # noqa: BLE001 - training failed (a lost device?): its own error must surface
            log.warning("the per-step losses after step %d were not journaled: %s", self.journaled, err)

    def _flush(self) -> None:
        self.next_flush = time.monotonic() + self.flush_s
        if not self.pending:
            return
        steps, times, losses = zip(*self.pending, strict=True)
        values = torch.stack([loss.float() for loss in losses]).tolist()  # one device sync
        self.epoch_metrics.journal.append_steps(self.KEY, list(steps), list(times), values)
        self.journaled, self.pending = self.pending[-1][0], []
        if self.epoch_metrics.delivery is not None:
            self.epoch_metrics.delivery.notify()


def _seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable)
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"{variable} must be a number of seconds, at least 0 (got {text!r})")
    return value


def require_delivered(client: MlflowClient, run_id: str, folder: Path) -> None:
    """Raise MetricsKeptLocally if training left metrics undelivered (the server is unreachable).

    Called right after training: the steps after it (test metrics, the model) would each wait out
    MLflow's retries, minutes, before failing the same way.
    """
    journal = metrics_journal.Journal(folder)
    pending = journal.pending()
    if pending:
        message = metrics_journal.kept_locally_message(journal, run_id, redact_uri(client.tracking_uri), pending, None)
        raise metrics_journal.MetricsKeptLocally(f"{message}; the run then ends FAILED (the model was not logged)")


def log_pyfunc_model(
    client: MlflowClient,
    run_id: str,
    model: torch.nn.Module,
    spec: dict[str, Any],
    preprocessor,
    input_example: pd.DataFrame | np.ndarray | dict | None,
) -> str:
    """Log the MLflow model; returns its URI. One model, two flavors, no pickle in either: the
    pyfunc (preprocessing as JSON + weights as a state dict) and the `pytorch` flavor (the same
    network exported by torch.export, tasks/pytorch_flavor.py).

    `input_example` None (a model whose inputs are a tuple: no pyfunc form): no example, no
    signature, no pytorch flavor.
    """
    from mlflow.models import Model, infer_signature

    from tasks import pytorch_flavor
    from tasks.serving import FitflowModel

    example = input_example.copy() if input_example is not None else None
    if isinstance(example, pd.DataFrame):
        for column in example.columns:  # ints in the signature would reject rows with missing values
            if pd.api.types.is_numeric_dtype(example[column]) and not pd.api.types.is_bool_dtype(example[column]):
                example[column] = example[column].astype("float64")
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: Path(tmp) / name for name in ("preprocessor.json", "model_spec.json", "weights.pt")}
        preprocessor.save(files["preprocessor.json"])
        files["model_spec.json"].write_text(json.dumps(spec), encoding="utf-8")
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, files["weights.pt"])
        serving = FitflowModel()
        serving.load_context(_Context({"preprocessor": str(files["preprocessor.json"]),
                                       "model_spec": str(files["model_spec.json"]),
                                       "weights": str(files["weights.pt"])}))
        signature = infer_signature(example, serving.predict(None, example)) if example is not None else None
        # the network the pyfunc loads (state dict, CPU, eval mode) is the one exported
        exported = pytorch_flavor.export(serving.model, serving.model_inputs(example), Path(tmp)) if example is not None else None
        if getattr(preprocessor, "kind", "table") == "images":  # paths or bytes: either column will do
            from mlflow.types.schema import ColSpec, Schema

            signature.inputs = Schema([ColSpec("string", "path", required=False),
                                       ColSpec("binary", "image", required=False)])
        # Created here, in the run's experiment: left to MLflow, the model would land in the
        # fluent "active" experiment (Default, artifacts in the CWD's ./mlruns).
        run = client.get_run(run_id)
        logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id,
                                            params=run.data.params, tags={"fitflow.model": spec["model"]})
        info = Model.log(
            artifact_path=None,
            name="model",
            flavor=pytorch_flavor,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=str(MODEL_CODE),
            artifacts={"preprocessor": str(files["preprocessor.json"]),
                       "model_spec": str(files["model_spec.json"]),
                       "weights": str(files["weights.pt"])},
            code_paths=_code_paths(spec),
            signature=signature,
            input_example=example,
            pip_requirements=_requirements(spec, preprocessor),  # skips MLflow's requirement inference, 8-11 s
            pytorch_model=exported,
        )
    return info.model_uri


class _Context:
    def __init__(self, artifacts: dict[str, str]) -> None:
        self.artifacts = artifacts


def _code_paths(spec: dict[str, Any]) -> list[str]:
    """The `tasks` package, plus the top-level package of a custom model if it is local code."""
    from tasks.models import is_builtin

    paths = [str(Path(__file__).parent)]
    if not is_builtin(spec["model"]):
        import importlib
        import sysconfig

        top = spec["model"].split(":")[0].split(".")[0]
        module = importlib.import_module(top)
        origin = Path(getattr(module, "__file__", "") or "")
        if origin.name and not str(origin).startswith(sysconfig.get_paths()["purelib"]):
            paths.append(str(origin.parent if origin.name == "__init__.py" else origin))
    return paths


def _requirements(spec: dict[str, Any], preprocessor: Any) -> list[str]:
    import importlib.metadata as md

    names = ["mlflow", "torch", "pandas", "numpy"]
    if spec["model"].startswith("torchvision:") or getattr(preprocessor, "kind", "table") == "images":
        names += ["torchvision", "pillow"]  # the architecture; decoding and resizing images
    return [f"{name}=={md.version(name).split('+')[0]}" for name in names]


def log_artifact(client: MlflowClient, run_id: str, path: str | Path, folder: str | None = None) -> None:
    client.log_artifact(run_id, str(path), folder)


def run_url(tracking_uri: str, experiment: str, run_id: str) -> str:
    """Where the run is in the MLflow UI (the local store's UI is `mlflow ui` on port 5000)."""
    base = redact_uri(tracking_uri) if tracking_uri.startswith(("http://", "https://")) else os.environ.get("FITFLOW_MLFLOW_UI_URL", "http://127.0.0.1:5000")
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
