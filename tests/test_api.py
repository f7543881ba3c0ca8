"""The Python API (fitflow/): compile + fit on arrays, a DataFrame, a Dataset and a DataLoader, each
learning a learnable problem; the MLflow run it writes; resume after an interrupted fit; evaluate,
predict and log_model with the registry's gate; fit as a Prefect flow run; bad arguments; and
the README's notebook example, run as written. Real torch, a real MLflow store, real Prefect."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torchmetrics
import user_code_examples
from conftest import REPO, write_mixed_classification_csv
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fitflow
from flows.resume import config_of_run
from tasks.config import Launch
from tasks.data import encode_split
from tasks.errors import ConfigError
from tasks.linear_fit import fit_logistic


class Net(nn.Module):
    """A small MLP; its constructor takes the sizes fitflow passes when the logged model rebuilds it."""

    def __init__(self, in_features: int, out_features: int, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Pairs(Dataset):
    """A map-style Dataset of (x, y) items over two tensors."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class StopAt(fitflow.callbacks.Callback):
    """Raises at the end of epoch `epoch` (after it is checkpointed and journaled): an interrupted fit."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, state) -> None:
        if state.epoch == self.epoch:
            raise KeyboardInterrupt(f"stopped at epoch {state.epoch}")


class Epochs(fitflow.callbacks.Callback):
    """Records the epochs this fit ran."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_epoch_end(self, state) -> None:
        self.seen.append(state.epoch)


def _problem(rows: int = 1500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes from two linear boundaries: a model that learns gets well above 0.9."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] - x[:, 3] > 1).astype(np.int64)
    return x, y


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float((probabilities.argmax(axis=1) == labels).mean())


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_fit_on_arrays_trains_the_model_in_place_and_tracks_the_run(mlflow_uri):
    x, y = _problem()
    model = Net(8, 3)
    trainer = fitflow.compile(model, optimizer="adamw", loss="cross_entropy", metrics=["accuracy", "f1_macro"],
                              lr=1e-2, experiment="api-arrays", seed=3)
    history = trainer.fit((x[:1000], y[:1000]), validation_data=(x[1000:1200], y[1000:1200]), epochs=8, batch_size=64,
                          callbacks=[fitflow.callbacks.EarlyStopping(patience=3)])
    assert isinstance(history, fitflow.History) and len(history) == 8
    assert set(history.history) == {"train_loss", "val_loss", "val_accuracy", "val_f1_macro", "val_auroc"}
    assert trainer.model is model  # trained in place: the caller's object holds the best weights
    test = trainer.evaluate((x[1200:], y[1200:]))
    assert trainer.baseline_metrics == {}  # arrays train as given, no table preprocessing: no linear baseline
    assert set(test) == {"test_loss", "test_accuracy", "test_f1_macro", "test_auroc"}
    assert test["test_accuracy"] > 0.9
    probabilities = trainer.predict(x[1200:])
    assert probabilities.shape == (300, 3) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert _accuracy(probabilities, y[1200:]) == pytest.approx(test["test_accuracy"])
    with torch.no_grad():  # the caller's model itself predicts as well
        assert _accuracy(model(torch.from_numpy(x[1200:])).numpy(), y[1200:]) == pytest.approx(test["test_accuracy"])

    client = MlflowClient(mlflow_uri)
    run = client.get_run(trainer.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "test_api:Net" and run.data.params["optimizer"] == "adamw"
    assert run.data.params["lr"] == "0.01" and run.data.params["patience"] == "3" and run.data.params["epochs"] == "8"
    assert run.data.params["data"] == "<arrays>" and run.data.params["data.rows_train"] == "1000"
    assert run.data.tags["fitflow.entry"] == "python"
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert _steps(client, trainer.run_id, key) == list(range(1, 9)), key
    assert run.data.metrics["test_accuracy"] == pytest.approx(test["test_accuracy"])
    model_uri = trainer.log_model()
    logged = mlflow.pyfunc.load_model(model_uri).predict(x[1200:])
    assert np.allclose(logged[[f"probability_{c}" for c in range(3)]].to_numpy(), probabilities, atol=1e-5)


class BatchLosses(fitflow.callbacks.Callback):
    """Records (epoch, batch, global step) at each training batch: the batch hook through the API."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def on_train_batch_end(self, state, batch, loss) -> None:
        self.seen.append((state.epoch, batch, state.step))


def test_the_loop_features_through_the_api(mlflow_uri, tmp_path, monkeypatch):
    """Your loss, metrics (path, function, torchmetrics object) and callbacks (object, path), gradient
    accumulation, a per-step warmup schedule and per-step logging: each as compile's or fit's argument."""
    monkeypatch.setenv("RECORD_CALLS_TO", str(tmp_path / "calls.jsonl"))
    x, y = _problem(rows=600, seed=9)
    f1 = torchmetrics.classification.MulticlassF1Score(num_classes=3, average="macro")
    trainer = fitflow.compile(
        Net(8, 3), loss=user_code_examples.label_smoothed_cross_entropy, lr=1e-2, experiment="api-loop",
        metrics=["accuracy", "user_code_examples:error_rate", f1], accumulate_grad_batches=2,
        scheduler="warmup_cosine", warmup_steps=3, log_every_n_steps=1, monitor="val_error_rate")
    batches = BatchLosses()
    history = trainer.fit(x[:400], y[:400], validation_data=(x[400:500], y[400:500]), epochs=3, batch_size=50,
                          callbacks=[batches, "user_code_examples:RecordCalls"])
    assert {"val_error_rate", "val_multiclass_f1_score"} <= set(history.history)
    assert history.history["val_error_rate"] == pytest.approx([1 - a for a in history.history["val_accuracy"]])
    # 8 batches an epoch, one optimizer step after every 2nd of them: steps 1..4, 5..8, 9..12
    assert batches.seen == [(epoch, batch, 4 * (epoch - 1) + (batch + 1) // 2) for epoch in (1, 2, 3) for batch in range(8)]
    recorded = [json.loads(line)["hook"] for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert recorded.count("on_train_batch_end") == 24 and recorded[0] == "on_fit_start" and recorded[-1] == "on_fit_end"
    test = trainer.evaluate(x[500:], y[500:])
    assert test["test_error_rate"] == pytest.approx(1 - test["test_accuracy"])
    assert test["test_multiclass_f1_score"] == pytest.approx(test["test_f1_macro"], abs=1e-6)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(trainer.run_id)
    assert run.info.status == "FINISHED"
    assert _steps(client, trainer.run_id, "train_loss_step") == list(range(1, 13))
    assert run.data.params["accumulate_grad_batches"] == "2" and run.data.params["scheduler"] == "warmup_cosine"
    assert "user_code_examples:error_rate" in run.data.params["metrics"]
    assert json.loads(run.data.tags["fitflow.objects"]) == {
        "model": "Net", "loss_fn": "function", "metrics": ["MulticlassF1Score"]}


def test_fit_on_a_dataframe_uses_the_table_preprocessing(mlflow_uri, tmp_path):
    table = pd.read_csv(write_mixed_classification_csv(tmp_path / "mixed.csv", rows=600))
    train, test = table.iloc[:480], table.iloc[480:]
    trainer = fitflow.compile("mlp", lr=1e-2, experiment="api-table")
    history = trainer.fit(train, target="label", validation_split=0.2, epochs=25, batch_size=32)
    assert history.history["val_accuracy"][-1] > 0.8
    run = MlflowClient(mlflow_uri).get_run(trainer.run_id)
    assert run.data.params["data.rows_train"] == "384" and run.data.params["data.rows_val"] == "96"
    assert "data.rows_test" not in run.data.params  # fit cuts no test split: evaluate's data is the test
    tested = trainer.evaluate(test, target="label")
    assert tested["test_accuracy"] > 0.8
    # As in every table run of the flow: the linear baseline, fitted on fit's training split, scored on the same rows
    assert set(trainer.baseline_metrics) == {f"baseline_{name}" for name in tested}
    run = MlflowClient(mlflow_uri).get_run(trainer.run_id)
    assert {name: run.data.metrics[name] for name in trainer.baseline_metrics} == trainer.baseline_metrics
    assert run.data.tags["fitflow.baseline_model"] == "logistic regression"
    prepared = trainer._data.prepared
    linear = fit_logistic(prepared.train.features, prepared.train.targets, 2)
    rows = encode_split(prepared.preprocessor, test, None)
    with torch.no_grad():
        predicted = linear(torch.as_tensor(rows.features)).argmax(dim=1).numpy()
    assert (predicted == rows.targets).mean() == pytest.approx(trainer.baseline_metrics["baseline_test_accuracy"])
    probabilities = trainer.predict(test.drop(columns=["label"]))
    assert probabilities.shape == (120, 2)  # classes in the preprocessing's order: "no", "yes"
    model = mlflow.pyfunc.load_model(trainer.log_model())
    predicted = model.predict(test.drop(columns=["label"]))  # raw rows, string labels out
    assert (predicted["prediction"] == test["label"].to_numpy()).mean() > 0.8
    assert np.allclose(predicted[["probability_no", "probability_yes"]].to_numpy(), probabilities, atol=1e-5)


def test_fit_on_a_dataset_and_on_dataloaders(mlflow_uri):
    x, y = _problem(seed=1)
    on_datasets = fitflow.compile(Net(8, 3), lr=1e-2, experiment="api-datasets")
    on_datasets.fit(Pairs(x[:1200], y[:1200]), validation_data=Pairs(x[1200:], y[1200:]), epochs=10, batch_size=64)
    on_loaders = fitflow.compile(Net(8, 3), lr=1e-2, experiment="api-datasets")
    on_loaders.fit(DataLoader(Pairs(x[:1200], y[:1200]), batch_size=64, shuffle=True),
                   validation_data=DataLoader(Pairs(x[1200:], y[1200:]), batch_size=256), epochs=10)
    split = fitflow.compile(Net(8, 3), lr=1e-2, experiment="api-datasets")
    split.fit(Pairs(x[:1200], y[:1200]), validation_split=0.25, epochs=10, batch_size=64)
    for trainer in (on_datasets, on_loaders, split):
        assert trainer.history.history["val_accuracy"][-1] > 0.9
        assert trainer.evaluate(Pairs(x[1200:], y[1200:]))["test_accuracy"] > 0.9
        assert _accuracy(trainer.predict(torch.from_numpy(x[1200:])), y[1200:]) > 0.9
        assert trainer.predict(Pairs(x[1200:], y[1200:])).shape == (300, 3)
    client = MlflowClient(mlflow_uri)
    assert client.get_run(split.run_id).data.params["data.rows_val"] == "300"
    assert client.get_run(on_loaders.run_id).data.params["data"] == "<Dataset>"


def test_regression_arrays_predict_in_the_targets_units(mlflow_uri):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1000, 4)).astype(np.float32)
    y = (3 * x[:, 0] - 2 * x[:, 1] + 10).astype(np.float32)
    trainer = fitflow.compile(Net(4, 1), lr=1e-2, metrics=["rmse"], experiment="api-regression")
    trainer.fit(x[:800], y[:800], epochs=30, batch_size=32)
    assert trainer.evaluate(x[800:], y[800:])["test_r2"] > 0.95
    predicted = trainer.predict(x[800:])
    assert predicted.shape == (200,) and np.sqrt(np.mean((predicted - y[800:]) ** 2)) < 0.5


def _seeded_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(8, 3)


def test_an_interrupted_fit_resumes_from_its_last_epoch(mlflow_uri):
    x, y = _problem(seed=4)
    data, validation = (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300])
    settings = {"lr": 1e-2, "experiment": "api-resume", "patience": 0, "scheduler": "cosine", "dropout": 0.2}
    trainer = fitflow.compile(_seeded_net(), **settings)
    with pytest.raises(KeyboardInterrupt, match="stopped at epoch 3"):
        trainer.fit(data, validation_data=validation, epochs=6, batch_size=64, callbacks=[StopAt(3)])
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("api-resume").experiment_id])
    assert run.info.status == "KILLED" and _steps(client, run.info.run_id, "val_loss") == [1, 2, 3]

    epochs = Epochs()
    resumed = fitflow.compile(_seeded_net(1), **settings)  # other initial weights: the checkpoint replaces them
    history = resumed.fit(data, validation_data=validation, epochs=6, batch_size=64, callbacks=[epochs],
                          resume=run.info.run_id)
    assert epochs.seen == [4, 5, 6]  # continued from the checkpoint of epoch 3, not from 0
    assert len(history) == 6 and resumed.run_id == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "val_loss") == [1, 2, 3, 4, 5, 6]  # each epoch once
    # the same training never interrupted ends with the same weights, bit for bit (CPU)
    whole = fitflow.compile(_seeded_net(), **settings)
    whole_history = whole.fit(data, validation_data=validation, epochs=6, batch_size=64)
    assert whole_history.history == history.history
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_resume_refuses_other_settings_and_the_flow_refuses_api_runs(mlflow_uri):
    x, y = _problem(rows=400, seed=5)
    trainer = fitflow.compile(Net(8, 3), experiment="api-refuse")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(x, y, epochs=3, batch_size=64, callbacks=[StopAt(1)])
    run_id = MlflowClient(mlflow_uri).search_runs([MlflowClient(mlflow_uri).get_experiment_by_name("api-refuse")
                                                   .experiment_id])[0].info.run_id
    with pytest.raises(ValueError, match=r"other settings: epochs \(4, the run has 3\)"):
        fitflow.compile(Net(8, 3), experiment="api-refuse").fit(x, y, epochs=4, batch_size=64, resume=run_id)
    with pytest.raises(ConfigError, match=re.escape(f"trainer.fit(..., resume='{run_id}')")):
        config_of_run(run_id, Launch())  # `fitflow resume` cannot: the data and the model are Python objects


def test_log_model_registers_behind_the_champion_gate(mlflow_uri):
    x, y = _problem(seed=6)
    test = (x[1200:], y[1200:])
    better = fitflow.compile(Net(8, 3), lr=1e-2, experiment="api-registry", seed=1)
    better.fit(x[:1200], y[:1200], epochs=6, batch_size=64)
    with pytest.raises(RuntimeError, match="call evaluate"):
        better.log_model(name="api-net")
    better.evaluate(*test)
    assert better.log_model(name="api-net") == "models:/api-net/1" and better.registered.alias == "champion"
    worse = fitflow.compile(Net(8, 3), lr=1e-4, experiment="api-registry", seed=1)
    worse.fit(x[:1200], y[:1200], epochs=1, batch_size=64)
    worse.evaluate(*test)
    assert worse.log_model(name="api-net") == "models:/api-net/2" and worse.registered.alias == "challenger"
    champion = mlflow.pyfunc.load_model("models:/api-net@champion").predict(test[0])
    assert (champion["prediction"].astype(int) == test[1]).mean() > 0.9


def test_a_champion_evaluated_on_other_rows_is_rescored_on_the_newcomers_rows_it_never_saw(mlflow_uri):
    """As the flow's gate: a DataFrame fit records the rows it trained and validated on (all of fit's
    frame), and a champion evaluated on other data is scored on the newcomer's evaluate rows less those."""
    x, y = _problem(rows=1500, seed=6)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(8)]).assign(label=y)
    client = MlflowClient(mlflow_uri)
    settings = {"lr": 1e-2, "experiment": "api-rescored", "seed": 1, "monitor": "val_accuracy"}
    champion = fitflow.compile(Net(8, 3), **settings)
    champion.fit(frame.iloc[:600], target="label", epochs=2, batch_size=64)
    champion.evaluate(frame.iloc[600:800], target="label")
    assert champion.log_model(name="api-rescored").endswith("/1") and champion.registered.alias == "champion"
    assert [a.path for a in client.list_artifacts(champion.run_id, "fitflow")] == ["fitflow/seen_rows.npz"]

    newcomer = fitflow.compile(Net(8, 3), **settings)
    newcomer.fit(frame.iloc[1000:], target="label", epochs=2, batch_size=64)
    newcomer.evaluate(frame.iloc[400:1000], target="label")  # rows 400-599 are rows the champion trained on
    newcomer.log_model(name="api-rescored")
    decision = newcomer.registered
    assert decision.rescored and decision.rows == "400 of 600", decision.reason
    assert "the 200 the champion trained or was validated on left out" in decision.reason
    # each figure is that version's accuracy on rows 600-999, as its own predictions give it
    rows, metrics = frame.iloc[600:1000], client.get_run(newcomer.run_id).data.metrics
    for version, metric in (("1", "champion_test_accuracy"), ("2", "gate_test_accuracy")):
        predicted = mlflow.pyfunc.load_model(f"models:/api-rescored/{version}").predict(rows.drop(columns=["label"]))
        expected = float((predicted["prediction"].astype(int).to_numpy() == rows["label"].to_numpy()).mean())
        assert metrics[metric] == pytest.approx(expected, abs=1e-6), metric


def test_a_lower_is_better_metric_object_gates_the_champion_by_its_own_direction(mlflow_uri):
    """error_rate says higher_is_better = False; by its name alone (not a loss, error, rmse or mae) it would go up."""
    x, y = _problem(seed=6)
    test = (x[1200:], y[1200:])
    metrics = [user_code_examples.error_rate]  # an object: only fit's caller holds it, the config does not
    better = fitflow.compile(Net(8, 3), lr=1e-2, experiment="api-errors", seed=1, metrics=metrics, monitor="val_error_rate")
    better.fit(x[:1200], y[:1200], epochs=6, batch_size=64)
    assert MlflowClient(mlflow_uri).get_run(better.run_id).data.tags["fitflow.monitor_mode"] == "min"
    better.evaluate(*test)
    assert better.log_model(name="api-errors").endswith("/1") and better.registered.alias == "champion"
    worse = fitflow.compile(Net(8, 3), lr=1e-4, experiment="api-errors", seed=1, metrics=metrics, monitor="val_error_rate")
    worse.fit(x[:1200], y[:1200], epochs=1, batch_size=64)
    tested = worse.evaluate(*test)
    assert tested["test_error_rate"] > better.registered.score  # the premise: more errors
    worse.log_model(name="api-errors")
    assert worse.registered.alias == "challenger" and "does not beat" in worse.registered.reason


def test_a_model_the_logged_model_cannot_rebuild_is_refused_with_the_reason(mlflow_uri):
    x, y = _problem(rows=300, seed=7)
    trainer = fitflow.compile(nn.Sequential(nn.Linear(8, 3)), experiment="api-sequential")
    trainer.fit(x, y, epochs=1, batch_size=64)
    assert trainer.predict(x).shape == (300, 3)  # it trains and predicts in the session
    with pytest.raises(ValueError, match="model_kwargs"):
        trainer.log_model()


X, Y = _problem(rows=200, seed=8)
FRAME = pd.DataFrame(X, columns=[f"f{i}" for i in range(8)]).assign(label=Y)


@pytest.mark.parametrize("compile_args, fit_args, error, names", [
    ({"model": 3}, None, TypeError, "model must be"),
    ({"optimizer": "rmsprop"}, None, ValueError, "optimizer"),
    ({"optimizer": 0.1}, None, TypeError, "optimizer must be"),
    ({"loss": 5}, None, TypeError, "loss must be"),
    ({"loss": "focal"}, None, ValueError, "loss"),
    ({"metrics": ["precision"]}, None, ValueError, "metrics: unknown metric 'precision'"),
    ({"metrics": "accuracy"}, None, TypeError, "metrics must be a list"),
    ({"lr": -1}, None, ValueError, "'lr'"),
    ({"epochs": 3}, None, ValueError, "epochs: give the data"),
    ({"hiden_sizes": [8]}, None, ValueError, "unknown argument 'hiden_sizes'; did you mean 'hidden_sizes'"),
    ({"strategy": "ddp"}, None, ValueError, "strategy"),
    ({}, {"x": "table.csv"}, TypeError, "x must be (x, y) arrays"),
    ({}, {"x": FRAME}, ValueError, "target='column'"),
    ({}, {"x": FRAME, "target": "labels"}, ValueError, "target='labels' is not a column"),
    ({}, {"x": X, "y": Y[:10]}, ValueError, "x has 200 rows but y has 10"),
    ({}, {"x": X}, TypeError, "without y"),
    ({}, {"x": X, "y": Y.astype(str)}, TypeError, "y must hold numbers"),
    ({}, {"x": X, "y": Y, "validation_split": 2.0}, ValueError, "validation_split must be a share"),
    ({}, {"x": X, "y": Y, "validation_data": X}, TypeError, "validation_data must be an (x, y) pair"),
    ({}, {"x": X, "y": Y, "callbacks": [print]}, TypeError, "callbacks: builtin_function_or_method"),
    ({}, {"x": X, "y": Y, "epochs": 0}, ValueError, "'epochs'"),
    ({}, {"x": X, "y": Y, "resume": "123"}, ValueError, "not an MLflow run id"),
    ({"metrics": ["rmse"]}, {"x": X, "y": Y}, ValueError, "metrics: 'rmse' is not a classification metric"),
    ({"metrics": [5]}, None, TypeError, "metrics: int is not a metric"),
    ({"metrics": ["user_code_examples:no_such_metric"]}, {"x": X, "y": Y}, ValueError, "has no 'no_such_metric'"),
    ({}, {"x": X, "y": Y, "callbacks": ["user_code_examples:NotACallback"]}, ValueError, "not a Callback"),
    ({}, {"x": X, "y": Y, "callbacks": ["print"]}, TypeError, "'print' is not a fitflow.callbacks.Callback"),
    ({"accumulate_grad_batches": 0}, None, ValueError, "'accumulate_grad_batches'"),
    ({"monitor": "val_r2"}, {"x": X, "y": Y}, ValueError, "monitor 'val_r2' is not logged for classification"),
], ids=lambda value: None)
def test_bad_arguments_raise_one_clear_error_naming_the_argument(mlflow_uri, compile_args, fit_args, error, names):
    compile_args = {"model": Net(8, 3), **compile_args}
    with pytest.raises(error, match=re.escape(names)):
        trainer = fitflow.compile(compile_args.pop("model"), **compile_args)
        trainer.fit(**{"epochs": 1, **fit_args})
    assert not MlflowClient(mlflow_uri).search_runs(
        [e.experiment_id for e in MlflowClient(mlflow_uri).search_experiments()])  # nothing was started


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_fit_as_a_prefect_flow_run(mlflow_uri):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    x, y = _problem(rows=1200, seed=9)
    trainer = fitflow.compile(Net(8, 3), lr=1e-2, experiment="api-flow")
    history = trainer.fit(x, y, epochs=8, batch_size=64, flow=True)
    assert len(history) == 8 and history.history["val_accuracy"][-1] > 0.85
    run = MlflowClient(mlflow_uri).get_run(trainer.run_id)
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert flow_run.state.is_completed() and f"mlflow_run_id:{trainer.run_id}" in flow_run.tags
    assert flow_run.parameters["settings"] == {"data": "<arrays>", "epochs": 8, "batch_size": 64}
    assert {"start_run", "build_loaders", "train_model"} <= {task.name.rsplit("-", 1)[0] for task in tasks}


@pytest.mark.slow
def test_the_readme_notebook_example_runs_as_written(tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"<!-- notebook example: tests/test_api.py runs it -->\n```python\n(.*?)```", readme, re.S)
    script = tmp_path / "notebook.py"
    script.write_text(code, encoding="utf-8")
    env = {"FITFLOW_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(tmp_path / "home" / "mlflow.db").exists()  # tracked in the default store under FITFLOW_HOME


LOG_MODEL_OUTSIDE_PREFECT = """
import json, sys
import numpy as np
import psutil
import fitflow
from custom_models import TinyNet

rng = np.random.default_rng(0)
x = rng.normal(size=(300, 4)).astype(np.float32)
y = (x[:, 0] > 0).astype(np.int64)
model = fitflow.compile(TinyNet(4, 2), experiment="outside-prefect", seed=0)
model.fit(x[:200], y[:200], epochs=1, batch_size=50)
model.evaluate(x[200:], y[200:])
uri = model.log_model(name="outside-prefect")
print(json.dumps({"uri": uri, "children": [" ".join(p.cmdline())[:200] for p in psutil.Process().children(recursive=True)]}))
"""


def test_log_model_outside_prefect_starts_no_prefect_server(tmp_path):
    """`log_model(name=...)` emits fitflow.model.promoted; with no Prefect API in use (no PREFECT_API_URL,
    no flow run) Prefect would start a temporary server of its own to take the event, about 10 s and
    a process, for an event nobody reads. The event is not sent, and the log says so."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FITFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", FITFLOW_HOME=str(tmp_path / "home"),
               PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(REPO / "tests"))
    done = subprocess.run([sys.executable, "-c", LOG_MODEL_OUTSIDE_PREFECT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["uri"] == "models:/outside-prefect/1"
    assert seen["children"] == [], f"a process was started: {seen['children']}"
    assert "temporary server" not in done.stdout + done.stderr
