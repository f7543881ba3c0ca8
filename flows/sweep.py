"""The `sweep` flow: many trainings of one base config, compared under one parent MLflow run.

Reads top to bottom: load and prepare the data once -> open the parent run -> ask Optuna for
trials and train them up to `parallelism` at a time (each a child run) -> rank them, log the
ranking and a plot to the parent -> register the best model (optional).

Trials are Prefect tasks in the flow's thread pool. Each calls the train flow's own tasks
(start_run, train_model, test_model, log_model), so the GPU tag limit on train_model caps
them like any training run, and each writes to its own child run by id (GUIDE.md section 3).
Optuna's study lives in this process (in memory); trials report to it from their threads.
With parallelism > 1 the trials share torch's global random generator, so a trial's numbers
can differ in the last digits from the same config trained alone; parallelism 1 reproduces them.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.config import TrainConfig
from flows.registry import register_model_task
from flows.runtime import tracking_uri
from flows.steps import Run, build_loaders, load_table_task, prep_spec, prepare_task, test_model_task, train_model_task
from flows.sweep_config import SweepConfig
from flows.train import log_outcome, start_run
from tasks import search, tracking
from tasks.callbacks import Monitor
from tasks.data import Prepared
from tasks.errors import TrainingError
from tasks.sweep_report import plot_metric_by_param, rank_trials, table_records

log = logging.getLogger("fitflow")


class SweepResult(BaseModel):
    parent_run_id: str
    experiment_id: str
    mlflow_url: str
    best_run_id: str
    best_params: dict[str, Any]
    best_value: float
    best_model_uri: str
    trials: list[dict[str, Any]]  # the ranking, best first (the CSV artifact's rows)
    registered: str | None = None


@flow(name="sweep", description="Hyperparameter sweep: trials as child MLflow runs of one parent, ranked.")
def sweep(config: SweepConfig = SweepConfig()) -> SweepResult:
    """Prepare once -> parent run -> trials (child runs) -> ranking, plot, best -> register."""
    base = config.base
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # fitflow logs one line per trial instead
    table = load_table_task(base.data)
    validation = load_table_task(base.validation_data) if base.validation_data else None
    prepared = prepare_task(table, prep_spec(base), validation)
    name = config.name or f"sweep-{config.sampler}"
    parent = start_run(base.model_copy(update={"run_name": name}), prepared, table, params=config.sweep_params())
    with tracking.finished_or_failed(parent.client, parent.run_id):
        run_trials(config, prepared, table, parent, name)
        ranking = summarise(config, parent)
    best = ranking.iloc[0]
    decision = (register_model_task(parent.client, base.register_model, best["run_id"], best["model_uri"], base.monitor)
                if base.register_model else None)
    if decision:
        parent.client.set_tag(parent.run_id, "fitflow.registered", str(decision))
    score = f"best_{base.monitor}"
    return SweepResult(
        parent_run_id=parent.run_id, experiment_id=parent.experiment_id,
        mlflow_url=tracking.run_url(tracking_uri(), parent.experiment_id, parent.run_id),
        best_run_id=best["run_id"], best_params={k: _plain(best[k]) for k in config.space}, best_value=float(best[score]),
        best_model_uri=best["model_uri"], trials=table_records(ranking), registered=str(decision) if decision else None,
    )


def run_trials(config: SweepConfig, prepared: Prepared, table: pd.DataFrame, parent: Run, name: str) -> None:
    """Ask Optuna for a trial whenever a slot is free, so samplers learn from finished trials."""
    integers, grid = config.integers(), config.sampler == "grid"
    space = {k: v.model_dump() for k, v in config.space.items()}
    n_trials = min(config.n_trials, search.grid_size(space, integers)) if grid else config.n_trials
    parallel = min(config.parallelism, n_trials)
    study = optuna.create_study(
        direction="minimize" if Monitor(config.base.monitor).lower_is_better else "maximize",
        sampler=search.make_sampler(config.sampler, space, integers, config.base.seed, n_trials, parallel > 1),
        pruner=search.make_pruner(config.prune, config.prune_warmup_epochs, n_trials),
    )
    log.info("sweep '%s': %d trials (%s sampler), %d at a time", name, n_trials, config.sampler, parallel)
    running: dict[Any, optuna.Trial] = {}
    started = 0
    while started < n_trials or running:
        while len(running) < parallel and started < n_trials:
            trial = study.ask()
            params = search.suggest(trial, space, integers, grid)
            future = run_trial.with_options(task_run_name=f"trial-{trial.number}").submit(
                trial.number, params, config.base, prepared, table, parent.run_id, f"{name}-{trial.number}", trial)
            running[future] = trial
            started += 1
        future = next(as_completed(list(running)))
        trial = running.pop(future)
        future.wait()  # makes the final state the future's own (`state` would ask the API, which may lag)
        state = future.state
        if state.is_completed():
            outcome = state.result()
            pruned = outcome["state"] == "pruned"
            study.tell(trial, None if pruned else outcome["value"],
                       state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE)
            log.info("trial %d %s: %s=%.4f %s", trial.number, outcome["state"], config.base.monitor,
                     outcome["value"], json.dumps(trial.params))
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning("trial %d failed (%s); the sweep goes on", trial.number, state.message)


@task(name="trial", cache_policy=NO_CACHE)
def run_trial(number: int, params: dict[str, Any], base: TrainConfig, prepared: Prepared, table: pd.DataFrame,
              parent_run_id: str, run_name: str, trial: optuna.Trial) -> dict[str, Any]:
    """Train one trial as a child run; a failure ends that run FAILED with its error and re-raises."""
    config = TrainConfig(**{**base.model_dump(), **params, "run_name": run_name})
    run = start_run(config, prepared, table, parent_run_id=parent_run_id)
    run.client.set_tag(run.run_id, "fitflow.trial", str(number))
    pruning = search.OptunaPruning(trial, config.monitor)
    with tracking.finished_or_failed(run.client, run.run_id):
        loaders = build_loaders(config, prepared)
        trained = train_model_task(config, prepared, loaders, run, extra_callbacks=[pruning], progress=False)
        value = trained.history.history[config.monitor][trained.best_epoch - 1]
        state = "pruned" if pruning.pruned_at else "complete"
        run.client.set_tag(run.run_id, "fitflow.trial_state", state)
        if pruning.pruned_at:  # clearly bad: skip the test pass and the model, keep the curves in MLflow
            run.client.set_tag(run.run_id, "fitflow.pruned_at_epoch", str(pruning.pruned_at))
            tracking.log_metrics(run.client, run.run_id, {f"best_{config.monitor}": value}, step=trained.best_epoch)
        else:
            test_metrics = test_model_task(config, prepared, loaders, trained)
            log_outcome(config, prepared, table, run, trained, test_metrics)
    return {"run_id": run.run_id, "state": state, "value": value}


@task(name="rank_trials", cache_policy=NO_CACHE)
def summarise(config: SweepConfig, parent: Run) -> pd.DataFrame:
    """Rank the child runs; log the ranking (CSV), the plot and the best trial to the parent run."""
    monitor, score = config.base.monitor, f"best_{config.base.monitor}"
    children = parent.client.search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'", max_results=10_000)
    ranking = rank_trials([_row(run, config, score) for run in children], score, Monitor(monitor).lower_is_better)
    if ranking.empty or ranking.iloc[0]["state"] != "complete":
        errors = [e for e in ranking.get("error", pd.Series(dtype=object)).dropna()][:1]
        raise TrainingError(f"no trial of the sweep completed ({len(ranking)} ran)"
                            + (f"; first error: {errors[0]}" if errors else "") + "; fix the base config or the space")
    best = ranking.iloc[0]
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "trials.csv"
        ranking.to_csv(csv, index=False)
        tracking.log_artifact(parent.client, parent.run_id, csv)
        space = {k: v.model_dump() for k, v in config.space.items()}
        png = plot_metric_by_param(ranking, space, score, Path(tmp) / f"{score}_by_param.png")
        tracking.log_artifact(parent.client, parent.run_id, png, "plots")
    counts = ranking["state"].value_counts()
    metrics = {score: best[score], **{k: best[k] for k in ranking.columns if k.startswith("test_") and pd.notna(best[k])},
               **{f"trials_{s}": float(counts.get(s, 0)) for s in ("complete", "pruned", "failed")}}
    tracking.log_metrics(parent.client, parent.run_id, metrics, step=0)
    tracking.log_params(parent.client, parent.run_id, {f"best.{k}": _text(best[k]) for k in config.space})
    for key, value in {"fitflow.best_run_id": best["run_id"], "fitflow.best_trial": str(best["trial"]),
                       "fitflow.best_model_uri": best["model_uri"]}.items():
        parent.client.set_tag(parent.run_id, key, value)
    if flow_run.id:
        create_table_artifact(key="sweep-ranking", table=table_records(ranking),
                              description=f"Trials of sweep run {parent.run_id}, best {score} first")
    return ranking


def _row(run, config: SweepConfig, score: str) -> dict[str, Any]:
    """One trial as a table row: the searched params, its metrics, state, duration and error."""
    tags, metrics = run.data.tags, run.data.metrics
    state = "failed" if run.info.status == "FAILED" else tags.get("fitflow.trial_state", "failed")
    end = run.info.end_time or int(time.time() * 1000)
    row: dict[str, Any] = {"trial": int(tags.get("fitflow.trial", -1)), "run_id": run.info.run_id,
                           "run_name": run.info.run_name, "state": state, "started": run.info.start_time}
    row.update({name: _value(run.data.params.get(name)) for name in config.space})
    row[score] = metrics.get(score)
    row.update({k: v for k, v in sorted(metrics.items()) if k.startswith("test_")})
    row.update({"duration_s": round((end - run.info.start_time) / 1000, 2), "model_uri": tags.get("fitflow.model_uri"),
                "error": tags.get("fitflow.error")})
    return row


def _value(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return text  # a plain string field (optimizer: adam)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(_plain(value))


def _plain(value: Any) -> Any:
    """numpy scalars (from the ranking frame) as Python values."""
    return value.item() if hasattr(value, "item") else value
