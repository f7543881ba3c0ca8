"""The team stack of docker-compose.yml, natively: PostgreSQL, the Prefect server with API auth,
the MLflow server with basic-auth and artifact serving, the deployments of prefect.yaml and a
worker of the GPU work pool (tests/stack.py starts them as compose would, on 127.0.0.1).

A run triggered through the API and one triggered with `prefect deployment run --param ...` both
complete, and the MLflow server holds both with their metrics and model, owned by the worker's own
(non-admin) MLflow account; a scheduled run fires; a failed run reaches the alert webhook of .env's
FITFLOW_NOTIFY_URL (a receiver on loopback). The secrets hold `@ : / %` and are on no command line;
flow runs cannot set the worker's command or environment; .env.example's values are refused.
CI runs this (`.ci/run` installs PostgreSQL); deselect it locally with -m "not integration".
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from uuid import UUID
from zoneinfo import ZoneInfo

import psutil
import pytest
from stack import REPO, SECRET_SPECIALS, TeamStack, postgres_bin, read_env_file, started_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEPLOYMENT = "train/default"
EXPERIMENT = "team-stack"
RUN_DEADLINE_S = 900  # a deadline for a hung run, not a timing assertion


class Webhook:
    """The alerts' receiver, on loopback: keeps each JSON body; `wait_for` wakes on each delivery."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.delivered = threading.Condition()
        webhook = self

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.end_headers()
                with webhook.delivered:
                    webhook.bodies.append(body)
                    webhook.delivered.notify_all()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, *words: str) -> str:
        """The first message holding every word; waits on deliveries (the deadline bounds a hang only)."""
        def found() -> str | None:
            return next((b["text"] for b in self.bodies if all(w in b["text"] for w in words)), None)

        with self.delivered:
            self.delivered.wait_for(found, timeout=RUN_DEADLINE_S)
            message = found()
        assert message, f"no alert with {words} within {RUN_DEADLINE_S} s; received {self.bodies}"
        return message


def _require_postgres() -> None:
    if postgres_bin("initdb") is None:
        message = "PostgreSQL's server programs are missing (apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them (.ci/run); never skip there
        pytest.skip(message)


@pytest.fixture(scope="module")
def webhook():
    receiver = Webhook()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def team_stack(webhook):
    _require_postgres()
    with started_stack(FITFLOW_NOTIFY_URL=webhook.url) as stack:  # .env with the alerts' webhook set
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


def test_the_stack_runs_on_secrets_holding_uri_and_ini_special_characters(team_stack: TeamStack):
    """Every service above answered with these: no URI broke on `@ : / %`, nor MLflow's ini on `%`."""
    for name, value in team_stack.secrets().items():
        assert value.endswith(SECRET_SPECIALS), name


def test_no_secret_is_ever_on_a_command_line(team_stack: TeamStack, worker):
    """What `ps` shows every user of the machine: each command the stack ran (the init scripts' psql
    calls too) and every process running now, the servers' own workers included."""
    assert any(line.startswith("psql ") for line in team_stack.command_lines), "the init script's psql was not seen"
    running = []
    for process in team_stack.processes:
        try:
            family = [psutil.Process(process.popen.pid), *psutil.Process(process.popen.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in family:
            try:
                running.append(" ".join(proc.cmdline()))
            except psutil.NoSuchProcess:
                pass
    assert any("mlflow" in line and "server" in line for line in running), running
    for name, secret in team_stack.secrets().items():
        shown = [line for line in [*team_stack.command_lines, *running] if secret in line]
        assert not shown, f"{name} is on a command line: {shown[0]}"


def test_the_stack_refuses_to_start_on_the_example_values(tmp_path):
    """.env copied from .env.example and left as it is: one line naming each secret, nothing started."""
    stack = TeamStack(root=tmp_path, variables=read_env_file(REPO / ".env.example"))
    with pytest.raises(RuntimeError) as refused:
        stack.start()
    line = next(line for line in str(refused.value).splitlines() if line.startswith("error:"))
    assert "still has the example value" in line and "openssl rand" in line
    for name in ("POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "PREFECT_AUTH_STRING",
                 "MLFLOW_ADMIN_PASSWORD", "MLFLOW_WORKER_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert name in line
    assert stack.processes == [] and not (tmp_path / "pgdata").exists()


def test_flow_runs_cannot_set_the_workers_command_or_environment(team_stack: TeamStack, worker, prefect, mlflow_client):
    """The work pool's job template has no `command` or `env` variable (anything else would run on the
    worker, with its credentials): the API refuses a flow run that sets one; a deployment that carries
    them (Prefect checks a deployment's variables only when its pool changes) gets none of its runs
    created, and a run created before they were set runs the flow, with the worker's own environment."""
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.states import Scheduled

    deployment = prefect.read_deployment_by_name(DEPLOYMENT)
    pool = prefect.read_work_pool(deployment.work_pool_name)
    assert not {"command", "env"} & (pool.base_job_template["variables"]["properties"].keys()
                                     | pool.base_job_template["job_configuration"].keys())
    marker = team_stack.root / "ran-a-command-of-the-api-user"
    admin, admin_password = team_stack.mlflow_credentials
    overrides = {"command": f"touch {marker}",
                 "env": {"MLFLOW_TRACKING_USERNAME": admin, "MLFLOW_TRACKING_PASSWORD": admin_password}}
    for name, value in overrides.items():
        with pytest.raises(PrefectHTTPStatusError) as refused:
            prefect.create_flow_run_from_deployment(deployment.id, parameters={"epochs": 1}, job_variables={name: value})
        assert refused.value.response.status_code == 422, refused.value.response.text

    # a run waiting on the calendar; then the deployment gets the overrides; then the run is due
    waiting = prefect.create_flow_run_from_deployment(
        deployment.id, parameters={"epochs": 1, "experiment": f"{EXPERIMENT}-locked"},
        state=Scheduled(scheduled_time=datetime.now(ZoneInfo("UTC")) + timedelta(days=1)))
    prefect.update_deployment(deployment.id, DeploymentUpdate(job_variables=overrides))
    try:
        with pytest.raises(PrefectHTTPStatusError) as refused:
            prefect.create_flow_run_from_deployment(deployment.id, parameters={"epochs": 1})
        assert refused.value.response.status_code == 422, refused.value.response.text
        prefect.set_flow_run_state(waiting.id, Scheduled(scheduled_time=datetime.now(ZoneInfo("UTC"))), force=True)
        flow_run = wait_for_final_state(prefect, waiting.id, team_stack)
    finally:
        prefect.update_deployment(deployment.id, DeploymentUpdate(job_variables={}))
    assert flow_run.state.is_completed(), f"{flow_run.state.name}: {flow_run.state.message}"
    assert not marker.exists(), "the worker ran the command a job variable gave it"
    run = mlflow_run_of(mlflow_client, flow_run.id)
    assert run.info.user_id == team_stack.worker_credentials[0], "the flow run signed in with the env a job variable gave it"


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
    assert_owned_by_the_worker_account(team_stack, mlflow_client, api_mlflow)
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


def assert_owned_by_the_worker_account(team_stack: TeamStack, mlflow_client, run) -> None:
    """The worker signed in as its own account: the run is its own, as is the experiment it created
    (basic-auth's MANAGE for a creator); the account is no admin and cannot act as one."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    worker_user, worker_password = team_stack.worker_credentials
    assert worker_user != team_stack.mlflow_credentials[0]
    assert run.info.user_id == worker_user
    auth = get_app_client("basic-auth", tracking_uri=team_stack.mlflow_uri)  # as the admin (mlflow_client's env)
    assert auth.get_user(worker_user).is_admin is False
    assert auth.get_user_permission(worker_user, "experiment", run.info.experiment_id).permission == "MANAGE"
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = worker_user, worker_password
    with pytest.raises(MlflowException, match="403|PERMISSION_DENIED|Permission denied"):
        auth.update_user_admin(worker_user, True)  # signed in as the worker: it cannot make itself admin


# --- alerts ------------------------------------------------------------------------------------------
def test_a_failed_run_reaches_the_alert_webhook_of_the_env_file(team_stack, worker, prefect, mlflow_client, webhook,
                                                                 tmp_path):
    """FITFLOW_NOTIFY_URL in .env: the setup job created the alerts; a run of the deployment that fails
    (a pretrained weights file that holds no state dict, found as it loads after the MLflow run started) sends one
    naming both runs and the reason."""
    from prefect.deployments import run_deployment

    names = sorted(a.name for a in prefect.read_automations() if a.name.startswith("fitflow:"))  # not the deployments' triggers
    assert names == ["fitflow: champion changed", "fitflow: drift detected", "fitflow: flow run failed"]
    not_weights = tmp_path / "weights.pt"
    not_weights.write_text("these are not weights\n")  # the worker runs on this machine: it reads this file
    failing = run_deployment(DEPLOYMENT, parameters={"epochs": 1, "experiment": f"{EXPERIMENT}-alerts",
                                                     "pretrained": str(not_weights)}, timeout=0, client=prefect)
    flow_run = wait_for_final_state(prefect, failing.id, team_stack)
    assert flow_run.state.is_failed(), flow_run.state
    run = mlflow_run_of(mlflow_client, flow_run.id)
    assert run.info.status == "FAILED"
    message = webhook.wait_for(flow_run.name, run.info.run_id)
    assert "flow 'train'" in message and "Failed" in message and "is not a torch state dict" in message, message


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
