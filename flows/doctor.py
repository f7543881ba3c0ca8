"""`fitflow doctor`: close MLflow runs left RUNNING by a flow run that is over.

A run's own code ends its MLflow run FINISHED, FAILED or KILLED, even on cancellation. Only
a process that dies without running any code (SIGKILL, the OOM killer, a lost machine) leaves
a run RUNNING; its Prefect flow run then ends Crashed (or is marked so by the server). The
doctor finds such runs through the `prefect.flow_run_id` tag and closes them with the status
that matches the flow run's final state, the reason in the `fitflow.closed_by` tag.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

log = logging.getLogger("fitflow")

# Prefect's final state types -> MLflow's terminal run status
STATUS = {"COMPLETED": "FAILED", "FAILED": "FAILED", "CRASHED": "FAILED", "CANCELLED": "KILLED"}


@dataclass
class Finding:
    run_id: str
    flow_run_id: str | None
    flow_run_state: str | None
    action: str  # "closed FAILED", "closed KILLED", "left: flow run still running", ...


def check_runs(tracking_uri: str, fix: bool = True) -> list[Finding]:
    """Every RUNNING MLflow run of the store, and what was done about it."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    running = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=10_000)
    findings = []
    with get_client(sync_client=True) as prefect:
        for run in running:
            flow_run_id = run.data.tags.get("prefect.flow_run_id")
            if not flow_run_id:
                findings.append(Finding(run.info.run_id, None, None, "left: not linked to a Prefect flow run"))
                continue
            try:
                state = prefect.read_flow_run(flow_run_id).state
            except ObjectNotFound:
                findings.append(Finding(run.info.run_id, flow_run_id, None,
                                        "left: flow run not found on this Prefect server (check PREFECT_API_URL)"))
                continue
            if state is None or not state.is_final():
                findings.append(Finding(run.info.run_id, flow_run_id, state.name if state else None,
                                        "left: flow run still going"))
                continue
            status = _close(client, run.info.run_id, flow_run_id, state, "fitflow doctor") if fix \
                else STATUS[state.type.value]
            findings.append(Finding(run.info.run_id, flow_run_id, state.name,
                                    f"{'closed' if fix else 'would close'} {status}"))
    return findings


def close_runs_of_flow_run(flow, flow_run, state) -> None:
    """Prefect state hook (on_crashed, on_cancellation of the train flow).

    The flow's own `finished_or_failed` ends its run whenever the flow's code still runs; this is
    the net under it for a crash or cancellation that killed the flow's process, after which
    Prefect's runner (`fitflow serve`, a worker) runs the hook in its own process. It never waits
    on a tracking server that is down (MLflow would retry for minutes): `fitflow doctor` later.
    """
    from flows.environment import tracking_uri
    from tasks.errors import TrackingError
    from tasks.redaction import redact_uri
    from tasks.tracking import check_server

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            check_server(uri, timeout=5.0)
        except TrackingError:
            log.warning("the MLflow runs of flow run %s stay open: %s is unreachable; run `fitflow doctor` later",
                        flow_run.id, redact_uri(uri))
            return
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    running = client.search_runs(
        experiments, f"tags.`prefect.flow_run_id` = '{flow_run.id}' and attributes.status = 'RUNNING'", max_results=100,
    )
    for run in running:
        status = _close(client, run.info.run_id, str(flow_run.id), state, "Prefect state hook")
        log.warning("MLflow run %s closed %s: its flow run ended %s", run.info.run_id, status, state.name)


def _close(client: MlflowClient, run_id: str, flow_run_id: str, state, closer: str) -> str:
    """End a run with the status matching its flow run's final state, the reason in fitflow.closed_by."""
    status = STATUS[state.type.value]
    client.set_tag(run_id, "fitflow.closed_by",
                   f"{closer}: Prefect flow run {flow_run_id} ended {state.name}: {state.message or ''}"[:5000])
    client.set_terminated(run_id, status)
    return status
