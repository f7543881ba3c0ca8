"""Scoring a model never runs code that came with it (tasks/model_loading.py).

Anyone who can log a model to the tracking server chooses what its files hold. `fitflow predict`
must read a fitflow model as data (spec and preprocessing JSON, weights with weights_only) with
this checkout's code, refuse anything else before building it, and import a custom network's
code only with --trust-model-code. Each payload below writes a marker file when it runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from tasks import tracking
from tasks.config import TrainConfig
from tasks.data import load_table, prepare
from tasks.errors import ConfigError
from tasks.models import build_model, model_spec
from tasks.trainer import prep_spec

pytestmark = pytest.mark.usefixtures("prefect_server")
REPO = Path(__file__).resolve().parents[1]


def _payload(marker: Path) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('artifact code ran')\n"


def _log_fitflow_model(tmp_path: Path, mlflow_uri: str, network: str = "mlp") -> tuple[str, Path, pd.DataFrame]:
    """A fitflow model of the shipped table (untrained: loading is under test); its URI, its folder
    in the artifact store, and raw rows to score."""
    config = TrainConfig(epochs=1)
    table = load_table(config.data)
    p = prepare(table, prep_spec(config)).preprocessor
    spec = model_spec(network, p.n_features, len(p.classes), {})
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("loading", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    rows = table.drop(columns=[config.target]).head(20)
    uri = tracking.log_pyfunc_model(client, run_id, build_model(spec).eval(), spec, p, rows)
    client.set_terminated(run_id)
    folder = next((tmp_path / "artifacts").rglob("model_code.py")).parent
    return uri, folder, rows


def _predict(uri: str, rows: pd.DataFrame, tmp_path: Path, *flags: str) -> int:
    rows.to_csv(tmp_path / "rows.csv", index=False)
    return main(["predict", "--model", uri, "--data", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "p.csv"), *flags])


def test_predict_scores_a_tampered_fitflow_model_without_running_its_code(mlflow_uri, tmp_path):
    uri, folder, rows = _log_fitflow_model(tmp_path, mlflow_uri)
    expected = mlflow.pyfunc.load_model(uri).predict(rows)  # before anyone tampers with it
    marker = tmp_path / "ran"
    for shipped in (folder / "model_code.py", folder / "code" / "tasks" / "serving.py"):
        shipped.write_text(_payload(marker) + shipped.read_text())

    assert _predict(uri, rows, tmp_path) == 0

    assert not marker.exists()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "p.csv"), expected.astype({"prediction": object}),
                                  check_dtype=False, atol=1e-6)


def test_predict_refuses_a_model_that_is_not_fitflows_before_running_it(mlflow_uri, tmp_path, capsys):
    marker = tmp_path / "ran"
    code = tmp_path / "other_model.py"
    code.write_text(_payload(marker) + textwrap.dedent("""
        import mlflow.models, mlflow.pyfunc

        class Echo(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):
                return model_input

        mlflow.models.set_model(Echo())
    """))
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("other", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), pip_requirements=["mlflow"])
    marker.unlink()  # logging ran it once, in this test's own process

    assert _predict(info.model_uri, pd.DataFrame({"x": [1.0]}), tmp_path) == 2

    assert not marker.exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"fitflow: error: model {info.model_uri} is not a fitflow model" in last, last


def test_a_custom_network_is_built_only_with_trust_model_code(mlflow_uri, tmp_path, capsys):
    uri, _, rows = _log_fitflow_model(tmp_path, mlflow_uri, network="custom_models:TinyNet")

    assert _predict(uri, rows, tmp_path) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "custom code ('custom_models:TinyNet')" in last and "--trust-model-code" in last, last
    assert not (tmp_path / "p.csv").exists()

    assert _predict(uri, rows, tmp_path, "--trust-model-code") == 0
    expected = mlflow.pyfunc.load_model(uri).predict(rows)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "p.csv"), expected.astype({"prediction": object}),
                                  check_dtype=False, atol=1e-6)


def test_a_custom_network_the_process_trains_is_built_from_this_machines_code(mlflow_uri, tmp_path):
    """The registry gate re-scores a champion of the class the new run trains (`own_network`): built
    without --trust-model-code from the class this process imports anyway, never from the packed copy."""
    from tasks.model_loading import load_fitflow_model

    uri, folder, rows = _log_fitflow_model(tmp_path, mlflow_uri, network="custom_models:TinyNet")
    marker = tmp_path / "ran"
    packed = next((folder / "code").rglob("custom_models.py"))
    packed.write_text(_payload(marker) + packed.read_text())
    path = list(sys.path)

    model = load_fitflow_model(uri, own_network="custom_models:TinyNet")

    assert not marker.exists() and sys.path == path
    pd.testing.assert_frame_equal(model.predict(None, rows), mlflow.pyfunc.load_model(uri).predict(rows))
    with pytest.raises(ConfigError, match="custom code .*--trust-model-code"):
        load_fitflow_model(uri, own_network="custom_models:OtherNet")


class Pickled(mlflow.pyfunc.PythonModel):
    """Pickled with the model; unpickling it runs __setstate__, which writes the marker."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).write_text("unpickled")
        self.__dict__.update(state)

    def predict(self, context, model_input, params=None):
        return model_input


def test_fitflow_processes_refuse_to_unpickle_models(tmp_path):
    marker = tmp_path / "ran"
    mlflow.pyfunc.save_model(str(tmp_path / "pickled"), python_model=Pickled(str(marker)), pip_requirements=["mlflow"])
    script = ("import sys\nfrom flows.environment import configure_environment\nconfigure_environment()\n"
              "import mlflow\nmlflow.pyfunc.load_model(sys.argv[1])\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "FITFLOW_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)  # MLflow's default: allowed

    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "pickled")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)

    assert out.returncode != 0 and "Deserializing model using pickle is disallowed" in out.stderr, out.stderr[-2000:]
    assert not marker.exists()
