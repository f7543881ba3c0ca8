"""DDP: one training run over several processes, launched by torch.distributed's elastic agent.

`train_distributed` starts one process per device through `elastic_launch`, torchrun's own
machinery as a function: no script is run again, and this process never touches CUDA (the
workers are spawned, each initialises its own device). Each worker (`_train_rank`) joins the
process group and calls the same trainer as a single process (tasks/trainer.py `train_model`)
with its `Rank`, on its shard of the training rows; what a rank adds is in tasks/ddp.py.
A failure in any rank stops all of them (the agent terminates the others) and becomes one
FitflowError naming the rank and its exception; its traceback goes to the log.

This module never imports prefect: the workers load it in fresh interpreters.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from tasks import errors
from tasks.callbacks import Callback
from tasks.checkout import checkout_first_on_path
from tasks.config import Launch, TrainConfig, load_config
from tasks.data import Prepared, load_table, prepare
from tasks.ddp import Rank
from tasks.errors import ConfigError, TrainingError
from tasks.models import build_model
from tasks.trainer import Run, Trained, build_loaders, prep_spec, spec_of_model, train_model
from tasks.training import History

log = logging.getLogger("fitflow")
# A rank that fails while a peer is still in a collective makes that peer fail too, within the
# same second (error files keep whole seconds): these are the echoes, not the cause.
_ECHO = re.compile(r"^(Dist\w*Error|RuntimeError: .*(gloo|NCCL|Connection (closed|reset) by peer))")


@dataclass
class Job:
    """What every rank needs, all picklable without prefect (the workers are fresh interpreters)."""

    config: TrainConfig
    prepared: Prepared
    run: Run | None = None  # its client left out (not picklable); rank 0 opens its own on tracking_uri
    tracking_uri: str | None = None
    progress: bool = True
    extra_callbacks: Sequence[Callback] = field(default_factory=tuple)  # rank 0 only


@dataclass
class Result:
    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    best_epoch: int
    best_value: float


def train_distributed(config: TrainConfig, prepared: Prepared, run: Run | None = None,
                      extra_callbacks: Sequence[Callback] = (), progress: bool = True) -> Trained:
    """Train with DDP; the model comes back on the CPU with rank 0's final (best) weights.

    `run`: the flow's MLflow run, or None. On machines other than 0 the ranks train and this
    returns the untrained model: machine 0 keeps the outcome.
    """
    if config.launch.node_rank > 0 and run is not None:
        rank = config.launch.node_rank
        raise ConfigError(f"machine {rank} joins a ddp run with `python -m tasks.distributed --config FILE "
                          f"--node-rank {rank}`; only machine 0 runs `fitflow train`, which logs the run")
    client = run.client if run is not None else None
    job = Job(config, prepared, replace(run, client=None) if run is not None else None,
              client.tracking_uri if client is not None else None, progress, tuple(extra_callbacks))
    result = launch(config, job)
    spec = spec_of_model(config, prepared)
    model = build_model(spec)
    if result is None:
        return Trained(model, spec, History(), 0, None)
    model.load_state_dict(result.state_dict)
    best_path = run.checkpoint_dir / "best.pt" if run is not None else None
    return Trained(model, spec, History(result.history), result.best_epoch,
                   best_path if best_path is not None and best_path.exists() else None, best_value=result.best_value)


def processes_per_node(launch: Launch) -> int:
    """`devices` as a count: auto is every visible GPU (asked without initialising CUDA here)."""
    if launch.devices != "auto":
        if launch.device != "cpu" and torch.cuda.is_available() and launch.devices > torch.cuda.device_count():
            raise ConfigError(f"devices {launch.devices} is more than the {torch.cuda.device_count()} visible GPU(s); "
                              "lower --devices or use --devices auto")
        return launch.devices
    if launch.device == "cpu" or not torch.cuda.is_available():
        raise ConfigError("devices auto means every visible GPU and there is none here; "
                          "give a count of CPU processes, e.g. --devices 2")
    return torch.cuda.device_count()


def launch(config: TrainConfig, job: Job) -> Result | None:
    """Run `_train_rank` in every process of this machine; rank 0's Result (None on other machines)."""
    settings = config.launch
    if re.fullmatch(r"mps|cuda:\d+", settings.device):
        raise ConfigError(f"strategy ddp places rank r on cuda:r (or the CPU); use --device auto, cuda or cpu, not {settings.device}")
    nproc = processes_per_node(settings)
    world_size = nproc * settings.num_nodes
    if config.batch_size % world_size:
        raise ConfigError(f"batch_size {config.batch_size} is the global batch and must divide evenly over the "
                          f"{world_size} DDP processes; use a multiple of {world_size}")
    if settings.num_nodes == 1:  # torchrun --standalone: the c10d store picks a free local port
        rdzv = {"rdzv_backend": "c10d", "rdzv_endpoint": settings.rdzv_endpoint or "localhost:0"}
    else:  # explicit machine ranks: machine 0's rank 0 is global rank 0, the one that logs
        rdzv = {"rdzv_backend": "static", "rdzv_endpoint": settings.rdzv_endpoint, "rdzv_configs": {"rank": settings.node_rank}}
    with tempfile.TemporaryDirectory(prefix="fitflow-ddp-") as logs, _signal_handlers_kept(), checkout_first_on_path():
        launch_config = LaunchConfig(
            min_nodes=settings.num_nodes, max_nodes=settings.num_nodes, nproc_per_node=nproc,
            run_id=_job_id(settings, job), max_restarts=0,  # a retry is Prefect's, and resumes
            start_method="spawn",  # fresh interpreters: fork after torch (or CUDA) is initialised is unsafe
            monitor_interval=0.5,  # how soon a failed rank is noticed and the others are stopped
            logs_specs=DefaultLogsSpecs(log_dir=logs),  # the error files; removed with the folder
            **rdzv,
        )
        log.info("DDP: %d process(es) on this machine, %d in all, %s", nproc, world_size,
                 "NCCL on GPUs" if settings.device != "cpu" and torch.cuda.is_available() else "gloo on CPU")
        try:
            results = elastic_launch(launch_config, _train_rank)(job)
        except ChildFailedError as err:
            raise _as_fitflow_error(every_failure(err, Path(logs), settings.node_rank * nproc)) from None
    return results.get(0)


def _job_id(settings: Launch, job: Job) -> str:
    """The id every machine's agent must agree on (the rendezvous keys its records by it). Machines
    other than 0 know no MLflow run: several machines use their meeting point, one machine the run."""
    if settings.num_nodes > 1:
        return f"fitflow-{settings.rdzv_endpoint}"
    return job.run.run_id if job.run is not None else uuid.uuid4().hex


def _train_rank(job: Job) -> Result | None:
    """One DDP process: the single-process trainer with this process' Rank, on its shard."""
    config = job.config
    rank = Rank.from_environment(config.launch.device)
    run = job.run
    if run is not None and rank.writes and job.tracking_uri:
        run = replace(run, client=MlflowClient(job.tracking_uri))
    with rank.joined():
        loaders = build_loaders(config, job.prepared, rank)
        trained = train_model(config, job.prepared, loaders, run, job.extra_callbacks, job.progress, rank)
    if not rank.writes:
        return None
    weights = {name: tensor.detach().cpu() for name, tensor in trained.model.state_dict().items()}
    return Result(weights, trained.history.epochs, trained.best_epoch, trained.best_value)


def every_failure(err: ChildFailedError, logs: Path, first_rank: int) -> dict[int, ProcessFailure]:
    """Every rank of this machine that recorded an error, by global rank.

    The agent reports the first failed process it sees, often a peer whose collective broke
    because another rank died (torch 2.14: only that one); each rank's own error file is in
    `logs` (<run>/attempt_<n>/<local rank>/error.json), the cause's included.
    """
    failures = dict(err.failures)
    for path in logs.glob("*/attempt_*/*/error.json"):
        local_rank = int(path.parent.name)
        failures.setdefault(first_rank + local_rank,
                            ProcessFailure(local_rank=local_rank, pid=-1, exitcode=1, error_file=str(path)))
    return failures


def _as_fitflow_error(failures: dict[int, ProcessFailure]) -> errors.FitflowError:
    """The failed rank that caused it, as one line; its traceback to the log.

    A fitflow error in a rank (bad config, a NaN loss) keeps its type, so the CLI treats it as
    in a single process; anything else becomes a TrainingError naming the rank.
    """
    failures = sorted(failures.items(), key=lambda item: item[1].timestamp)
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

    parser = argparse.ArgumentParser(prog="python -m tasks.distributed", description=main.__doc__)
    parser.add_argument("--config", required=True, metavar="FILE.yaml")
    parser.add_argument("--node-rank", type=int, required=True, metavar="K")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        config = load_config(args.config, node_rank=args.node_rank)
        if config.launch.strategy != "ddp" or config.launch.node_rank == 0:
            raise ConfigError("this joins machines 1..N-1 of a ddp run: set strategy ddp and --node-rank 1 or more")
        validation = load_table(config.validation_data) if config.validation_data else None
        prepared = prepare(load_table(config.data), prep_spec(config), validation)
        train_distributed(config, prepared, progress=False)
    except errors.FitflowError as err:
        print(f"fitflow: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
