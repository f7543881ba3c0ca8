"""The team stack of docker-compose.yml, started natively on 127.0.0.1 (no Docker engine needed).

Each service runs the command and environment that docker-compose.yml gives it, interpolated the
way compose does (from a variables mapping that plays the part of .env), with only what a
container provides replaced: service host names and container ports become loopback ports, and
container paths become temporary directories. PostgreSQL comes from the distribution's packages
and runs the init scripts that compose mounts into /docker-entrypoint-initdb.d; the MLflow server
runs behind the MLflow image's entrypoint script. Services start in compose's order, each once
the services it depends on answer their health checks, and `TeamStack.close()` stops every
process it started, children included.

Every command line the stack runs is kept (`command_lines`), the psql calls of the init scripts
included (a `psql` on PATH that notes its arguments, then runs the real one), so a test can check
that no secret is ever an argument.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
MLFLOW_ENTRYPOINT = REPO / "docker" / "mlflow" / "entrypoint.sh"
MLFLOW_WORKER_ACCOUNT = REPO / "docker" / "mlflow" / "worker_account.py"
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180  # cold PostgreSQL migrations of both servers on 2 shared cores

# Environment a process keeps from the test process; everything else comes from compose.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "VIRTUAL_ENV")


class InterpolationError(ValueError):
    pass


_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?$", re.S)


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's variable interpolation: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}, ${VAR:+alt}, ${VAR+alt}, and $$ for a literal $."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["plain"]:
            return variables.get(match["plain"], "")
        spec = _BRACED.match(match["braced"])
        if spec is None:
            raise InterpolationError(f"invalid interpolation format: {match[0]!r}")
        name, op, arg = spec["name"], spec["op"], spec["arg"] or ""
        value = variables.get(name)
        empty = not value
        if op is None:
            return value or ""
        if op == ":-":
            return arg if empty else value
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?"):
            if (op == ":?" and empty) or value is None:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return value
        if op == ":+":
            return "" if empty else arg
        return "" if value is None else arg  # "+"

    return _VARIABLE.sub(replace, text)


def load_compose(path: Path = COMPOSE_FILE) -> dict:
    return yaml.safe_load(path.read_text())


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose .env file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin(name: str) -> Path | None:
    """A PostgreSQL server program: on PATH, or in Debian's /usr/lib/postgresql/<major>/bin."""
    found = shutil.which(name)
    if found:
        return Path(found)
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return Path(candidates[-1]) if candidates else None


@dataclass
class Process:
    """A started service: its log file, and a stop that takes its children along."""

    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, timeout: float = 30) -> None:
        try:
            family = [psutil.Process(self.popen.pid), *psutil.Process(self.popen.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for proc in family:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=timeout)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.popen.wait(timeout=10)


@dataclass
class TeamStack:
    """docker-compose.yml's services on loopback ports; see the module docstring."""

    root: Path
    variables: dict[str, str]
    compose: dict = field(default_factory=load_compose)
    ports: dict[str, int] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    command_lines: list[str] = field(default_factory=list)
    _pg_data: Path | None = None
    _pg_ctl: Path | None = None
    _run_as: str | None = None

    # --- what a client needs -------------------------------------------------------------
    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect-server']}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def prefect_auth(self) -> str:
        return self.variables["PREFECT_AUTH_STRING"]

    @property
    def mlflow_credentials(self) -> tuple[str, str]:
        """The MLflow admin's."""
        return self.variables["MLFLOW_ADMIN_USERNAME"], self.variables["MLFLOW_ADMIN_PASSWORD"]

    @property
    def worker_credentials(self) -> tuple[str, str]:
        """The worker's own MLflow account."""
        return self.variables["MLFLOW_WORKER_USERNAME"], self.variables["MLFLOW_WORKER_PASSWORD"]

    def secrets(self) -> dict[str, str]:
        """The secret values of .env, by name: what must never be an argument of a process."""
        values = {name: value for name, value in self.variables.items()
                  if re.search(r"PASSWORD|SECRET|AUTH_STRING", name) and value}
        values["PREFECT_AUTH_STRING"] = self.prefect_auth.partition(":")[2]  # the user name is no secret
        return values

    def client_env(self) -> dict[str, str]:
        """Environment of a CLI on the host: the compose worker's, pointed at the loopback ports."""
        return self.service_env("worker")

    # --- compose -> native ---------------------------------------------------------------
    def _host_map(self) -> dict[str, str]:
        """Service host:container-port -> 127.0.0.1:native-port."""
        mapping = {}
        for name, port in self.ports.items():
            target = self.container_port(name)
            if target:
                mapping[f"{name}:{target}"] = f"127.0.0.1:{port}"
        return mapping

    def _path_map(self) -> dict[str, Path]:
        """Container paths -> native ones: the image's work dir is the repository; files the images copy in."""
        return {"/app": REPO, "/var/lib/fitflow": self.root / "fitflow-state", "/mlartifacts": self.root / "mlartifacts",
                "/usr/local/bin/mlflow-worker-account": MLFLOW_WORKER_ACCOUNT}

    def _mounted(self, service: str, path: str) -> Path:
        """A file that compose mounts into the service's container, in the repository."""
        for volume in self.compose["services"][service].get("volumes", []):
            source, target = volume.split(":")[:2]
            if target == path:
                return (REPO / source).resolve()
        raise LookupError(f"docker-compose.yml mounts nothing at {path} in {service}")

    def container_port(self, service: str) -> int | None:
        """The container side of the service's published port, or the port its healthcheck uses."""
        spec = self.compose["services"][service]
        for entry in spec.get("ports", []):
            return int(interpolate(str(entry), self.variables).rsplit(":", 1)[1])
        if service == "postgres":
            return 5432
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", " ".join(spec.get("healthcheck", {}).get("test", [])))
        return int(url[1]) if url else None

    def _native(self, text: str) -> str:
        text = interpolate(text, self.variables)
        for old, new in self._host_map().items():
            text = re.sub(rf"(?<![\w.-]){re.escape(old)}(?![\w@.-])", new, text)
        for old, new in self._path_map().items():
            if text == old or text.startswith(old + "/"):
                text = str(new) + text[len(old):]
        return text

    def service_env(self, service: str, **extra: str) -> dict[str, str]:
        env = {key: os.environ[key] for key in _INHERITED if key in os.environ}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        for key, value in (self.compose["services"][service].get("environment") or {}).items():
            env[key] = self._native(str(value))
        env.update(extra)
        return env

    def service_argv(self, service: str, **options: str) -> list[str]:
        """The service's entrypoint and command, natively; `options` replace the values of flags (--host ...)."""
        spec = self.compose["services"][service]
        argv = [self._native(str(arg)) for arg in [*spec.get("entrypoint", []), *spec.get("command", [])]]
        for flag, value in options.items():
            argv[argv.index(flag) + 1] = value
        return argv

    def healthcheck_url(self, service: str) -> str:
        test = " ".join(self.compose["services"][service]["healthcheck"]["test"])
        url = re.search(r"http://127\.0\.0\.1:\d+/[\w/]*", test)[0]
        return url.replace(f"127.0.0.1:{self.container_port(service)}", f"127.0.0.1:{self.ports[service]}")

    # --- processes -----------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = REPO, user: str | None = None) -> Process:
        self.command_lines.append(" ".join(argv))
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, user=user)
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def run(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = REPO, timeout: float = 300,
            user: str | None = None) -> subprocess.CompletedProcess:
        self.command_lines.append(" ".join(argv))
        result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL, user=user)
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(argv)}\n{result.stdout}\n{result.stderr}")
        if result.returncode != 0:
            raise RuntimeError(f"{name}: {' '.join(argv)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def wait_http(self, process: Process, url: str, timeout: float = START_TIMEOUT_S) -> None:
        wait_http(process, url, timeout)

    # --- the services, in compose's order ------------------------------------------------
    def start(self) -> TeamStack:
        self.check_env()
        for name in ("postgres", "prefect-server", "mlflow"):
            self.ports[name] = free_port()
        self.variables.setdefault("PREFECT_PORT", str(self.ports["prefect-server"]))
        self.variables.setdefault("MLFLOW_PORT", str(self.ports["mlflow"]))
        self.variables.setdefault("MLFLOW_ARTIFACTS_DESTINATION", str(self.root / "mlartifacts"))
        self.variables.setdefault("MLFLOW_WORKERS", "1")  # 2 shared cores
        self.start_postgres()
        prefect = self.start_prefect_server()
        mlflow = self.start_mlflow()
        self.wait_http(prefect, self.healthcheck_url("prefect-server"))
        self.wait_http(mlflow, self.healthcheck_url("mlflow"))
        self.run("mlflow-worker-account", self.service_argv("mlflow-worker-account"),
                 self.service_env("mlflow-worker-account"), cwd=self.root)
        self.run_deployments()
        return self

    def check_env(self) -> None:
        """compose's first service: its script refuses example values (RuntimeError with its line)."""
        script = self._mounted("check-env", "/check-env.sh")
        argv = [str(script) if arg == "/check-env.sh" else arg for arg in self.service_argv("check-env")]
        self.run("check-env", argv, self.service_env("check-env"), cwd=self.root)

    def start_postgres(self) -> None:
        initdb, pg_ctl, pg_isready = postgres_bin("initdb"), postgres_bin("pg_ctl"), postgres_bin("pg_isready")
        if not (initdb and pg_ctl and pg_isready):
            raise FileNotFoundError("PostgreSQL server programs not found (Debian: apt-get install postgresql)")
        env = self.service_env("postgres")
        superuser = env["POSTGRES_USER"]
        data, sockets = self.root / "pgdata", self.root / "pgsocket"
        data.mkdir()
        sockets.mkdir()
        pwfile = self.root / "pgpass"
        pwfile.write_text(env["POSTGRES_PASSWORD"] + "\n")
        # PostgreSQL refuses to run as root; the distribution's package has a `postgres` user.
        self._run_as = "postgres" if os.geteuid() == 0 else None
        if self._run_as:
            for path in (self.root, data, sockets, pwfile):
                shutil.chown(path, user=self._run_as)
        server_env = {key: os.environ[key] for key in ("PATH", "LANG") if key in os.environ}
        self.run("initdb", [str(initdb), "--pgdata", str(data), "--username", superuser, "--pwfile", str(pwfile),
                            "--auth-local", "trust", "--auth-host", "scram-sha-256", "--encoding", "UTF8"],
                 server_env, cwd=self.root, user=self._run_as)
        pwfile.unlink()
        self._pg_data, self._pg_ctl = data, pg_ctl
        options = f"-c listen_addresses=127.0.0.1 -c port={self.ports['postgres']} -c unix_socket_directories={sockets}"
        self.run("pg_ctl-start", [str(pg_ctl), "start", "--pgdata", str(data), "--wait", "--timeout", "120",
                                  "--log", str(self.root / "postgres.log"), "--options", options],
                 server_env, cwd=self.root, user=self._run_as)
        # The image's entrypoint: each init script, against the server's socket as the superuser,
        # with a psql that notes its arguments first
        init_env = {**env, "PGHOST": str(sockets), "PGPORT": str(self.ports["postgres"])}
        shim = self._noting_psql()
        for script in sorted(self.initdb_dir().glob("*.sh")):
            self.run(f"initdb-{script.stem}", ["bash", str(script)],
                     {**init_env, "PATH": f"{shim}{os.pathsep}{init_env['PATH']}"}, cwd=self.root)
        self.command_lines.extend((shim / "calls").read_text().splitlines())
        # compose's healthcheck command, over TCP
        test = self.compose["services"]["postgres"]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        self.run("postgres-healthcheck", ["sh", "-c", test[1].replace("$$", "$")],
                 {**init_env, "PGHOST": "127.0.0.1"}, cwd=self.root)

    def _noting_psql(self) -> Path:
        """A folder with a `psql` that appends its command line to `calls` there, then runs the real psql."""
        real = postgres_bin("psql")
        shim = self.root / "psql-shim"
        shim.mkdir()
        (shim / "calls").touch()
        (shim / "psql").write_text(f'#!/bin/sh\nprintf "psql %s\\n" "$*" >> "{shim}/calls"\nexec "{real}" "$@"\n')
        (shim / "psql").chmod(0o755)
        return shim

    def initdb_dir(self) -> Path:
        return self._mounted("postgres", "/docker-entrypoint-initdb.d")

    def start_prefect_server(self) -> Process:
        env = self.service_env("prefect-server", PREFECT_HOME=str(self.root / "prefect-server-home"))
        argv = self.service_argv("prefect-server", **{"--host": "127.0.0.1", "--port": str(self.ports["prefect-server"])})
        return self.spawn("prefect-server", argv, env)

    def start_mlflow(self) -> Process:
        env = self.service_env("mlflow", MLFLOW_AUTH_CONFIG_PATH=str(self.root / "mlflow-basic-auth.ini"))
        argv = self.service_argv("mlflow", **{"--host": "127.0.0.1", "--port": str(self.ports["mlflow"])})
        mlflow_home = self.root / "mlflow-home"
        mlflow_home.mkdir()
        return self.spawn("mlflow", ["sh", str(MLFLOW_ENTRYPOINT), *argv], env, cwd=mlflow_home)

    def run_deployments(self) -> None:
        """The one-shot services `setup` then `deployments`, in the repository (the image's /app)."""
        for job in ("setup", "deployments"):
            env = self.service_env(job, FITFLOW_REPO=str(REPO), FITFLOW_HOME=str(self.root / "fitflow-state"))  # the image's ENV
            self.run(job, self.service_argv(job), env, timeout=600)

    def start_worker(self, service: str = "worker-cpu") -> Process:
        """A worker service (`worker` is the same without the GPU reservation), once healthy."""
        self.ports[service] = free_port()
        # its health server listens on all interfaces of its container; here on loopback only
        env = self.service_env(service, PREFECT_WORKER_WEBSERVER_HOST="127.0.0.1",
                               PREFECT_WORKER_WEBSERVER_PORT=str(self.ports[service]))
        process = self.spawn(service, self.service_argv(service), env)
        self.wait_http(process, self.healthcheck_url(service))
        return process

    def close(self) -> None:
        errors = []
        for process in reversed(self.processes):
            try:
                process.stop()
            except Exception as err:  # stop the others all the same
                errors.append(f"{process.name}: {err!r}")
        self.processes.clear()
        if self._pg_data is not None:
            self.run("pg_ctl-stop", [str(self._pg_ctl), "stop", "--pgdata", str(self._pg_data), "--mode", "fast",
                                     "--wait"], {"PATH": os.environ.get("PATH", "")}, cwd=self.root, user=self._run_as)
            self._pg_data = None
        if errors:
            raise RuntimeError("; ".join(errors))


# In every secret: the characters that end a URI's user info, separate its parts, or start an
# escape in a URI and in MLflow's ini file
SECRET_SPECIALS = "@:/%"


def stack_variables() -> dict[str, str]:
    """.env for a test stack: .env.example's settings with fresh random secrets, each holding SECRET_SPECIALS."""
    variables = read_env_file(REPO / ".env.example")
    for key, value in variables.items():
        if "change-me" in value:
            variables[key] = ("admin:" if key == "PREFECT_AUTH_STRING" else "") + "t" + secrets.token_hex(8) + SECRET_SPECIALS
    return variables


class started_stack(ExitStack):
    """`with started_stack(**settings) as stack:` a TeamStack in a temporary directory (`settings` on top of
    `stack_variables()`, as lines added to .env), closed and removed after."""

    def __init__(self, **settings: str):
        super().__init__()
        self.settings = settings

    def __enter__(self) -> TeamStack:
        super().__enter__()
        root = Path(tempfile.mkdtemp(prefix="fitflow-stack-"))
        self.callback(shutil.rmtree, root, ignore_errors=True)
        stack = TeamStack(root=root, variables={**stack_variables(), **self.settings})
        self.callback(stack.close)
        try:
            return stack.start()
        except BaseException:
            self.close()
            raise


def wait_http(process: Process, url: str, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until `url` answers 200; fail at once, with its log, if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{process.name} not healthy at {url} after {timeout:.0f} s:\n{process.log_tail()}")
