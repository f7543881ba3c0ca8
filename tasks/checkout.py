"""This checkout of fitflow: where it is, and putting it first on sys.path for spawned workers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def checkout_first_on_path() -> Iterator[None]:
    """While worker processes are spawned (DDP ranks, local Dask workers): this checkout first on sys.path.

    Spawned processes start with this process' sys.path. fitflow reads its own logged models as
    data (tasks/model_loading.py), but a model loaded with `mlflow.pyfunc.load_model` in the same
    process (by the user's own code) puts its code folder (MLflow code_paths: a
    copy of tasks/) at its front, and a worker would import that copy, possibly of an older
    version and without data/, instead of fitflow's own packages.
    """
    saved = list(sys.path)
    sys.path.insert(0, str(REPO))
    try:
        yield
    finally:
        sys.path[:] = saved
