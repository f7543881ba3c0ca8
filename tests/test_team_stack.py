"""The team stack of docker-compose.yml, natively: PostgreSQL, the Prefect server with API auth,
the MLflow server with basic-auth and artifact serving, the deployments of prefect.yaml and a
worker of the GPU work pool (tests/stack.py starts them as compose would, on 127.0.0.1).

A run triggered through the API and one triggered with `prefect deployment run --param ...` both
complete, and the MLflow server holds both with their metrics and model; a scheduled run fires.
CI runs this (`.ci/run` installs PostgreSQL); deselect it locally with -m "not integration".
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from uuid import UUID
from zoneinfo import ZoneInfo

import pytest
from stack import REPO, TeamStack, postgres_bin, started_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEPLOYMENT = "train/default"
EXPERIMENT = "team-stack"
RUN_DEADLINE_S = 900  # a deadline for a hung run, not a timing assertion


@pytest.fixture(scope="module")
def team_stack():
    if postgres_bin("initdb") is None:
        message = "PostgreSQL's server programs are missing (apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them (.ci/run); never skip there
        pytest.skip(message)
    with started_stack() as stack:
        yield stack


@pytest.fixture(scope="module")
def worker(team_stack: TeamStack):
    """compose's CPU worker (the GPU one is the same plus the device reservation)."""
    return team_stack.start_worker("worker-cpu")


@pytest.fixture
def prefect(team_stack: TeamStack):
    """A Prefect client of the stack's server, with its credentials."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: team_stack.prefect_api_url, PREFECT_API_AUTH_STRING: team_stack.prefect_auth}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture
def mlflow_client(team_stack: TeamStack, monkeypatch):
    from mlflow.tracking import MlflowClient

    user, password = team_stack.mlflow_credentials
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(team_stack.mlflow_uri)


def http_status(url: str, method: str = "GET", auth: tuple[str, str] | None = None, host: str | None = None,
                body: dict | None = None) -> int:
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None)
    request.add_header("Content-Type", "application/json")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def wait_for_final_state(client, flow_run_id: UUID, stack: TeamStack):
    deadline = time.monotonic() + RUN_DEADLINE_S
    while time.monotonic() < deadline:
        flow_run = client.read_flow_run(flow_run_id)
        if flow_run.state and flow_run.state.is_final():
            return flow_run
        time.sleep(2)
    logs = "\n".join(f"--- {p.name}\n{p.log_tail(3000)}" for p in stack.processes if p.name.startswith("worker"))
    raise AssertionError(f"flow run {flow_run_id} not finished after {RUN_DEADLINE_S} s:\n{logs}")


def mlflow_run_of(mlflow_client, flow_run_id: UUID):
    runs = mlflow_client.search_runs(
        [e.experiment_id for e in mlflow_client.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
    )
    assert len(runs) == 1, f"MLflow runs of flow run {flow_run_id}: {[r.info.run_id for r in runs]}"
    return runs[0]


def assert_tracked(mlflow_client, flow_run, epochs: int, experiment: str):
    """The MLflow run of a completed flow run: linked both ways, params, per-epoch metrics, a model."""
    run = mlflow_run_of(mlflow_client, flow_run.id)
    assert run.info.status == "FINISHED"
    assert mlflow_client.get_experiment(run.info.experiment_id).name == experiment
    assert f"mlflow_run_id:{run.info.run_id}" in flow_run.tags
    assert run.data.params["epochs"] == str(epochs)
    history = mlflow_client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))  # step = epoch
    assert {"test_accuracy", "test_loss", "val_accuracy", "train_loss"} <= run.data.metrics.keys()
    model_uri = run.data.tags["fitflow.model_uri"]
    model = mlflow_client.get_logged_model(model_uri.removeprefix("models:/"))
    assert model.source_run_id == run.info.run_id
    return run, model_uri


# --- the servers: authentication and separation are on ---------------------------------------------
def test_servers_refuse_requests_without_credentials(team_stack: TeamStack):
    api = team_stack.prefect_api_url
    assert http_status(f"{api}/health") == 200  # compose's healthcheck needs no credentials
    assert http_status(f"{api}/flows/filter", "POST", body={}) == 401
    user, _, password = team_stack.prefect_auth.partition(":")
    assert http_status(f"{api}/flows/filter", "POST", auth=(user, "wrong"), body={}) == 401
    assert http_status(f"{api}/flows/filter", "POST", auth=(user, password), body={}) == 200

    search = f"{team_stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    credentials = team_stack.mlflow_credentials
    assert http_status(f"{team_stack.mlflow_uri}/health") == 200
    assert http_status(search) == 401
    assert http_status(search, auth=(credentials[0], "wrong")) == 401
    assert http_status(search, auth=credentials) == 200
    # host-header protection: a name that is not in --allowed-hosts is refused (DNS rebinding)
    assert http_status(search, auth=credentials, host="attacker.example:5000") == 403


def test_prefect_and_mlflow_roles_cannot_open_each_others_database(team_stack: TeamStack):
    import psycopg2

    port, variables = team_stack.ports["postgres"], team_stack.variables
    for user, password, own, other in (("mlflow", variables["MLFLOW_DB_PASSWORD"], "mlflow", "prefect"),
                                       ("prefect", variables["PREFECT_DB_PASSWORD"], "prefect", "mlflow")):
        psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname=own).close()
        with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
            psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname=other)


# --- runs triggered through the API and the CLI ------------------------------------------------------
def test_runs_triggered_through_the_api_and_the_cli_complete_and_are_tracked(team_stack, worker, prefect, mlflow_client):
    from prefect.deployments import run_deployment

    api_run = run_deployment(DEPLOYMENT, parameters={"epochs": 2, "experiment": EXPERIMENT, "run_name": "from-api"},
                             timeout=0, client=prefect)
    cli = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", DEPLOYMENT, "--param", "epochs=3",
         "--param", f"experiment={EXPERIMENT}", "--param", "run_name=from-cli"],
        env=team_stack.client_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    cli_run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", cli.stdout)[1])

    finished = {name: wait_for_final_state(prefect, run_id, team_stack)
                for name, run_id in (("api", api_run.id), ("cli", cli_run_id))}
    for name, flow_run in finished.items():
        assert flow_run.state.is_completed(), f"{name} run ended {flow_run.state.name}: {flow_run.state.message}"
    api_mlflow, api_model = assert_tracked(mlflow_client, finished["api"], epochs=2, experiment=EXPERIMENT)
    cli_mlflow, _ = assert_tracked(mlflow_client, finished["cli"], epochs=3, experiment=EXPERIMENT)
    assert (api_mlflow.info.run_name, cli_mlflow.info.run_name) == ("from-api", "from-cli")
    print(f"\nflow runs {api_run.id} (API), {cli_run_id} (CLI) -> MLflow runs "
          f"{api_mlflow.info.run_id}, {cli_mlflow.info.run_id}; model {api_model}")

    # a teammate's process loads the model through the server's artifact proxy, with credentials
    user, password = team_stack.mlflow_credentials
    load = subprocess.run(
        [sys.executable, "-c",
         "import json, sys, mlflow, pandas as pd; m = mlflow.pyfunc.load_model(sys.argv[1]);"
         " print(json.dumps(m.predict(pd.read_csv(sys.argv[2]).head(4))['prediction'].tolist()))",
         api_model, str(REPO / "data" / "breast_cancer.csv")],
        env={**os.environ, "MLFLOW_TRACKING_URI": team_stack.mlflow_uri, "MLFLOW_TRACKING_USERNAME": user,
             "MLFLOW_TRACKING_PASSWORD": password},
        cwd=team_stack.root, capture_output=True, text=True, timeout=300,
    )
    assert load.returncode == 0, load.stderr[-3000:]
    predictions = json.loads(load.stdout.strip().splitlines()[-1])
    assert len(predictions) == 4 and set(predictions) <= {"benign", "malignant"}  # the original labels


# --- schedules ---------------------------------------------------------------------------------------
def test_nightly_schedule_is_registered_in_its_time_zone_and_a_scheduled_run_fires(team_stack, worker, prefect, mlflow_client):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.schedules import IntervalSchedule

    deployment = prefect.read_deployment_by_name(DEPLOYMENT)
    (nightly,) = deployment.schedules
    assert (nightly.schedule.cron, nightly.schedule.timezone, nightly.active) == ("0 2 * * *", "Europe/Berlin", True)

    def scheduled_runs():
        return prefect.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
        )

    # the server's scheduler has put the next nights on the calendar: 02:00 in Berlin
    deadline = time.monotonic() + 300  # the service plans about once a minute; a guard against a hang
    while not (upcoming := [r for r in scheduled_runs() if r.auto_scheduled]) and time.monotonic() < deadline:
        time.sleep(2)
    assert upcoming, "the scheduler created no run for the nightly schedule"
    for flow_run in upcoming:
        local = flow_run.expected_start_time.astimezone(ZoneInfo("Europe/Berlin"))
        assert (local.hour, local.minute) == (2, 0) and local > datetime.now(ZoneInfo("Europe/Berlin"))
        assert flow_run.parameters["experiment"] == "nightly"

    # a second schedule of the deployment, due 30 s from now (then daily), and the worker starts its
    # run when it is due, as it will at 02:00. The run is put on the calendar at once through the
    # deployment's schedule endpoint (the function the scheduler service runs; idempotent, so the
    # service adds no second run): the service, about once a minute, could come after the due time.
    due = datetime.now(ZoneInfo("Europe/Berlin")) + timedelta(seconds=30)
    (soon,) = prefect.create_deployment_schedules(
        deployment.id, [(IntervalSchedule(interval=timedelta(days=1), anchor_date=due, timezone="Europe/Berlin"), True)],
        parameters={"epochs": 1, "experiment": f"{EXPERIMENT}-scheduled"},
    )
    try:
        prefect.request("POST", "/deployments/{id}/schedule", path_params={"id": deployment.id}, json={})
        deadline = time.monotonic() + 300
        fired = []
        while not fired and time.monotonic() < deadline:
            fired = [r for r in prefect.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
                if r.auto_scheduled and r.parameters.get("experiment") == f"{EXPERIMENT}-scheduled"
                and r.state_type not in (StateType.SCHEDULED, StateType.PENDING)]
            time.sleep(2)
        assert fired, f"the run of the schedule due at {due} never started"
    finally:
        prefect.delete_deployment_schedule(deployment.id, soon.id)
    (flow_run,) = fired
    assert flow_run.expected_start_time.timestamp() == pytest.approx(due.timestamp(), abs=1)
    flow_run = wait_for_final_state(prefect, flow_run.id, team_stack)
    assert flow_run.state.is_completed(), f"scheduled run ended {flow_run.state.name}: {flow_run.state.message}"
    run, _ = assert_tracked(mlflow_client, flow_run, epochs=1, experiment=f"{EXPERIMENT}-scheduled")
    print(f"\nscheduled flow run {flow_run.id} ({flow_run.expected_start_time}) -> MLflow run {run.info.run_id}")


def test_a_run_against_a_server_that_refuses_the_credentials_fails_before_training(team_stack: TeamStack, monkeypatch):
    """The training flow's first tracking step (start_run -> prepare_store) on the real basic-auth server:
    one request, no retries (counted, not timed)."""
    import urllib3.util.connection

    from tasks.errors import TrackingError
    from tasks.tracking import prepare_store

    port, tries, connect = team_stack.ports["mlflow"], [], urllib3.util.connection.create_connection

    def counted(address, *args, **kwargs):
        if address[1] == port:
            tries.append(address)
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counted)
    user, password = team_stack.mlflow_credentials
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password + "-wrong")
    with pytest.raises(TrackingError, match=rf"MLflow tracking server {team_stack.mlflow_uri} refused the credentials \(HTTP 401\)"):
        prepare_store(team_stack.mlflow_uri)
    assert len(tries) == 1, tries
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    prepare_store(team_stack.mlflow_uri)  # the right credentials pass
