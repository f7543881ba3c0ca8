"""The promotion gate against a real MLflow registry: real training runs, real scores."""

from __future__ import annotations

import textwrap
import time

import mlflow
import pandas as pd
import pytest
from conftest import write_mixed_classification_csv
from mlflow.tracking import MlflowClient

from flows import events
from flows.train import train
from tasks.config import TrainConfig
from tasks.data import load_table, raw_test_rows, split_rows
from tasks.trainer import prep_spec

pytestmark = pytest.mark.usefixtures("prefect_server")

# The MLP alone (linear_path false): from random weights, so that a run of lr 1e-6 is clearly worse (a table's
# default network starts at the linear baseline's fit, already good)
BASE = dict(monitor="val_accuracy", patience=0, experiment="registry", register_model="bc", linear_path=False)


def _version(client: MlflowClient, alias: str):
    return client.get_model_version_by_alias("bc", alias)


def test_champion_moves_only_to_a_better_model_on_the_same_test_data(mlflow_uri):
    client = MlflowClient(mlflow_uri)
    first = train(TrainConfig(epochs=2, lr=3e-4, **BASE))
    assert str(_version(client, "champion").version) == "1" and "first version" in first.registered

    # lr so small that one epoch leaves the weights almost where they started: clearly worse
    worse = train(TrainConfig(epochs=1, lr=1e-6, **BASE))
    assert worse.test_metrics["test_accuracy"] < first.test_metrics["test_accuracy"]  # the premise
    assert str(_version(client, "champion").version) == "1"
    challenger = _version(client, "challenger")
    assert str(challenger.version) == "2" and challenger.tags["fitflow.gate"] == "challenger"
    both = (f"{worse.test_metrics['test_accuracy']:.4f}", f"{first.test_metrics['test_accuracy']:.4f}")
    assert all(score in challenger.description for score in both) and "does not beat" in challenger.description
    assert challenger.tags["fitflow.champion_version"] == "1"

    better = train(TrainConfig(epochs=25, lr=3e-3, **BASE))
    assert better.test_metrics["test_accuracy"] > first.test_metrics["test_accuracy"]  # the premise
    champion = _version(client, "champion")
    assert str(champion.version) == "3" and champion.run_id == better.run_id and "beats" in champion.description
    assert champion.tags["fitflow.champion_score"] == f"{first.test_metrics['test_accuracy']:.6g}"

    # models:/bc@champion is the production model: it predicts exactly what the better run's model does
    rows = load_table("breast_cancer").drop(columns=["diagnosis"]).head(50)
    served = mlflow.pyfunc.load_model("models:/bc@champion").predict(rows)
    logged = mlflow.pyfunc.load_model(better.model_uri).predict(rows)
    assert served.equals(logged)


def test_a_champion_tested_on_other_data_is_rescored_on_the_newcomers_test_rows_it_never_saw(mlflow_uri):
    """Another seed splits the same rows anew: most of the newcomer's test rows are rows the champion
    trained or validated on. Both models are scored on the rest only."""
    client = MlflowClient(mlflow_uri)
    first = TrainConfig(epochs=1, lr=1e-6, **BASE)
    train(first)  # a weak champion
    other_split = TrainConfig(epochs=20, lr=3e-3, seed=7, **BASE)  # better, tested on another split
    better = train(other_split)
    champion = _version(client, "champion")
    assert champion.run_id == better.run_id and "re-scored on this version's test data" in champion.description
    assert "seed" in champion.description and champion.tags["fitflow.champion_rescored"] == "true"

    # the rows compared, found by position in the split (not by the gate's row fingerprints): the newcomer's
    # test rows that were in v1's test split too
    table = load_table("breast_cancer")
    v1_test = set(split_rows(table["diagnosis"], "classification", prep_spec(first))[2])
    new_test = split_rows(table["diagnosis"], "classification", prep_spec(other_split))[2]
    kept = [row for row in new_test if row in v1_test]
    assert 0 < len(kept) < len(new_test) / 2  # the premise: most of them v1 learned from
    assert champion.tags["fitflow.gate_rows"] == f"{len(kept)} of {len(new_test)}"
    assert f"the {len(new_test) - len(kept)} the champion trained or was validated on left out" in champion.description
    assert f"only {len(kept)} rows: a small sample, the decision may not hold on more data" in champion.description
    # each figure is that version's accuracy on those rows, as its own predictions give it
    rows, run = table.iloc[kept], client.get_run(better.run_id)
    for version, metric in (("1", "champion_test_accuracy"), ("2", "gate_test_accuracy")):
        predicted = mlflow.pyfunc.load_model(f"models:/bc/{version}").predict(rows.drop(columns=["diagnosis"]))
        expected = float((predicted["prediction"].to_numpy() == rows["diagnosis"].to_numpy()).mean())
        assert run.data.metrics[metric] == pytest.approx(expected, abs=1e-6), metric
    assert run.data.metrics["gate_test_accuracy"] > run.data.metrics["champion_test_accuracy"]
    assert run.data.metrics["test_accuracy"] == better.test_metrics["test_accuracy"]  # its own figure, on every row
    assert champion.tags["fitflow.champion_score"] == f"{run.data.metrics['champion_test_accuracy']:.6g}"
    assert champion.tags["fitflow.gate_score"] == f"{run.data.metrics['gate_test_accuracy']:.6g}"
    assert champion.tags["fitflow.score"] == f"{better.test_metrics['test_accuracy']:.6g}"


def test_a_champion_whose_seen_rows_were_not_recorded_is_rescored_on_every_test_row_and_the_reason_says_so(
        mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    train(TrainConfig(epochs=1, lr=1e-6, **BASE))
    (recorded,) = (tmp_path / "mlartifacts").rglob("seen_rows.npz")
    recorded.unlink()  # as for a champion registered before the gate recorded them, or by hand
    other_split = TrainConfig(epochs=20, lr=3e-3, seed=7, **BASE)
    better = train(other_split)
    version = client.get_model_version(BASE["register_model"], "2")
    rows = raw_test_rows(load_table("breast_cancer"), prep_spec(other_split), "classification")
    assert version.tags["fitflow.gate_rows"] == f"{len(rows)} of {len(rows)}"
    assert "the champion's training rows were not recorded, some of them may be among these" in version.description
    assert "small sample" not in version.description  # 86 rows
    predicted = mlflow.pyfunc.load_model("models:/bc/1").predict(rows.drop(columns=["diagnosis"]))
    expected = float((predicted["prediction"] == rows["diagnosis"]).mean())
    metrics = client.get_run(better.run_id).data.metrics
    assert metrics["champion_test_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert "gate_test_accuracy" not in metrics and "fitflow.gate_score" not in version.tags


def test_a_champion_whose_seen_rows_record_is_damaged_is_not_comparable_rather_than_scored_on_every_row(
        mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    train(TrainConfig(epochs=1, lr=1e-6, **BASE))
    (recorded,) = (tmp_path / "mlartifacts").rglob("seen_rows.npz")
    recorded.write_bytes(recorded.read_bytes()[:100])  # cut short
    better = train(TrainConfig(epochs=20, lr=3e-3, seed=7, **BASE))
    challenger = _version(client, "challenger")
    assert challenger.run_id == better.run_id and "not comparable" in challenger.description
    assert "recorded training rows (fitflow/seen_rows.npz of run" in challenger.description
    assert "champion_test_accuracy" not in client.get_run(better.run_id).data.metrics


def test_two_data_versions_rescoring_decides_and_each_decision_is_a_prefect_event(mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    v1 = write_mixed_classification_csv(tmp_path / "v1.csv", seed=0)
    v2 = write_mixed_classification_csv(tmp_path / "v2.csv", seed=1)  # a new data version: same columns, other rows
    fields = dict(target="label", **{**BASE, "register_model": "data-versions"})
    strong = train(TrainConfig(data=str(v1), epochs=30, lr=3e-3, **fields))
    weak = train(TrainConfig(data=str(v2), epochs=1, lr=1e-6, **fields))  # other data, and barely trained
    challenger = client.get_model_version_by_alias("data-versions", "challenger")
    assert challenger.run_id == weak.run_id and "does not beat" in challenger.description
    assert "re-scored" in challenger.description and "dataset_digest" in challenger.description
    champion_on_v2 = client.get_run(weak.run_id).data.metrics["champion_test_accuracy"]
    assert champion_on_v2 > weak.test_metrics["test_accuracy"]
    # a third version with a class the champion never saw: it cannot be scored there
    v3 = pd.read_csv(v2)
    v3.loc[v3.index[::5], "label"] = "maybe"
    v3.to_csv(tmp_path / "v3.csv", index=False)
    third = train(TrainConfig(data=str(tmp_path / "v3.csv"), epochs=1, **fields))
    refused = client.get_model_version_by_alias("data-versions", "challenger")
    assert refused.run_id == third.run_id and "not comparable" in refused.description
    assert "classes differ" in refused.description and "maybe" in refused.description

    expected = {(strong.run_id, events.MODEL_PROMOTED), (weak.run_id, events.MODEL_REJECTED),
                (third.run_id, events.MODEL_REJECTED)}
    seen = _wait_for_model_events("data-versions", expected)
    assert expected <= seen
    (promoted,) = [e for e in _model_events("data-versions") if e.payload["mlflow_run_id"] == strong.run_id]
    related = {r.id: r.role for r in promoted.related}
    assert related[f"mlflow.run.{strong.run_id}"] == "mlflow-run"
    assert related[f"mlflow.model.{strong.model_uri}"] == "mlflow-model"
    assert promoted.payload["version"] == "1" and promoted.resource["fitflow.model.version"] == "1"


def test_rescoring_a_champion_never_runs_code_that_came_with_it(mlflow_uri, tmp_path):
    """The gate re-scores a champion tested on other data: it reads the champion as data, with this
    checkout's code (tasks/model_loading.py), as `fitflow predict` does. Anyone who can register a
    model version could otherwise run code on the machine that trains the next one."""
    client = MlflowClient(mlflow_uri)
    marker = tmp_path / "ran"
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('artifact code ran')\n"
    fields = {**BASE, "register_model": "guarded"}
    train(TrainConfig(epochs=1, lr=1e-6, **fields))
    (mlmodel,) = (tmp_path / "mlartifacts").rglob("MLmodel")  # v1's files, edited in the artifact store
    shipped = mlmodel.parent / "model_code.py"
    shipped.write_text(payload + shipped.read_text())

    better = train(TrainConfig(epochs=20, lr=3e-3, seed=7, **fields))  # tested on another split: v1 is re-scored

    assert not marker.exists()
    champion = client.get_model_version_by_alias("guarded", "champion")
    assert champion.run_id == better.run_id and champion.tags["fitflow.champion_rescored"] == "true"

    code = tmp_path / "other_model.py"  # a champion that is no fitflow model: refused before it is loaded
    code.write_text(payload + textwrap.dedent("""
        import mlflow.models, mlflow.pyfunc

        class Echo(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):
                return model_input

        mlflow.models.set_model(Echo())
    """))
    with mlflow.start_run(experiment_id=client.get_experiment_by_name(BASE["experiment"]).experiment_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), pip_requirements=["mlflow"],
                                       registered_model_name="guarded")
    client.set_registered_model_alias("guarded", "champion", str(info.registered_model_version))
    marker.unlink()  # logging ran it once, in this test's own process

    refused = train(TrainConfig(epochs=1, seed=8, **fields))

    assert not marker.exists()
    challenger = client.get_model_version_by_alias("guarded", "challenger")
    assert challenger.run_id == refused.run_id and "is not a fitflow model" in challenger.description, \
        challenger.description


def _model_events(name: str) -> list:
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    with get_client(sync_client=True) as prefect:
        page = prefect.read_events(EventFilter(
            event=EventNameFilter(name=[events.MODEL_PROMOTED, events.MODEL_REJECTED]),
            resource=EventResourceFilter(id=[f"fitflow.model.{name}"])), limit=50)
    return page.events


def _wait_for_model_events(name: str, expected: set) -> set:
    """Events reach the server from a background sender: wait until they are all there (deadline: a hang)."""
    deadline = time.monotonic() + 120
    while True:
        seen = {(e.payload["mlflow_run_id"], e.event) for e in _model_events(name)}
        if expected <= seen or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def test_a_lower_is_better_metric_of_yours_promotes_the_lower_value_also_when_rescored(mlflow_uri):
    """error_rate (tests/user_code_examples.py) says higher_is_better = False; by its name alone it would go up."""
    client = MlflowClient(mlflow_uri)
    errors = dict(BASE, monitor="val_error_rate", metrics=["user_code_examples:error_rate"], register_model="err")
    weak = train(TrainConfig(epochs=1, lr=1e-6, **errors))
    good = train(TrainConfig(epochs=25, lr=3e-3, **errors))
    assert good.test_metrics["test_error_rate"] < weak.test_metrics["test_error_rate"]  # the premise
    assert client.get_run(good.run_id).data.tags["fitflow.monitor_mode"] == "min"
    champion = client.get_model_version_by_alias("err", "champion")
    assert champion.run_id == good.run_id and " < " in champion.description and "beats" in champion.description
    # weak again, tested on another split: the champion is re-scored there, and its fewer errors keep it champion
    other_split = train(TrainConfig(epochs=1, lr=1e-6, seed=7, **errors))
    assert client.get_model_version_by_alias("err", "champion").run_id == good.run_id
    challenger = client.get_model_version_by_alias("err", "challenger")
    assert challenger.run_id == other_split.run_id and challenger.tags["fitflow.champion_rescored"] == "true"
    assert "does not beat" in challenger.description and "re-scored" in challenger.description
    rescored = client.get_run(other_split.run_id).data.metrics  # both on the test rows the champion did not see
    assert rescored["champion_test_error_rate"] < rescored["gate_test_error_rate"]
