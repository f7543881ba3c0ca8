"""End-to-end: the real `train` flow on a real Prefect server and a real MLflow store."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import task_states, write_mixed_classification_csv, write_regression_csv
from mlflow.tracking import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.train import train
from tasks import tracking
from tasks.config import TrainConfig
from tasks.data import load_table
from tasks.errors import TrainingError

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_train_flow_on_the_shipped_dataset(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "..")  # nothing may be written relative to the working directory
    before = set(os.listdir("."))
    result = train(TrainConfig(experiment="e2e"))
    assert set(os.listdir(".")) == before
    assert result.test_metrics["test_accuracy"] >= 0.95
    assert result.epochs_trained == result.best_epoch + TrainConfig().patience  # early stopping ended it, not the cap

    client = MlflowClient(mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # params: the hyperparameters plus dataset facts and what `auto` settings came to; launch settings are
    # tags; config.json the whole config
    config = TrainConfig(experiment="e2e")
    assert {k for k in run.data.params if not k.startswith(("data.", "resolved."))} == set(config.params())
    assert {k for k in run.data.params if k.startswith("resolved.")} == {"resolved.weight_decay"}
    assert {k: v for k, v in run.data.tags.items() if k.startswith("fitflow.launch.")} == config.launch_tags()
    logged = client.download_artifacts(result.run_id, "config.json", str(tmp_path))
    assert TrainConfig.model_validate_json(Path(logged).read_text()) == config
    assert run.data.params["epochs"] == "1000" and run.data.params["hidden_sizes"] == "[64, 32]"
    assert run.data.params["baseline"] == "true" and "baseline_test_accuracy" in run.data.metrics
    rows = [int(run.data.params[f"data.rows_{split}"]) for split in ("train", "val", "test")]
    assert sum(rows) == 569 and rows[1] == rows[2] == 86 and run.data.params["data.n_classes"] == "2"
    # per-epoch metrics with step = epoch, Keras-style names; test metrics at the end
    epochs = result.epochs_trained
    for name in ("train_loss", "val_loss", "val_accuracy", "val_f1_macro", "val_auroc"):
        steps = [m.step for m in client.get_metric_history(result.run_id, name)]
        assert sorted(steps) == list(range(1, epochs + 1)), name
    assert {"test_loss", "test_accuracy", "test_f1_macro", "test_auroc"} <= set(run.data.metrics)
    # what the machine did (system metrics, sampled off the training thread) and which code ran
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert run.data.tags["fitflow.git.dirty"] in ("true", "false")
    # the dataset as a run input, with its digest
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest and dataset_input.dataset.name == "breast_cancer"
    assert run.data.tags["fitflow.dataset_digest"] == dataset_input.dataset.digest
    # artifacts: learning curves and the best checkpoint
    artifacts = {a.path for folder in ("plots", "checkpoints") for a in client.list_artifacts(result.run_id, folder)}
    assert artifacts == {"plots/learning_curves.png", "checkpoints/best.pt"}
    # the MLflow run and the Prefect flow run point at each other
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        assert f"mlflow_run_id:{result.run_id}" in prefect.read_flow_run(flow_run_id).tags
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert {"train-summary", "mlflow-run"} <= {a.key for a in artifacts}
    # the model is a LoggedModel of the run, in the run's experiment, stored beside the database
    logged = client.get_logged_model(result.model_uri.removeprefix("models:/"))
    assert logged.experiment_id == run.info.experiment_id and logged.source_run_id == result.run_id
    assert logged.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    # its requirements are fitflow's explicit pins: MLflow's inference (8-11 s here, in a subprocess) never ran
    requirements = Path(mlflow.pyfunc.get_model_dependencies(result.model_uri)).read_text().splitlines()
    assert {line for line in requirements if line and not line.startswith("#")} == set(tracking._requirements({"model": "mlp"}, None))
    # the model predicts raw rows of the original file in the original label space
    raw = load_table("breast_cancer")
    predictions = mlflow.pyfunc.load_model(result.model_uri).predict(raw.drop(columns=["diagnosis"]))
    assert set(predictions["prediction"]) <= {"malignant", "benign"}
    assert (predictions["prediction"] == raw["diagnosis"]).mean() > 0.95
    assert np.allclose(predictions[["probability_benign", "probability_malignant"]].sum(axis=1), 1.0, atol=1e-5)


def test_same_seed_same_metrics_and_the_prep_cache_is_hit(mlflow_uri):
    config = TrainConfig(epochs=4, patience=0, experiment="determinism")
    first = train(config)
    second = train(config)
    assert first.history == second.history and first.test_metrics == second.test_metrics
    client = MlflowClient(mlflow_uri)
    second_flow_run = client.get_run(second.run_id).data.tags["prefect.flow_run_id"]
    assert task_states(second_flow_run)["prepare"] == "Cached"
    other = train(config.model_copy(update={"seed": 1}))
    assert other.history != first.history
    other_flow_run = client.get_run(other.run_id).data.tags["prefect.flow_run_id"]
    assert task_states(other_flow_run)["prepare"] == "Completed"  # the seed changes the split


def test_regression_target(mlflow_uri, tmp_path):
    path = write_regression_csv(tmp_path / "houses.csv")
    result = train(TrainConfig(data=str(path), target="price", epochs=60, lr=0.01, experiment="regression"))
    assert result.test_metrics["test_r2"] > 0.9
    assert {"val_rmse", "val_mae", "val_r2"} <= set(result.history)
    raw = pd.read_csv(path)
    predicted = mlflow.pyfunc.load_model(result.model_uri).predict(raw.drop(columns=["price"]))["prediction"]
    assert np.sqrt(np.mean((predicted - raw["price"]) ** 2)) < 0.5 * raw["price"].std()


def test_csv_with_string_categoricals_missing_values_and_string_labels(mlflow_uri, tmp_path):
    path = write_mixed_classification_csv(tmp_path / "mixed.csv")
    result = train(TrainConfig(data=str(path), target="label", epochs=40, experiment="mixed"))
    assert result.test_metrics["test_accuracy"] > 0.8
    raw = pd.read_csv(path)
    rows = raw.drop(columns=["label"])
    rows.loc[0, "colour"] = "purple"  # unseen category: documented as all-zero one-hot
    predictions = mlflow.pyfunc.load_model(result.model_uri).predict(rows)
    assert set(predictions["prediction"]) <= {"yes", "no"}


def test_custom_module_by_import_path(mlflow_uri, tmp_path):
    config = TrainConfig(model="custom_models:TinyNet", model_kwargs={"width": 16}, epochs=5, experiment="custom")
    result = train(config)
    assert MlflowClient(mlflow_uri).get_run(result.run_id).data.params["model"] == "custom_models:TinyNet"
    # A fresh process where the test helpers are not importable, with pickle loading forbidden:
    # the model must bring its own code (code_paths) and load without any pickle.
    script = (
        "import mlflow, pandas as pd, sys; "
        "m = mlflow.pyfunc.load_model(sys.argv[1]); "
        "rows = pd.read_csv(sys.argv[2]).drop(columns=['diagnosis']).head(3); "
        "print(list(m.predict(rows)['prediction']))"
    )
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false", "MLFLOW_TRACKING_URI": mlflow_uri}
    env.pop("PYTHONPATH", None)
    data = Path(__file__).resolve().parents[1] / "data" / "breast_cancer.csv"
    out = subprocess.run([sys.executable, "-c", script, result.model_uri, str(data)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert set(ast.literal_eval(out.stdout.strip().splitlines()[-1])) <= {"malignant", "benign"}


def test_a_failing_run_ends_failed_with_the_error(mlflow_uri):
    with pytest.raises(TrainingError, match="epoch 1, batch 2"):
        train(TrainConfig(model="custom_models:NaNAfterFirstStep", experiment="failing"))
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert run.info.status == "FAILED"
    assert "loss became nan at epoch 1, batch 2" in run.data.tags["fitflow.error"]
