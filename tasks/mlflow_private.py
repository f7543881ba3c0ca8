"""Every MLflow private API fitflow uses, each with why no public API serves.

tests/test_private_api_contract.py imports each one and checks what fitflow relies on, so an
MLflow upgrade that removes or changes one fails there rather than in a user's run. Prefect's
are in flows/prefect_private.py: tasks/ never imports prefect, so one module cannot hold both.
"""

from __future__ import annotations

import json
from collections.abc import Callable

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
