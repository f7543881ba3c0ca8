"""The security surface: credentials never leak, and installs are reproducible.

Credentials: a real `mlflow server --app-name basic-auth` on 127.0.0.1 (sqlite stores in a
temporary directory), whose admin password is a distinctive random string. The real `fitflow
train` CLI trains against it (with the session's Prefect test server), once with the password in
MLFLOW_TRACKING_PASSWORD and once inline in MLFLOW_TRACKING_URI; then the string is searched for
in everything the run left behind: MLflow params, tags, metric keys, every artifact of the run
and of its model, the Prefect flow run (parameters, tags, logs, artifacts) and the CLI's
stdout/stderr.

Installs: constraints.txt pins every package of the tested environment (`make lock` writes it,
the Makefile installs with `-c constraints.txt`); the venv must match it, and every dependency
that pyproject.toml declares must be pinned there.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from stack import Process, free_port, wait_http

from tasks.config import TrainConfig
from tasks.redaction import redact_text, redact_uri

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ADMIN = "admin"


@dataclass
class AuthServer:
    uri: str  # http://127.0.0.1:<port>, no credentials
    password: str  # the admin's: distinctive, so any copy of it is a leak


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server` with MLflow's basic-auth app, as the team stack runs it, on sqlite."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    password = "pw-" + secrets.token_hex(16)
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"  # PBKDF2 on every request is slow on 2 shared cores
    )
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    port = free_port()
    argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
            "--artifacts-destination", str(root / "artifacts"), "--app-name", "basic-auth"]
    log = root / "mlflow.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(argv, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    server = Process("mlflow", popen, log)
    try:
        wait_http(server, f"http://127.0.0.1:{port}/health")
        yield AuthServer(f"http://127.0.0.1:{port}", password)
    finally:
        server.stop()


def _train_cli(tmp_path: Path, tracking_env: dict[str, str]) -> subprocess.CompletedProcess:
    """`fitflow train` (epochs 2) on the session's Prefect test server; tracking_env sets MLflow up."""
    from prefect.settings import PREFECT_API_URL

    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_TRACKING_")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), FITFLOW_HOME=str(tmp_path / "home"), **tracking_env)
    result = subprocess.run([str(BIN / "fitflow"), "train", "--epochs", "2", "--experiment", "security"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _everything_the_run_left(server: AuthServer, run_id: str, tmp_path: Path, monkeypatch) -> dict[str, str]:
    """Each place fitflow writes to, as text (artifact files as bytes decoded leniently)."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    # the test reads with the credentials from the environment, as a teammate would
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.password)
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    places = {
        "mlflow params": json.dumps(run.data.params),
        "mlflow tags": json.dumps(run.data.tags),
        "mlflow metric keys": " ".join(run.data.metrics),
        "mlflow run": json.dumps(run.to_dictionary(), default=str),
    }
    model = client.get_logged_model(run.data.tags["fitflow.model_uri"].removeprefix("models:/"))
    places["mlflow logged model"] = json.dumps(model.to_dictionary(), default=str)
    # the model by its own location: a models:/ URI would resolve through MLflow's default store
    folders = {"run": Path(client.download_artifacts(run_id, "", str(tmp_path / "run"))),
               "model": Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                                 dst_path=str(tmp_path / "model"), tracking_uri=server.uri))}
    for name, folder in folders.items():
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        assert files, f"no {name} artifacts downloaded"
        for path in files:
            places[f"artifact {name}/{path.relative_to(folder)}"] = path.read_bytes().decode("latin-1")

    flow_run_id = run.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(flow_run_id)
        logs, offset = [], 0
        while page := prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                        limit=200, offset=offset):
            logs += page
            offset += len(page)
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    places["prefect parameters"] = json.dumps(flow_run.parameters, default=str)
    places["prefect tags"] = " ".join(flow_run.tags)
    places["prefect logs"] = "\n".join(log.message for log in logs)
    places["prefect artifacts"] = "\n".join(f"{a.key} {a.data} {a.description}" for a in artifacts)
    assert "mlflow-run" in places["prefect artifacts"] and "train-summary" in places["prefect artifacts"]
    assert "epoch 2/2" in places["prefect logs"], places["prefect logs"][-2000:]  # the run's own log lines were read
    return places


def _assert_nowhere(secret: str, places: dict[str, str]) -> None:
    leaks = [name for name, text in places.items() if secret in text]
    assert not leaks, f"the password appears in: {', '.join(leaks)}"


@pytest.mark.slow
def test_password_from_the_environment_appears_nowhere(auth_server, prefect_server, tmp_path, monkeypatch):
    result = _train_cli(tmp_path, {"MLFLOW_TRACKING_URI": auth_server.uri, "MLFLOW_TRACKING_USERNAME": ADMIN,
                                   "MLFLOW_TRACKING_PASSWORD": auth_server.password})
    run_id = re.search(r"MLflow run: (\w+)", result.stdout)[1]
    places = _everything_the_run_left(auth_server, run_id, tmp_path, monkeypatch)
    _assert_nowhere(auth_server.password, {**places, "stdout": result.stdout, "stderr": result.stderr})


@pytest.mark.slow
def test_credentials_inline_in_the_tracking_uri_are_redacted(auth_server, prefect_server, tmp_path, monkeypatch):
    inline = auth_server.uri.replace("http://", f"http://{ADMIN}:{auth_server.password}@")
    result = _train_cli(tmp_path, {"MLFLOW_TRACKING_URI": inline})  # no MLFLOW_TRACKING_USERNAME/PASSWORD
    run_id = re.search(r"MLflow run: (\w+)", result.stdout)[1]
    places = _everything_the_run_left(auth_server, run_id, tmp_path, monkeypatch)
    places.update(stdout=result.stdout, stderr=result.stderr)
    _assert_nowhere(auth_server.password, places)
    # the places that name the server still do, without the credentials
    shown = auth_server.uri.replace("http://", "http://***@")
    for name in ("stdout", "prefect logs", "prefect artifacts"):
        assert shown in places[name], f"{name} does not name the server as {shown}"


@pytest.mark.slow
def test_a_refused_inline_password_is_not_repeated_in_the_error(auth_server, monkeypatch):
    from tasks.errors import TrackingError
    from tasks.tracking import prepare_store

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    wrong = "wrong-" + secrets.token_hex(8)
    with pytest.raises(TrackingError, match="refused the credentials") as error:
        prepare_store(auth_server.uri.replace("http://", f"http://{ADMIN}:{wrong}@"))
    assert wrong not in str(error.value) and "http://***@127.0.0.1" in str(error.value)


@pytest.mark.parametrize(("uri", "shown"), [
    ("http://u:p@h:5000", "http://***@h:5000"),
    ("https://token@mlflow.example/prefix", "https://***@mlflow.example/prefix"),
    ("http://u:pa/ss#w@h:5000", "http://***@h:5000"),  # unencoded / and # in the password
    ("postgresql+psycopg2://mlflow:pw@db:5432/mlflow", "postgresql+psycopg2://***@db:5432/mlflow"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),
])
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown


def test_redact_text_hides_user_info_of_every_uri_in_a_message():
    message = ("MlflowException: API request to http://ada:s3cr/t@127.0.0.1:5000/api/2.0/mlflow/runs/get failed "
               "(see https://mlflow.org/docs); retry http://tok3n@host/x")
    shown = redact_text(message)
    assert "s3cr/t" not in shown and "tok3n" not in shown and "ada" not in shown
    assert "http://***@127.0.0.1:5000/api/2.0/mlflow/runs/get" in shown and "https://mlflow.org/docs" in shown


def test_train_config_has_no_field_that_could_carry_a_secret():
    """Flow parameters, CLI flags, YAML keys, MLflow params and tags are TrainConfig's fields: none is a credential."""
    from flows.train import train_flow

    secretive = re.compile(r"pass|secret|token|credential|auth|key|user|login|tracking|uri|url|api", re.IGNORECASE)
    assert [name for name in TrainConfig.flat_fields() if secretive.search(name)] == []
    for name, field in TrainConfig.flat_fields().items():
        assert "Secret" not in str(field.annotation), name
    assert set(train_flow.parameters.properties) == {*TrainConfig.flat_fields(), "resume"}


# --- reproducible installs --------------------------------------------------------------------------
def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _frozen() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    frozen = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"pip freeze: {line!r} is not installed from a registry (name==version); pin it"
            frozen[canonicalize_name(name)] = version
    return frozen


def test_installed_packages_are_exactly_the_pinned_ones():
    pins = _pins()
    drift = []
    for name, version in _frozen().items():
        # torch 2.14.1+cu130 (PyPI) or +cpu (a CPU index), torchvision likewise: the pins leave the build open
        if name not in pins or Version(pins[name]) != Version(Version(version).public):
            drift.append(f"{name}=={version} (pinned: {pins.get(name, 'nothing')})")
    assert not drift, "installed packages differ from constraints.txt; run `make lock` after a deliberate change: " + \
        ", ".join(drift)


def test_every_declared_dependency_is_pinned_within_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pending, seen, requirements = ["test", "bench"], set(), list(project["dependencies"])
    while pending:  # the test extra, the extras it pulls in (fitflow[team]), and the benchmark extra
        extra = pending.pop()
        if extra not in seen:
            seen.add(extra)
            for text in extras[extra]:
                requirement = Requirement(text)
                if canonicalize_name(requirement.name) == "fitflow":
                    pending += requirement.extras
                else:
                    requirements.append(text)
    pins = _pins()
    unpinned = [text for text in map(Requirement, requirements)
                if canonicalize_name(text.name) not in pins
                or not text.specifier.contains(pins[canonicalize_name(text.name)], prereleases=True)]
    assert not unpinned, f"declared in pyproject.toml but not pinned (within range) in constraints.txt: {unpinned}"


def test_torch_floor_excludes_releases_whose_weights_only_loading_can_be_bypassed():
    """Checkpoints and logged models are read with torch.load(weights_only=True); before torch 2.6
    a crafted file could run code through it anyway (CVE-2025-32434)."""
    declared = {canonicalize_name(Requirement(text).name): Requirement(text).specifier
                for text in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert not declared["torch"].contains("2.5.1") and declared["torch"].contains("2.6.0")
    assert not declared["torchvision"].contains("0.20.1")  # torch 2.5's torchvision would pull it back in
