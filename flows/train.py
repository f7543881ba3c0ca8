"""The `train` flow: a table in, a tracked, reusable model out.

Reads top to bottom like the pipeline: load -> prepare -> loaders -> (MLflow run:) train ->
test -> log the model -> summarise. One MLflow run per flow run; it ends FINISHED, or FAILED
with the error as a tag, never RUNNING.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from prefect import flow, get_client, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed
from pydantic import BaseModel, Field, StringConstraints, ValidationError

from flows.doctor import close_runs_of_flow_run
from flows.environment import artifact_location, fitflow_home, tracking_uri
from flows.resume import config_of_run, reopen_run, unfinished_run_of_flow_run
from flows.steps import (
    DataRecord,
    baseline_of_run,
    build_loaders_task,
    evaluate_on_test_task,
    load_and_prepare,
    on_own_device,
    retry_after_crash,
    run_step,
    train_model_task,
)
from tasks import run_owner, system_metrics, tracking
from tasks.baseline import BASELINE_PREFIX, Baseline, baseline_sentence
from tasks.callbacks import Callback
from tasks.code_version import code_version_tags
from tasks.config import RUN_ID_PATTERN, TrainConfig, as_flow_signature, check_run_id, describe_validation_error
from tasks.data import Prepared
from tasks.errors import ConfigError
from tasks.loaders import Loaders
from tasks.plots import plot_learning_curves
from tasks.redaction import redact_uri
from tasks.trainer import Given, Run, Trained, check_before_run, first_inputs, lower_is_better, weight_decay_of

log = logging.getLogger("fitflow")


class TrainResult(BaseModel):
    run_id: str
    experiment_id: str
    model_uri: str
    mlflow_url: str
    best_epoch: int
    epochs_trained: int
    history: dict[str, list[float]]
    test_metrics: dict[str, float]
    baseline_model: str | None = None  # "logistic regression", "ridge regression"; None: no baseline (not a table, or off)
    baseline_metrics: dict[str, float] = {}  # baseline_test_<metric>, on the same test rows as test_metrics
    baseline_warning: str | None = None  # one sentence when the network does not beat the baseline
    registered: str | None = None  # "models:/<name>/<version> is champion: <reason>" with register_model
    unchanged: str | None = None  # why nothing was trained: the champion's data and config are this run's (the rest is the champion's)


def train(config: TrainConfig, resume: str | None = None) -> TrainResult:
    """Run the `train` flow for a config (from Python, the CLI and tests); `resume`: see the flow."""
    return train_flow(**config.flat(), resume=resume)


def train_flow(resume: str | None = None, **fields) -> TrainResult:
    """Load -> prepare -> check -> loaders -> train -> test -> log the model (one MLflow run).

    `resume`: an MLflow run id to continue from its last epoch checkpoint, with the
    hyperparameters of its config.json; only the launch settings given here apply.
    """
    log.setLevel(logging.INFO)  # the per-epoch lines are the run's log, also under workers and serve
    config = config_from_parameters(fields)
    if resume:  # continue that run, with the config it was started with (flows/resume.py)
        config = config_of_run(check_run_id(resume), config.launch)
    prepared, data = load_and_prepare(config)  # a table, images or your Datasets (flows/steps.py)
    check_before_run(config, prepared)  # a wrong model name or monitor fails here, before there is an MLflow run
    if config.register_model and not resume:  # a retrain of what the champion already learned: stop here
        same = champion_of_same_inputs(config, data)
        if same is not None:
            return Completed(name="Unchanged", message=same.unchanged, data=same)
    with on_own_device(config) as config:  # several GPUs: one no other run trains on, until the model is logged
        loaders = build_loaders_task(config, prepared)
        run = start_run(config, prepared, data, resume=resume)
        with (run_owner.released_at_end(run.checkpoint_dir),
              tracking.finished_or_failed(run.client, run.run_id, run.checkpoint_dir),
              system_metrics.sampled(run.client, run.run_id)):
            trained = train_in_run(config, prepared, loaders, run)
            test_metrics = evaluate_on_test_task(config, prepared, loaders, trained)
            baseline = baseline_of_run(config, data, prepared, loaders, trained)
            model_uri = log_model(config, prepared, data, run, trained, test_metrics, baseline)
    decision = None
    if config.register_model:
        from flows.registry import register_model_task  # registry code only for a run that registers
        from tasks.rescoring import Rescorer

        decision = register_model_task(run.client, config.register_model, run.run_id, model_uri, config.monitor,
                                       rescore=Rescorer(config, prepared, data.frame if data.kind == "table" else None))
    result = TrainResult(
        run_id=run.run_id, experiment_id=run.experiment_id, model_uri=model_uri,
        mlflow_url=tracking.run_url(tracking_uri(), run.experiment_id, run.run_id),
        best_epoch=trained.best_epoch, epochs_trained=len(trained.history),
        history=trained.history.history, test_metrics=test_metrics,
        **beside_baseline(config, test_metrics, baseline, lower_is_better(config, prepared)),
        registered=str(decision) if decision else None,
    )
    publish_summary(config, result)
    return result


def train_in_run(config: TrainConfig, prepared: Prepared, loaders: Loaders, run: Run,
                 extra_callbacks: Sequence[Callback] = (), given: Given | None = None) -> Trained:
    """The training step of a run (the flow's and the Python API's): in a flow run a task retried after a
    crash, each retry resuming from the run's last epoch checkpoint; then every epoch must have reached MLflow."""
    training = train_model_task.with_options(retries=config.launch.retries, retry_condition_fn=retry_after_crash)
    trained = run_step(training, config, prepared, loaders, run, extra_callbacks, given=given)
    tracking.require_delivered(run.client, run.run_id, run.checkpoint_dir)  # server gone: fail now, not in minutes
    return trained


def beside_baseline(config: TrainConfig, test_metrics: dict[str, float], baseline: Baseline | None,
                    lower_is_better: bool) -> dict:
    """TrainResult's baseline fields: the model, its test metrics, the sentence when the network does not beat it
    (`lower_is_better`: which way the monitor improves)."""
    if baseline is None:
        return {}
    warning = baseline_sentence({**test_metrics, **baseline.metrics}, config.monitor, lower_is_better, baseline.model)
    return {"baseline_model": baseline.model, "baseline_metrics": baseline.metrics, "baseline_warning": warning}


# The flow takes the config's fields as flat parameters (JSON data): the deployment's form shows
# each field with its description, default, bounds and choices, and `prefect deployment run
# 'train/default' --param epochs=3` works. The signature is generated, so TrainConfig stays the
# single source of truth. The function has the flow's module name: a deployment's entrypoint is
# `flows/train.py:<function name>`, and it must load this Flow (name, hooks), not the bare function.
# `resume` is an action, not a setting of the run, so it is the flow's own parameter beside the config's.
RESUME_PARAMETER = inspect.Parameter(
    "resume", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[str | None, StringConstraints(pattern=RUN_ID_PATTERN)],
    default=Field(None, description="MLflow run id to continue from its last epoch checkpoint, with that run's own "
                  "config; of the fields here only the launch settings (device, threads, workers, ...) apply."),
)
train_flow.__signature__ = as_flow_signature(TrainResult, extra=(RESUME_PARAMETER,))
# validate_parameters=False: the parameters are validated once, as a TrainConfig, by
# config_from_parameters (one readable line per problem); the UI form and a deployment's
# enforce_parameter_schema check them against the same schema before a run is created.
train_flow = flow(
    name="train", description="Train a PyTorch model on a table and track it in MLflow.",
    on_crashed=[close_runs_of_flow_run], on_cancellation=[close_runs_of_flow_run], validate_parameters=False,
)(train_flow)


@task(cache_policy=NO_CACHE)
def champion_of_same_inputs(config: TrainConfig, data: DataRecord) -> TrainResult | None:
    """The champion of `config.register_model` as this run's result when it was trained on the same data
    (dataset digest) with the same hyperparameters; None when this run has something new to learn."""
    from flows.registry import unchanged_since_champion

    uri = tracking_uri()
    tracking.prepare_store(uri)
    client = MlflowClient(uri)
    digest = tracking.dataset_digest(data.frame, data.source, data.target)
    found = unchanged_since_champion(client, config.register_model, digest, config.params())
    if found is None:
        return None
    champion, run = found
    reason = (f"unchanged: the data (dataset {digest}) and the config equal those of champion "
              f"'{config.register_model}' v{champion.version} (run {run.info.run_id}); no new model")
    log.info(reason)
    return TrainResult(
        run_id=run.info.run_id, experiment_id=run.info.experiment_id, model_uri=champion.source,
        mlflow_url=tracking.run_url(uri, run.info.experiment_id, run.info.run_id), best_epoch=0, epochs_trained=0,
        history={}, test_metrics={k: v for k, v in run.data.metrics.items() if k.startswith("test_")}, unchanged=reason,
    )


def config_from_parameters(fields: dict) -> TrainConfig:
    """Validate flow parameters as a TrainConfig; a bad value fails before any work starts."""
    try:
        return TrainConfig(**fields)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err)) from None


def _resolved(config: TrainConfig, prepared: Prepared) -> dict[str, float]:
    """What an `auto` setting came to for this run, beside the setting itself (`weight_decay` stays
    "auto", a value travels one way: this is what the run trained with, for comparing runs)."""
    return {"resolved.weight_decay": weight_decay_of(config, prepared)} if config.weight_decay == "auto" else {}


@task(name="start_run", cache_policy=NO_CACHE)
def start_run(config: TrainConfig, prepared: Prepared, data: DataRecord, parent_run_id: str | None = None,
              params: dict[str, str] | None = None, resume: str | None = None, from_python: bool = False,
              given: Given | None = None) -> Run:
    """Create the MLflow run, linked to this flow run both ways; log params and the dataset.

    With `parent_run_id` it is a child run (a sweep's trial), nested by the explicit
    `mlflow.parentRunId` tag, so nesting holds in any thread or process; the parent holds the
    flow run's links. `params` replace the config's fields as params (a sweep's own run).
    A run being resumed (`resume`, or one an earlier attempt of this flow run left unfinished)
    is reopened instead: same run, same params, its checkpoints continue it. A new run gets the
    hyperparameters as params, the launch settings as tags and the whole config as config.json.
    `from_python`: the Python API's run (fitflow/), on the caller's objects (`given`: its metrics count for
    which way the monitor improves, recorded as the tag MONITOR_MODE_TAG); only the API resumes it.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # model logging goes through MLflow's fluent layer
    tracking.prepare_store(uri)
    client = MlflowClient(uri)
    experiment_id = tracking.experiment_id(client, config.experiment, artifact_location(uri))
    flow_name = "train" if parent_run_id is None and params is None else "sweep"  # resume accepts "train" only
    tags = {"fitflow.flow": flow_name, "mlflow.source.name": f"flows/{flow_name}.py", **config.launch_tags(),
            **code_version_tags(), tracking.MONITOR_MODE_TAG: tracking.monitor_mode(lower_is_better(config, prepared, given))}
    if from_python:
        tags.update({"fitflow.entry": "python", "mlflow.source.name": "fitflow (Python API)"})
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):  # the account that logs it: the UI's "User" of the run
        tags["mlflow.user"] = os.environ["MLFLOW_TRACKING_USERNAME"]
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if flow_run.id:
        tags.update({"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name})
        if flow_run.ui_url:
            tags["prefect.flow_run_url"] = flow_run.ui_url
    earlier = resume or (flow_run.id and not parent_run_id and params is None
                                and unfinished_run_of_flow_run(client, experiment_id, flow_run.id))
    run_id = earlier or client.create_run(experiment_id, run_name=config.run_name, tags=tags).info.run_id
    checkpoint_dir = fitflow_home() / "checkpoints" / run_id
    # The lock says no other process trains the run (a second resume of it is refused before anything
    # changes it) and records this one for `fitflow doctor`; the caller's block releases it (released_at_end).
    run_owner.claim(checkpoint_dir, run_id)
    try:
        if earlier:  # on a machine without the run's checkpoint folder: the checkpoints it logged to MLflow
            tracking.restore_checkpoints(client, run_id, checkpoint_dir)
            reopen_run(client, earlier, data, tags, from_python)
        with tracking.fail_on_error(client, run_id):
            if not earlier:
                own = config.params() if params is None else params
                tracking.log_params(client, run_id, {**own, **{f"data.{k}": v for k, v in prepared.facts.items()},
                                                     **_resolved(config, prepared)})
                tracking.log_config(client, run_id, config.model_dump_json(indent=2))
                digest = tracking.log_dataset(client, run_id, data.frame, data.source, data.target,
                                              Path(data.source).stem if data.kind != "dataset" else data.source)
                client.set_tag(run_id, "fitflow.dataset_digest", digest)
            if flow_run.id and not parent_run_id:
                _tag_flow_run(flow_run.id, run_id)
                create_link_artifact(key="mlflow-run", link=tracking.run_url(uri, experiment_id, run_id),
                                     link_text=f"MLflow run {run_id}")
    except BaseException:
        run_owner.release(checkpoint_dir)
        raise
    log.info("MLflow run %s in experiment '%s' (%s)", run_id, config.experiment, redact_uri(uri))
    return Run(client, run_id, experiment_id, checkpoint_dir)


def _tag_flow_run(flow_run_id: str, run_id: str) -> None:
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run_id)
        client.update_flow_run(flow_run_id, tags=[*current.tags, f"mlflow_run_id:{run_id}"])


@task(cache_policy=NO_CACHE)
def log_model(config: TrainConfig, prepared: Prepared, data: DataRecord, run: Run,
              trained: Trained, test_metrics: dict[str, float], baseline: Baseline | None = None) -> str:
    """Test metrics (and the linear baseline's), the learning curves, the best checkpoint and the pyfunc model."""
    log_test_metrics(config, run, trained, test_metrics, baseline)
    return log_trained_model(config, prepared, data, run, trained)


def log_test_metrics(config: TrainConfig, run: Run, trained: Trained, test_metrics: dict[str, float],
                     baseline: Baseline | None = None) -> None:
    """The test metrics (the linear baseline's beside them) and best_<monitor>, at the best epoch's step
    (the registry's gate compares them)."""
    # best_<monitor>: the monitored value of the weights that ship; the UI's val_* columns show the last epoch
    best = {f"best_{config.monitor}": trained.best_value}
    beside = baseline.metrics if baseline else {}
    tracking.log_metrics(run.client, run.run_id, {**test_metrics, **beside, **best}, step=trained.best_epoch)
    if baseline:
        run.client.set_tag(run.run_id, "fitflow.baseline_model", baseline.model)


def log_trained_model(config: TrainConfig, prepared: Prepared, data: DataRecord, run: Run, trained: Trained) -> str:
    """The learning curves (images: validation plots too), the best checkpoint and the pyfunc model; its URI."""
    with tempfile.TemporaryDirectory() as tmp:
        plots = [plot_learning_curves(trained.history.history, Path(tmp) / "learning_curves.png")]
        if data.kind == "images":  # where the classes are confused, and the images it gets wrong
            from tasks.image_plots import validation_plots

            plots += validation_plots(trained.model, prepared, Path(tmp))
        for png in plots:
            tracking.log_artifact(run.client, run.run_id, png, "plots")
    if trained.checkpoint is not None:
        tracking.log_artifact(run.client, run.run_id, trained.checkpoint, "checkpoints")
    model_uri = tracking.log_pyfunc_model(run.client, run.run_id, trained.model, trained.spec, prepared.preprocessor,
                                          input_example(data, prepared))
    run.client.set_tag(run.run_id, "fitflow.model_uri", model_uri)
    run.client.set_tag(run.run_id, "fitflow.model", trained.spec["model"])  # what `model: auto` chose
    return model_uri


def input_example(data: DataRecord, prepared) -> pd.DataFrame | np.ndarray | dict | None:
    """A few inputs as a user has them at prediction time: raw rows, image paths, or arrays."""
    if data.kind == "table":
        return data.frame.drop(columns=prepared.preprocessor.target_columns).head(5)
    if data.kind == "images":
        return pd.DataFrame({"path": prepared.val.paths[:3]})
    if data.kind == "arrays":  # the Python API's (x, y) (tasks/arrays.py)
        return prepared.val.features[:3]
    from tasks.user_dataset import make_dataset_loaders

    x = first_inputs(make_dataset_loaders(prepared, batch_size=3).val)
    if isinstance(x, dict):
        return {name: value.numpy() for name, value in x.items()}
    return x.numpy() if isinstance(x, torch.Tensor) else None  # a tuple of inputs has no pyfunc form: no example


def publish_summary(config: TrainConfig, result: TrainResult) -> None:
    """A markdown artifact in the Prefect UI: final metrics beside the linear baseline's, and where the run is."""
    baseline = result.baseline_metrics
    if baseline:
        header = f"| test metric | network | linear baseline ({result.baseline_model}) |\n|---|---|---|"
        rows = "\n".join(f"| {name} | {value:.4f} | {baseline[BASELINE_PREFIX + name]:.4f} |"
                         for name, value in result.test_metrics.items())
    else:
        header = "| test metric | value |\n|---|---|"
        rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in result.test_metrics.items())
    sentence = f"**{result.baseline_warning}**\n\n" if result.baseline_warning else ""
    last = {name: values[-1] for name, values in result.history.items()}
    val_rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in last.items() if name.startswith("val_"))
    markdown = (
        f"# Training run `{result.run_id}`\n\n"
        f"Data `{config.data}`, target `{config.target}`, model `{config.model}`; "
        f"{result.epochs_trained} epochs, best weights from "
        f"{f'epoch {result.best_epoch}' if result.best_epoch else 'the start (no epoch did better on validation)'}.\n\n"
        f"{header}\n{rows}\n\n{sentence}"
        f"| last validation metric | value |\n|---|---|\n{val_rows}\n\n"
        f"MLflow run: [{result.run_id}]({result.mlflow_url}) - model `{result.model_uri}`\n"
    )
    if flow_run.id:
        create_markdown_artifact(key="train-summary", markdown=markdown, description="fitflow training summary")
