"""Where runtime state lives, and the environment every entry point sets up first.

All state (MLflow store and artifacts, checkpoints, Prefect's home with its database and the
prepared-data cache) lives under one directory: $FITFLOW_HOME, by default `.fitflow/` in the
repository (git ignores it). Explicit settings win: MLFLOW_TRACKING_URI, PREFECT_API_URL and
PREFECT_HOME are left alone when set.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Prefect settings that make the embedded (ephemeral) server reliable on a cold machine
# (GUIDE.md 1.1): no telemetry (its heartbeat also caused "database is locked"), and a start
# timeout that covers the 20-27 s of migrations of a fresh database.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
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


def redact_uri(uri: str) -> str:
    """`uri` fit to print or store: user info (`user:password@`, `token@`) becomes `***@`.

    Credentials belong in MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, but a URI such as
    http://user:pw@host works too (requests takes them from it), so every log line, tag, link and
    error message that names the tracking URI shows it through here. It cuts to the last `@`, not
    to what urllib parses as the host: a password with an unencoded `/`, `?` or `#` fools the parser.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest:
        return uri
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def redact_text(text: str) -> str:
    """Every URI in free text (an error message quoting a request URL) through `redact_uri`."""
    import re

    return re.sub(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+", lambda uri: redact_uri(uri.group()), text)


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database (MLflow's default is ./mlruns of the CWD)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def configure_environment() -> None:
    """Set defaults for Prefect and MLflow; call once, before prefect is imported."""
    home = fitflow_home()
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
    if redact_uri(tracking_uri()) != tracking_uri():
        # MLflow prints "View run ... at: <tracking URI>/#/..." as a run ends, user info and all;
        # fitflow prints and links the run itself, redacted
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    logging.getLogger("fitflow").setLevel(logging.INFO)  # Prefect forwards it (PREFECT_LOGGING_EXTRA_LOGGERS)


class _UserErrorWithoutTraceback(logging.Filter):
    """Drop the traceback from Prefect's failure logs when the error is the user's to fix.

    The message of a FitflowError already says what is wrong and how to fix it; a page of
    engine frames above it only hides that line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from tasks.errors import FitflowError

        if record.exc_info and isinstance(record.exc_info[1], FitflowError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_error_tracebacks() -> None:
    """Install the filter on Prefect's run loggers (after prefect configured its logging)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorWithoutTraceback) for f in logger.filters):
            logger.addFilter(_UserErrorWithoutTraceback())


# The two start-up steps of Prefect's server app (prefect.server.api.server.create_app, 3.9):
# migrations, then the block registration, memoized in PREFECT_HOME/memo_store.toml.
_PREPARE_PREFECT_DATABASE = """
import asyncio
from prefect.server.api.server import _memoize_block_auto_registration
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration

@_memoize_block_auto_registration
async def add_block_types():
    session = await provide_database_interface().session()
    async with session:
        await run_block_auto_registration(session=session)

async def main():
    await provide_database_interface().create_db()
    await add_block_types()

asyncio.run(main())
"""


def migrate_embedded_prefect_database() -> None:
    """Migrate the embedded Prefect server's sqlite database once, under a file lock, before it starts.

    Without PREFECT_API_URL every process starts its own temporary server on PREFECT_HOME's
    database. Four `fitflow train` started at once on a fresh home ran the server's start-up work
    together: servers failed start-up ("duplicate column name", "table ... already exists" in the
    migrations; "UNIQUE constraint failed: block_type.slug" in the block registration) with
    tracebacks in the run's output, and Prefect restarted them up to a minute later; under load
    that can outlast the start-up timeout (GUIDE.md 5, prefect#19771). The first through the lock
    does that work (what the server's start-up does, in a clean process; its block registration
    leaves Prefect's memo that makes servers skip it); the others find a marker naming the Prefect
    version that prepared the database, and go on at once, as does every later run.
    Call after configure_environment(), before the first flow.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    import subprocess
    import sys

    import prefect
    from filelock import FileLock
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = str(PREFECT_API_DATABASE_CONNECTION_URL.value())
    if not url.startswith("sqlite+aiosqlite:///") or ":memory:" in url:
        return  # another database server, or nothing to share
    database = Path(url.removeprefix("sqlite+aiosqlite:///"))
    marker = database.with_name(database.name + ".fitflow-migrated")
    if database.exists() and marker.exists() and marker.read_text() == prefect.__version__:
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.fitflow-lock", timeout=600):
        if database.exists() and marker.exists() and marker.read_text() == prefect.__version__:
            return
        done = subprocess.run([sys.executable, "-c", _PREPARE_PREFECT_DATABASE],
                              check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"preparing Prefect's database {database} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        marker.write_text(prefect.__version__)


@contextmanager
def checkout_first_on_path() -> Iterator[None]:
    """While worker processes are spawned (DDP ranks, local Dask workers): this checkout first on sys.path.

    Spawned processes start with this process' sys.path. Loading a logged model put its code
    folder (MLflow code_paths: a copy of tasks/) at its front, and a worker would import that
    copy, possibly of an older version and without data/, instead of fitflow's own packages.
    """
    saved = list(sys.path)
    sys.path.insert(0, str(REPO))
    try:
        yield
    finally:
        sys.path[:] = saved
