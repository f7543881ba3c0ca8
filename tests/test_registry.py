"""The promotion gate against a real MLflow registry: real training runs, real scores."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows.train import train
from tasks.config import TrainConfig
from tasks.data import load_table

pytestmark = pytest.mark.usefixtures("prefect_server")

BASE = dict(monitor="val_accuracy", patience=0, experiment="registry", register_model="bc")


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


def test_a_model_tested_on_other_data_never_takes_the_champion_alias(mlflow_uri):
    client = MlflowClient(mlflow_uri)
    train(TrainConfig(epochs=1, lr=1e-6, **BASE))  # a weak champion
    other_split = train(TrainConfig(epochs=20, lr=3e-3, seed=7, **BASE))  # better, but another test split
    assert str(_version(client, "champion").version) == "1"
    challenger = _version(client, "challenger")
    assert challenger.run_id == other_split.run_id
    assert "not comparable" in challenger.description and "seed" in challenger.description
