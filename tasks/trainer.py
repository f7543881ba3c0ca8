"""The trainer assembly: from a TrainConfig to a trained model, in one plain function.

`train_model` builds the model, optimizer, schedule and callbacks and runs `fit`. It is the
one assembly: the flow's task calls it, tests and notebooks call it, and each DDP rank calls
it with its `Rank` (tasks/ddp.py), which adds only the lines marked "DDP". No Prefect here.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from mlflow.tracking import MlflowClient

from tasks import tracking
from tasks.callbacks import Callback, deciding_callbacks, progress_callback, start_as_epoch_zero
from tasks.checkpoints import Checkpoints
from tasks.compile import PER_STEP_SCHEDULERS, balanced_class_weights, make_loss, make_optimizer, make_scheduler
from tasks.config import TrainConfig
from tasks.data import Prepared, PrepSpec
from tasks.device import autocast_dtype, resident_device, resolve_device, set_cpu_threads
from tasks.errors import ConfigError
from tasks.images_prepare import ImagesPrepared
from tasks.labels import balanced_pos_weight
from tasks.linear_fit import baseline_penalty, fit_linear
from tasks.loaders import Loaders, make_loaders
from tasks.metrics import METRICS, TaskMetrics, metric_names
from tasks.models import (
    LinearAndMLP,
    build_model,
    check_model_name,
    check_outputs,
    check_pretrained_file,
    class_path,
    load_pretrained,
    model_spec,
)
from tasks.training import History, evaluate, fit, optimizer_steps, seed_everything, to_device
from tasks.user_code import UserMetric, monitor_lower_is_better, user_callbacks, user_metrics
from tasks.user_dataset import UserDatasets, make_dataset_loaders

if TYPE_CHECKING:
    from tasks.ddp import Rank

log = logging.getLogger("fitflow")


@dataclass
class Run:
    """The MLflow run a training run writes to, passed explicitly to every step.

    `client` None: checkpoints only, nothing logged (notebooks, tests, DDP ranks other than 0).
    """

    client: MlflowClient | None
    run_id: str
    experiment_id: str
    checkpoint_dir: Path


@dataclass
class Given:
    """Objects the caller built (the Python API, fitflow/), used instead of building them from the config.

    `model` is trained in place, as Keras trains its model: after `fit` the caller's object holds
    the best weights. `optimizer` must hold the model's parameters. `loss_fn` is any callable
    loss(outputs, targets); an nn.Module loss moves to the device. `metrics`: metric objects
    (torchmetrics Metric classes or instances, functions), logged after the config's `metrics`.
    """

    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    loss_fn: Callable | None = None
    metrics: list[Any] = field(default_factory=list)


@dataclass
class Trained:
    model: torch.nn.Module
    spec: dict
    history: History
    best_epoch: int
    checkpoint: Path | None
    # The linear fit a table network started from (LinearAndMLP) and its name: the run's linear baseline
    # scores it instead of fitting the same model again. None: no linear path (or a DDP run's launcher).
    linear_start: tuple[torch.nn.Linear, str] | None = None
    # The monitored value of the kept weights (best_<monitor>); best_epoch 0: the start's, which no epoch beat.
    best_value: float = math.nan


def prep_spec(config: TrainConfig) -> PrepSpec:
    return PrepSpec(
        target=config.target, task=config.task, val_fraction=config.val_fraction,
        test_fraction=config.test_fraction, max_categories=config.max_categories, seed=config.seed,
    )


def task_metrics(prepared: Prepared, extra: Sequence[str | object] = ()) -> TaskMetrics:
    """The task's metrics, then `extra`: yours, as import paths or objects (tasks/user_code.py)."""
    p = prepared.preprocessor
    mean, std = (p.target_mean, p.target_std) if p.target_mean is not None else (0.0, 1.0)  # unscaled targets
    return TaskMetrics(p.task, len(p.classes or []), mean, std, extra=metrics_of(extra, prepared))


def your_metrics(config: TrainConfig, given: Given | None) -> list[str | object]:
    """The config's metrics (import paths), then the caller's objects: copies, since a torchmetrics
    Metric keeps its running state and training and testing each need a fresh one."""
    return [*config.metrics, *(copy.deepcopy(metric) for metric in (given.metrics if given is not None else ()))]


def metrics_of(extra: Sequence[str | object], prepared: Prepared) -> list[UserMetric]:
    p = prepared.preprocessor
    return user_metrics(extra, p.task, len(p.classes or []), taken=("loss", *METRICS[p.task]))


def lower_is_better(config: TrainConfig, prepared: Prepared | ImagesPrepared | UserDatasets,
                    given: Given | None = None) -> bool:
    """Which way the config's monitor improves, your metrics (the config's and the caller's) included."""
    return monitor_lower_is_better(config.monitor, metrics_of(your_metrics(config, given), prepared))


def spec_of_model(config: TrainConfig, prepared: Prepared | ImagesPrepared | UserDatasets,
                  given: torch.nn.Module | None = None) -> dict:
    """What `build_model` needs: the class, its input and output sizes, its keyword arguments.

    `given`: the caller's model object; the logged model rebuilds its class with these sizes and model_kwargs.
    """
    p = prepared.preprocessor
    in_shape = getattr(p, "in_shape", None)  # images and Datasets: one sample's shape; tables: n_features
    in_features = p.n_features or (in_shape[0] if in_shape is not None and len(in_shape) == 1 else None)
    if given is not None:
        return model_spec(class_path(type(given)), in_features, len(p.classes) if p.classes else 1,
                          config.model_kwargs, in_shape)
    model = config.model
    inputs = (f"{in_features} features" if in_features is not None else f"shape {tuple(in_shape)}" if in_shape is not None
              else "tuples or dicts")
    if model == "auto":  # the MLP for feature vectors (tables, flat Dataset items), the CNN for images
        if in_features is not None:
            model = "mlp"
        elif in_shape is not None and len(in_shape) == 3:
            model = "cnn"
        else:
            raise ConfigError(f"model auto has no built-in model for these inputs ({inputs}); "
                              "name yours with --model package.module:Class")
    if model == "mlp":
        kwargs = {"hidden_sizes": config.hidden_sizes, "activation": config.activation,
                  "dropout": config.dropout, "batch_norm": config.batch_norm,
                  "linear_path": config.linear_path and isinstance(prepared, Prepared)}
    elif model == "cnn":
        kwargs = {"dropout": config.dropout, **config.model_kwargs}
    else:
        kwargs = config.model_kwargs
    fits = in_features is not None if model == "mlp" else in_shape is not None and len(in_shape) == 3
    if model in ("mlp", "cnn") and not fits:
        raise ConfigError(f"model {model} needs {'feature vectors' if model == 'mlp' else 'images'} (the inputs here: "
                          f"{inputs}); use model auto or name yours with --model package.module:Class")
    return model_spec(model, in_features, len(p.classes) if p.classes else 1, kwargs, in_shape)


def build_loaders(config: TrainConfig, prepared: Prepared | ImagesPrepared | UserDatasets,
                  rank: Rank | None = None) -> Loaders:
    """The train, val and test loaders of any data kind, for this process (or this DDP rank).

    Under ddp the launching process only tests the returned model, so its loaders stay on the
    CPU (no CUDA before the ranks start); each rank builds its own shard with its `rank`.
    """
    launch = config.launch
    if rank is not None:
        device = rank.device
    else:
        device = resolve_device(launch.device) if launch.strategy == "single" else torch.device("cpu")
    shard = {"rank": rank.rank, "world_size": rank.world_size} if rank is not None else {}
    common = {"num_workers": launch.num_workers, "seed": config.seed, **shard}
    if isinstance(prepared, ImagesPrepared):
        from tasks.images_loaders import make_image_loaders  # image code (torchvision) for image data only

        return make_image_loaders(prepared, config.batch_size, config.drop_last, pin_memory=device.type == "cuda",
                                  augment=config.augment, cache=launch.image_cache, **common)
    if isinstance(prepared, UserDatasets):
        return make_dataset_loaders(prepared, config.batch_size, config.drop_last, pin_memory=device.type == "cuda",
                                    **common)
    # Tables: on a GPU with room, the splits live on the GPU; otherwise pinned batches, copied asynchronously
    splits = [split for split in (prepared.train, prepared.val, prepared.test) if split is not None]
    resident = resident_device(sum(s.features.nbytes + s.targets.nbytes for s in splits), device)
    return make_loaders(prepared, config.batch_size, config.drop_last, pin_memory=device.type == "cuda" and resident is None,
                        device=resident, **common)


def first_inputs(loader) -> object:
    """The inputs of a loader's first batch (on the CPU), for the model's output check."""
    return next(iter(loader))[0]


def check_monitor(config: TrainConfig, prepared: Prepared, extra: Sequence[UserMetric] = ()) -> None:
    task_name = prepared.preprocessor.task
    known = metric_names(task_name, "train") + metric_names(task_name, "val") + [f"val_{m.name}" for m in extra]
    if config.monitor not in known:
        raise ConfigError(f"monitor '{config.monitor}' is not logged for {task_name}; use one of {', '.join(known)}")


def check_before_run(config: TrainConfig, prepared: Prepared | ImagesPrepared | UserDatasets, given: Given | None = None) -> None:
    """What would otherwise fail a run just after its MLflow run starts, as a ConfigError before it has one: the
    model (its kind fits the data, a torchvision name exists, an import path imports), the pretrained weights file
    (it exists and can be read) and the monitor (a metric the run logs, yours included)."""
    spec = spec_of_model(config, prepared, given.model if given is not None else None)
    if given is None or given.model is None:
        check_model_name(spec["model"])
    if config.pretrained:
        check_pretrained_file(config.pretrained)
    check_monitor(config, prepared, task_metrics(prepared, your_metrics(config, given)).extra)


def train_model(config: TrainConfig, prepared: Prepared, loaders: Loaders, run: Run | None = None,
                extra_callbacks: Sequence[Callback] = (), progress: bool = True, rank: Rank | None = None,
                given: Given | None = None) -> Trained:
    """Compile (optimizer, loss, schedule) and fit with the default callbacks, then `extra_callbacks`.

    `progress=False` drops the progress display (a sweep trains several models at once).
    `rank`: this process is one rank of a DDP run (tasks/distributed.py starts them).
    `given`: the caller's own model, optimizer or loss (the Python API), each instead of the config's.
    """
    if rank is not None:
        from tasks.ddp import AgreeToStop, GlobalTrainLoss, RankSeed  # DDP
    given = given or Given()
    metrics = task_metrics(prepared, your_metrics(config, given))
    check_monitor(config, prepared, metrics.extra)
    writes = rank is None or rank.writes  # DDP: rank 0 alone prints, checkpoints and logs
    device = rank.device if rank is not None else resolve_device(config.launch.device)
    set_cpu_threads(config.launch.num_threads)
    seed_everything(config.seed)  # before the model exists: the seed fixes its initial weights
    spec = spec_of_model(config, prepared, given.model)
    # A Dataset's inputs may be token ids, tuples or dicts, a caller's model may take anything its
    # data holds: check the model on a real batch, not on zeros
    sample = first_inputs(loaders.val) if isinstance(prepared, UserDatasets) or given.model is not None else None
    model = build_model(spec, sample=sample) if given.model is None else given.model
    linear_start = None
    if isinstance(model, LinearAndMLP):  # a table's network starts as its linear baseline's fit (tasks/models.py)
        linear_start = fit_linear(prepared, given.loss_fn if given.loss_fn is not None else loss_of(config, prepared))
        model.linear.load_state_dict(linear_start[0].state_dict())
    if config.pretrained:
        left = load_pretrained(model, config.pretrained)
        if writes:
            log.info("started from %s; %d tensor(s) left at their initial values%s", config.pretrained, len(left),
                     f" ({', '.join(left[:4])}{', ...' if len(left) > 4 else ''})" if left else "")
    model.to(device)  # before the optimizer: it must hold the parameters that will be trained
    if given.model is not None:  # on the device: the caller's model may already live there
        check_outputs(model, to_device(sample, device), spec["out_features"], spec["model"])
    if config.torch_compile:
        model.compile()  # in place: the state dict keeps its keys for checkpoints and the MLflow model
    trainee = rank.replicate(model) if rank is not None else model  # DDP: gradients averaged in backward
    optimizer = given.optimizer if given.optimizer is not None else make_optimizer(
        config.optimizer, trainee.parameters(), config.lr, weight_decay_of(config, prepared), config.momentum)
    scheduler = make_scheduler(config.scheduler, optimizer, config.epochs, config.scheduler_step_size, config.scheduler_gamma,
                               optimizer_steps(len(loaders.train), config.accumulate_grad_batches), config.warmup_steps)
    best_path = run.checkpoint_dir / "best.pt" if run is not None and writes else None
    stateful = deciding_callbacks(config.monitor, config.min_delta, config.patience, scheduler, best_path,
                                  per_step=config.scheduler in PER_STEP_SCHEDULERS,
                                  lower_is_better=monitor_lower_is_better(config.monitor, metrics.extra))
    if linear_start is not None:  # the start is the linear baseline: a candidate for the kept weights (epoch 0)
        start = evaluate(trainee, loaders.val, training_loss(config, prepared, given, device), metrics.to(device),
                         device, "val", autocast_dtype(config.precision, device))
        start_as_epoch_zero(stateful, start, model)
    yours = user_callbacks(config.callbacks) if writes else []  # DDP: on rank 0, as the caller's callbacks
    # Order: the epoch's logs are complete (DDP: the global train loss) before anything reads them;
    # progress prints the epoch first; the best weights are kept before anything may stop the run;
    # the checkpoint holds the epoch after every callback with state has seen it; the caller's
    # callbacks see an epoch that is already logged and checkpointed. Per batch, the schedule
    # steps before anything reads the learning rate.
    callbacks: list[Callback] = []
    if rank is not None:
        callbacks.append(GlobalTrainLoss(loaders.train.sampler.rows_per_epoch()))  # DDP
    display = progress_callback(config.launch.progress) if progress and writes else None
    if display is not None:
        callbacks.append(display)
    callbacks.extend(stateful.values())
    # resumes from the newest epoch checkpoint when there is one (a retry, `fitflow resume`)
    checkpoints = Checkpoints(run.checkpoint_dir, stateful, config.launch.keep_checkpoints, run.run_id) if run else None
    if rank is not None:
        callbacks.append(rank.checkpoints(checkpoints, stateful))  # DDP: rank 0 reads and writes, every rank resumes
    elif checkpoints is not None:
        callbacks.append(checkpoints)
    if run is not None and run.client is not None and writes and tracking.logs_checkpoints(
            config.launch.checkpoint_to_mlflow, run.client.tracking_uri):
        callbacks.append(tracking.MlflowCheckpoints(run.client, run.run_id, checkpoints))  # a retry elsewhere
    if rank is not None:
        callbacks.append(RankSeed(config.seed, rank.rank))  # DDP: after the checkpoint restored the generators
    if run is not None and run.client is not None and writes:
        epoch_metrics = tracking.MlflowMetrics(run.client, run.run_id, run.checkpoint_dir)
        if config.log_every_n_steps:  # before the epoch metrics: its last values are journaled before delivery closes
            callbacks.append(tracking.MlflowStepLoss(epoch_metrics, config.log_every_n_steps))
        callbacks.append(epoch_metrics)
    callbacks.extend(yours)
    if writes:
        callbacks.extend(extra_callbacks)
    if rank is not None:
        callbacks.append(AgreeToStop())  # DDP: last, a stop set on any rank stops every rank
    if writes:
        log.info("training %s on %s for up to %d epochs", spec["model"], device, config.epochs)
    history = fit(
        trainee, loaders.train, loaders.val, epochs=config.epochs, optimizer=optimizer,
        loss_fn=training_loss(config, prepared, given, device), metrics=metrics, device=device, callbacks=callbacks,
        precision=config.precision, grad_clip=config.grad_clip, accumulate_grad_batches=config.accumulate_grad_batches,
    )
    best = stateful["best_weights"]
    return Trained(model, spec, history, best.monitor.best_epoch,
                   best_path if best_path is not None and best_path.exists() else None, linear_start, best.monitor.best)


def weight_decay_of(config: TrainConfig, prepared: Prepared | ImagesPrepared | UserDatasets) -> float:
    """The configured weight decay; auto: for feature tables the linear baseline's own L2 penalty (about 1 / training
    rows), for images and Datasets 0 (TrainConfig.weight_decay)."""
    if config.weight_decay != "auto":
        return config.weight_decay
    return baseline_penalty(prepared) if isinstance(prepared, Prepared) and prepared.preprocessor.n_features else 0.0


def evaluate_on_test(config: TrainConfig, prepared: Prepared, loaders: Loaders, trained: Trained,
                     given: Given | None = None) -> dict[str, float]:
    """Test-split metrics of the best weights, with the loss they were trained with."""
    device = next(trained.model.parameters()).device
    return evaluate(trained.model, loaders.test, training_loss(config, prepared, given, device),
                    task_metrics(prepared, your_metrics(config, given)), device, "test")


def training_loss(config: TrainConfig, prepared: Prepared, given: Given | None, device: torch.device) -> Callable:
    """The caller's loss when given, else the configured one; on `device` when it is a module."""
    loss = given.loss_fn if given is not None and given.loss_fn is not None else loss_of(config, prepared)
    return loss.to(device) if isinstance(loss, torch.nn.Module) else loss


def loss_of(config: TrainConfig, prepared: Prepared | ImagesPrepared | UserDatasets) -> torch.nn.Module:
    """The configured loss; with class_weights balanced, weighed by the training split's class counts
    (multilabel: each class's positives by its negatives/positives ratio, BCE's pos_weight)."""
    task = prepared.preprocessor.task
    if config.class_weights == "none":
        return make_loss(config.loss, task)
    if task == "regression":
        raise ConfigError("class_weights balanced is for classification; this task is regression: drop it")
    if isinstance(prepared, UserDatasets):
        raise ConfigError("class_weights balanced needs the training labels, which fitflow does not read from your "
                          "Datasets; weigh the classes in your own loss, or drop class_weights")
    targets = torch.as_tensor(prepared.train.targets)
    if task == "multilabel":
        return make_loss(config.loss, task, torch.from_numpy(balanced_pos_weight(targets.numpy())))
    return make_loss(config.loss, task, balanced_class_weights(targets, len(prepared.preprocessor.classes)))
