"""Shared fixtures: real Prefect (test harness), real MLflow (sqlite in tmp_path), real torch.

The environment is pointed at a throwaway FITFLOW_HOME and PREFECT_HOME before prefect is
imported, so no test reads or writes the developer's own stores or caches.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="fitflow-tests-"))
os.environ["FITFLOW_HOME"] = str(_SESSION_HOME / "fitflow")
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True)

from flows.environment import configure_environment  # noqa: E402

configure_environment()
os.environ.pop("MLFLOW_TRACKING_URI")  # each test that tracks sets its own store (fixture below)

# Import prefect now, while pytest's session-wide capture is in place: Prefect binds its console
# log handler to the sys.stderr of the moment, and a test's capsys stream is closed after it.
import prefect.main  # noqa: E402, F401  (configures logging)

REPO = Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


# What the suite and its tools may leave in the checkout (git ignores each): caches, the browser
# test's screenshots and the reliability report. Anything else a test writes there is a bug: MLflow's
# ./mlruns of a sqlite tracking URI was one, three times, until a clone of a CI run showed it.
LEFT_IN_THE_CHECKOUT = ("__pycache__/", ".pytest_cache/", ".hypothesis/", "test-artifacts/", ".egg-info/")


def _new_files_in_the_checkout() -> set[str] | None:
    """Untracked and ignored entries of the checkout as `git status` lists them (a new folder as one
    entry); None outside a git checkout."""
    import subprocess

    done = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return {line[3:] for line in done.stdout.splitlines() if line[:2] in ("??", "!!")}


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_checkout():
    before = _new_files_in_the_checkout()
    yield
    after = _new_files_in_the_checkout()
    if before is None or after is None:
        return
    written = sorted(e for e in after - before if not any(part in e for part in LEFT_IN_THE_CHECKOUT))
    assert not written, (f"the tests wrote into the checkout {REPO} (or it was changed while they ran): {written}; "
                         "write to tmp_path or FITFLOW_HOME instead")


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the session (each harness migrates a fresh database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def prepared():
    """The shipped table prepared with the default config, once per test module."""
    from tasks.config import TrainConfig
    from tasks.data import load_table, prepare
    from tasks.trainer import prep_spec

    config = TrainConfig()
    return prepare(load_table(config.data), prep_spec(config))


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store for one test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # MLflow's fluent layer keeps the last URI set in this process over the env
    return uri


def task_states(flow_run_id: str) -> dict[str, str]:
    """The state of each task run of a flow run, by task name (Completed, Cached, ...)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def write_mixed_classification_csv(path: Path, rows: int = 400, seed: int = 0) -> Path:
    """Numeric and string features with missing values, and string labels."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=rows)
    x2 = rng.normal(loc=50, scale=10, size=rows)
    colour = rng.choice(["red", "green", "blue"], size=rows)
    signal = 2 * x1 + (colour == "red") * 2.5 - (colour == "blue") * 1.5 + (x2 - 50) / 20
    frame = pd.DataFrame({
        "x1": x1,
        "x2": x2,
        "colour": colour,
        "label": np.where(signal + rng.normal(scale=0.3, size=rows) > 0.3, "yes", "no"),
    })
    frame.loc[rng.choice(rows, 25, replace=False), "x2"] = np.nan
    frame.loc[rng.choice(rows, 20, replace=False), "colour"] = np.nan
    frame.to_csv(path, index=False)
    return path


def write_regression_csv(path: Path, rows: int = 500, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=rows), rng.uniform(0, 10, size=rows)
    kind = rng.choice(["a", "b"], size=rows)
    price = 100 + 30 * x1 + 5 * x2 + np.where(kind == "a", 20.0, -20.0) + rng.normal(scale=2, size=rows)
    pd.DataFrame({"x1": x1, "x2": x2, "kind": kind, "price": price}).to_csv(path, index=False)
    return path
