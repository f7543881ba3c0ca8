"""The UI path in a real browser, on the stack a user starts on one machine with `fitflow up` (a
Prefect server with its UI, an MLflow server with its UI, `fitflow serve`; free loopback ports):

- a custom run started from the Prefect UI's form, followed to Completed there, then found in the
  MLflow UI of `fitflow up` with the parameters given in the form;
- a `fitflow train` from a terminal, which finds the stack by itself, shown in that MLflow UI;
- the automations `fitflow setup --notify-url` creates, listed in the Prefect UI's Automations page.

Playwright drives Debian's Chromium (never a browser that Playwright downloads). Screenshots of
both UIs go to test-artifacts/browser/ (git ignores it). CI runs this (`.ci/run` installs
chromium); deselect it locally with -m "not browser".
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from uuid import uuid4

import pytest
from mlflow.tracking import MlflowClient
from stack import REPO, Process, free_port, wait_http

pytestmark = [pytest.mark.browser, pytest.mark.slow]

BIN = Path(sys.executable).parent
CHROMIUM = Path(os.environ.get("FITFLOW_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts" / "browser"
START_TIMEOUT_S = 180  # cold migrations of the Prefect and MLflow stores on 2 shared cores
RUN_DEADLINE_S = 600  # a deadline for a hung run, not a timing assertion
UI_TIMEOUT_MS = 60_000  # a single page element; the UIs are slow to render on a busy CI machine

# Changed in the form; what MLflow shows as the run's params.
PARAMS = {"epochs": "3", "lr": "0.005"}


def _require(found: bool, message: str) -> None:
    if not found:
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them (.ci/run, the test extra); never skip there
        pytest.skip(message)


class UiStack:
    """`fitflow up` on free loopback ports, with its own FITFLOW_HOME; `fitflow down` stops it."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "fitflow-home"
        self.processes: list[Process] = []
        self.prefect_url = f"http://127.0.0.1:{free_port()}"
        self.mlflow_url = f"http://127.0.0.1:{free_port()}"
        self.tracking_uri = self.mlflow_url
        # fitflow finds the stack through FITFLOW_HOME's stack.json; explicit settings would win over it
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FITFLOW_"))}
        self.env = {**inherited, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                    "FITFLOW_HOME": str(self.home), "FITFLOW_REPO": str(REPO)}

    def spawn(self, name: str, argv: list[str], cwd: Path, **env: str) -> Process:
        log = self.root / f"{name}.log"
        popen = subprocess.Popen(argv, cwd=cwd, env={**self.env, **env}, stdout=log.open("w"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def fitflow(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "fitflow"), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=RUN_DEADLINE_S)

    def start(self) -> UiStack:
        self.home.mkdir()
        up = self.spawn("up", [str(BIN / "fitflow"), "up", "--prefect-port", self.prefect_url.rsplit(":", 1)[1],
                               "--mlflow-port", self.mlflow_url.rsplit(":", 1)[1]], REPO)
        wait_http(up, f"{self.mlflow_url}/health", START_TIMEOUT_S)
        wait_http(up, f"{self.prefect_url}/api/deployments/name/train/default", START_TIMEOUT_S)  # serve registered them
        stack = json.loads((self.home / "stack.json").read_text())
        assert (stack["prefect_ui_url"], stack["mlflow_url"]) == (self.prefect_url, self.mlflow_url)
        return self

    def logs(self) -> str:
        logs = sorted((self.home / "logs").glob("*.log")) if (self.home / "logs").exists() else []
        return "\n".join([f"--- {p.name}.log\n{p.log_tail(3000)}" for p in self.processes]
                         + [f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs])

    def close(self) -> None:
        if self.home.exists():
            self.fitflow("down")
        for process in reversed(self.processes):
            process.stop()  # `up` has exited after down; anything left: SIGTERM, then SIGKILL
        self.processes.clear()


@pytest.fixture(scope="module")
def ui_stack(tmp_path_factory):
    _require(CHROMIUM.is_file(), f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)")
    _require(importlib.util.find_spec("playwright") is not None, "playwright is missing (pip install -e '.[test]')")
    stack = UiStack(tmp_path_factory.mktemp("ui-stack"))
    try:
        yield stack.start()
    finally:
        stack.close()


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


def _form_field(page, name: str):
    """The input of one parameter in the Prefect UI's run form, found by its label."""
    label = page.locator(".schema-form-property__label").get_by_text(re.compile(rf"^{name}( \(Optional\))?$"))
    return page.locator("div.schema-form-property").filter(has=label).locator("input, textarea").first


def start_custom_run(page, prefect_url: str, params: dict[str, str]) -> None:
    """Deployments -> train/default -> Run -> Custom run, fill `params`, Submit, open the run."""
    page.goto(f"{prefect_url}/deployments")
    train_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="train", exact=True))
    train_row.get_by_role("link", name="default", exact=True).click()  # sweep has a "default" too
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    submit = page.get_by_role("button", name="Submit", exact=True)
    submit.wait_for()
    for name, value in params.items():
        _form_field(page, name).fill(value)
    for name, value in params.items():
        assert _form_field(page, name).input_value() == value, f"the form did not take {name}={value}"
    _form_field(page, "lr").evaluate("el => el.scrollIntoView({block: 'center'})")
    _screenshot(page, "prefect-custom-run.png")
    submit.click()
    # A toast says "<run name> scheduled to start now"; the deployment page lists the run by that name.
    scheduled = re.compile(r"(\S+)\s+scheduled\s+to\s+start\s+now")  # two spaces in 3.9.1's markup
    run_name = scheduled.search(page.get_by_text(scheduled).first.inner_text())[1]
    page.get_by_role("link", name=run_name, exact=True).first.click()
    page.wait_for_url(re.compile(r"/flow-run/[0-9a-f-]{36}"))


def wait_until_completed(page, deadline_s: float, logs) -> str:
    """Reload the flow run page until its state badge shows Completed; return its mlflow_run_id tag."""
    deadline = time.monotonic() + deadline_s
    while True:
        state = page.locator("[class*=page-heading] .state-badge").first.inner_text().strip()
        if state == "Completed":
            break
        assert state not in ("Failed", "Crashed", "Cancelled"), f"the flow run ended {state}:\n{logs()}"
        assert time.monotonic() < deadline, f"the flow run is still {state}:\n{logs()}"
        time.sleep(3)
        page.reload()
    page.get_by_text("Parameters", exact=True).first.click()  # the run page's tab: the JSON it ran with
    page.get_by_text('"epochs"').first.wait_for()
    _screenshot(page, "prefect-flow-run-completed.png")
    tag = page.get_by_text(re.compile(r"^mlflow_run_id:[0-9a-f]{32}$")).first.inner_text()
    return tag.split(":", 1)[1]


def find_mlflow_run(page, mlflow_url: str, experiment: str, run_id: str, screenshot: str = "mlflow-run.png") -> dict[str, str]:
    """Experiments -> `experiment` -> the run; return the Parameters table as shown."""
    page.goto(f"{mlflow_url}/#/experiments")
    page.get_by_text("Model training", exact=True).click()  # the runs view, not GenAI's traces
    page.get_by_role("link", name=experiment, exact=True).click()
    page.locator(f'a[href$="/runs/{run_id}"]').first.click()
    header = page.get_by_role("columnheader").get_by_text("Parameter", exact=True)
    params = page.get_by_role("table").filter(has=header)
    params.wait_for()
    page.get_by_text("Finished", exact=True).first.wait_for()
    shown = {}
    for row in params.get_by_role("row").all()[1:]:  # the first is the header
        cells = [cell.inner_text().strip() for cell in row.get_by_role("cell").all()]
        if len(cells) == 2:
            shown[cells[0]] = cells[1]
    close_assistant = page.get_by_role("button", name="Close", exact=True)
    if close_assistant.count() == 1:  # the MLflow Assistant side panel would hide half the page
        close_assistant.click()
    params.get_by_role("cell", name="epochs", exact=True).evaluate("el => el.scrollIntoView({block: 'center'})")
    _screenshot(page, screenshot)
    return shown


def test_custom_run_from_prefect_ui_shows_up_in_mlflow_ui(ui_stack, page):
    experiment = f"ui-{uuid4().hex[:8]}"
    try:
        start_custom_run(page, ui_stack.prefect_url, {**PARAMS, "experiment": experiment})
        flow_run_id = re.search(r"/flow-run/([0-9a-f-]{36})", page.url)[1]
        run_id = wait_until_completed(page, RUN_DEADLINE_S, ui_stack.logs)
        shown = find_mlflow_run(page, ui_stack.mlflow_url, experiment, run_id)
    except Exception:
        _screenshot(page, "failure.png")
        raise
    assert {name: shown.get(name) for name in PARAMS} == PARAMS, shown
    assert shown["experiment"] == experiment
    # The run the MLflow UI showed is the one this flow run logged.
    run = MlflowClient(ui_stack.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["prefect.flow_run_id"] == flow_run_id


def test_a_terminal_run_shows_in_the_mlflow_ui_of_fitflow_up(ui_stack, page):
    """`fitflow train` in a terminal finds the stack (no server of its own): its run is in the MLflow UI
    that `fitflow up` serves, linked to a flow run of the stack's Prefect server."""
    experiment = f"terminal-{uuid4().hex[:8]}"
    trained = ui_stack.fitflow("train", "--epochs", "2", "--experiment", experiment)
    assert trained.returncode == 0, trained.stderr[-3000:]
    client = MlflowClient(ui_stack.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    try:
        shown = find_mlflow_run(page, ui_stack.mlflow_url, experiment, run.info.run_id, "mlflow-up-terminal-run.png")
    except Exception:
        _screenshot(page, "failure-terminal-run.png")
        raise
    assert shown["epochs"] == "2" and shown["experiment"] == experiment, shown
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"{ui_stack.prefect_url}/api"}), get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(run.data.tags["prefect.flow_run_id"])  # on the stack's server
    assert flow_run.state.is_completed() and f"mlflow_run_id:{run.info.run_id}" in flow_run.tags


def test_the_prefect_ui_lists_the_automations_fitflow_setup_creates(ui_stack, page):
    """`fitflow setup --notify-url` against the stack of `fitflow up`: the Automations page shows each alert."""
    done = ui_stack.fitflow("setup", "--notify-url", "http://127.0.0.1:9/fitflow-alerts")
    assert done.returncode == 0, done.stderr[-3000:]
    from flows.alerts import automations

    names = [automation.name for automation in automations(block_id=uuid4())]
    assert len(names) == 3
    try:
        page.goto(f"{ui_stack.prefect_url}/automations")
        for name in names:
            page.get_by_text(name, exact=True).first.wait_for()
        _screenshot(page, "prefect-automations.png")
    except Exception:
        _screenshot(page, "failure-automations.png")
        raise

