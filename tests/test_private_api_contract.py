"""The Prefect and MLflow private APIs fitflow uses, pinned: an upgrade that removes, renames or
changes one fails here rather than in a user's run. Each is named, with why no public API
serves, in flows/prefect_private.py or tasks/mlflow_private.py, and nowhere else."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import threading
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.entities import Metric

from flows.prefect_private import EPHEMERAL_SERVER_ENV, SERVER_APP_FACTORY
from tasks.mlflow_private import LOG_BATCH, log_batch_once, sqlite_log_batch, system_metrics_collectors

REPO = Path(__file__).resolve().parents[1]
PRIVATE_MODULES = {"flows/prefect_private.py", "tasks/mlflow_private.py"}
INTERNALS = ("prefect.server", "mlflow.utils", "mlflow.protos", "mlflow.store", "mlflow.system_metrics.system_metrics_monitor",
             "PREFECT__")
# in a string: code or a module path that names an internal module, or a private Prefect setting
CODE_NAMING_INTERNALS = re.compile(r"(?:^|import |from )((?:prefect\.server|mlflow\.(?:utils|protos|store))[\w.]*"
                                   r"|PREFECT__\w+)", re.M)


def test_the_server_app_factory_takes_no_arguments_and_reads_its_switches_from_the_environment():
    module, _, name = SERVER_APP_FACTORY.partition(":")
    factory = getattr(importlib.import_module(module), name)
    parameters = inspect.signature(factory).parameters.values()
    assert all(p.default is not inspect.Parameter.empty for p in parameters)  # uvicorn --factory calls it bare
    source = inspect.getsource(factory)
    assert all(variable in source for variable in EPHEMERAL_SERVER_ENV), "create_app no longer reads its switches"


def test_the_database_preparation_steps_keep_their_shape():
    from prefect.server.api.server import _memoize_block_auto_registration
    from prefect.server.database import provide_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration

    assert list(inspect.signature(_memoize_block_auto_registration).parameters) == ["fn"]
    assert not inspect.signature(provide_database_interface).parameters
    interface = typing.get_type_hints(provide_database_interface)["return"]
    assert inspect.iscoroutinefunction(interface.create_db) and inspect.iscoroutinefunction(interface.session)
    assert list(inspect.signature(run_block_auto_registration).parameters) == ["session"]


def test_preparing_the_database_migrates_it_and_leaves_the_memo_that_servers_skip_registration_by(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PREFECT_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "flows.prefect_database"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "prefect.db").stat().st_size > 0
    assert "block_auto_registration" in (tmp_path / "memo_store.toml").read_text()


def test_log_batch_is_one_request_of_mlflows_own_endpoint_without_retries():
    from mlflow.protos.service_pb2 import LogBatch, MlflowService
    from mlflow.utils.rest_utils import extract_api_info_for_service

    assert extract_api_info_for_service(MlflowService, "/api/2.0")[LogBatch] == (LOG_BATCH, "POST")
    received: list[tuple[str, dict]] = []
    status = [200]

    class Tracking(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            received.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(status[0])
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Tracking) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        send = log_batch_once(f"http://127.0.0.1:{server.server_port}", "run-1", timeout_s=5)
        send([Metric("val_loss", 0.5, 1000, 3)])
        assert received == [(LOG_BATCH, {"run_id": "run-1", "metrics": [
            {"key": "val_loss", "value": 0.5, "timestamp": 1000, "step": 3}]})]
        status[0] = 503
        with pytest.raises(Exception):  # noqa: B017 (requests' or MLflow's error, either will do)
            send([Metric("val_loss", 0.4, 2000, 4)])
        assert len(received) == 2, "a failed batch was retried inside the call"
        server.shutdown()


def test_the_system_metrics_monitor_hands_out_its_collectors_without_starting_a_thread(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "7")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_NODE_ID", "node-3")
    threads = set(threading.enumerate())  # other tests' threads may end meanwhile: only new ones count
    monitor = system_metrics_collectors("0" * 32, 5.0, f"sqlite:///{tmp_path}/mlflow.db")
    assert set(threading.enumerate()) - threads == set()  # construction starts nothing and asks no server
    assert float(monitor.sampling_interval) == 7.0 and monitor.node_id == "node-3"  # MLflow's variables win
    monitor.collect_metrics()
    sample = monitor.aggregate_metrics()
    assert {"cpu_utilization_percentage", "system_memory_usage_megabytes"} <= set(sample)
    assert all(isinstance(value, int | float) for value in sample.values())
    for collector in monitor.monitors:
        collector.clear_metrics()
        assert not collector.metrics


# underscore names that their library documents as its API
DOCUMENTED = {("os", "_exit"),  # https://docs.python.org/3/library/os.html#os._exit (flows/cli.py `run`)
              ("sys", "_xoptions")}  # https://docs.python.org/3/library/sys.html#sys._xoptions (flows/preloaded_client.py)


def test_no_other_module_uses_a_private_api():
    found = []
    for path in sorted(p for package in ("fitflow", "flows", "tasks") for p in (REPO / package).glob("*.py")):
        name = path.relative_to(REPO).as_posix()
        if name in PRIVATE_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("prefect", "mlflow"):
                names = [node.module, *(alias.name for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.split(".")[0] in ("prefect", "mlflow")]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):  # a script, a uvicorn factory
                names = CODE_NAMING_INTERNALS.findall(node.value)
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                names = [node.attr] if owner not in ("self", "cls") and (owner, node.attr) not in DOCUMENTED else []
            else:
                continue
            private = [n for n in names if any(part.startswith("_") for part in n.split("."))
                       or n.startswith(INTERNALS)]
            found += [f"{name}:{node.lineno}: {n}" for n in private]
    assert not found, ("private names (of Prefect, MLflow or another library) outside flows/prefect_private.py "
                       "and tasks/mlflow_private.py:\n" + "\n".join(found))


def _stored(client, run_id: str) -> tuple[dict, dict]:
    """Each key's history (sorted, NaN as a string so that it compares) and the run's latest values."""
    def number(value: float):
        return "nan" if value != value else value

    latest = client.get_run(run_id).data.metrics
    history = {key: sorted((m.step, m.timestamp, number(m.value)) for m in client.get_metric_history(run_id, key))
               for key in latest}
    return history, {key: number(value) for key, value in latest.items()}


def test_one_insert_into_a_sqlite_store_stores_what_log_batch_stores(tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("contract")
    by_mlflow, by_insert = (client.create_run(experiment).info.run_id for _ in range(2))
    insert = sqlite_log_batch(client, by_insert)
    inf = float("inf")
    batches = [
        [Metric("loss", 0.5, 1000, 1), Metric("loss", 0.4, 1001, 2), Metric("acc", float("nan"), 1000, 1),
         Metric("loss", 0.4, 1001, 2), Metric("loss", 0.6, 999, 2), Metric("acc", inf, 1002, 3)],  # a repeat, a tie
        [Metric("loss", 0.3, 1003, 3), Metric("acc", -inf, 1003, 2), Metric("loss", 0.4, 1001, 2)],  # older, one stored
        [Metric("loss", 0.9, 900, 1), Metric("f1", 0.7, 1004, 4)],  # only older for loss: its latest stays
    ]
    for batch in batches:
        client.log_batch(by_mlflow, metrics=batch)
        insert(batch)
        assert _stored(client, by_insert) == _stored(client, by_mlflow)
    for run_id in (by_mlflow, by_insert):
        client.delete_run(run_id)
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        client.log_batch(by_mlflow, metrics=batches[0])
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        insert(batches[0])
    assert sqlite_log_batch(MlflowClient("http://127.0.0.1:9"), "0" * 32) is None  # a server: not a local store


def test_the_metrics_sender_builds_no_orm_object_per_value_on_sqlite(tmp_path):
    """MLflow's log_batch builds an ORM object per value (about 54 us of CPU each, beside training);
    the sender for a sqlite store inserts the rows as they are: one object per key (its latest value)."""
    from mlflow.store.tracking.dbmodels.models import SqlMetric
    from mlflow.tracking import MlflowClient
    from sqlalchemy import event

    from tasks.metrics_journal import sender

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("orm")).info.run_id
    built = []
    listener = lambda target, args, kwargs: built.append(target)  # noqa: E731
    event.listen(SqlMetric, "init", listener)
    try:
        sender(client, run_id)([Metric("train_loss_step", 1 / step, step, step) for step in range(1, 392)])
    finally:
        event.remove(SqlMetric, "init", listener)
    assert len(built) == 1
    assert [m.step for m in client.get_metric_history(run_id, "train_loss_step")] == list(range(1, 392))


def test_the_sqlite_store_imported_early_is_the_one_a_sqlite_client_opens(tmp_path):
    """`fitflow train` imports it while its Prefect server starts (flows/cli.py): the module must
    stay the one MLflow opens for a sqlite URI, or the early import is spent for nothing."""
    code = ("import sys\nfrom mlflow import MlflowClient\nfrom tasks.mlflow_private import import_sqlite_store\n"
            "import_sqlite_store()\nloaded = sys.modules['mlflow.store.tracking.sqlalchemy_store']\n"
            "store = MlflowClient(sys.argv[1])._tracking_client.store\n"
            "print(isinstance(store, loaded.SqlAlchemyStore))\n")
    done = subprocess.run([sys.executable, "-c", code, f"sqlite:///{tmp_path / 'm.db'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "True"


def test_the_package_map_built_early_is_the_one_the_requirement_check_uses(monkeypatch):
    """`fitflow train` builds it while its Prefect server starts (flows/cli.py): the model logging's
    requirement check must then find it built, not scan the installed distributions again."""
    import importlib_metadata
    from mlflow.utils import requirements_utils

    from tasks.mlflow_private import map_installed_packages

    scans, scan = [], importlib_metadata.packages_distributions
    monkeypatch.setattr(importlib_metadata, "packages_distributions", lambda: scans.append(1) or scan())
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)  # as in a fresh process
    map_installed_packages()
    assert scans == [1]
    requirements_utils.warn_dependency_requirement_mismatches(["torch", "mlflow"])
    assert scans == [1]  # the check did not scan again


def test_refreshing_prefects_settings_reads_the_environment_changed_after_import():
    """The preloaded process of `fitflow up` imports Prefect before the command it forks into has its
    environment (flows/preloaded.py); the child reads Prefect's settings again."""
    script = ("import os; import prefect; from prefect.settings import get_current_settings; "
              "from flows.prefect_private import refresh_settings; "
              "os.environ['PREFECT_API_URL'] = 'http://127.0.0.1:9/api'; before = get_current_settings().api.url; "
              "refresh_settings(); print(before, get_current_settings().api.url)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["None", "http://127.0.0.1:9/api"]
