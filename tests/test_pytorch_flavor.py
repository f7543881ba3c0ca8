"""The logged model's `pytorch` flavor: `mlflow.pytorch.load_model(uri)` gives the trained network.

Each run is trained through the flow against a sqlite MLflow store, then read back in a fresh
process with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false and without the test helpers importable,
the way a teammate loads a model elsewhere. The exported network must give the same outputs as
the pyfunc's network (rebuilt from the state dict), as the pyfunc's probabilities, and as the
run's best checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_mixed_classification_csv
from mlflow.tracking import MlflowClient
from torch import nn

from flows.train import train
from tasks import pytorch_flavor, tracking
from tasks.config import TrainConfig
from tasks.data import load_table, prepare
from tasks.models import build_model, model_spec
from tasks.trainer import prep_spec

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh process: both flavors of one URI, fed the same inputs.
LOAD_BOTH = """
import importlib.util, json, sys
import mlflow, pandas as pd, torch
uri, rows = sys.argv[1], pd.read_parquet(sys.argv[2])
user_code_importable = importlib.util.find_spec("custom_models") is not None  # before the pyfunc adds its code paths
net = mlflow.pytorch.load_model(uri)
pyfunc = mlflow.pyfunc.load_model(uri)
own = pyfunc.unwrap_python_model()
x = own.model_inputs(rows)
with torch.no_grad():
    exported, rebuilt, first = net(x), own.model(x), net(x[:1])
print(json.dumps({
    "is_module": isinstance(net, torch.nn.Module), "devices": sorted({p.device.type for p in net.parameters()}),
    "own_class": type(own.model).__name__, "user_code_importable": user_code_importable,
    "inputs": x.tolist(), "exported": exported.tolist(), "rebuilt": rebuilt.tolist(), "first": first.tolist(),
    "probabilities": pyfunc.predict(rows).filter(like="probability_").to_numpy().tolist()}))
"""


def _load_in_a_fresh_process(model_uri: str, rows: pd.DataFrame, mlflow_uri: str, tmp_path: Path) -> dict:
    rows.to_parquet(tmp_path / "rows.parquet")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    env.pop("PYTHONPATH", None)  # the model brings the code it needs, or needs none
    out = subprocess.run([sys.executable, "-c", LOAD_BOTH, model_uri, str(tmp_path / "rows.parquet")], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_outputs(loaded: dict, model_uri: str, run_id: str, mlflow_uri: str, tmp_path: Path) -> None:
    """The exported network = the pyfunc's network = the best checkpoint, and its softmax = the pyfunc's probabilities."""
    assert loaded["is_module"] and loaded["devices"] == ["cpu"]
    exported = np.array(loaded["exported"])
    np.testing.assert_allclose(exported, np.array(loaded["rebuilt"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(exported[:1], np.array(loaded["first"]), rtol=0, atol=1e-5)  # a batch of one too
    np.testing.assert_allclose(torch.softmax(torch.tensor(exported), 1).numpy(), np.array(loaded["probabilities"]),
                               rtol=0, atol=1e-5)

    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / "model")))
    spec = json.loads((model_dir / "artifacts" / "model_spec.json").read_text())
    best = build_model(spec)
    checkpoint = MlflowClient(mlflow_uri).download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path))
    best.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    best.eval()
    with torch.no_grad():
        expected = best(torch.tensor(loaded["inputs"], dtype=torch.float32)).numpy()
    np.testing.assert_allclose(exported, expected, rtol=0, atol=1e-5)

    # one model, two flavors, nothing pickled in it
    flavors = mlflow.models.Model.load(str(model_dir)).flavors
    assert flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # fitflow's, from code
    assert (model_dir / flavors["pytorch"]["model_data"] / "model.pt2").is_file()
    assert not [p.name for p in model_dir.rglob("*") if p.suffix in (".pkl", ".pth", ".pickle")]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_table_run_loads_as_a_torch_module_with_pickle_off(mlflow_uri, tmp_path):
    data = write_mixed_classification_csv(tmp_path / "mixed.csv")
    # dropout and batch norm: outputs only match if the network is in eval mode
    result = train(TrainConfig(data=str(data), target="label", epochs=3, dropout=0.3, batch_norm=True, experiment="flavor"))
    rows = pd.read_csv(data).drop(columns=["label"]).head(12)

    loaded = _load_in_a_fresh_process(result.model_uri, rows, mlflow_uri, tmp_path)

    assert loaded["own_class"] == "LinearAndMLP"  # the default table network: its linear path beside the MLP
    _check_outputs(loaded, result.model_uri, result.run_id, mlflow_uri, tmp_path)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_an_image_run_loads_as_a_torch_module_with_pickle_off(mlflow_uri, tmp_path):
    result = train(TrainConfig(data="digits", image_size=16, epochs=2, batch_size=64, experiment="flavor-images",
                               num_threads=1))
    paths = sorted(str(p) for p in (REPO / "data" / "digits").glob("[38]/*.png"))[:5]

    loaded = _load_in_a_fresh_process(result.model_uri, pd.DataFrame({"path": paths}), mlflow_uri, tmp_path)

    assert loaded["own_class"] == "CNN" and np.array(loaded["inputs"]).shape == (5, 1, 16, 16)
    _check_outputs(loaded, result.model_uri, result.run_id, mlflow_uri, tmp_path)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_user_model_by_import_path_loads_where_its_code_is_not_importable(mlflow_uri, tmp_path):
    result = train(TrainConfig(model="custom_models:TinyNet", model_kwargs={"width": 16}, epochs=3, experiment="flavor-user"))
    rows = pd.read_csv(REPO / "data" / "breast_cancer.csv").drop(columns=["diagnosis"]).head(8)

    loaded = _load_in_a_fresh_process(result.model_uri, rows, mlflow_uri, tmp_path)

    # the pyfunc brought the user's code with it; the exported graph needs none
    assert loaded["own_class"] == "TinyNet" and not loaded["user_code_importable"]
    _check_outputs(loaded, result.model_uri, result.run_id, mlflow_uri, tmp_path)


class BranchesOnValues(nn.Module):
    """Control flow on the data: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


def test_a_network_torch_export_cannot_trace_is_left_without_the_flavor_and_says_why(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fitflow"):
        assert pytorch_flavor.export(BranchesOnValues().eval(), torch.ones(4, 3), tmp_path) is None
    assert "torch.export cannot trace the model" in caplog.text and "logged without the pytorch flavor" in caplog.text
    assert not (tmp_path / "pytorch").exists()


def test_inputs_given_as_a_dict_are_left_without_the_flavor_and_say_why(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fitflow"):
        assert pytorch_flavor.export(nn.Linear(3, 2), {"x": torch.ones(4, 3)}, tmp_path) is None
    assert "takes its inputs as a dict" in caplog.text


def test_a_single_example_row_still_exports_a_free_batch_size(tmp_path, monkeypatch):
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    saved = pytorch_flavor.export(net, torch.randn(1, 3), tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    loaded = mlflow.pytorch.load_model(str(saved))
    x = torch.randn(6, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=1e-6)


class CallsBackWhileTraced(nn.Module):
    """A linear layer whose forward, while torch.export traces it, calls `on_trace` (holds the trace open)."""

    def __init__(self, on_trace) -> None:
        super().__init__()
        self.linear, self.on_trace = nn.Linear(3, 2), on_trace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            self.on_trace()
        return self.linear(x)


def test_two_threads_exporting_at_once_both_get_the_flavor(tmp_path):
    """Sweep trials log their models from parallel threads; torch.export keeps its tracer in module
    globals, so a second export started inside the first one's trace broke both ("CURRENT_PATCHER is
    None", "_EXPORT_MODULE_HIERARCHY must not be None") and the trials lost their pytorch flavor. The
    first trace is held open until the second export is tracing too, or for 5 s when exports wait for
    each other (then the second one cannot start tracing before the first is done)."""
    second_tracing, saved = threading.Event(), {}
    second = threading.Thread(target=lambda: saved.update(
        second=pytorch_flavor.export(CallsBackWhileTraced(second_tracing.set).eval(), torch.randn(4, 3), tmp_path / "b")))

    def hold_first_trace() -> None:
        if second.ident is None:  # not started yet: torch.export may call forward more than once
            second.start()
        saved["overlapped"] = second_tracing.wait(timeout=5) or saved.get("overlapped", False)

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    saved["first"] = pytorch_flavor.export(CallsBackWhileTraced(hold_first_trace).eval(), torch.randn(4, 3), tmp_path / "a")
    second.join()
    assert saved["first"] is not None and saved["second"] is not None
    assert not saved["overlapped"]  # the second trace began only after the first had ended


def test_log_pyfunc_model_logs_one_model_with_both_flavors(mlflow_uri, monkeypatch, tmp_path):
    """The quick suite's check of the whole logging step (the runs above are slow): an untrained
    MLP on the shipped table, logged and read back in this process with pickle off."""
    config = TrainConfig(epochs=1)
    table = load_table(config.data)
    prepared = prepare(table, prep_spec(config))
    p = prepared.preprocessor
    spec = model_spec("mlp", p.n_features, len(p.classes), {"dropout": 0.5})
    client = MlflowClient(mlflow_uri)
    # an artifact location of its own: MLflow's default for a sqlite store is ./mlruns of the working directory
    run_id = client.create_run(client.create_experiment("both", (tmp_path / "artifacts").as_uri())).info.run_id
    rows = table.drop(columns=[config.target]).head(7)

    uri = tracking.log_pyfunc_model(client, run_id, build_model(spec).eval(), spec, p, rows)

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    net = mlflow.pytorch.load_model(uri)
    pyfunc = mlflow.pyfunc.load_model(uri)
    x = pyfunc.unwrap_python_model().model_inputs(rows)
    with torch.no_grad():
        logits = net(x)
        torch.testing.assert_close(logits, pyfunc.unwrap_python_model().model(x), rtol=0, atol=1e-6)
    probabilities = pyfunc.predict(rows).filter(like="probability_").to_numpy()
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), probabilities, rtol=0, atol=1e-6)
