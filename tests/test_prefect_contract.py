"""The Prefect side of the contract: the UI form, task names, several processes on one store."""

from __future__ import annotations

import os
import subprocess
import sys

from mlflow.tracking import MlflowClient
from prefect.utilities.callables import parameter_schema

from flows.config import TrainConfig
from flows.train import train_flow


def test_parameter_schema_is_a_usable_ui_form():
    """Every config field is a flat flow parameter with its description, default, bounds, choices."""
    fields = parameter_schema(train_flow.fn).model_dump()["properties"]
    assert list(fields) == list(TrainConfig.model_fields)
    assert all(field.get("description") for field in fields.values())
    assert fields["optimizer"]["enum"] == ["adam", "adamw", "sgd"]
    assert fields["epochs"]["minimum"] == 1 and fields["epochs"]["default"] == 30
    assert fields["lr"]["exclusiveMinimum"] == 0
    assert fields["hidden_sizes"]["default"] == [64, 32]


def test_flow_and_task_names():
    assert train_flow.name == "train"
    from flows import steps

    names = {t.name for t in (steps.load_table_task, steps.prepare_task, steps.make_loaders_task,
                              steps.train_model_task, steps.test_model_task)}
    assert names == {"load_table", "prepare", "make_loaders", "train_model", "test_model"}
    assert steps.load_table_task.retries == 2


def test_processes_share_a_fresh_local_store(tmp_path, prefect_server):
    """Three training processes at once on a store that does not exist yet: none loses data."""
    from prefect.settings import PREFECT_API_URL

    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": uri}
    code = ("import sys; from flows.config import TrainConfig; from flows.train import train; "
            "train(TrainConfig(epochs=3, patience=0, experiment='shared', run_name=sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"p{i}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outputs)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["p0", "p1", "p2"]
    for run in runs:
        assert run.info.status == "FINISHED"
        for name in ("train_loss", "val_loss", "val_accuracy"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == [1, 2, 3]

