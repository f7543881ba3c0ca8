"""Deployments: prefect.yaml is their single definition.

`prefect --no-prompt deploy --all` (what `make deploy` runs) registers them for workers of the
`gpu-pool` work pool; `fitflow serve` serves the very same deployments, schedules included,
from one process (Prefect's serve), the quick path for one machine without workers.
`fitflow setup --gpus N` creates the work pool and the GPU concurrency limits they rely on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from tasks.checkout import REPO
from tasks.errors import ConfigError

log = logging.getLogger("fitflow")

PREFECT_YAML = REPO / "prefect.yaml"
GPU_POOL = "gpu-pool"
GPU_TAG = "gpu"  # the train_model task carries this tag: a tag concurrency limit caps parallel training


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The `deployments:` entries of prefect.yaml."""
    specs = yaml.safe_load(path.read_text(encoding="utf-8")).get("deployments") or []
    if not specs:
        raise ConfigError(f"{path} declares no deployments")
    return specs


def require_server() -> str:
    """Serving and setup need a real Prefect server (the embedded one dies with the process)."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise ConfigError(
            "no Prefect server: start one with `make prefect-server` (or `prefect server start`) "
            "and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return url


def runner_deployments(specs: list[dict[str, Any]]) -> list:
    """prefect.yaml entries as RunnerDeployments for `serve`, schedules and triggers included (the work
    pool is not used there)."""
    from prefect.events import DeploymentTriggerTypes
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron
    from pydantic import TypeAdapter

    DeploymentTriggerAdapter = TypeAdapter(DeploymentTriggerTypes)  # noqa: N806 (prefect's own name for it)

    deployments = []
    for spec in specs:
        flow = load_flow_from_entrypoint(str(REPO / spec["entrypoint"]))
        schedules = []
        for schedule in spec.get("schedules") or []:
            if "cron" not in schedule:
                raise ConfigError(f"deployment '{spec['name']}': fitflow serve supports cron schedules only")
            schedules.append(Cron(schedule["cron"], timezone=schedule.get("timezone"), active=schedule.get("active", True),
                                  parameters=schedule.get("parameters") or None))
        deployments.append(flow.to_deployment(
            name=spec["name"], description=spec.get("description"), tags=spec.get("tags"),
            parameters=spec.get("parameters") or {}, schedules=schedules,
            enforce_parameter_schema=spec.get("enforce_parameter_schema", True),
            concurrency_limit=spec.get("concurrency_limit"),
            triggers=[DeploymentTriggerAdapter.validate_python({"name": f"{spec['name']}__automation_{i}", **trigger})
                      for i, trigger in enumerate(spec.get("triggers") or [], start=1)],  # named as `prefect deploy` names them
        ))
    return deployments


def serve(limit: int = 1) -> None:
    """Serve every deployment of prefect.yaml until interrupted; at most `limit` runs at once."""
    import prefect

    require_server()
    prefect.serve(*runner_deployments(deployment_specs()), limit=limit)


# Job variables a flow run may not set: `command` is what the worker runs, `env` what it runs with.
# Anyone with Prefect API access could otherwise run any command on a worker, with its credentials.
LOCKED_JOB_VARIABLES = ("command", "env")


def locked_job_template() -> dict[str, Any]:
    """The process worker's base job template without the `command` and `env` job variables: the
    server rejects a deployment or flow run that sets them (unknown variables are refused), and the
    worker's job configuration no longer reads them, so flow runs start with the worker's own
    command and environment."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    for name in LOCKED_JOB_VARIABLES:
        del template["job_configuration"][name]
        del template["variables"]["properties"][name]
    template["variables"]["additionalProperties"] = False
    return template


def setup(gpus: int = 1, notify_url: str | None = None, notify_block: str | None = None) -> None:
    """Create or update the work pool (its job template locked: `locked_job_template`) and the "gpu"
    tag limit: one training run per GPU; with a notification target, the alert automations too
    (flows/alerts.py)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    require_server()
    template = locked_job_template()
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=GPU_POOL, type="process", concurrency_limit=gpus,
                                                   base_job_template=template))
        except ObjectAlreadyExists:
            client.update_work_pool(GPU_POOL, WorkPoolUpdate(concurrency_limit=gpus, base_job_template=template))
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=gpus)  # creates or updates
        if notify_url or notify_block:
            from flows.alerts import create_alerts

            create_alerts(client, notify_url, notify_block)
    log.info("work pool '%s' and tag limit '%s' set to %d concurrent training run(s)", GPU_POOL, GPU_TAG, gpus)
