"""Every MLflow private API fitflow uses, each with why no public API serves.

tests/test_private_api_contract.py imports each one and checks what fitflow relies on, so an
MLflow upgrade that removes or changes one fails there rather than in a user's run. Prefect's
are in flows/prefect_private.py: tasks/ never imports prefect, so one module cannot hold both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from mlflow.entities import Metric

# `log_batch` of MLflow's REST API as one HTTP request with its own timeout and no retries.
# MlflowClient retries each call for about four minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7,
# backoff factor 2) and reads that policy only from process-wide environment variables
# (mlflow#5744), so changing it would change every other MLflow call of the process too.
# `http_request` is what MLflow's REST store sends with, and it takes the policy per call; the
# request body is the LogBatch message as MLflow's REST store encodes it, with the credentials
# MlflowClient would use (MLFLOW_TRACKING_USERNAME, ...). All four are in mlflow.utils and
# mlflow.protos, which MLflow does not document as API. Importing them costs nothing:
# mlflow.tracking already imported them.
from mlflow.protos.service_pb2 import LogBatch
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.proto_json_utils import message_to_json
from mlflow.utils.rest_utils import http_request, verify_rest_response

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"


def log_batch_once(tracking_uri: str, run_id: str, timeout_s: float) -> Callable[[list[Metric]], None]:
    """A function that logs a batch of metrics to the run on the HTTP tracking server at
    `tracking_uri` in one request: it raises on a failure or after `timeout_s`, never retries."""
    creds = get_default_host_creds(tracking_uri)

    def send(metrics: list[Metric]) -> None:
        body = json.loads(message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in metrics])))
        response = http_request(creds, LOG_BATCH, "POST", max_retries=0, backoff_factor=0, timeout=timeout_s, json=body)
        verify_rest_response(response, LOG_BATCH)

    return send


def import_sqlite_store() -> None:
    """Import MLflow's SQL tracking store without opening one: what the first MlflowClient on a
    sqlite URI imports (alembic and SQLAlchemy's ORM with it, 0.5 s of CPU here). `fitflow train`
    does it while its embedded Prefect server starts (flows/cli.py); the run opens the store."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


# MLflow checks a logged model's pip requirements against the installed packages (a warning on a
# mismatch); its first check maps every installed distribution to its modules
# (importlib_metadata.packages_distributions over each distribution's file list: 0.56 s of CPU
# here, once per process). Every log_model with pip_requirements pays it, the model logging of a
# run too. No public API builds the map ahead: `fitflow train` builds it while its embedded Prefect
# server starts (flows/cli.py) instead of inside the model logging.
def map_installed_packages() -> None:
    """Build MLflow's map of installed distributions to modules now (once per process)."""
    from mlflow.utils.requirements_utils import _init_packages_to_modules_map

    _init_packages_to_modules_map()


# Metrics into a local sqlite store as one multi-row INSERT. `MlflowClient.log_batch` reaches MLflow's
# SqlAlchemyStore, which builds one SQLAlchemy ORM object per value and flushes them through the
# ORM's unit of work: about 54 us of CPU per value on the project's machine, 21 ms for one epoch's
# 391 per-step losses, spent on the metrics delivery thread while holding the GIL, so it comes out
# of the training thread's epoch (docs/benchmarks.md, per-step logging). The same rows as one Core
# INSERT through the store's own session take about 3 ms. No public API writes metrics any other
# way. What is used: the client's store (`MlflowClient._tracking_client.store`), its session maker
# (the pragmas MLflow sets on sqlite: foreign keys, busy timeout), the `metrics` table's model, and
# the store's own `_get_run`/`_check_run_is_active` (a deleted run refuses values, as log_batch
# does), `sanitize_metric_value` (NaN and infinities as MLflow stores them) and
# `_update_latest_metrics_if_necessary` (the run's latest value per key, by MLflow's rule). A value
# already stored (same key, step, timestamp and value: the table's primary key) is skipped, as
# log_batch skips it. Another store (a server, PostgreSQL, MySQL) gets None: the caller logs
# through the client.
def sqlite_log_batch(client: MlflowClient, run_id: str) -> Callable[[list[Metric]], None] | None:
    """A function that logs a batch of metrics to the run as `client.log_batch` would, with one
    INSERT for all of them, when the client's store is MLflow's SQL store on sqlite; else None."""
    import sqlalchemy
    from mlflow.store.tracking.dbmodels.models import SqlMetric
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = client._tracking_client.store
    if not isinstance(store, SqlAlchemyStore) or store.engine.dialect.name != "sqlite":
        return None
    insert = sqlalchemy.insert(SqlMetric.__table__).prefix_with("OR IGNORE")

    def send(metrics: list[Metric]) -> None:
        rows, newest = [], {}
        for metric in metrics:
            is_nan, value = store.sanitize_metric_value(metric.value)
            row = {"run_uuid": run_id, "key": metric.key, "value": value, "timestamp": metric.timestamp,
                   "step": metric.step, "is_nan": is_nan}
            rows.append(row)
            kept = newest.get(metric.key)
            if kept is None or (row["step"], row["timestamp"], value) > (kept["step"], kept["timestamp"], kept["value"]):
                newest[metric.key] = row
        if not rows:
            return
        with store.ManagedSessionMaker(read_only=False) as session:
            store._check_run_is_active(store._get_run(session=session, run_uuid=run_id))
            session.execute(insert, rows)
            store._update_latest_metrics_if_necessary([SqlMetric(**row) for row in newest.values()], session)

    return send


def system_metrics_collectors(run_id: str, sampling_interval_s: float, tracking_uri: str):
    """MLflow's system metrics monitor, for its collectors (`.monitors`: CPU, memory, disk, network,
    and each NVIDIA or AMD GPU), `collect_metrics`/`aggregate_metrics`, and the sampling interval and
    node id as MLflow's variables set them; its own thread is never started.

    Its module is not documented API. The public way to use it, `mlflow.start_run(
    log_system_metrics=True)`, binds it to the fluent thread-local active run and to `end_run`,
    which fitflow never uses (runs are addressed by id and end FAILED or KILLED too), and its
    thread waits out MLflow's retries when the server is away (see tasks/system_metrics.py).
    Imported here, not at the top: it imports psutil and probes for NVML, which only runs need.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    return SystemMetricsMonitor(run_id, sampling_interval=sampling_interval_s, tracking_uri=tracking_uri)
