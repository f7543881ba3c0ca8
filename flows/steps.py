"""The training flow's steps as Prefect tasks, and the glue from TrainConfig to tasks/.

Every step is a plain function of tasks/ (or below) wrapped by `task(...)`: tests and
notebooks call the plain functions, the flow calls the tasks. Retries only where I/O happens
(loading); the cache only on deterministic data preparation, keyed on content.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.config import TrainConfig
from tasks import tracking
from tasks.callbacks import Callback, Progress, deciding_callbacks
from tasks.checkpoints import Checkpoints
from tasks.compile import make_loss, make_optimizer, make_scheduler
from tasks.data import PrepSpec, Prepared, content_key, load_table, prepare
from tasks.device import resident_device, resolve_device, set_cpu_threads
from tasks.distributed import train_distributed
from tasks.errors import ConfigError, FitflowError
from tasks.loaders import Loaders, make_loaders
from tasks.metrics import TaskMetrics, metric_names
from tasks.models import build_model, model_spec
from tasks.training import History, evaluate, fit, seed_everything

log = logging.getLogger("fitflow")


@dataclass
class Run:
    """The MLflow run a flow run writes to, passed explicitly to every step."""

    client: MlflowClient | None
    run_id: str
    experiment_id: str
    checkpoint_dir: Path


@dataclass
class Trained:
    model: torch.nn.Module
    spec: dict
    history: History
    best_epoch: int
    checkpoint: Path | None


def prep_spec(config: TrainConfig) -> PrepSpec:
    return PrepSpec(
        target=config.target, task=config.task, val_fraction=config.val_fraction,
        test_fraction=config.test_fraction, max_categories=config.max_categories, seed=config.seed,
    )


def build_loaders(config: TrainConfig, prepared: Prepared) -> Loaders:
    """On a GPU with room, the splits live on the GPU; otherwise pinned batches, copied asynchronously."""
    # ddp: this process only tests the returned model, on the CPU; each rank places its own data
    device = resolve_device(config.device) if config.strategy == "single" else torch.device("cpu")
    splits = (prepared.train, prepared.val, prepared.test)
    resident = resident_device(sum(s.features.nbytes + s.targets.nbytes for s in splits), device)
    return make_loaders(prepared, config.batch_size, config.drop_last, config.num_workers,
                        pin_memory=device.type == "cuda" and resident is None, seed=config.seed, device=resident)


def task_metrics(prepared: Prepared) -> TaskMetrics:
    p = prepared.preprocessor
    return TaskMetrics(p.task, len(p.classes or []), p.target_mean, p.target_std)


def train_model(config: TrainConfig, prepared: Prepared, loaders: Loaders, run: Run | None = None,
                extra_callbacks: Sequence[Callback] = (), progress: bool = True) -> Trained:
    """Compile (optimizer, loss, schedule) and fit with the default callbacks, then `extra_callbacks`.

    `progress=False` drops the per-epoch progress (a sweep trains several models at once).
    """
    task_name = prepared.preprocessor.task
    known = metric_names(task_name, "train") + metric_names(task_name, "val")
    if config.monitor not in known:
        raise ConfigError(f"monitor '{config.monitor}' is not logged for {task_name}; use one of {', '.join(known)}")
    seed_everything(config.seed)  # before the model exists: the seed fixes its initial weights
    p = prepared.preprocessor
    spec = model_spec(config.model, p.n_features, len(p.classes) if p.classes else 1,
                      config.model_kwargs if config.model != "mlp" else
                      {"hidden_sizes": config.hidden_sizes, "activation": config.activation,
                       "dropout": config.dropout, "batch_norm": config.batch_norm})
    model = build_model(spec)
    if config.strategy == "ddp":  # one process per device (tasks/distributed.py); rank 0's weights come back here
        history, best_epoch = train_distributed(model, config, prepared, spec, task_metrics(prepared), run,
                                                extra_callbacks, progress)
        best_path = run.checkpoint_dir / "best.pt" if run else None
        return Trained(model, spec, history, best_epoch, best_path if best_path and best_path.exists() else None)
    device = resolve_device(config.device)
    set_cpu_threads(config.num_threads)
    model.to(device)  # before the optimizer: it must hold the parameters that will be trained
    if config.torch_compile:
        model.compile()  # in place: the state dict keeps its keys for checkpoints and the MLflow model
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay, config.momentum)
    scheduler = make_scheduler(config.scheduler, optimizer, config.epochs, config.scheduler_step_size, config.scheduler_gamma)
    checkpoint = run.checkpoint_dir / "best.pt" if run else None
    stateful = deciding_callbacks(config.monitor, config.min_delta, config.patience, scheduler, checkpoint)
    best = stateful["best_weights"]
    # Order: progress prints the epoch first; the best weights are kept before anything may stop
    # the run; the checkpoint holds the epoch after every callback with state has seen it.
    callbacks: list[Callback] = [Progress(), *stateful.values()] if progress else list(stateful.values())
    if run is not None:
        # Resumes from the newest epoch checkpoint when there is one: a retried task, `--resume`.
        callbacks.append(Checkpoints(run.checkpoint_dir, stateful, config.keep_checkpoints, run.run_id))
    if run is not None and run.client is not None:  # a Run without a client: checkpoints only (notebooks, tests)
        callbacks.append(tracking.MlflowMetrics(run.client, run.run_id, run.checkpoint_dir))
    callbacks.extend(extra_callbacks)  # last: they see an epoch that is already logged and checkpointed
    log.info("training %s on %s for up to %d epochs", config.model, device, config.epochs)
    history = fit(
        model, loaders.train, loaders.val, epochs=config.epochs, optimizer=optimizer,
        loss_fn=make_loss(config.loss, task_name), metrics=task_metrics(prepared), device=device,
        callbacks=callbacks, precision=config.precision, grad_clip=config.grad_clip,
    )
    return Trained(model, spec, history, best.monitor.best_epoch, checkpoint if checkpoint and checkpoint.exists() else None)


def test_model(config: TrainConfig, prepared: Prepared, loaders: Loaders, trained: Trained) -> dict[str, float]:
    """Test-split metrics of the best weights."""
    device = next(trained.model.parameters()).device
    loss_fn = make_loss(config.loss, prepared.preprocessor.task)
    return evaluate(trained.model, loaders.test, loss_fn, task_metrics(prepared), device, "test")


def _retry_unless_bad_input(retry_on: type[Exception]):
    """A task retry condition: retry failures of type `retry_on`, never fitflow's own errors (bad
    input fails the same way again)."""

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except FitflowError:
            return False
        except retry_on:
            return True
        except Exception:
            return False
        return False

    return condition


# Reads that failed for a passing reason (network file systems); training after a crash (a lost
# device, a killed worker thread, I/O), which resumes from its last epoch checkpoint.
_retry_transient_io = _retry_unless_bad_input(OSError)
retry_after_crash = _retry_unless_bad_input(Exception)


def _prepare_cache_key(context, parameters) -> str:
    return content_key(parameters["table"], parameters["spec"], parameters.get("validation"))


load_table_task = task(load_table, name="load_table", retries=2, retry_delay_seconds=[2, 10],
                       retry_condition_fn=_retry_transient_io, cache_policy=NO_CACHE)
prepare_task = task(prepare, name="prepare", cache_key_fn=_prepare_cache_key,
                    cache_expiration=timedelta(days=30), persist_result=True)
make_loaders_task = task(build_loaders, name="make_loaders", cache_policy=NO_CACHE)
# "gpu": `fitflow setup --gpus N` puts a tag concurrency limit on it, so parallel runs (flows,
# sweep trials) never train more models at once than there are GPUs.
train_model_task = task(train_model, name="train_model", cache_policy=NO_CACHE, tags=["training", "gpu"])
test_model_task = task(test_model, name="test_model", cache_policy=NO_CACHE)
