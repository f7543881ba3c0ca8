"""The training flow's steps as Prefect tasks: thin wrappers of the plain functions in tasks/.

Tests and notebooks call the plain functions (tasks/trainer.py), the flow calls these tasks.
Retries only where I/O happens (loading) and on training after a crash (it resumes from its
last epoch checkpoint); the cache only on deterministic data preparation, keyed on content.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.callbacks import Callback
from tasks.config import TrainConfig
from tasks.data import Prepared, content_key, load_table, prepare
from tasks.distributed import train_distributed
from tasks.errors import FitflowError
from tasks.loaders import Loaders
from tasks.trainer import Run, Trained, build_loaders, evaluate_on_test
from tasks.trainer import train_model as train_single_process


def train_model(config: TrainConfig, prepared: Prepared, loaders: Loaders, run: Run | None = None,
                extra_callbacks: Sequence[Callback] = (), progress: bool = True) -> Trained:
    """Train in this process, or with `strategy: ddp` in one process per device (tasks/distributed.py)."""
    if config.launch.strategy == "ddp":  # the ranks build their own loaders, on their shards
        return train_distributed(config, prepared, run, extra_callbacks, progress)
    return train_single_process(config, prepared, loaders, run, extra_callbacks, progress)


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
build_loaders_task = task(build_loaders, name="build_loaders", cache_policy=NO_CACHE)
# "gpu": `fitflow setup --gpus N` puts a tag concurrency limit on it, so parallel runs (flows,
# sweep trials) never train more models at once than there are GPUs.
train_model_task = task(train_model, name="train_model", cache_policy=NO_CACHE, tags=["training", "gpu"])
evaluate_on_test_task = task(evaluate_on_test, name="evaluate_on_test", cache_policy=NO_CACHE)
