"""The `predict` flow: a registered (or logged) model scores a table of raw rows.

Reads top to bottom: resolve the model and load it from its files (its code never runs:
tasks/model_loading.py) -> read the rows -> check them against what
the model was trained on (tasks/scoring.py) -> predict -> write the predictions and a summary
-> one MLflow run that records the input, the model version and the summary. Every problem a
user can fix is found before the MLflow run is created and raises a one-line FitflowError.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mlflow
import pandas as pd
from mlflow.entities import LoggedModelInput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from flows import events
from flows.doctor import close_runs_of_flow_run
from flows.environment import artifact_location, fitflow_home, tracking_uri
from flows.steps import load_table_task
from tasks import run_owner, scoring, tracking
from tasks.data import resolve_source
from tasks.drift import DEFAULT_THRESHOLD, drift_table
from tasks.errors import ConfigError
from tasks.images import images_to_score
from tasks.images_preprocessor import ImagePreprocessor
from tasks.model_loading import load_fitflow_model
from tasks.redaction import redact_uri
from tasks.serving import FitflowModel

log = logging.getLogger("fitflow")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
OUTPUT_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version>, models:/m-<id>, runs:/<run id>/model or a run id"


class PredictConfig(BaseModel):
    model: str = Field(..., min_length=1, description=f"The model: {URI_FORMS}.")
    data: str = Field(..., min_length=1, description="CSV or Parquet file of raw rows (the training columns; the target "
                      "may be absent); for an image model, a folder of images (class sub-folders add accuracy) or a manifest.")
    out: str = Field(..., min_length=1, description="Predictions file, .csv or .parquet; the summary goes beside it (<out>.summary.json).")
    unseen: Literal["encode", "error"] = Field(
        "encode", description="Categorical values never seen in training: encode them as training encoded rare values (and count them), or fail.")
    experiment: str = Field("fitflow-predictions", min_length=1, description="MLflow experiment of the prediction run.")
    drift_threshold: float = Field(
        DEFAULT_THRESHOLD, ge=0, description="Population stability index above which a column counts as drifted from "
        "the training data; any drifted column emits fitflow.drift.detected (0.1-0.25: moderate shift, above 0.25: major).")
    trust_model_code: bool = Field(
        False, description="Allow a model whose network is custom code (pkg.mod:Class) to import and run that code, "
        "packed in the model by whoever logged it, on this machine. Off: only fitflow's own networks are built.")


class PredictResult(BaseModel):
    run_id: str
    model_uri: str  # the exact model that scored (models:/<name>/<version> or models:/m-<id>)
    out: str
    summary_path: str
    summary: dict


@dataclass
class ModelRef:
    uri: str  # what to load: pinned to one version, so an alias that moves meanwhile changes nothing
    model_id: str | None
    name: str | None = None
    version: str | None = None
    source_run_id: str | None = None


@flow(name="predict", description="Score a table or a folder of images with a registered MLflow model; log the prediction run.",
      on_crashed=[close_runs_of_flow_run], on_cancellation=[close_runs_of_flow_run])
def predict(config: PredictConfig) -> PredictResult:
    """Resolve the model -> read rows -> check -> predict -> write -> track."""
    out, kind = output_path(config.out, config.data)
    ref = resolve_model_task(config.model)
    model = load_model_task(ref, config.trust_model_code)
    images = isinstance(model.preprocessor, ImagePreprocessor)
    frame = images_to_score_task(config.data) if images else load_table_task(config.data)
    predictions, summary = score_task(model, frame, config.unseen)
    drift = None if images else drift_task(model.preprocessor, frame, config.drift_threshold)
    summary = {"model": ref.uri, "registered": f"{ref.name}/{ref.version}" if ref.name else None,
               "data": config.data, **summary, **({"drift": drift_summary(drift, config.drift_threshold)} if drift is not None else {})}
    summary_path = write_predictions(predictions, summary, out, kind)
    run_id = track_prediction(config, ref, frame, summary, predictions.head(100), out, summary_path, drift)
    if drift is not None and drift["drifted"].any():
        announce_drift(config, ref, run_id, summary["drift"])
    log.info("wrote %d predictions to %s (MLflow run %s)", len(predictions), out, run_id)
    return PredictResult(run_id=run_id, model_uri=ref.uri, out=str(out), summary_path=str(summary_path), summary=summary)


def output_path(out: str, data: str) -> tuple[Path, str]:
    path = Path(out).expanduser()
    kind = OUTPUT_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"--out {out}: write predictions to a .csv or .parquet file")
    if path.exists() and path.resolve() == resolve_source(data).resolve():
        raise ConfigError(f"--out {out} is the input file; choose another output path")
    if path.is_dir():
        raise ConfigError(f"--out {out} is a directory; name a file such as {path / 'predictions.csv'}")
    return path, kind


def resolve_model(uri: str) -> ModelRef:
    """Pin `uri` to one model: registry aliases and versions, logged model ids, runs."""
    client = MlflowClient(tracking_uri())
    try:
        return _resolve(client, uri.strip())
    except MlflowException as err:
        raise ConfigError(f"model {uri!r} cannot be read from {redact_uri(tracking_uri())}: {err.message.splitlines()[0]}") from None


resolve_model_task = task(resolve_model, name="resolve_model", cache_policy=NO_CACHE)


def _resolve(client: MlflowClient, uri: str) -> ModelRef:
    registry = re.fullmatch(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))", uri)
    if uri.startswith("models:/m-"):
        model = _or_none(lambda: client.get_logged_model(uri.removeprefix("models:/")))
        if model is None:
            raise ConfigError(f"no logged model {uri}; copy the model URI that `fitflow train` printed")
        return ModelRef(uri, model.model_id, source_run_id=model.source_run_id)
    if registry:
        name, alias, number = registry.groups()
        if _or_none(lambda: client.get_registered_model(name)) is None:
            raise ConfigError(f"no registered model '{name}'; register one with `fitflow train --register-model {name}`")
        version = _or_none(lambda: client.get_model_version_by_alias(name, alias)) if alias else \
            _or_none(lambda: client.get_model_version(name, number))
        if version is None and alias:
            aliases = sorted(client.get_registered_model(name).aliases)
            raise ConfigError(f"registered model '{name}' has no alias '{alias}'; its aliases are: {', '.join(aliases) or 'none'}")
        if version is None:
            latest = max((int(v.version) for v in client.search_model_versions(f"name='{name}'")), default=0)
            raise ConfigError(f"registered model '{name}' has no version {number}; versions are 1 to {latest}")
        # A version registered from a logged model keeps its id in `source` (models:/m-...).
        model_id = version.model_id or (version.source.removeprefix("models:/") if version.source.startswith("models:/m-") else None)
        pinned = f"models:/{model_id}" if model_id else f"models:/{name}/{version.version}"
        return ModelRef(pinned, model_id, name, str(version.version), version.run_id)
    run_id = uri.removeprefix("runs:/").split("/")[0] if uri.startswith("runs:/") else uri
    if not _RUN_ID.fullmatch(run_id):
        raise ConfigError(f"model {uri!r} is not a model URI; use {URI_FORMS}")
    run = _or_none(lambda: client.get_run(run_id))
    if run is None or "fitflow.model_uri" not in run.data.tags:
        raise ConfigError(f"run {run_id} {'does not exist' if run is None else 'logged no fitflow model'}; pick a finished training run")
    return _resolve(client, run.data.tags["fitflow.model_uri"])


def _or_none(call):
    try:
        return call()
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def load_model(ref: ModelRef, trust_model_code: bool = False) -> FitflowModel:
    """The model from its files, never its code (tasks/model_loading.py): MLflow's loader would run it."""
    mlflow.set_tracking_uri(tracking_uri())  # registry URIs resolve through MLflow's fluent layer
    return load_fitflow_model(ref.uri, trust_model_code, tracking_uri())


load_model_task = task(load_model, name="load_model", cache_policy=NO_CACHE)


def score(model: FitflowModel, frame: pd.DataFrame, unseen: str) -> tuple[pd.DataFrame, dict]:
    """Check the rows (errors name column and row), predict, summarise."""
    prep = model.preprocessor
    if isinstance(prep, ImagePreprocessor):  # path and label (if known) first, then the predictions
        predictions = model.predict(None, frame[["path"]])
        scored = pd.concat([frame.reset_index(drop=True), predictions], axis=1)
        return scored, scoring.summarise(predictions, prep, frame)
    prep.check_columns(frame)  # missing or duplicated model columns, before any per-row check
    rows, handling = scoring.check_rows(frame, prep, unseen)
    predictions = model.predict(None, rows)
    return predictions, {**scoring.summarise(predictions, prep, frame), **handling}


score_task = task(score, name="score", cache_policy=NO_CACHE)
images_to_score_task = task(images_to_score, name="images_to_score", cache_policy=NO_CACHE)


drift_task = task(drift_table, name="drift", cache_policy=NO_CACHE)


def drift_summary(drift: pd.DataFrame, threshold: float) -> dict:
    """The drift part of the summary: the threshold, the drifted columns, and each column's figures."""
    columns = {row.column: {"psi": _number(row.psi), "unseen_share": _number(row.unseen_share),
                            "missing_share": row.missing_share} for row in drift.itertuples()}
    return {"threshold": threshold, "drifted": drift.loc[drift["drifted"], "column"].tolist(),
            "max_psi": _number(drift["psi"].max()) if len(drift) else None, "columns": columns}


def _number(value: float) -> float | None:
    return None if pd.isna(value) else round(float(value), 6)


@task(cache_policy=NO_CACHE)
def announce_drift(config: PredictConfig, ref: ModelRef, run_id: str, drift: dict) -> None:
    """`fitflow.drift.detected` about the registered model (or, unregistered, the prediction run), with the
    training data source and the model name: what the retrain trigger in prefect.yaml passes on."""
    client = MlflowClient(tracking_uri())
    trained_on = client.get_run(ref.source_run_id).data.params if ref.source_run_id else {}
    resource = (events.registered_model(ref.name, ref.version) if ref.name
                else {"prefect.resource.id": f"fitflow.prediction.{run_id}", "prefect.resource.name": run_id})
    log.warning("drift: %s drifted from the training data (PSI above %g; max %s)", ", ".join(drift["drifted"]),
                drift["threshold"], drift["max_psi"])
    events.emit(events.DRIFT_DETECTED, resource, [events.mlflow_run(run_id), events.mlflow_model(ref.uri)], {
        "model_uri": ref.uri, "model_name": ref.name or "", "model_version": ref.version or "", "data": config.data,
        "training_data": trained_on.get("data", ""), "target": trained_on.get("target", ""), "threshold": drift["threshold"], "max_psi": drift["max_psi"],
        "drifted": {name: drift["columns"][name] for name in drift["drifted"]}, "mlflow_run_id": run_id})


@task(cache_policy=NO_CACHE)
def write_predictions(predictions: pd.DataFrame, summary: dict, out: Path, kind: str) -> Path:
    """Predictions row for row with the input (row i of the output scores row i of the input)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    predictions.to_parquet(out, index=False) if kind == "parquet" else predictions.to_csv(out, index=False)
    summary_path = out.with_name(out.name + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    return summary_path


@task(cache_policy=NO_CACHE)
def track_prediction(config: PredictConfig, ref: ModelRef, frame: pd.DataFrame, summary: dict,
                     sample: pd.DataFrame, out: Path, summary_path: Path, drift: pd.DataFrame | None = None) -> str:
    """One MLflow run: the input dataset, the model as input (MLflow's link), the summary, the drift
    figures per column (metrics `drift_psi_<column>`, `drift_unseen_share_<column>`, and `drift.csv`) and tags."""
    uri = tracking_uri()
    tracking.prepare_store(uri)
    client = MlflowClient(uri)
    experiment_id = tracking.experiment_id(client, config.experiment, artifact_location(uri))
    tags = {"fitflow.flow": "predict", "mlflow.source.name": "flows/predict.py", "fitflow.model_uri": ref.uri,
            "fitflow.model_requested": config.model, "fitflow.predictions": str(out.resolve())}
    if ref.name:
        tags.update({"fitflow.model_name": ref.name, "fitflow.model_version": ref.version})
    if ref.source_run_id:
        tags["fitflow.source_run_id"] = ref.source_run_id
    if flow_run.id:
        tags["prefect.flow_run_id"] = flow_run.id
    run_name = f"predict-{ref.name}-v{ref.version}" if ref.name else "predict"
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    # this process recorded as the run's owner: killed outright (SIGKILL, the OOM killer) it runs no code
    # that ends the run, and a CLI flow run sends no heartbeats; `fitflow doctor` closes it by the owner
    with (tracking.finished_or_failed(client, run_id),
          run_owner.recorded_while_open(fitflow_home() / "checkpoints" / run_id, run_id)):
        tracking.log_params(client, run_id, {"model": config.model, "data": config.data, "unseen": config.unseen})
        source = str(resolve_source(config.data))
        tracking.log_dataset(client, run_id, frame, source, None, Path(source).stem, context="prediction")
        if ref.model_id:
            client.log_inputs(run_id, models=[LoggedModelInput(ref.model_id)])
        numbers = {"rows": summary["rows"], **{f"input_{k}": v for k, v in summary.get("metrics", {}).items()}}
        if drift is not None:
            numbers.update(drift_metrics(drift))
            client.set_tag(run_id, "fitflow.drift", ", ".join(summary["drift"]["drifted"]) or "none")
        tracking.log_metrics(client, run_id, numbers, step=0)
        tracking.log_artifact(client, run_id, summary_path)
        with tempfile.TemporaryDirectory() as tmp:  # the first rows, not the whole file: outputs may be large
            sample.to_csv(Path(tmp) / "predictions_head.csv", index=False)
            tracking.log_artifact(client, run_id, Path(tmp) / "predictions_head.csv")
            if drift is not None:  # the drift table, one row per column, most drifted first
                drift.to_csv(Path(tmp) / "drift.csv", index=False)
                tracking.log_artifact(client, run_id, Path(tmp) / "drift.csv")
    return run_id


def drift_metrics(drift: pd.DataFrame) -> dict[str, float]:
    """`drift_psi_<column>` and `drift_unseen_share_<column>` (names in MLflow's alphabet), `drift_psi_max`."""
    metrics = {"drift_psi_max": float(drift["psi"].max())} if drift["psi"].notna().any() else {}
    for row in drift.itertuples():
        name = re.sub(r"[^A-Za-z0-9_.\- /]", "_", str(row.column))
        if not pd.isna(row.psi):
            metrics[f"drift_psi_{name}"] = float(row.psi)
        if not pd.isna(row.unseen_share):
            metrics[f"drift_unseen_share_{name}"] = float(row.unseen_share)
    return metrics
