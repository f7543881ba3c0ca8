"""The UI path in a real browser: a custom run started from the Prefect UI's form, followed to
Completed there, then found in the MLflow UI with the parameters given in the form.

Playwright drives Debian's Chromium (never a browser that Playwright downloads). The services are
the ones a user starts on one machine: `prefect server start` (with its UI), `fitflow serve` and
`mlflow server` on the same sqlite store the runs write to, each on a free loopback port. Screenshots
of both UIs go to test-artifacts/browser/ (git ignores it). CI runs this (`.ci/run`
installs chromium); deselect it locally with -m "not browser".
"""

from __future__ import annotations

import importlib.util
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
    """A Prefect server with its UI, `fitflow serve` against it, and an MLflow server."""

    def __init__(self, root: Path):
        self.root = root
        self.processes: list[Process] = []
        self.prefect_url = f"http://127.0.0.1:{free_port()}"
        self.mlflow_url = f"http://127.0.0.1:{free_port()}"
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                    "PREFECT_HOME": str(root / "prefect-home"), "FITFLOW_HOME": str(root / "fitflow-home"),
                    "FITFLOW_REPO": str(REPO), "MLFLOW_TRACKING_URI": self.tracking_uri}

    def spawn(self, name: str, argv: list[str], cwd: Path, **env: str) -> Process:
        log = self.root / f"{name}.log"
        popen = subprocess.Popen(argv, cwd=cwd, env={**self.env, **env}, stdout=log.open("w"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def start(self) -> UiStack:
        port = self.prefect_url.rsplit(":", 1)[1]
        # The UI calls the API at PREFECT_UI_API_URL, which otherwise names the default port 4200.
        prefect = self.spawn("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                "--port", port], self.root, PREFECT_UI_API_URL=f"{self.prefect_url}/api")
        mlflow = self.spawn("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", self.tracking_uri,
                                       "--host", "127.0.0.1", "--port", self.mlflow_url.rsplit(":", 1)[1],
                                       "--workers", "1"], self.root, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        wait_http(prefect, f"{self.prefect_url}/api/health")
        wait_http(mlflow, f"{self.mlflow_url}/health")  # it has created the store's tables by now
        serve = self.spawn("serve", [str(BIN / "fitflow"), "serve"], REPO, PREFECT_API_URL=f"{self.prefect_url}/api")
        wait_http(serve, f"{self.prefect_url}/api/deployments/name/train/default")
        return self

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}.log\n{p.log_tail(3000)}" for p in self.processes)

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()  # SIGTERM to it and its children, then SIGKILL to what is left
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


def find_mlflow_run(page, mlflow_url: str, experiment: str, run_id: str) -> dict[str, str]:
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
    _screenshot(page, "mlflow-run.png")
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
