"""Where runtime state lives, and the environment every entry point sets up first.

All state (MLflow store and artifacts, checkpoints, Prefect's home with its database and the
prepared-data cache) lives under one directory: $FITFLOW_HOME, by default `.fitflow/` in the
repository (git ignores it). Explicit settings win: MLFLOW_TRACKING_URI, PREFECT_API_URL and
PREFECT_HOME are left alone when set.

Light on purpose: every command imports it before prefect, and Dask workers import it to report
their tracking URI (flows/sweep.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tasks.checkout import REPO
from tasks.redaction import redact_uri

PREFECT_DEFAULTS = {
    # Prefect's telemetry heartbeat writes to the embedded server's sqlite database and made
    # concurrent runs fail with "database is locked"; it reports nothing fitflow needs.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # the embedded server migrates a fresh database in 20-27 s on a cold machine; Prefect's
    # default start-up timeout is shorter
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "fitflow",
    # the plain functions log through "fitflow" outside flow runs too (notebooks, tests)
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # MLflow draws download bars when it validates a model's input example: noise in run logs
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def fitflow_home() -> Path:
    return Path(os.environ.get("FITFLOW_HOME") or REPO / ".fitflow").expanduser().resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the local sqlite store under FITFLOW_HOME."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{fitflow_home() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of the store at `uri` keeps its artifacts; None: the server's default.

    A sqlite store's go beside the database (MLflow's default is ./mlruns of the CWD). On the MLflow
    server of `fitflow up`, whose store is this FITFLOW_HOME's sqlite file, the same folder: its
    default would be `mlflow-artifacts:/`, which only a server can resolve, so an experiment made
    with the stack up could not take a run once it is down (on the sqlite file, as `make run`)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    home = fitflow_home()
    stack = running_stack(home)
    if stack is not None and uri == stack["mlflow_url"]:
        return (home / "mlartifacts").as_uri()
    return None


def configure_environment() -> None:
    """Set defaults for Prefect and MLflow; call once, before prefect is imported."""
    home = fitflow_home()
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    stack = running_stack(home)
    if stack is not None:  # `fitflow up` runs for this home: its servers, not an embedded one and the sqlite file
        os.environ.setdefault("PREFECT_API_URL", stack["prefect_api_url"])
        os.environ.setdefault("MLFLOW_TRACKING_URI", stack["mlflow_url"])
        if os.environ["PREFECT_API_URL"] == stack["prefect_api_url"]:
            os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))  # the stack's server's home: one cache
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
    # Nothing fitflow reads is a pickle (weights with weights_only, JSON, pt2); refusing them makes
    # MLflow's loaders in this process and its children fail instead of running a pickle's code.
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    if redact_uri(tracking_uri()) != tracking_uri():
        # MLflow prints "View run ... at: <tracking URI>/#/..." as a run ends, user info and all;
        # fitflow prints and links the run itself, redacted
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    logging.getLogger("fitflow").setLevel(logging.INFO)  # Prefect forwards it (PREFECT_LOGGING_EXTRA_LOGGERS)


def running_stack(home: Path) -> dict | None:
    """Where the servers of `fitflow up` for this home are (its stack.json, flows/local_stack.py), while
    its process lives; None otherwise. Cheap: one small file and one signal-0, no network."""
    try:
        stack = json.loads((home / "stack.json").read_text(encoding="utf-8"))
        os.kill(int(stack["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stack
