"""Every Prefect private API fitflow uses, each with why no public API serves.

tests/test_private_api_contract.py imports each one and checks what fitflow relies on, so a
Prefect upgrade that removes or changes one fails there rather than in a user's run. MLflow's
are in tasks/mlflow_private.py: tasks/ never imports prefect, so one module cannot hold both.

Importing this module is cheap. Importing Prefect's server package takes about 3 s, so its
internals are imported inside the function that uses them, in the process that needs them.
"""

from __future__ import annotations

# The embedded server (flows/embedded_server.py) runs what Prefect's own temporary server runs:
# uvicorn on the server app's factory, with the two switches `create_app` reads from the
# environment: ephemeral (only the background services a temporary server needs) and final (the
# only app of the process, so Prefect frees what only a second app would need). Prefect's public
# ways to run a server do not fit: `prefect server start` runs every service of a standing
# server, and the temporary server (SubprocessASGIServer, itself internal) picks a port in
# 8000-8999 and takes any server answering there for its own.
SERVER_APP_FACTORY = "prefect.server.api.server:create_app"
EPHEMERAL_SERVER_ENV = {"PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def prepare_server_database() -> None:
    """The two start-up steps of Prefect's server app (`create_app`'s lifespan), in this process:
    the database migrations, then the block type registration, memoized in PREFECT_HOME/
    memo_store.toml so that servers started later skip it.

    Prefect runs them only inside the app's start-up; `prefect server database upgrade` runs the
    migrations but not the registration, and only the private decorator writes the memo.
    flows/prefect_database.py runs it in a process of its own: importing Prefect's server
    package would cost the command's process about 3 s.
    """
    import asyncio

    from prefect.server.api.server import _memoize_block_auto_registration
    from prefect.server.database import provide_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration

    @_memoize_block_auto_registration
    async def add_block_types() -> None:
        session = await provide_database_interface().session()
        async with session:
            await run_block_auto_registration(session=session)

    async def prepare() -> None:
        await provide_database_interface().create_db()
        await add_block_types()

    asyncio.run(prepare())


def refresh_settings() -> None:
    """Read Prefect's settings again from the environment and the working directory (.env,
    prefect.toml): the preloaded process of `fitflow up` (flows/preloaded.py) imported Prefect before
    the command it forks into had its environment. Prefect reads them once, at import, into its
    global settings context; `refresh_global_settings_context` is what Prefect itself calls after
    its plugins change the environment, and is not documented."""
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
