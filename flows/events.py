"""fitflow's Prefect events: their names, the resources they are about, and emitting them.

Events are how the loop's parts hear of each other: `fitflow.data.changed` starts a retrain
(the train deployment's trigger in prefect.yaml), `fitflow.model.promoted` / `.rejected` and
`fitflow.drift.detected` feed the alerts `fitflow setup` creates (Prefect automations). Each
names the MLflow run and the model as related resources, so the Prefect UI's event feed links
them; inside a flow run Prefect adds the flow run (and its flow and deployment) as well.
Without a Prefect API to send to (no PREFECT_API_URL and no flow run), nothing is emitted.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect.events import emit_event

log = logging.getLogger("fitflow")

DATA_CHANGED = "fitflow.data.changed"
MODEL_PROMOTED = "fitflow.model.promoted"
MODEL_REJECTED = "fitflow.model.rejected"
DRIFT_DETECTED = "fitflow.drift.detected"


def registered_model(name: str, version: str | None = None) -> dict[str, str]:
    """A registered model of MLflow's registry as an event's resource (`fitflow.model.<name>`)."""
    resource = {"prefect.resource.id": f"fitflow.model.{name}", "prefect.resource.name": name}
    if version is not None:
        resource["fitflow.model.version"] = str(version)
    return resource


def data_source(source: str, digest: str) -> dict[str, str]:
    """A watched data source (file or folder) as an event's resource (`fitflow.data.<source>`)."""
    return {"prefect.resource.id": f"fitflow.data.{source}", "prefect.resource.name": source,
            "fitflow.data.digest": digest}


def mlflow_run(run_id: str) -> dict[str, str]:
    return {"prefect.resource.id": f"mlflow.run.{run_id}", "prefect.resource.role": "mlflow-run",
            "prefect.resource.name": run_id}


def mlflow_model(model_uri: str) -> dict[str, str]:
    return {"prefect.resource.id": f"mlflow.model.{model_uri}", "prefect.resource.role": "mlflow-model",
            "prefect.resource.name": model_uri}


def emit(event: str, resource: dict[str, str], related: list[dict[str, str]], payload: dict[str, Any]) -> None:
    """Emit one event (sent in the background by Prefect's events worker, flushed at exit)."""
    emitted = (emit_event(event=event, resource=resource, related=related, payload=payload)
               if prefect_api_in_use() else None)
    log.info("event %s about %s%s", event, resource["prefect.resource.id"], "" if emitted else " (no Prefect API: not sent)")


def prefect_api_in_use() -> bool:
    """A Prefect API this process already talks to: PREFECT_API_URL, or the server of the flow or task
    run it is in. Outside both (the Python API in a notebook), Prefect's `emit_event` would start a
    temporary server of its own to take the event (about 10 s and a process here), which nothing
    then reads: the event would not reach the automations of any server the user runs."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value()) or FlowRunContext.get() is not None or TaskRunContext.get() is not None
