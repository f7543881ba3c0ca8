"""fitflow doctor closes MLflow runs whose Prefect flow run is over, and only those."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from prefect import flow, get_client
from prefect.states import Cancelled, Crashed, Running

from flows.cli import main
from flows.doctor import check_runs

pytestmark = pytest.mark.usefixtures("prefect_server")


@flow(name="doctor-probe")
def probe() -> None:
    """Never called: gives the flow runs below a flow."""


def test_doctor_closes_runs_of_finished_flow_runs(mlflow_uri, capsys):
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("doctor")
    runs = {}
    with get_client(sync_client=True) as prefect:
        for name, state in (("crashed", Crashed(message="process killed")), ("cancelled", Cancelled()),
                            ("running", Running())):
            flow_run = prefect.create_flow_run(probe, state=state)
            runs[name] = client.create_run(experiment, tags={"prefect.flow_run_id": str(flow_run.id)}).info.run_id
    runs["unlinked"] = client.create_run(experiment).info.run_id
    finished = client.create_run(experiment).info.run_id
    client.set_terminated(finished, "FINISHED")

    dry = {f.run_id: f.action for f in check_runs(mlflow_uri, fix=False)}
    assert dry[runs["crashed"]] == "would close FAILED"
    assert client.get_run(runs["crashed"]).info.status == "RUNNING"

    assert main(["doctor"]) == 0
    assert runs["crashed"] in capsys.readouterr().out
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"crashed": "FAILED", "cancelled": "KILLED", "running": "RUNNING", "unlinked": "RUNNING"}
    assert "ended Crashed: process killed" in client.get_run(runs["crashed"]).data.tags["fitflow.closed_by"]
    assert client.get_run(finished).info.status == "FINISHED"
