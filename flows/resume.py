"""Continuing a training run that crashed, was killed or cancelled: same MLflow run, same config.

Three ways in, one mechanism (the epoch checkpoints of tasks/checkpoints.py, found by run id
under `<FITFLOW_HOME>/checkpoints/<run id>`):
- `fitflow resume <run id>` (or the `resume` field in the Prefect UI form): the hyperparameters
  are the run's own, read back from its `config.json`; the launch settings (device, threads,
  workers, ...) are this invocation's, since the run may continue on another machine;
- a retry of the same Prefect flow run (the UI's Retry, flow retries): the MLflow run tagged
  with this flow run id and not FINISHED is continued instead of starting a new one;
- a retry of the training task inside one flow run: the same Run, so its checkpoint is found.

A run still training in another process is refused (tasks/run_owner.py holds a lock on its
checkpoint folder). On a machine without that folder, the checkpoints the run logged to MLflow
(`checkpoint_to_mlflow`) are restored first (flows/train.py start_run).
"""

from __future__ import annotations

import logging

from mlflow.entities import Run as MlflowRun
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from flows.environment import fitflow_home, tracking_uri
from flows.steps import DataRecord
from tasks import run_owner, tracking
from tasks.config import Launch, TrainConfig, describe_validation_error
from tasks.errors import ConfigError
from tasks.redaction import redact_uri

log = logging.getLogger("fitflow")


def config_of_run(run_id: str, launch: Launch, from_python: bool = False) -> TrainConfig:
    """The config a run was started with, to run with `launch`; ConfigError if it cannot be resumed.

    `from_python`: the caller is the Python API, which alone can resume its runs (their data and
    model are the caller's objects), and only those.
    """
    uri = tracking_uri()
    tracking.prepare_store(uri)
    client = MlflowClient(uri)
    _resumable_run(client, run_id, uri, from_python)
    run_owner.check_free(fitflow_home() / "checkpoints" / run_id, run_id)  # still training: refused before any work
    text = tracking.logged_config(client, run_id)
    if text is None:
        raise ConfigError(f"run {run_id} has no {tracking.CONFIG_ARTIFACT} artifact to resume from (it was not "
                          "started by this fitflow); start a new run with `fitflow train`")
    try:
        return TrainConfig.model_validate_json(text).model_copy(update={"launch": launch})
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, source=f"{tracking.CONFIG_ARTIFACT} of run {run_id}")) from None


def unfinished_run_of_flow_run(client: MlflowClient, experiment_id: str, flow_run_id: str) -> str | None:
    """The MLflow run an earlier attempt of this flow run left unfinished, if any."""
    runs = client.search_runs(
        [experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}' and attributes.status != 'FINISHED'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def reopen_run(client: MlflowClient, run_id: str, data: DataRecord, tags: dict[str, str],
               from_python: bool = False) -> None:
    """Mark the run RUNNING again, after checking it trains on the same data; `tags` link the new flow run."""
    run = _resumable_run(client, run_id, tracking_uri(), from_python)
    logged = run.data.tags.get("fitflow.dataset_digest")
    digest = tracking.dataset_digest(data.frame, data.source, data.target)
    if logged and logged != digest:
        raise ConfigError(f"the data of run {run_id} has changed (digest {digest}, the run logged {logged}); "
                          "resume needs the same data, or start a new run")
    attempt = int(run.data.tags.get("fitflow.attempt", "1")) + 1
    client.update_run(run_id, status="RUNNING")
    if "fitflow.error" in run.data.tags:
        client.set_tag(run_id, "fitflow.previous_error", run.data.tags["fitflow.error"])
        client.delete_tag(run_id, "fitflow.error")
    for key, value in {**tags, "fitflow.attempt": str(attempt)}.items():
        client.set_tag(run_id, key, value)
    log.info("continuing MLflow run %s (attempt %d, was %s)", run_id, attempt, run.info.status)


def _resumable_run(client: MlflowClient, run_id: str, uri: str, from_python: bool) -> MlflowRun:
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"there is no MLflow run {run_id} in {redact_uri(uri)}; pass the id of a training run "
                          "(`fitflow runs` lists them) and the same MLFLOW_TRACKING_URI") from None
    if run.data.tags.get("fitflow.flow") != "train":
        raise ConfigError(f"run {run_id} is not a run of the train flow; only training runs can be resumed")
    python_run = run.data.tags.get("fitflow.entry") == "python"
    if python_run and not from_python:
        raise ConfigError(f"run {run_id} was trained from Python objects (fitflow.compile(...).fit); resume it "
                          f"there, with the same model and data: trainer.fit(..., resume='{run_id}')")
    if from_python and not python_run:
        raise ConfigError(f"run {run_id} was started by the train flow on its own data; resume it with "
                          f"`fitflow resume {run_id}`")
    if run.info.status == "FINISHED":
        raise ConfigError(f"run {run_id} has already finished; there is nothing to resume")
    return run
