"""The embedded Prefect server's sqlite database, migrated once, under a file lock, before any
server starts on it.

Without PREFECT_API_URL every command starts its own temporary server on PREFECT_HOME's
database, and each server migrates the database and registers Prefect's block types as it
starts. Several commands started at once on a fresh home would do that work together and fail
it ("duplicate column name" and "table ... already exists" in the migrations, "UNIQUE
constraint failed: block_type.slug" in the registration; prefect#19771); Prefect restarts such
a server, which under load can outlast the start-up timeout. So the first command through the
lock does that work in a process of its own (`python -m flows.prefect_database`), and leaves
Prefect's memo that makes servers skip the registration and a marker naming the Prefect
version that prepared the database; the others, and every later command, find the marker and
go on at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tasks.checkout import REPO


def migrate_embedded_prefect_database() -> None:
    """Prepare the embedded server's database unless done for this Prefect version.

    Call after configure_environment(), before the first flow. Nothing to do with PREFECT_API_URL
    set, or on a database other than a sqlite file.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    import prefect
    from filelock import FileLock
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = str(PREFECT_API_DATABASE_CONNECTION_URL.value())
    if not url.startswith("sqlite+aiosqlite:///") or ":memory:" in url:
        return  # another database server, or nothing to share
    database = Path(url.removeprefix("sqlite+aiosqlite:///"))
    marker = database.with_name(database.name + ".fitflow-migrated")

    def prepared() -> bool:
        return database.exists() and marker.exists() and marker.read_text() == prefect.__version__

    if prepared():
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.fitflow-lock", timeout=600):
        if prepared():
            return
        # the checkout on the path: `-m` finds it from any working directory, installed or not
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        done = subprocess.run([sys.executable, "-m", "flows.prefect_database"], env={**os.environ, "PYTHONPATH": path},
                              check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"preparing Prefect's database {database} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        marker.write_text(prefect.__version__)


if __name__ == "__main__":
    from flows.prefect_private import prepare_server_database

    prepare_server_database()
