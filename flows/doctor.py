"""`fitflow doctor`: close MLflow runs left RUNNING by a flow run that is over.

A run's own code ends its MLflow run FINISHED, FAILED or KILLED, even on cancellation. Only
a process that dies without running any code (SIGKILL, the OOM killer, a lost machine) leaves
a run RUNNING; under a worker or `fitflow serve` its Prefect flow run then ends Crashed (or is
marked so by the server). The doctor finds such runs through the `prefect.flow_run_id` tag and
closes them with the status that matches the flow run's final state, the reason in the
`fitflow.closed_by` tag.

A CLI run sends no heartbeats, so after a SIGKILL its flow run stays Running. For a run whose
flow run is not over, or not linked, the doctor reads the owner the run recorded in its
checkpoint folder (tasks/run_owner.py): when that process is gone from this host, the run is
closed FAILED and its flow run marked Crashed. An owner on another host is left to a doctor there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from tasks import run_owner

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
                findings.append(_check_owner(client, prefect, run.info.run_id, None, None, fix))
                continue
            try:
                state = prefect.read_flow_run(flow_run_id).state
            except ObjectNotFound:
                findings.append(Finding(run.info.run_id, flow_run_id, None,
                                        "left: flow run not found on this Prefect server (check PREFECT_API_URL)"))
                continue
            if state is None or not state.is_final():
                findings.append(_check_owner(client, prefect, run.info.run_id, flow_run_id,
                                             state.name if state else None, fix))
                continue
            status = _close(client, run.info.run_id, flow_run_id, state, "fitflow doctor") if fix \
                else STATUS[state.type.value]
            findings.append(Finding(run.info.run_id, flow_run_id, state.name,
                                    f"{'closed' if fix else 'would close'} {status}"))
    return findings


def _check_owner(client: MlflowClient, prefect, run_id: str, flow_run_id: str | None, state_name: str | None,
                 fix: bool) -> Finding:
    """A run whose flow run is not over (or that has none): closed when its recorded process is gone."""
    from prefect.states import Crashed

    from flows.environment import fitflow_home

    owner = run_owner.owner_of(fitflow_home() / "checkpoints" / run_id)
    gone = owner.is_gone() if owner else None
    if owner is None or not gone:
        why = ("not linked to a Prefect flow run" if flow_run_id is None else "flow run still going") if owner is None \
            else f"its process ({owner}) {'is on another host: run fitflow doctor there' if gone is None else 'still runs'}"
        return Finding(run_id, flow_run_id, state_name, f"left: {why}")
    if not fix:
        return Finding(run_id, flow_run_id, state_name, "would close FAILED")
    reason = f"its process ({owner}) is gone without ending the run (killed outright: SIGKILL, the OOM killer)"
    client.set_tag(run_id, "fitflow.closed_by", f"fitflow doctor: {reason}")
    client.set_terminated(run_id, "FAILED")
    if flow_run_id:
        prefect.set_flow_run_state(flow_run_id, Crashed(message=f"fitflow doctor: {reason}"), force=True)
    return Finding(run_id, flow_run_id, "Crashed" if flow_run_id else None, "closed FAILED")


def close_runs_of_flow_run(flow, flow_run, state) -> None:
    """Prefect state hook (on_crashed, on_cancellation of the train, sweep and predict flows).

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
