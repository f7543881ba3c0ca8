"""`fitflow up` / `down`: the real local stack (Prefect server, MLflow server, serve) on loopback
ports, the loop through it (a changed file -> event -> triggered retrain -> new MLflow run; the same
data again -> "Unchanged", no new model), and a stop that leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import write_mixed_classification_csv
from custom_models import wait_until_held
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
DEADLINE_S = 600  # bounds a hang only (cold servers, runs in fresh processes, on 2 shared cores)
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FITFLOW_"))}
    return {**env, "FITFLOW_HOME": str(home), "FITFLOW_REPO": str(REPO), **extra}


class Up:
    """A `fitflow up` process, with everything it started recorded while it runs."""

    def __init__(self, home: Path, ports: tuple[int, int] | None = None, **extra_env: str) -> None:
        self.home, self.ports = home, ports or (_free_port(), _free_port())
        self.log = open(home.parent / "up.log", "w")
        self.popen = subprocess.Popen([str(BIN / "fitflow"), "up", "--prefect-port", str(self.ports[0]),
                                       "--mlflow-port", str(self.ports[1])], cwd=REPO, env=_env(home, **extra_env),
                                      stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + DEADLINE_S
        while "serving the deployments of prefect.yaml" not in self.output():  # the last line `up` prints
            assert self.popen.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.5)
        self.stack = json.loads((home / "stack.json").read_text())
        self.family = [psutil.Process(self.popen.pid), *psutil.Process(self.popen.pid).children(recursive=True)]

    def output(self) -> str:
        return (self.home.parent / "up.log").read_text()[-4000:]

    def assert_all_gone(self) -> None:
        self.popen.wait(timeout=DEADLINE_S)
        _, alive = psutil.wait_procs(self.family, timeout=60)
        assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"
        assert not (self.home / "stack.json").exists()

    def close(self) -> None:  # only after a failure: never leave the stack running
        if self.popen.poll() is None:
            subprocess.run([str(BIN / "fitflow"), "down"], env=_env(self.home), timeout=300)
        for proc in self.family:
            if proc.is_running():
                proc.kill()
        self.log.close()


def _answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status == 200


def _cli(home: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fitflow"), *args], cwd=REPO, env=_env(home, **extra_env), capture_output=True,
                          text=True, timeout=DEADLINE_S)


def _wait_for(condition, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S} s"
        time.sleep(1)


def test_up_runs_the_loop_and_down_leaves_nothing_behind(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    up = Up(home)
    try:
        prefect_api, mlflow_url = up.stack["prefect_api_url"], up.stack["mlflow_url"]
        assert _answers(f"{prefect_api}/health") and _answers(f"{mlflow_url}/health")
        assert f"Prefect UI:  http://127.0.0.1:{up.ports[0]}" in up.output() and f"MLflow UI:   {mlflow_url}" in up.output()
        # once `up` says the deployments are served, `prefect deployment run` finds every one of them
        # (the line came 20-30 s before serve had registered them: "Deployment 'train/default' not found!")
        for name in ("train/default", "sweep/default", "watch/default", "predict/batch"):
            assert _registered(prefect_api, name), f"{name} is not registered yet"

        # fitflow train finds the stack: its run is on the MLflow server, its flow run on the Prefect server
        table = write_mixed_classification_csv(tmp_path / "data.csv")
        weak = _cli(home, "train", "--data", str(table), "--target", "label", "--epochs", "1", "--lr", "1e-6",
                    "--no-linear-path", "--register-model", "loop")  # random weights barely trained: a weak champion
        assert weak.returncode == 0, weak.stderr[-3000:]
        assert f"({mlflow_url}/#/experiments/" in weak.stdout
        mlflow = MlflowClient(mlflow_url)
        (first,) = mlflow.search_runs([mlflow.get_experiment_by_name("fitflow").experiment_id])
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # this test process asks the stack's Prefect server
        with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as prefect:
            assert prefect.read_flow_run(first.data.tags["prefect.flow_run_id"]).state.is_completed()

            # the watch flow, served: the first run remembers the file, a changed file -> event -> retrain
            watch = ["deployment", "run", "watch/default", "--param", f"sources={json.dumps([str(table)])}",
                     "--param", "target=label", "--param", "register_model=loop", "--watch"]
            seen = subprocess.run([str(BIN / "prefect"), *watch], env={**_env(home), "PREFECT_API_URL": prefect_api},
                                  capture_output=True, text=True, timeout=DEADLINE_S)
            assert "Completed" in seen.stdout, seen.stdout[-3000:] + seen.stderr[-3000:]
            write_mixed_classification_csv(table, seed=1)
            changed = subprocess.run([str(BIN / "prefect"), *watch], env={**_env(home), "PREFECT_API_URL": prefect_api},
                                     capture_output=True, text=True, timeout=DEADLINE_S)
            assert "Completed" in changed.stdout, changed.stdout[-3000:]
            retrain = _wait_for(lambda: _finished_train_runs(prefect, 1), "triggered retrain")[0]
            assert retrain.state.is_completed() and retrain.parameters["data"] == str(table), retrain.state
            retrained = mlflow.search_runs([_wait_for(lambda: mlflow.get_experiment_by_name("retrain"), "experiment")
                                            .experiment_id])
            assert len(retrained) == 1 and retrained[0].data.tags["prefect.flow_run_id"] == str(retrain.id)
            champion = mlflow.get_model_version_by_alias("loop", "champion")
            assert champion.run_id == retrained[0].info.run_id  # re-scoring: it beat v1 on the new data's test split

            # the same data announced again: the retrain ends at once as Unchanged, no new model
            # from a fresh process: this one's events worker may still be bound to another test's server
            announce = ("import sys; from prefect.events import emit_event; from prefect.events.worker import "
                        "EventsWorker; emit_event('fitflow.data.changed', resource={'prefect.resource.id': "
                        "'fitflow.data.' + sys.argv[1]}, payload={'source': sys.argv[1], 'target': 'label', "
                        "'register_model': 'loop', 'digest': '', 'previous_digest': ''}); EventsWorker.drain_all()")
            emitted = subprocess.run([sys.executable, "-c", announce, str(table)], capture_output=True, text=True,
                                     env={**_env(home), "PREFECT_API_URL": prefect_api}, timeout=DEADLINE_S)
            assert emitted.returncode == 0, emitted.stderr[-3000:]
            again = _wait_for(lambda: _finished_train_runs(prefect, 2), "second triggered run")[0]
            assert again.state.name == "Unchanged", again.state
            assert len(mlflow.search_model_versions("name='loop'")) == 2

            # the champion scores drifted rows (fitflow predict finds the stack too): drift -> event -> retrain
            shifted = pd.read_csv(table)
            shifted["x2"] = shifted["x2"] + 30
            shifted.to_csv(tmp_path / "shifted.csv", index=False)
            scored = _cli(home, "predict", "--model", "models:/loop@champion", "--data", str(tmp_path / "shifted.csv"),
                          "--out", str(tmp_path / "scored.csv"))
            assert scored.returncode == 0 and "drift: x2" in scored.stdout, scored.stderr[-3000:]
            third = _wait_for(lambda: _finished_train_runs(prefect, 3), "retrain after drift")[0]
            assert third.parameters["data"] == str(table) and third.parameters["register_model"] == "loop"
            assert third.state.name == "Unchanged"  # the training source has no new rows: nothing to learn

        # both commands ran in forks of the preloaded process (the environment of `up`'s shell)
        forks = _preloaded_commands(home)
        assert [(command.split()[0], code) for command, code in forks.values()] == [("train", 0), ("predict", 0)]

        # `up` is this test's child, not reaped until assert_all_gone: a zombie that `down` counts as exited
        down = _cli(home, "down")
        assert down.returncode == 0 and down.stdout.startswith("stopped the stack"), down.stderr
        assert "had not exited" not in down.stdout, down.stdout
        up.assert_all_gone()
        assert up.popen.returncode == 0, up.output()
        assert (home / "logs" / "preloaded.log").read_text().splitlines()[-1].endswith(" stopped")  # on its SIGTERM
    finally:
        up.close()


def _preloaded_commands(home: Path) -> dict[int, tuple[str, int | None]]:
    """pid -> (the command's arguments, its exit status or None while it runs), from the preloaded process's log."""
    commands: dict[int, tuple[str, int | None]] = {}
    for line in (home / "logs" / "preloaded.log").read_text().splitlines():
        if match := re.search(r"pid (\d+): fitflow (.*) \(in ", line):
            commands[int(match[1])] = (match[2], None)
        elif match := re.search(r"pid (\d+): exit (-?\d+)", line):
            commands[int(match[1])] = (commands[int(match[1])][0], int(match[2]))
    return commands


def _held_train(home: Path, hold: Path, experiment: str) -> subprocess.Popen:
    """`fitflow train` held at the start of its epoch 2 (tests/custom_models.py), its run logged."""
    args = ["train", "--epochs", "3", "--patience", "0", "--experiment", experiment, "--model", "custom_models:HoldAtEpochs",
            "--model-kwargs", json.dumps({"folder": str(hold / experiment), "epochs": [2]})]
    process = subprocess.Popen([str(BIN / "fitflow"), *args], cwd=REPO, env=_env(home, PYTHONPATH=str(TESTS)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until_held(process, hold / experiment, 2)
    return process


def _on_a_terminal(home: Path, *args: str, **extra_env: str) -> str:
    """What `fitflow ARGS` writes to a terminal (a pseudo-terminal as its stdin, stdout and stderr)."""
    import pty

    terminal, its_end = pty.openpty()
    process = subprocess.Popen([str(BIN / "fitflow"), *args], cwd=REPO, env=_env(home, TERM="xterm-256color", **extra_env),
                               stdin=its_end, stdout=its_end, stderr=its_end)
    os.close(its_end)
    written = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # EIO: every process holding the terminal has closed it
            break
        if not chunk:
            break
        written += chunk
    os.close(terminal)
    assert process.wait(timeout=DEADLINE_S) == 0, written.decode(errors="replace")[-3000:]
    return written.decode(errors="replace")


def _run_status(mlflow: MlflowClient, experiment: str) -> str:
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name(experiment).experiment_id])
    return run.info.status


def test_commands_start_in_the_preloaded_process_and_end_as_in_their_own(tmp_path):
    """With `fitflow up`, a command runs in a fork of its preloaded process: the same output, exit
    status and runs; Ctrl-C, a killed command and `fitflow down` each end the run KILLED, not
    RUNNING; a command whose environment differs at import runs in its own process."""
    home, hold = tmp_path / "home", tmp_path / "hold"
    home.mkdir()
    up = Up(home, PYTHONPATH=str(TESTS))  # the held model's module, for `up` and the commands alike
    try:
        mlflow = MlflowClient(up.stack["mlflow_url"])
        mlflow.create_experiment("server-made")  # as a script of the user's: the server's default artifact store
        trained = _cli(home, "train", "--epochs", "2", "--experiment", "forked", PYTHONPATH=str(TESTS))
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert "MLflow run:" in trained.stdout and "test_accuracy=" in trained.stdout  # the child wrote to our pipe
        assert _run_status(mlflow, "forked") == "FINISHED"
        bad = _cli(home, "train", "--data", str(tmp_path / "missing.csv"), PYTHONPATH=str(TESTS))
        assert bad.returncode == 2 and bad.stderr.startswith("fitflow: error: data file not found") and \
            bad.stderr.count("\n") == 1, bad.stderr
        assert [(c.split()[0], code) for c, code in _preloaded_commands(home).values()] == [("train", 0), ("train", 2)]
        # on a terminal, Prefect's log lines are coloured as in a process of its own
        on_a_terminal = _on_a_terminal(home, "train", "--epochs", "1", "--experiment", "terminal", PYTHONPATH=str(TESTS))
        assert "\x1b[36mINFO\x1b[0m" in on_a_terminal and "MLflow run:" in on_a_terminal, on_a_terminal[-3000:]
        assert len(_preloaded_commands(home)) == 3

        # another value of a variable read at import: declined, the command runs in its own process
        other = _cli(home, "train", "--data", str(tmp_path / "missing.csv"), PYTHONPATH=str(TESTS),
                     MLFLOW_HTTP_REQUEST_TIMEOUT="7")
        assert other.returncode == 2 and other.stderr.count("\n") == 1
        log = (home / "logs" / "preloaded.log").read_text()
        assert "declined train: environment variables read at import differ: MLFLOW_HTTP_REQUEST_TIMEOUT" in log
        # another -X option of the interpreter (tracemalloc, importtime, ...): the same
        x_option = subprocess.run([sys.executable, "-X", "fitflow_test", "-m", "flows.cli", "train", "--data",
                                   str(tmp_path / "missing.csv")], cwd=REPO, env=_env(home, PYTHONPATH=str(TESTS)),
                                  capture_output=True, text=True, timeout=DEADLINE_S)
        assert x_option.returncode == 2 and x_option.stderr.count("\n") == 1, x_option.stderr
        log = (home / "logs" / "preloaded.log").read_text()
        assert log.count("declined train: another Python or other interpreter options") == 1
        assert len(_preloaded_commands(home)) == 3

        # what is not a command's request is refused and logged, and the descriptors it carried are closed
        server = psutil.Process(up.stack["children"][-1])
        assert "flows.preloaded" in server.cmdline()
        open_before = server.num_fds()
        for payload in (b"{not json\n", b'{"argv": ["train"]'):  # malformed; cut short (the sender hangs up)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(up.stack["preloaded_socket"])
                socket.send_fds(conn, [payload], [0, 1, 2])
        _wait_for(lambda: (home / "logs" / "preloaded.log").read_text().count("refused a request") == 2, "two refusals")
        _wait_for(lambda: server.num_fds() == open_before, f"the server back at its {open_before} open descriptors")
        assert len(_preloaded_commands(home)) == 3

        # Ctrl-C reaches the child through the command
        interrupted = _held_train(home, hold, "ctrl-c")
        (child,) = [pid for pid, (_, code) in _preloaded_commands(home).items() if code is None]
        interrupted.send_signal(signal.SIGINT)
        assert interrupted.wait(timeout=120) == 130 and b"fitflow: interrupted" in interrupted.stdout.read()
        assert _preloaded_commands(home)[child][1] == 130 and _run_status(mlflow, "ctrl-c") == "KILLED"

        # a command killed outright: its child is interrupted, its run does not stay RUNNING
        killed = _held_train(home, hold, "sigkill")
        (child,) = [pid for pid, (_, code) in _preloaded_commands(home).items() if code is None]
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=30) == -signal.SIGKILL
        _wait_for(lambda: _preloaded_commands(home)[child][1] is not None, "the killed command's child to end")
        assert _preloaded_commands(home)[child][1] == 130 and _run_status(mlflow, "sigkill") == "KILLED"

        # `fitflow down` while a command runs: interrupted as by Ctrl-C, then everything is gone
        running = _held_train(home, hold, "down")
        (child,) = [pid for pid, (_, code) in _preloaded_commands(home).items() if code is None]
        family = [psutil.Process(child)]
        down = _cli(home, "down")
        assert down.returncode == 0, down.stderr
        assert running.wait(timeout=120) == 130
        up.family += family
        up.assert_all_gone()
        # the run was ended before the MLflow server stopped: its store says so
        local = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        assert _run_status(local, "down") == "KILLED"
        assert not Path(up.stack["preloaded_socket"]).parent.exists()  # its private folder is removed

        # with the stack down, the same home's sqlite store takes runs of experiments made with it up:
        # fitflow's (its artifacts in the home's folder), and one line for the server's own kind
        again = _cli(home, "train", "--epochs", "1", "--experiment", "forked")
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(local.search_runs([local.get_experiment_by_name("forked").experiment_id])) == 2
        refused = _cli(home, "train", "--epochs", "1", "--experiment", "server-made")
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert refused.stderr.splitlines()[-1].startswith("fitflow: error: MLflow experiment 'server-made' keeps its "
                                                          "artifacts on an MLflow server (mlflow-artifacts:/")
        assert not local.search_runs([local.get_experiment_by_name("server-made").experiment_id])
    finally:
        up.close()


def test_an_up_killed_outright_leaves_servers_that_the_next_up_stops_and_ctrl_c_stops_everything(tmp_path):
    """SIGKILL: `up` runs no `finally`; its servers live on, holding the ports and the databases. The
    next `up` of the home (on the same ports) stops them from stack.json, then starts afresh; its
    Ctrl-C stops everything it started. (One test: each `up` costs about a minute on 2 cores.)"""
    home = tmp_path / "home"
    home.mkdir()
    killed = Up(home)
    socket_dir = Path(killed.stack["preloaded_socket"]).parent
    try:
        killed.popen.send_signal(signal.SIGKILL)
        assert killed.popen.wait(timeout=30) == -signal.SIGKILL
        left = [p for p in killed.family[1:] if p.is_running()]
        assert len(left) >= 4 and socket_dir.exists()  # the premise: both servers, serve, the preloaded process

        again = Up(home, killed.ports)
        try:
            assert f"stopped what the killed `fitflow up` (process {killed.popen.pid}) left running" in again.output()
            _, alive = psutil.wait_procs(left, timeout=60)
            assert not alive, [p.cmdline() for p in alive]
            assert not socket_dir.exists() and again.stack["pid"] == again.popen.pid
            assert len(again.family) >= 4  # up, both servers (and their workers), serve
            again.popen.send_signal(signal.SIGINT)
            again.assert_all_gone()
            assert again.popen.returncode == 0 and "stopped the Prefect server" in again.output()
            assert _cli(home, "down").stdout.startswith("no stack is up")
            # the idle preloaded process ended on its SIGTERM, not by `up`'s SIGKILL 30 s later
            assert (home / "logs" / "preloaded.log").read_text().splitlines()[-1].endswith(" stopped")
        finally:
            again.close()
    finally:
        killed.close()


def test_bad_ports_are_one_line_and_exit_2(tmp_path):
    home = tmp_path / "home"
    same = _cli(home, "up", "--prefect-port", "5005", "--mlflow-port", "5005")
    assert same.returncode == 2 and same.stderr.count("\n") == 1 and "different ports" in same.stderr
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = _cli(home, "up", "--prefect-port", str(busy.getsockname()[1]), "--mlflow-port", str(_free_port()))
    assert taken.returncode == 2 and "is in use" in taken.stderr and taken.stderr.count("\n") == 1


def _registered(prefect_api: str, name: str) -> bool:
    try:
        return _answers(f"{prefect_api}/deployments/name/{name}")
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return False
        raise


def _finished_train_runs(prefect, count: int) -> list:
    """The deployment runs of the train flow (the trigger's), newest first, once `count` of them are over."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterDeploymentId

    runs = prefect.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])),
                                  flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(is_null_=False)),
                                  sort="START_TIME_DESC")
    final = [run for run in runs if run.state and run.state.is_final()]
    return final if len(final) >= count else []
