"""The Prefect side of the contract: the UI form and the task names (several processes on one
store: tests/test_concurrency.py)."""

from __future__ import annotations

from prefect.utilities.callables import parameter_schema

from flows.train import train_flow
from tasks.config import TrainConfig


def test_parameter_schema_is_a_usable_ui_form():
    """Every config field is a flat flow parameter with its description, default, bounds, choices."""
    fields = parameter_schema(train_flow.fn).model_dump()["properties"]
    assert list(fields) == [*TrainConfig.flat_fields(), "resume"]
    assert all(field.get("description") for field in fields.values())
    assert fields["optimizer"]["enum"] == ["adam", "adamw", "sgd"]
    assert fields["epochs"]["minimum"] == 1 and fields["epochs"]["default"] == 1000
    # the default rule as the form shows it: early stopping, not the epoch cap, ends a default run
    assert fields["patience"]["default"] == 20 and "early stopping ends the run first" in fields["epochs"]["description"]
    assert fields["baseline"]["default"] is True and "baseline_test_<metric>" in fields["baseline"]["description"]
    assert fields["lr"]["exclusiveMinimum"] == 0
    assert fields["hidden_sizes"]["default"] == [64, 32]


def test_flow_and_task_names():
    assert train_flow.name == "train"
    from flows import steps

    names = {t.name for t in (steps.load_table_task, steps.prepare_task, steps.build_loaders_task,
                              steps.train_model_task, steps.evaluate_on_test_task)}
    assert names == {"load_table", "prepare", "build_loaders", "train_model", "evaluate_on_test"}
    assert steps.load_table_task.retries == 2
