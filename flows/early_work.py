"""Work a training run does anyway, done by the command while its embedded Prefect server starts
(flows/embedded_server.py `prefect_server_starting(meanwhile=...)`): `fitflow train`, `resume` and
`sweep` (a trial does what a training run does). Measured in docs/benchmarks.md."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial

# What a training run imports once it runs (CPU s here, docs/benchmarks.md): torch._dynamo (1.0:
# every torch.optim optimizer imports it), torch.export's tracer (0.4: the pytorch flavor's pt2
# export; a private module, so tests/test_cli.py checks that it imports), matplotlib's Figure
# (about 0.3: the learning-curve plot).
RUN_IMPORTS = ["torch._dynamo", "torch.export._trace", "matplotlib.figure"]


def work_before_a_run() -> list[Callable[[], object]]:
    """What the command does while its embedded Prefect server starts instead of later: with the
    local sqlite store, import MLflow's SQL store (0.5 s of CPU: its first open imports it); map the
    installed packages for MLflow's requirement check of the model logging (0.56 s); then the
    imports of RUN_IMPORTS (tasks/mlflow_private.py says why the first two are private)."""
    def import_sqlite_store() -> None:
        from flows.environment import tracking_uri
        from tasks.mlflow_private import import_sqlite_store

        if tracking_uri().startswith("sqlite:"):
            import_sqlite_store()

    def map_installed_packages() -> None:
        from tasks.mlflow_private import map_installed_packages

        map_installed_packages()

    return [import_sqlite_store, map_installed_packages,
            *(partial(importlib.import_module, name) for name in RUN_IMPORTS)]
