"""docker-compose.yml without a Docker engine: the Compose specification's JSON schema, the
security and ordering rules of the team stack, and every service command parsed by the CLI
that will run it (the installed prefect, mlflow and fitflow).

The schema is the compose-spec.json that check-jsonschema ships (PyPI, pinned in the `test`
extra; Apache-2.0, from the compose-spec project, licence beside it in the package).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from importlib.metadata import version
from importlib.resources import files

import click
import jsonschema
import pytest
import yaml
from stack import (
    COMPOSE_FILE,
    MLFLOW_ENTRYPOINT,
    REPO,
    SECRET_SPECIALS,
    InterpolationError,
    interpolate,
    load_compose,
    read_env_file,
)

ENV_EXAMPLE = read_env_file(REPO / ".env.example")
COMPOSE = load_compose()
SERVICES = COMPOSE["services"]
WORKERS = ("worker", "worker-cpu")
_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:-|-|:\?|\?|:\+|\+)?")


def compose_schema() -> dict:
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))


def schema_errors(document: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def resolved(value) -> str:
    return interpolate(str(value), ENV_EXAMPLE)


# --- the Compose specification ---------------------------------------------------------------
def test_compose_file_is_valid_against_the_compose_specification():
    assert compose_schema()["title"] == "Compose Specification"
    assert schema_errors(COMPOSE) == []


def test_the_schema_check_rejects_what_compose_would_reject():
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "healthy"  # not a condition
    broken["services"]["postgres"]["healthcheck"]["intervall"] = "10s"  # misspelt
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["gpus"] = 1  # not a key there
    errors = schema_errors(broken)
    assert any(e.startswith("services/mlflow/depends_on") for e in errors), errors
    assert any(e.startswith("services/postgres/healthcheck") and "intervall" in e for e in errors), errors
    assert any(e.startswith("services/worker/deploy/resources/reservations") for e in errors), errors


# --- credentials, ports, order -----------------------------------------------------------------
def _environment_items():
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            yield name, key, str(value)


SECRET_KEY = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY")
SECRETS_OF_ENV = sorted(name for name, value in ENV_EXAMPLE.items() if "change-me" in value)


def _argv(service: str) -> list[str]:
    spec = SERVICES[service]
    return [str(arg) for arg in [*(spec.get("entrypoint") or []), *(spec.get("command") or [])]]


def test_every_credential_comes_from_env_through_the_environment_only():
    """From .env, into a variable of the environment: never written into this file, never an argument
    (any user of the machine sees arguments in `ps`), never inside a URI (a password holding `@ : / %`
    breaks a URI, and compose cannot percent-encode: PostgreSQL clients read PGPASSWORD instead)."""
    for service, key, value in _environment_items():
        if SECRET_KEY.search(key):
            assert _REFERENCE.search(value), f"{service}.{key} is a credential written into docker-compose.yml"
        assert not re.search(r"://[^/@\s]+:[^@\s]*@", value), f"{service}.{key}: a password inside a URI: {value}"
    secret_reference = re.compile(r"\$\{(" + "|".join(SECRETS_OF_ENV) + r")\b")
    for service in SERVICES:
        for arg in _argv(service):
            assert not secret_reference.search(arg), f"{service}: a secret on its command line: {arg}"
            assert not re.search(r"://[^/@\s]+:[^@\s]*@", arg), f"{service}: a password inside a URI: {arg}"
    for key in ("PREFECT_SERVER_DATABASE_CONNECTION_URL",):
        assert "@postgres:5432/" in SERVICES["prefect-server"]["environment"][key]
    assert SERVICES["prefect-server"]["environment"]["PGPASSWORD"].startswith("${PREFECT_DB_PASSWORD:?")
    assert SERVICES["mlflow"]["environment"]["PGPASSWORD"].startswith("${MLFLOW_DB_PASSWORD:?")


def test_the_init_script_passes_no_password_as_an_argument():
    """psql reads the passwords with \\getenv; the script expands them only in its own `:?` checks."""
    for script in sorted((REPO / "docker" / "postgres" / "initdb").glob("*.sh")):
        for line in script.read_text().splitlines():
            if re.search(r"\$\{?(PREFECT|MLFLOW)_DB_PASSWORD", line):
                assert re.fullmatch(r': "\$\{\w+_DB_PASSWORD:\?[^}]*\}"', line.strip()), f"{script.name}: {line}"
        text = script.read_text()
        assert "\\getenv prefect_password PREFECT_DB_PASSWORD" in text and "\\getenv mlflow_password MLFLOW_DB_PASSWORD" in text


def _check_env(values: dict[str, str]) -> subprocess.CompletedProcess:
    """docker/check-env.sh with the environment compose gives the check-env service for `values` (.env)."""
    env = {key: interpolate(str(value), values) for key, value in SERVICES["check-env"]["environment"].items()}
    return subprocess.run(["sh", str(REPO / "docker" / "check-env.sh")], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=60)


def test_the_example_values_of_env_refuse_to_start_the_stack():
    check = SERVICES["check-env"]
    assert "./docker/check-env.sh:/check-env.sh:ro" in check["volumes"] and check["entrypoint"] == ["sh", "/check-env.sh"]
    assert set(SECRETS_OF_ENV) <= check["environment"].keys(), "a secret of .env.example the check never sees"
    # first: PostgreSQL (and so everything after it) starts only once the check passed
    assert SERVICES["postgres"]["depends_on"] == {"check-env": {"condition": "service_completed_successfully"}}
    refused = _check_env(ENV_EXAMPLE)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused
    assert all(name in refused.stderr for name in SECRETS_OF_ENV) and "openssl rand" in refused.stderr
    one_left = {**ENV_EXAMPLE, **{name: f"own-{name}{SECRET_SPECIALS}" for name in SECRETS_OF_ENV[1:]}}
    refused = _check_env(one_left)
    assert refused.returncode == 2 and SECRETS_OF_ENV[0] in refused.stderr and SECRETS_OF_ENV[1] not in refused.stderr
    edited = {**ENV_EXAMPLE, **{name: f"own-{name}{SECRET_SPECIALS}" for name in SECRETS_OF_ENV}}
    assert _check_env(edited).returncode == 0


def test_the_basic_auth_ini_keeps_a_percent_encoded_password(tmp_path):
    """The entrypoint writes the auth store's URI into MLflow's ini, whose parser reads `%` as the start of
    an interpolation: MLflow's own reader gets the URI back exactly, `%40%3A%2F%25` included."""
    uri = "postgresql+psycopg2://mlflow:p%40%3A%2F%25w@postgres:5432/mlflow_auth"
    env = {"PATH": os.environ["PATH"], "MLFLOW_AUTH_DATABASE_URI": uri, "MLFLOW_AUTH_ADMIN_PASSWORD": "a@:/%",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "k", "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic-auth.ini")}
    read = subprocess.run(["sh", str(MLFLOW_ENTRYPOINT), sys.executable, "-c",
                           "from mlflow.server.auth.config import read_auth_config as r; c = r();"
                           " print(c.database_uri); print(c.admin_password)"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr[-2000:]
    assert read.stdout.splitlines() == [uri, "a@:/%"]


def test_the_worker_signs_in_to_mlflow_with_its_own_account():
    """Not the admin's: the admin's password reaches only the MLflow server, the job that makes the
    worker's account, and the check of .env."""
    for worker in WORKERS:
        env = SERVICES[worker]["environment"]
        assert env["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_WORKER_USERNAME:-fitflow-worker}"
        assert env["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_WORKER_PASSWORD:?")
        assert SERVICES[worker]["depends_on"]["mlflow-worker-account"] == {"condition": "service_completed_successfully"}
    holders = sorted(service for service, _, value in _environment_items() if "MLFLOW_ADMIN_PASSWORD" in value)
    assert holders == ["check-env", "mlflow", "mlflow-worker-account"]
    account = SERVICES["mlflow-worker-account"]
    assert account["build"] == SERVICES["mlflow"]["build"] and account["image"] == SERVICES["mlflow"]["image"]
    assert account["entrypoint"] == ["python", "/usr/local/bin/mlflow-worker-account"]
    dockerfile = (REPO / "docker" / "mlflow" / "Dockerfile").read_text()
    assert "COPY --chmod=644 worker_account.py /usr/local/bin/mlflow-worker-account" in dockerfile
    assert interpolate(account["environment"]["MLFLOW_WORKER_USERNAME"], ENV_EXAMPLE) != ENV_EXAMPLE["MLFLOW_ADMIN_USERNAME"]


def test_every_required_variable_is_in_env_example_and_env_is_not_committed():
    text = COMPOSE_FILE.read_text()
    referenced = {m["name"]: m["op"] for m in _REFERENCE.finditer(text)}
    required = {name for name, op in referenced.items() if op in (":?", "?", None)}
    assert required <= ENV_EXAMPLE.keys(), f"missing from .env.example: {sorted(required - ENV_EXAMPLE.keys())}"
    assert {"POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "PREFECT_AUTH_STRING",
            "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= required
    with pytest.raises(InterpolationError, match="PREFECT_AUTH_STRING"):  # compose refuses to start without it
        interpolate(SERVICES["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"], {})
    ignored = subprocess.run(["git", "check-ignore", "--quiet", ".env"], cwd=REPO)
    assert ignored.returncode == 0, ".env must be git-ignored"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", ".env.example"], cwd=REPO, capture_output=True)
    assert tracked.returncode == 0, ".env.example must be committed"


def test_every_published_port_is_bound_to_loopback():
    published = []
    for name, service in SERVICES.items():
        for entry in service.get("ports") or []:
            host_ip = resolved(entry).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {entry} beyond this machine"
            published.append(name)
    assert sorted(published) == ["mlflow", "prefect-server"]


def test_services_start_in_order_once_their_dependencies_are_healthy():
    expected = {
        "prefect-server": {"postgres": "service_healthy"},
        "mlflow": {"postgres": "service_healthy"},
        "postgres": {"check-env": "service_completed_successfully"},
        "mlflow-worker-account": {"mlflow": "service_healthy"},
        "setup": {"prefect-server": "service_healthy"},
        "deployments": {"setup": "service_completed_successfully"},
        "worker": {"prefect-server": "service_healthy", "mlflow": "service_healthy",
                   "mlflow-worker-account": "service_completed_successfully",
                   "deployments": "service_completed_successfully"},
    }
    expected["worker-cpu"] = expected["worker"]
    for name, dependencies in expected.items():
        declared = {dep: spec["condition"] for dep, spec in SERVICES[name]["depends_on"].items()}
        assert declared == dependencies, name
        for dependency, condition in dependencies.items():
            if condition == "service_healthy":
                assert SERVICES[dependency]["healthcheck"]["test"], dependency
    for name, service in SERVICES.items():  # a healthcheck that is Python must at least compile
        test = service.get("healthcheck", {}).get("test", [])
        if test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"{name} healthcheck", "exec")


def test_postgres_has_separate_databases_from_an_init_script_and_a_named_volume():
    postgres = SERVICES["postgres"]
    mounts = dict(volume.split(":")[:2][::-1] for volume in postgres["volumes"])
    assert mounts["/var/lib/postgresql/data"] in COMPOSE["volumes"]
    init_dir = REPO / mounts["/docker-entrypoint-initdb.d"]
    scripts = sorted(init_dir.glob("*.sh"))
    assert scripts and all(os.access(s, os.X_OK) for s in scripts)
    sql = "\n".join(s.read_text() for s in scripts)
    for statement in ("CREATE DATABASE prefect OWNER prefect", "CREATE DATABASE mlflow OWNER mlflow",
                      "CREATE ROLE prefect LOGIN", "CREATE ROLE mlflow LOGIN"):
        assert statement in sql
    url = SERVICES["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert url == "postgresql+asyncpg://prefect@postgres:5432/prefect"
    assert "postgresql+psycopg2://mlflow@postgres:5432/mlflow" in SERVICES["mlflow"]["command"]
    assert SERVICES["mlflow"]["environment"]["MLFLOW_AUTH_DATABASE_URI"] == "postgresql+psycopg2://mlflow@postgres:5432/mlflow_auth"


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_mlflow_serves_artifacts_behind_basic_auth_and_host_checks():
    mlflow = SERVICES["mlflow"]
    argv = [resolved(arg) for arg in mlflow["command"]]
    assert "--serve-artifacts" in argv and _option(argv, "--app-name") == "basic-auth"
    assert _option(argv, "--artifacts-destination") == "/mlartifacts"
    assert "mlartifacts:/mlartifacts" in mlflow["volumes"] and "mlartifacts" in COMPOSE["volumes"]
    allowed = _option(argv, "--allowed-hosts").split(",")
    # the workers reach it as mlflow:5000, a browser as 127.0.0.1 / localhost on the published port
    assert {"mlflow:5000", "127.0.0.1:5000", "localhost:5000"} == set(allowed)
    assert set(_option(argv, "--cors-allowed-origins").split(",")) == {"http://127.0.0.1:5000", "http://localhost:5000"}
    env = mlflow["environment"]
    assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_DATABASE_URI"} <= env.keys()
    for worker in WORKERS:
        worker_env = SERVICES[worker]["environment"]
        assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"} <= worker_env.keys()


def test_gpu_worker_reserves_an_nvidia_gpu_and_the_cpu_variant_reserves_none():
    gpu, cpu = SERVICES["worker"], SERVICES["worker-cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and resolved(device["count"]) == "1"
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert ENV_EXAMPLE["COMPOSE_PROFILES"] == "gpu"
    for worker in (gpu, cpu):
        argv = [resolved(arg) for arg in worker["command"]]
        assert argv[:3] == ["prefect", "worker", "start"] and _option(argv, "--pool") == "gpu-pool"
    same = {key: value for key, value in gpu.items() if key not in ("profiles", "deploy")}
    assert same == {key: value for key, value in cpu.items() if key != "profiles"}


def test_images_match_the_installed_versions_and_the_project_layout():
    assert SERVICES["prefect-server"]["image"].startswith(f"prefecthq/prefect:{version('prefect')}-")
    mlflow_dockerfile = (REPO / SERVICES["mlflow"]["build"]["context"] / "Dockerfile").read_text()
    assert f'"mlflow[auth]=={version("mlflow")}"' in mlflow_dockerfile
    assert "ENTRYPOINT" in mlflow_dockerfile and MLFLOW_ENTRYPOINT.name in mlflow_dockerfile
    dockerfile = (REPO / SERVICES["worker"]["build"]["context"] / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "FITFLOW_REPO=/app" in dockerfile
    for path in ("flows", "tasks", "data", "prefect.yaml", "pyproject.toml"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", dockerfile, re.M), path
    # `deployments` registers FITFLOW_REPO of the image as the working directory: the worker's image
    assert SERVICES["deployments"]["build"] == SERVICES["worker"]["build"] == SERVICES["worker-cpu"]["build"]
    assert SERVICES["deployments"]["image"] == SERVICES["worker"]["image"]
    prefect_yaml = (REPO / "prefect.yaml").read_text()
    assert "{{ $FITFLOW_REPO }}" in prefect_yaml and "gpu-pool" in prefect_yaml


# --- each command, parsed by the CLI that runs it ----------------------------------------------
def parse_command(argv: list[str]) -> str:
    """Parse argv with the installed program's own parser (nothing runs); raises on a bad command."""
    program, args = argv[0], argv[1:]
    if program == "prefect":
        from prefect.cli._app import _app

        _, root, _ = _app.meta.parse_args(args, print_error=False, exit_on_error=False)
        command, _, _ = _app.parse_args(list(root.arguments["tokens"]), print_error=False, exit_on_error=False)
        return f"{command.__module__}.{command.__name__}"
    if program == "mlflow":
        from mlflow.cli import cli

        with cli.make_context("mlflow", list(args)) as ctx:
            name, command, rest = cli.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
            with command.make_context(name, rest, parent=ctx):
                return f"mlflow {name}"
    if program == "fitflow":
        from flows.cli import build_parser

        return f"fitflow {build_parser().parse_args(args).command}"
    raise AssertionError(f"no parser known for {program}")


@pytest.mark.parametrize("service", [name for name, spec in SERVICES.items() if spec.get("command")])
def test_service_command_is_accepted_by_the_installed_cli(service):
    argv = [resolved(arg) for arg in SERVICES[service]["command"]]
    expected = {
        "prefect-server": "prefect.cli.server.start",
        "mlflow": "mlflow server",
        "setup": "fitflow setup",
        "deployments": "prefect.cli.deploy._commands.deploy",
        "worker": "prefect.cli.worker.start",
        "worker-cpu": "prefect.cli.worker.start",
    }
    assert parse_command(argv) == expected[service]


@pytest.mark.parametrize("argv", [
    ["prefect", "server", "start", "--hots", "0.0.0.0"],
    ["prefect", "worker", "start", "--pool", "gpu-pool", "--limit", "one"],
    ["mlflow", "server", "--app-name", "basic_auth"],
    ["mlflow", "server", "--serve-artefacts"],
])
def test_the_command_check_rejects_a_bad_command(argv):
    from cyclopts import CycloptsError

    with pytest.raises((CycloptsError, click.ClickException)):
        parse_command(argv)


def test_fitflow_command_check_rejects_a_bad_command(capsys):
    with pytest.raises(SystemExit):
        parse_command(["fitflow", "setup", "--cpus", "1"])
    assert "--cpus" in capsys.readouterr().err


# --- compose's interpolation, as tests/stack.py implements it ----------------------------------
def test_interpolation_follows_compose():
    values = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d}/${EMPTY:-d}/${UNSET:-d}/${EMPTY-d}/${UNSET-d}", values) == "x/d/d//d"
    assert interpolate("${SET:+alt}|${EMPTY:+alt}|${EMPTY+alt}|$SET|$$SET", values) == "alt||alt|x|$SET"
    assert interpolate("${SET:?missing}", values) == "x"
    with pytest.raises(InterpolationError, match="EMPTY"):
        interpolate("${EMPTY:?set EMPTY}", values)
    with pytest.raises(InterpolationError, match="UNSET"):
        interpolate("${UNSET?set UNSET}", values)
    assert interpolate("${EMPTY?set EMPTY}", values) == ""


# --- supply chain: what the images are built from ------------------------------------------------
DOCKERFILES = [REPO / "Dockerfile", REPO / "docker" / "mlflow" / "Dockerfile"]


def _base_images() -> list[str]:
    pulled = [service["image"] for service in SERVICES.values() if "image" in service and "build" not in service]
    built_from = [line.split()[1] for path in DOCKERFILES for line in path.read_text().splitlines() if line.startswith("FROM ")]
    return pulled + built_from


def test_every_image_is_pinned_to_an_exact_release():
    """major.minor.patch (PostgreSQL numbers its releases major.minor), with a digest or without."""
    floating = [image for image in _base_images()
                if not (re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image)
                        or re.fullmatch(r"postgres:\d+\.\d+", image))]
    assert not floating, f"pin these to an exact release: {floating}"
    python = platform.python_version()  # the images run the Python the tests ran on
    assert all(image.startswith(f"python:{python}-") for image in _base_images() if image.startswith("python:"))


def test_images_install_every_package_from_constraints():
    for path in DOCKERFILES:
        installs = [line for line in path.read_text().splitlines() if "pip install" in line]
        assert installs and all(re.search(r"-c \S*constraints\.txt", line) for line in installs), (path, installs)
    assert SERVICES["mlflow"]["build"]["additional_contexts"]["project"] == "."
