"""The `sweep` flow: many trainings of one base config, compared under one parent MLflow run.

Reads top to bottom: load and prepare the data once -> open the parent run -> ask Optuna for
trials and train them up to `parallelism` at a time (each a child run) -> rank them, log the
ranking and a plot to the parent -> register the best model (optional).

Trials are Prefect task runs submitted to the sweep's task runner: a thread pool in this process
(default), Dask worker processes or Ray (`task_runner`, docs/scaling-sweeps.md). Each calls the
train flow's own tasks (start_run, train_model, evaluate_on_test, log_model), so the GPU tag limit on
train_model, which the Prefect server enforces, caps them like any training run wherever they
run, and each writes to its own child run by run id, not through MLflow's per-thread active run.
Optuna's study lives in this process (in memory); a trial prunes against a copy of the trials
finished when it started, so what it is sent is plain picklable data and it prunes the same way
in a thread or on a worker. In threads, parallel trials share torch's global random generator,
so a trial's numbers can differ in the last digits from the same config trained alone;
parallelism 1, or worker processes, reproduce them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from prefect import flow, get_client, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel

from flows.doctor import close_runs_of_flow_run
from flows.environment import fitflow_home, tracking_uri
from flows.registry import register_model_task
from flows.steps import (
    DataRecord,
    baseline_of_run,
    evaluate_on_test_task,
    load_and_prepare,
    on_own_device,
    train_model_task,
)
from flows.sweep_config import SweepConfig, check_prefect_for_cluster, check_task_runner
from flows.train import log_model, start_run
from tasks import run_owner, search, system_metrics, tracking
from tasks.checkout import checkout_first_on_path
from tasks.config import TrainConfig
from tasks.data import Prepared
from tasks.errors import ConfigError, TrainingError
from tasks.redaction import redact_uri
from tasks.rescoring import Rescorer
from tasks.sweep_report import plot_metric_by_param, rank_trials, table_records
from tasks.trainer import Run, build_loaders, check_before_run

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


DEFAULT_SWEEP = SweepConfig()  # the deployment form's defaults (an argument default evaluated once, made explicit)


@flow(name="sweep", description="Hyperparameter sweep: trials as child MLflow runs of one parent, ranked.",
      on_crashed=[close_runs_of_flow_run], on_cancellation=[close_runs_of_flow_run])
def sweep(config: SweepConfig = DEFAULT_SWEEP) -> SweepResult:
    """Prepare once -> task runner -> parent run -> trials (child runs) -> ranking, plot, best -> register."""
    base = config.base
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # fitflow logs one line per trial instead
    prepared, data = load_and_prepare(base)
    check_before_run(base, prepared)  # a wrong model name or monitor fails here, not in every trial
    name = config.name or f"sweep-{config.sampler}"
    n_trials, parallel = budget(config)
    # The runner connects to (and checks) a cluster before the parent run exists: a wrong address or
    # misconfigured workers leave no empty run behind. A local cluster starts at the first trial.
    with trial_runner(config, parallel) as runner:
        parent = start_run(base.model_copy(update={"run_name": name}), prepared, data, params=config.sweep_params())
        with run_owner.released_at_end(parent.checkpoint_dir), tracking.finished_or_failed(parent.client, parent.run_id):
            run_trials(config, runner, n_trials, parallel, prepared, data, parent, name)
            ranking = report_trials(config, parent)
    best = ranking.iloc[0]
    # the trials share the base config's data and split: a champion tested on other data is re-scored on it
    decision = (register_model_task(parent.client, base.register_model, best["run_id"], best["model_uri"], base.monitor,
                                    rescore=Rescorer(base, prepared, data.frame if data.kind == "table" else None))
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


def budget(config: SweepConfig) -> tuple[int, int]:
    """Trials to run (a grid stops at its size) and how many at once."""
    integers = config.integers()
    space = {k: v.model_dump() for k, v in config.space.items()}
    n_trials = min(config.n_trials, search.grid_size(space, integers)) if config.sampler == "grid" else config.n_trials
    return n_trials, min(config.parallelism, n_trials)


def run_trials(config: SweepConfig, runner: TaskRunner, n_trials: int, parallel: int, prepared: Prepared,
               data: DataRecord, parent: Run, name: str) -> None:
    """Ask Optuna for a trial whenever a slot is free, so samplers learn from finished trials."""
    integers, grid = config.integers(), config.sampler == "grid"
    space = {k: v.model_dump() for k, v in config.space.items()}
    study = optuna.create_study(
        direction="minimize" if recorded_lower_is_better(parent, config.base.monitor) else "maximize",
        sampler=search.make_sampler(config.sampler, space, integers, config.base.seed, n_trials, parallel > 1),
        pruner=search.make_pruner(config.prune, config.prune_warmup_epochs, n_trials),
    )
    if config.base_trial and not grid:
        search.enqueue_base(study, space, integers, config.base.model_dump())
    log.info("sweep '%s': %d trials (%s sampler), %d at a time on %s", name, n_trials, config.sampler, parallel,
             config.task_runner)
    running: dict[Any, optuna.Trial] = {}
    started = 0
    while started < n_trials or running:
        while len(running) < parallel and started < n_trials:
            trial = study.ask()
            parameters = {"number": trial.number, "params": search.suggest(trial, space, integers, grid),
                          "base": config.base, "prepared": prepared, "data": data, "parent_run_id": parent.run_id,
                          "run_name": f"{name}-{trial.number}", "pruning": PruningBasis.of(study)}
            running[runner.submit(run_trial.with_options(task_run_name=f"trial-{trial.number}"), parameters)] = trial
            started += 1
        future = next(as_completed(list(running)))
        trial = running.pop(future)
        future.wait()  # makes the final state the future's own (`state` would ask the API, which may lag)
        tell(study, trial, future.state, config.base.monitor)


def tell(study: optuna.Study, trial: optuna.Trial, state: Any, monitor: str) -> None:
    """Record a finished trial, with its per-epoch curve, so later trials prune against it."""
    if state.is_completed():
        outcome = state.result()
        for epoch, value in enumerate(outcome["curve"], start=1):
            trial.report(value, epoch)
        pruned = outcome["state"] == "pruned"
        study.tell(trial, None if pruned else outcome["value"],
                   state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE)
        log.info("trial %d %s: %s=%.4f %s", trial.number, outcome["state"], monitor, outcome["value"],
                 json.dumps(trial.params))
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning("trial %d failed (%s); the sweep goes on", trial.number, state.message)


@dataclass(frozen=True)
class PruningBasis:
    """What a trial prunes against, as picklable data: the study's direction and pruner, and the
    trials finished when it started. The study itself stays in the flow's process."""

    direction: optuna.study.StudyDirection
    pruner: optuna.pruners.BasePruner
    finished: list[optuna.trial.FrozenTrial]

    @classmethod
    def of(cls, study: optuna.Study) -> PruningBasis:
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return cls(study.direction, study.pruner, study.get_trials(deepcopy=True, states=done))

    def trial(self) -> optuna.Trial:
        """A trial of a private in-memory copy of the study, for OptunaPruning to report to."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # also in a worker process: no "study created" line
        study = optuna.create_study(direction=self.direction, pruner=self.pruner)
        study.add_trials(self.finished)
        return study.ask()


@contextmanager
def trial_runner(config: SweepConfig, parallel: int) -> Iterator[TaskRunner]:
    """The task runner trials are submitted to, for the length of the sweep (a local cluster with it)."""
    check_task_runner(config)
    if config.task_runner == "threads":
        with ThreadPoolTaskRunner(max_workers=parallel) as runner:
            yield runner
        return
    # Workers report their task runs (and take GPU slots) on this flow's Prefect API. Prefect sends the
    # settings along with each task, so the embedded server's address is made an explicit setting first.
    api_url = PREFECT_API_URL.value()
    check_prefect_for_cluster(config, api_url)
    if not api_url:
        with get_client(sync_client=True) as client:
            api_url = str(client.api_url)
    uri = tracking_uri()
    with ExitStack() as stack:
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))
        try:
            if not config.cluster_address:
                stack.enter_context(checkout_first_on_path())
            runner = stack.enter_context(_cluster_runner(config, parallel, uri))
            if config.task_runner == "dask" and config.cluster_address:
                _check_dask_workers(runner.client, config.cluster_address, uri)
        except OSError as err:  # ConnectionError, and distributed's connect timeouts
            if not config.cluster_address:
                raise  # a local cluster that cannot start is not a setting to fix
            raise ConfigError(f"cannot reach the {config.task_runner} cluster at {config.cluster_address} "
                              f"({type(err).__name__}: {err}); start it or fix cluster_address") from None
        yield runner


def _cluster_runner(config: SweepConfig, parallel: int, uri: str) -> TaskRunner:
    """A Dask or Ray task runner; a local cluster's workers get this process's tracking URI and home."""
    local_env = {"MLFLOW_TRACKING_URI": uri, "FITFLOW_HOME": str(fitflow_home())}
    if config.task_runner == "ray":
        from prefect_ray import RayTaskRunner

        # runtime_env: Ray sets these on every worker of this job, on a remote cluster too (not FITFLOW_HOME,
        # a path of this machine)
        env = {"MLFLOW_TRACKING_URI": uri} if config.cluster_address else local_env
        return RayTaskRunner(address=config.cluster_address, init_kwargs={"runtime_env": {"env_vars": env}})
    from prefect_dask import DaskTaskRunner

    if config.cluster_address:
        return DaskTaskRunner(address=config.cluster_address)
    # One single-threaded worker process per trial slot: trials share neither torch's global state nor
    # the GIL, and each Nanny sets OMP_NUM_THREADS=1, so torch does not oversubscribe the cores.
    return DaskTaskRunner(cluster_kwargs={"n_workers": parallel, "threads_per_worker": 1, "processes": True,
                                          "env": local_env})


def _check_dask_workers(client: Any, address: str, uri: str) -> None:
    """Fail before any trial when the cluster has no workers, or workers that would track elsewhere
    (their child runs would be missing from the ranking)."""
    try:
        seen = client.run(tracking_uri)  # by reference: flows.environment, a light import, on each worker
    except ImportError as err:
        raise ConfigError(f"the Dask workers at {address} cannot import fitflow ({err}); "
                          "start `dask worker` in the fitflow checkout or image") from None
    if not seen:
        raise ConfigError(f"no Dask worker is connected to the scheduler at {address}; start some: dask worker {address}")
    for worker, theirs in seen.items():
        if theirs != uri:
            raise ConfigError(f"Dask worker {worker} tracks to {redact_uri(theirs)}, this sweep to {redact_uri(uri)}; "
                              "start the workers with this MLFLOW_TRACKING_URI")


@task(cache_policy=NO_CACHE)
def run_trial(number: int, params: dict[str, Any], base: TrainConfig, prepared: Prepared, data: DataRecord,
              parent_run_id: str, run_name: str, pruning: PruningBasis) -> dict[str, Any]:
    """Train one trial as a child run; a failure ends that run FAILED with its error and re-raises."""
    config = TrainConfig(**{**base.model_dump(), **params, "run_name": run_name})
    run = start_run(config, prepared, data, parent_run_id=parent_run_id)
    with (run_owner.released_at_end(run.checkpoint_dir),
          tracking.finished_or_failed(run.client, run.run_id, run.checkpoint_dir),  # from here on the run always ends
          system_metrics.sampled(run.client, run.run_id)):  # the machine the trial ran on, while it ran
        run.client.set_tag(run.run_id, "fitflow.trial", str(number))
        # the process that trained it: on a cluster, the machine and worker to look at when a trial misbehaves
        run.client.set_tag(run.run_id, "fitflow.worker", f"{socket.gethostname()}:{os.getpid()}")
        pruning_callback = search.OptunaPruning(pruning.trial(), config.monitor)
        with on_own_device(config) as config:  # several GPUs: trials at once train on different ones
            loaders = build_loaders(config, prepared)
            trained = train_model_task(config, prepared, loaders, run, extra_callbacks=[pruning_callback], progress=False)
            tracking.require_delivered(run.client, run.run_id, run.checkpoint_dir)  # server gone: fail now, not in minutes
            curve = trained.history.history[config.monitor]
            value = trained.best_value
            state = "pruned" if pruning_callback.pruned_at else "complete"
            run.client.set_tag(run.run_id, "fitflow.trial_state", state)
            if pruning_callback.pruned_at:  # clearly bad: skip the test pass and the model, keep the curves in MLflow
                run.client.set_tag(run.run_id, "fitflow.pruned_at_epoch", str(pruning_callback.pruned_at))
                tracking.log_metrics(run.client, run.run_id, {f"best_{config.monitor}": value}, step=trained.best_epoch)
            else:
                test_metrics = evaluate_on_test_task(config, prepared, loaders, trained)
                log_model(config, prepared, data, run, trained, test_metrics,
                          baseline_of_run(config, data, prepared, loaders, trained))
    return {"run_id": run.run_id, "state": state, "value": value, "curve": curve}


@task(cache_policy=NO_CACHE)
def report_trials(config: SweepConfig, parent: Run) -> pd.DataFrame:
    """Rank the child runs; log the ranking (CSV), the plot and the best trial to the parent run."""
    monitor, score = config.base.monitor, f"best_{config.base.monitor}"
    children = parent.client.search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'", max_results=10_000)
    ranking = rank_trials([_row(run, config, score) for run in children], score, recorded_lower_is_better(parent, monitor))
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
    tested = [k for k in ranking.columns if k.startswith(("test_", "baseline_test_")) and pd.notna(best[k])]
    metrics = {score: best[score], **{k: best[k] for k in tested},
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


def recorded_lower_is_better(parent: Run, monitor: str) -> bool:
    """Which way `monitor` improves, as the sweep's parent run recorded it from the base config (your metric's own
    say included): the study's direction and the ranking's."""
    return tracking.recorded_lower_is_better(monitor, parent.client.get_run(parent.run_id).data.tags)


def _row(run, config: SweepConfig, score: str) -> dict[str, Any]:
    """One trial as a table row: the searched params, its metrics, state, duration and error."""
    tags, metrics = run.data.tags, run.data.metrics
    state = "failed" if run.info.status == "FAILED" else tags.get("fitflow.trial_state", "failed")
    end = run.info.end_time or int(time.time() * 1000)
    row: dict[str, Any] = {"trial": int(tags.get("fitflow.trial", -1)), "run_id": run.info.run_id,
                           "run_name": run.info.run_name, "state": state, "started": run.info.start_time}
    row.update({name: _value(run.data.params.get(name)) for name in config.space})
    row[score] = metrics.get(score)
    row.update({k: v for k, v in sorted(metrics.items()) if k.startswith(("test_", "baseline_test_"))})
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
