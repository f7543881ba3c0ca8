"""DDP: one training run over several processes, launched by torch.distributed's elastic agent.

`train_distributed` (called by `train_model` when `strategy: ddp`) starts one process per
device through `elastic_launch`, torchrun's own machinery as a function: no script is run
again, and this process never touches CUDA (the workers are spawned, each initialises its own
device). Each worker (`_train_rank`) joins the process group (NCCL on GPUs, gloo on CPU),
wraps the model in DistributedDataParallel and runs the same `fit` as a single process, on its
shard of the training rows (tasks/loaders.py). What differs, all outside the loop:

- gradients: averaged by DDP in backward;
- validation: the loss sum is all-reduced (`evaluate`) and torchmetrics gathers every rank's
  outputs at `compute`, so every rank sees the metrics of the whole split, as one process would;
  early stopping, best weights and the LR schedule therefore agree on every rank;
- rank 0 alone prints progress, writes checkpoints, logs to MLflow and returns the weights;
- a failure in any rank stops all of them (the agent terminates the others) and becomes one
  FitflowError naming the rank and its exception; its traceback goes to the log.

This module never imports prefect: the workers load it in fresh interpreters.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.nn.parallel import DistributedDataParallel

from flows.config import TrainConfig, load_config
from flows.runtime import checkout_first_on_path
from tasks import errors
from tasks.callbacks import BestWeights, Callback, FitState, Progress, deciding_callbacks
from tasks.checkpoints import Checkpoints
from tasks.compile import make_loss, make_optimizer, make_scheduler
from tasks.data import Prepared
from tasks.device import resident_device, set_cpu_threads
from tasks.errors import ConfigError, TrainingError
from tasks.loaders import make_loaders
from tasks.metrics import TaskMetrics
from tasks.models import build_model
from tasks.training import History, fit, seed_everything

log = logging.getLogger("fitflow")
# A rank that fails while a peer is still in a collective makes that peer fail too, within the
# same second (error files keep whole seconds): these are the echoes, not the cause.
_ECHO = re.compile(r"^(Dist\w*Error|RuntimeError: .*(gloo|NCCL|Connection (closed|reset) by peer))")


@dataclass
class Job:
    """What every rank needs, all picklable without prefect (the workers are fresh interpreters)."""

    config: TrainConfig
    prepared: Prepared
    spec: dict
    metrics: TaskMetrics
    tracking_uri: str | None = None  # rank 0 logs to this MLflow run
    run_id: str | None = None
    checkpoint_dir: Path | None = None
    progress: bool = True
    extra_callbacks: Sequence[Callback] = field(default_factory=tuple)  # rank 0 only


@dataclass
class Result:
    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    best_epoch: int


def train_distributed(model: torch.nn.Module, config: TrainConfig, prepared: Prepared, spec: dict,
                      metrics: TaskMetrics, run: Any = None, extra_callbacks: Sequence[Callback] = (),
                      progress: bool = True) -> tuple[History, int]:
    """Train `model` (built, still on the CPU) with DDP; returns the history and the best epoch.

    On return `model` holds rank 0's final weights (the best ones, on the CPU). `run`: the
    flow's MLflow run (client, run_id, checkpoint_dir), or None.
    """
    if config.node_rank > 0 and run is not None:
        raise ConfigError(f"machine {config.node_rank} joins a ddp run with `python -m tasks.distributed --config FILE "
                          f"--node-rank {config.node_rank}`; only machine 0 runs `fitflow train`, which logs the run")
    client = getattr(run, "client", None)
    job = Job(config, prepared, spec, metrics, client.tracking_uri if client is not None else None,
              getattr(run, "run_id", None), getattr(run, "checkpoint_dir", None), progress, tuple(extra_callbacks))
    result = launch(config, job)
    if result is None:  # a machine other than 0 (`main`): its ranks trained, machine 0 keeps the outcome
        return History(), 0
    model.load_state_dict(result.state_dict)
    return History(result.history), result.best_epoch


def processes_per_node(config: TrainConfig) -> int:
    """`devices` as a count: auto is every visible GPU (asked without initialising CUDA here)."""
    if config.devices != "auto":
        if config.device != "cpu" and torch.cuda.is_available() and config.devices > torch.cuda.device_count():
            raise ConfigError(f"devices {config.devices} is more than the {torch.cuda.device_count()} visible GPU(s); "
                              "lower --devices or use --devices auto")
        return config.devices
    if config.device == "cpu" or not torch.cuda.is_available():
        raise ConfigError("devices auto means every visible GPU and there is none here; "
                          "give a count of CPU processes, e.g. --devices 2")
    return torch.cuda.device_count()


def launch(config: TrainConfig, job: Job) -> Result | None:
    """Run `_train_rank` in every process of this machine; rank 0's Result (None on other machines)."""
    if re.fullmatch(r"mps|cuda:\d+", config.device):
        raise ConfigError(f"strategy ddp places rank r on cuda:r (or the CPU); use --device auto, cuda or cpu, not {config.device}")
    nproc = processes_per_node(config)
    world_size = nproc * config.num_nodes
    if config.batch_size % world_size:
        raise ConfigError(f"batch_size {config.batch_size} is the global batch and must divide evenly over the "
                          f"{world_size} DDP processes; use a multiple of {world_size}")
    if config.num_nodes == 1:  # torchrun --standalone: the c10d store picks a free local port
        rdzv = {"rdzv_backend": "c10d", "rdzv_endpoint": config.rdzv_endpoint or "localhost:0"}
    else:  # explicit machine ranks: machine 0's rank 0 is global rank 0, the one that logs
        rdzv = {"rdzv_backend": "static", "rdzv_endpoint": config.rdzv_endpoint, "rdzv_configs": {"rank": config.node_rank}}
    with tempfile.TemporaryDirectory(prefix="fitflow-ddp-") as logs, _signal_handlers_kept(), checkout_first_on_path():
        launch_config = LaunchConfig(
            min_nodes=config.num_nodes, max_nodes=config.num_nodes, nproc_per_node=nproc,
            run_id=job.run_id or uuid.uuid4().hex, max_restarts=0,  # a retry is Prefect's, and resumes
            start_method="spawn",  # fresh interpreters: fork after torch (or CUDA) is initialised is unsafe
            monitor_interval=0.5,  # how soon a failed rank is noticed and the others are stopped
            logs_specs=DefaultLogsSpecs(log_dir=logs),  # the error files; removed with the folder
            **rdzv,
        )
        log.info("DDP: %d process(es) on this machine, %d in all, %s", nproc, world_size,
                 "NCCL on GPUs" if config.device != "cpu" and torch.cuda.is_available() else "gloo on CPU")
        try:
            results = elastic_launch(launch_config, _train_rank)(job)
        except ChildFailedError as err:
            raise _as_fitflow_error(err) from None
    return results.get(0)


def _train_rank(job: Job) -> Result | None:
    """One DDP process: the same model, optimizer, callbacks and `fit` as `train_model`, on a shard."""
    config, prepared = job.config, job.prepared
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = config.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        set_cpu_threads(config.num_threads)
        seed_everything(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        model = build_model(job.spec).to(device)
        if config.torch_compile:
            model.compile()
        replica = _Replica(model, device_ids=[local_rank] if cuda else None)
        optimizer = make_optimizer(config.optimizer, replica.parameters(), config.lr, config.weight_decay, config.momentum)
        scheduler = make_scheduler(config.scheduler, optimizer, config.epochs, config.scheduler_step_size,
                                   config.scheduler_gamma)
        splits = (prepared.train, prepared.val, prepared.test)
        resident = resident_device(sum(s.features.nbytes + s.targets.nbytes for s in splits), device)
        loaders = make_loaders(prepared, config.batch_size, config.drop_last, config.num_workers,
                               pin_memory=cuda and resident is None, seed=config.seed, device=resident,
                               rank=rank, world_size=world_size)
        callbacks, best = _callbacks(job, rank, scheduler, loaders.train.sampler.rows_per_epoch())
        history = fit(replica, loaders.train, loaders.val, epochs=config.epochs, optimizer=optimizer,
                      loss_fn=make_loss(config.loss, prepared.preprocessor.task), metrics=job.metrics, device=device,
                      callbacks=callbacks, precision=config.precision, grad_clip=config.grad_clip)
        if rank != 0:
            return None
        weights = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        return Result(weights, history.epochs, best.monitor.best_epoch)
    finally:
        dist.destroy_process_group()


def _callbacks(job: Job, rank: int, scheduler: Any, rows: int) -> tuple[list[Callback], BestWeights]:
    """train_model's callbacks, by rank: the ones that decide run everywhere, the ones that write on rank 0."""
    config = job.config
    best_path = job.checkpoint_dir / "best.pt" if job.checkpoint_dir and rank == 0 else None
    stateful = deciding_callbacks(config.monitor, config.min_delta, config.patience, scheduler, best_path)
    best = stateful["best_weights"]
    # Order: the epoch's train loss is made global before anything reads the logs.
    callbacks: list[Callback] = [_GlobalTrainLoss(rows)]
    if rank == 0 and job.progress:
        callbacks.append(Progress())
    callbacks.extend(stateful.values())
    if job.checkpoint_dir is not None:  # every rank resumes from rank 0's checkpoint; rank 0 alone writes
        checkpoints = Checkpoints(job.checkpoint_dir, stateful, config.keep_checkpoints, job.run_id)
        callbacks.append(checkpoints if rank == 0 else _ResumeOnly(checkpoints))
    callbacks.append(_RankSeed(config.seed, rank))  # after the checkpoint restored the generators
    if rank == 0 and job.tracking_uri and job.run_id:
        from mlflow.tracking import MlflowClient

        from tasks import tracking

        callbacks.append(tracking.MlflowMetrics(MlflowClient(job.tracking_uri), job.run_id, job.checkpoint_dir))
    if rank == 0:
        callbacks.extend(job.extra_callbacks)
    callbacks.append(_AgreeToStop())  # last: a stop set by any callback on any rank stops every rank
    return callbacks, best


class _Replica(DistributedDataParallel):
    """DDP whose state dict is the model's own (no `module.` prefix): checkpoints fit any strategy."""

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state_dict, strict, assign)


class _GlobalTrainLoss(Callback):
    """`train_loss` over every rank's rows (the loop measured its own shard's)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def on_epoch_end(self, state: FitState) -> None:
        both = _all_reduce(torch.tensor([state.logs["train_loss"] * self.rows, self.rows], dtype=torch.float64))
        state.logs["train_loss"] = state.history[-1]["train_loss"] = float(both[0] / both[1])


class _ResumeOnly(Callback):
    """A rank other than 0 restores the newest checkpoint at the start and writes none."""

    def __init__(self, checkpoints: Checkpoints) -> None:
        self.checkpoints = checkpoints

    def on_fit_start(self, state: FitState) -> None:
        self.checkpoints.on_fit_start(state)


class _RankSeed(Callback):
    """Each epoch's dropout draws come from (seed, epoch, rank): independent across ranks, and a
    resumed rank draws what it would have drawn (a checkpoint holds rank 0's generators only)."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed, rank

    def on_fit_start(self, state: FitState) -> None:
        self._reseed(state.epoch)

    def on_epoch_end(self, state: FitState) -> None:
        self._reseed(state.epoch)

    def _reseed(self, epoch: int) -> None:
        torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0]))


class _AgreeToStop(Callback):
    """One all-reduce per epoch: if any rank stops, all stop (a rank left alone would wait forever)."""

    def on_epoch_end(self, state: FitState) -> None:
        state.stop = bool(_all_reduce(torch.tensor([int(state.stop)]), dist.ReduceOp.MAX).item())


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor; NCCL reduces CUDA tensors only, so it goes there and back."""
    on_backend = tensor.cuda() if dist.get_backend() == "nccl" else tensor
    dist.all_reduce(on_backend, op=op)
    return on_backend.cpu()


def _as_fitflow_error(err: ChildFailedError) -> errors.FitflowError:
    """The failed rank that caused it, as one line; its traceback to the log.

    A fitflow error in a rank (bad config, a NaN loss) keeps its type, so the CLI treats it as
    in a single process; anything else becomes a TrainingError naming the rank.
    """
    failures = sorted(err.failures.items(), key=lambda item: item[1].timestamp)
    causes = [(rank, failure) for rank, failure in failures if not _ECHO.match(_message(failure))]
    rank, failure = (causes or failures)[0]
    message = _message(failure)
    if isinstance(failure.message, dict):
        log.error("DDP rank %d failed:\n%s", rank, failure.message.get("extraInfo", {}).get("py_callstack", message))
    kind, _, text = message.partition(": ")
    fitflow_types = {cls.__name__: cls for cls in _subclasses(errors.FitflowError)}
    if kind in fitflow_types:
        return fitflow_types[kind](f"DDP rank {rank}: {text}")
    return TrainingError(f"DDP rank {rank} failed: {message.splitlines()[0] if message else 'no error message'}")


def _message(failure: ProcessFailure) -> str:
    """`Type: text` of the exception a rank recorded, or how the process ended (a signal)."""
    message = failure.message
    return str(message.get("message", "") if isinstance(message, dict) else message)


def _subclasses(cls: type) -> list[type]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


@contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """The elastic agent installs its own SIGTERM/SIGINT handlers (on the main thread) so that a
    stopped run stops its workers; put the caller's back afterwards (Prefect's, pytest's)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    saved = {sig: signal.getsignal(sig) for sig in (getattr(signal, n) for n in names if hasattr(signal, n))}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be put back
                signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Machines 1..N-1 of a multi-machine run: `python -m tasks.distributed --config run.yaml --node-rank K`.

    The same config file as machine 0's `fitflow train` (the same data path on every machine):
    this machine prepares the data the same way, runs its ranks, and logs nothing.
    """
    import argparse

    from flows.steps import build_loaders, prep_spec, train_model  # prefect here is fine: workers never import it
    from tasks.data import load_table, prepare

    parser = argparse.ArgumentParser(prog="python -m tasks.distributed", description=main.__doc__)
    parser.add_argument("--config", required=True, metavar="FILE.yaml")
    parser.add_argument("--node-rank", type=int, required=True, metavar="K")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        config = load_config(args.config, node_rank=args.node_rank)
        if config.strategy != "ddp" or config.node_rank == 0:
            raise ConfigError("this joins machines 1..N-1 of a ddp run: set strategy ddp and --node-rank 1 or more")
        validation = load_table(config.validation_data) if config.validation_data else None
        prepared = prepare(load_table(config.data), prep_spec(config), validation)
        train_model(config, prepared, build_loaders(config, prepared), progress=False)
    except errors.FitflowError as err:
        print(f"fitflow: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
