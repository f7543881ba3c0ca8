"""The training flow's steps as Prefect tasks: thin wrappers of the plain functions in tasks/.

Tests and notebooks call the plain functions (tasks/trainer.py), the flow calls these tasks.
Retries only where I/O happens (loading) and on training after a crash (it resumes from its
last epoch checkpoint); the cache only on deterministic data preparation, keyed on content.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from flows.environment import fitflow_home
from tasks import images
from tasks.baseline import Baseline, linear_baseline
from tasks.callbacks import Callback
from tasks.config import TrainConfig, target_columns
from tasks.data import Prepared, content_key, load_table, prepare, resolve_source
from tasks.errors import FitflowError
from tasks.gpu_slots import claimed_device
from tasks.images import index_images
from tasks.images_prepare import ImagesPrepared, prepare_images
from tasks.kinds import detect_kind
from tasks.loaders import Loaders
from tasks.trainer import Given, Run, Trained, build_loaders, evaluate_on_test, prep_spec
from tasks.trainer import train_model as train_single_process
from tasks.user_dataset import UserDatasets, load_factory


@dataclass
class DataRecord:
    """The run's data as MLflow logs it (a dataset input, its digest, the model's input example)."""

    kind: str  # table | images | dataset
    frame: pd.DataFrame  # the table; the image index (path, label, split, bytes); the factory and its kwargs
    source: str  # the file or folder, or the factory's import path
    target: str | None  # the label column of `frame` (None for several: MLflow's dataset names one)


def load_and_prepare(config: TrainConfig) -> tuple[Prepared | ImagesPrepared | UserDatasets, DataRecord]:
    """Each data kind's loading and preparation, as named tasks (the flows' first step)."""
    kind = detect_kind(config.data, config.data_kind)
    if kind == "images":
        # the table default ("diagnosis") names no manifest column: a manifest's labels are then in "label"
        target = None if config.target == TrainConfig.model_fields["target"].default else config.target
        source = index_images_task(str(resolve_source(config.data)), target, task=config.task)
        prepared = prepare_images_task(source, config.image_size, config.val_fraction, config.test_fraction, config.seed)
        return prepared, DataRecord(kind, source.as_frame(), source.root, "label")
    if kind == "dataset":
        datasets = load_datasets_task(config.data, config.data_kwargs)
        frame = pd.DataFrame({"factory": [config.data], "data_kwargs": [json.dumps(config.data_kwargs, sort_keys=True)]})
        return datasets, DataRecord(kind, frame, config.data, None)
    table = load_table_task(config.data)
    validation = load_table_task(config.validation_data) if config.validation_data else None
    prepared = prepare_task(table, prep_spec(config), validation)
    target = config.target if len(target_columns(config.target)) == 1 else None
    return prepared, DataRecord(kind, table, str(resolve_source(config.data)), target)


def baseline_of_run(config: TrainConfig, data: DataRecord, prepared: Prepared, loaders: Loaders,
                    trained: Trained) -> Baseline | None:
    """The linear baseline of a table run, on the device of its model; images and Datasets have none."""
    if not config.baseline or data.kind != "table":
        return None
    return linear_baseline_task(config, prepared, loaders.test, next(trained.model.parameters()).device,
                                fitted=trained.linear_start)


def train_model(config: TrainConfig, prepared: Prepared, loaders: Loaders, run: Run | None = None,
                extra_callbacks: Sequence[Callback] = (), progress: bool = True, given: Given | None = None) -> Trained:
    """Train in this process, or with `strategy: ddp` in one process per device (tasks/distributed.py).

    `given`: the Python API's own model, optimizer or loss objects (single process only).
    """
    if config.launch.strategy == "ddp":  # the ranks build their own loaders, on their shards
        from tasks.distributed import train_distributed  # torch's elastic launcher: DDP runs only

        return train_distributed(config, prepared, run, extra_callbacks, progress)
    return train_single_process(config, prepared, loaders, run, extra_callbacks, progress, given=given)


def run_step(step, *args, **kwargs):
    """Call a step: as its Prefect task inside a flow run (a task run in the UI, retries, the cache),
    as the plain function elsewhere (the Python API's fit without flow=True: no Prefect server)."""
    return (step if FlowRunContext.get() is not None else step.fn)(*args, **kwargs)


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


def _prepare_images_cache_key(context, parameters) -> str:
    """The file list with sizes and content edges (ImageSource.digest), the settings and the prep code."""
    digest = hashlib.sha256(parameters["source"].digest().encode())
    settings = {k: parameters.get(k) for k in ("image_size", "val_fraction", "test_fraction", "seed")}
    digest.update(repr(sorted(settings.items())).encode())
    for module in ("images.py", "images_prepare.py", "images_decode.py", "images_preprocessor.py", "labels.py"):
        digest.update((Path(images.__file__).parent / module).read_bytes())
    return f"prepare-images-{digest.hexdigest()}"


load_table_task = task(load_table, name="load_table", retries=2, retry_delay_seconds=[2, 10],
                       retry_condition_fn=_retry_transient_io, cache_policy=NO_CACHE)
prepare_task = task(prepare, name="prepare", cache_key_fn=_prepare_cache_key,
                    cache_expiration=timedelta(days=30), persist_result=True)
# Images: the index (a listing and a digest, cheap) runs every time; the preparation (split and
# channel statistics, which decode a sample) is cached on the digest. Paths, not pixels, are cached.
index_images_task = task(index_images, name="index_images", retries=2, retry_delay_seconds=[2, 10],
                         retry_condition_fn=_retry_transient_io, cache_policy=NO_CACHE)
prepare_images_task = task(prepare_images, name="prepare_images", cache_key_fn=_prepare_images_cache_key,
                           cache_expiration=timedelta(days=30), persist_result=True)
# The user's factory returns live objects (Datasets, a collate function): nothing to cache or persist.
load_datasets_task = task(load_factory, name="load_datasets", cache_policy=NO_CACHE)
build_loaders_task = task(build_loaders, name="build_loaders", cache_policy=NO_CACHE)
# "gpu": `fitflow setup --gpus N` puts a tag concurrency limit on it, so parallel runs (flows,
# sweep trials) never train more models at once than there are GPUs.
train_model_task = task(train_model, name="train_model", cache_policy=NO_CACHE, tags=["training", "gpu"])
evaluate_on_test_task = task(evaluate_on_test, name="evaluate_on_test", cache_policy=NO_CACHE)
linear_baseline_task = task(linear_baseline, name="linear_baseline", cache_policy=NO_CACHE)


@contextlib.contextmanager
def on_own_device(config: TrainConfig) -> Iterator[TrainConfig]:
    """The config with the device this run holds while the block runs: on a machine with several GPUs,
    one no other run trains on (tasks/gpu_slots.py; the locks live in $FITFLOW_HOME/gpus)."""
    with claimed_device(config.launch.device, fitflow_home() / "gpus", config.launch.strategy) as device:
        if device == config.launch.device:
            yield config
        else:
            yield config.model_copy(update={"launch": config.launch.model_copy(update={"device": device})})
