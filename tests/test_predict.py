"""The `predict` flow and `fitflow predict`: a registered model scores raw rows; every bad input exits 2."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_mixed_classification_csv
from mlflow.tracking import MlflowClient

from flows.cli import main
from flows.environment import fitflow_home
from flows.predict import PredictConfig, predict
from flows.train import train
from tasks.config import TrainConfig
from tasks.data import load_table, prepare, split_rows
from tasks.models import build_model, model_spec
from tasks.preprocessing import infer_task
from tasks.trainer import prep_spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_server):
    """One model on a table with numeric and text features, missing values and string labels."""
    folder = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        data = write_mixed_classification_csv(folder / "mixed.csv")
        config = TrainConfig(data=str(data), target="label", epochs=8, experiment="predict", register_model="mixed")
        yield config, train(config), folder


def test_predict_reproduces_the_training_runs_test_predictions_exactly(trained, tmp_path):
    config, result, folder = trained
    raw = load_table(config.data)  # read as the train flow read it
    spec = prep_spec(config)
    _, _, test_rows = split_rows(raw[config.target], infer_task(raw[config.target], config.task), spec)
    test = raw.iloc[test_rows]
    test.to_csv(tmp_path / "test.csv", index=False)  # raw rows, target included: the summary scores them

    out = predict(PredictConfig(model="models:/mixed@champion", data=str(tmp_path / "test.csv"), out=str(tmp_path / "p.parquet")))
    assert not (fitflow_home() / "checkpoints" / out.run_id).exists()  # its owner record ended with the run

    # What the run's best weights predict for its own test split, computed here from the checkpoint
    client = MlflowClient()
    prepared = prepare(raw, spec)
    p = prepared.preprocessor
    net = build_model(model_spec("mlp", p.n_features, len(p.classes), {"hidden_sizes": config.hidden_sizes,
                      "activation": config.activation, "dropout": config.dropout, "batch_norm": config.batch_norm,
                      "linear_path": config.linear_path}))
    checkpoint = torch.load(client.download_artifacts(result.run_id, "checkpoints/best.pt", str(tmp_path)), weights_only=True)
    net.load_state_dict(checkpoint["model"])
    net.eval()
    with torch.inference_mode():
        expected = p.decode(net(torch.from_numpy(prepared.test.features)).numpy())
    predictions = pd.read_parquet(out.out)
    pd.testing.assert_frame_equal(predictions, expected, check_exact=True)
    assert out.summary["metrics"]["accuracy"] == pytest.approx(result.test_metrics["test_accuracy"], abs=1e-6)

    run = client.get_run(out.run_id)
    version = client.get_model_version_by_alias("mixed", "champion")
    assert run.info.status == "FINISHED" and run.data.tags["fitflow.model_version"] == str(version.version)
    assert run.data.tags["fitflow.source_run_id"] == result.run_id
    assert [m.model_id for m in run.inputs.model_inputs] == [result.model_uri.removeprefix("models:/")]
    assert json.loads(open(out.summary_path).read())["rows"] == len(test_rows)
    assert {a.path for a in client.list_artifacts(out.run_id)} >= {"p.parquet.summary.json", "predictions_head.csv"}


def test_unseen_categories_and_missing_values_are_encoded_and_counted(trained, tmp_path):
    config, _, _ = trained
    rows = pd.read_csv(config.data).drop(columns=["label"]).head(20)
    rows.loc[[0, 1], "colour"] = "purple"
    rows.loc[2, "x2"] = np.nan
    rows.to_csv(tmp_path / "rows.csv", index=False)
    out = predict(PredictConfig(model="models:/mixed/1", data=str(tmp_path / "rows.csv"), out=str(tmp_path / "p.csv")))
    written = pd.read_csv(out.out)
    assert len(written) == 20 and set(written["prediction"]) <= {"yes", "no"}
    assert np.allclose(written[["probability_no", "probability_yes"]].sum(axis=1), 1.0, atol=1e-5)
    assert out.summary["unseen_categories"] == {"colour": 2}
    assert out.summary["filled_missing"]["x2"] >= 1 and "metrics" not in out.summary


def _rows(trained, tmp_path, change) -> str:
    frame = pd.read_csv(trained[0].data).head(30)
    change(frame)
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    return str(path)


def _set(frame, column, row, value):
    frame[column] = frame[column].astype(object)
    frame.loc[row, column] = value


ERRORS = {
    "not a model uri": (["--model", "mixed@champion"], "is not a model URI; use models:/<name>@<alias>"),
    "unknown registered model": (["--model", "models:/mixd@champion"], "no registered model 'mixd'"),
    "missing alias": (["--model", "models:/mixed@production"], "has no alias 'production'; its aliases are: champion"),
    "missing version": (["--model", "models:/mixed/7"], "has no version 7; versions are 1 to 1"),
    "unknown run": (["--model", "0" * 32], "run 00000000000000000000000000000000 does not exist"),
    "missing column": (["--data", lambda t, p: _rows(t, p, lambda f: f.drop(columns=["x2"], inplace=True))],
                       "input is missing column(s) 'x2' that the model was trained on"),
    "text in a numeric column": (["--data", lambda t, p: _rows(t, p, lambda f: _set(f, "x1", 4, "abc"))],
                                 "column 'x1' row 5: 'abc' is not a number"),
    "unseen category refused": (["--unseen", "error", "--data", lambda t, p: _rows(t, p, lambda f: _set(f, "colour", 2, "purple"))],
                                "column 'colour' row 3: 'purple' never occurred in training"),
    "missing data file": (["--data", lambda t, p: str(p / "nope.csv")], "data file not found"),
    "bad output suffix": (["--out", lambda t, p: str(p / "p.txt")], "write predictions to a .csv or .parquet file"),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_bad_input_exits_2_with_one_line_and_no_run_left_running(case, trained, tmp_path, capsys):
    extra, message = ERRORS[case]
    args = {"--model": "models:/mixed@champion", "--data": trained[0].data, "--out": str(tmp_path / "p.csv")}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value(trained, tmp_path) if callable(value) else value
    client = MlflowClient()
    before = len(_prediction_runs(client))
    assert main(["predict", *[part for pair in args.items() for part in pair]]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fitflow: error:") and message in last, last
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert len(_prediction_runs(client)) == before  # found before any prediction run was created


def _prediction_runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.fitflow.flow = 'predict'")


def _drift_events(model_name: str) -> list:
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        return client.read_events(EventFilter(event=EventNameFilter(name=["fitflow.drift.detected"]),
                                              resource=EventResourceFilter(id=[f"fitflow.model.{model_name}"])),
                                  limit=50).events


def test_drift_per_column_is_logged_and_above_the_threshold_is_an_event(trained, tmp_path):
    import time

    config, result, folder = trained
    rows = load_table(config.data)
    steady = predict(PredictConfig(model="models:/mixed@champion", data=config.data, out=str(tmp_path / "same.csv")))
    assert steady.summary["drift"]["drifted"] == [] and steady.summary["drift"]["max_psi"] < 0.2
    client = MlflowClient()
    assert client.get_run(steady.run_id).data.tags["fitflow.drift"] == "none"

    shifted = rows.copy()
    shifted["x2"] = shifted["x2"] + 30  # three training standard deviations up
    shifted.loc[shifted.index[::2], "colour"] = "purple"  # a colour the model never saw
    shifted.to_csv(tmp_path / "shifted.csv", index=False)
    out = predict(PredictConfig(model="models:/mixed@champion", data=str(tmp_path / "shifted.csv"),
                                out=str(tmp_path / "p.csv"), drift_threshold=0.2))
    drift = out.summary["drift"]
    assert set(drift["drifted"]) == {"x2", "colour"} and "x1" not in drift["drifted"]
    assert drift["columns"]["colour"]["unseen_share"] == pytest.approx(0.5, abs=0.01)
    assert drift["columns"]["x1"]["psi"] < 0.1
    run = client.get_run(out.run_id)
    assert run.data.metrics["drift_psi_x2"] == pytest.approx(drift["columns"]["x2"]["psi"], abs=1e-6)
    assert drift["columns"]["x2"]["psi"] > 0.2
    assert run.data.metrics["drift_unseen_share_colour"] == pytest.approx(0.5, abs=0.01)
    assert set(run.data.tags["fitflow.drift"].split(", ")) == {"x2", "colour"}
    table = pd.read_csv(client.download_artifacts(out.run_id, "drift.csv", str(tmp_path)))
    assert set(table.loc[table["drifted"], "column"]) == {"x2", "colour"}

    def of_these_runs() -> list:  # other tests of this module score drifted rows with the same model too
        return [e for e in _drift_events("mixed") if e.payload["mlflow_run_id"] in (steady.run_id, out.run_id)]

    deadline = time.monotonic() + 120  # events reach the server from a background sender; this bounds a hang
    while not of_these_runs() and time.monotonic() < deadline:
        time.sleep(0.2)
    (event,) = of_these_runs()  # the steady run emitted none
    assert event.payload["training_data"] == config.data and event.payload["model_name"] == "mixed"
    assert event.payload["target"] == "label"
    assert set(event.payload["drifted"]) == {"x2", "colour"} and event.payload["mlflow_run_id"] == out.run_id
    assert {r.id for r in event.related} >= {f"mlflow.run.{out.run_id}", f"mlflow.model.{out.model_uri}"}


def test_the_logged_model_class_draws_no_mlflow_warning():
    """MLflow warns at class definition when a PythonModel's predict has no type hint for its
    input; every `fitflow train` printed that warning. The hint (a DataFrame) is one MLflow takes
    as is, without validating or inferring a signature from it: fitflow logs its own signature."""
    import subprocess
    import sys

    probe = ("import warnings\n"
             "warnings.simplefilter('always')\n"
             "with warnings.catch_warnings(record=True) as caught:\n"
             "    import tasks.serving\n"
             "print([str(w.message) for w in caught if 'type hint' in str(w.message)])\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
