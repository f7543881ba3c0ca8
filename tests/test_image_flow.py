"""Images and the user's own Datasets through the real `train` flow, MLflow model and `predict`.

Real Prefect (the session's test server), a real MLflow sqlite store, real torch and torchvision:
the shipped digits (data/digits) train the built-in CNN; the logged model loads in a fresh
process with pickle deserialisation off and predicts from image paths and bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import task_states
from image_folders import pixels, write_class_folders, write_image, write_manifest, write_split_folders
from mlflow.tracking import MlflowClient

from flows.cli import main
from flows.train import train
from tasks.config import TrainConfig

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "data" / "digits"
# 16 px and 8 epochs: the CNN reaches >= 0.97 validation accuracy in about 10 s on one CPU core
DIGITS_SETTINGS = {"data": "digits", "image_size": 16, "epochs": 8, "batch_size": 64, "lr": 3e-3,
                   "monitor": "val_accuracy", "patience": 3, "num_threads": 1}


def test_shipped_digits_train_the_cnn_and_the_model_predicts_from_paths_and_bytes(mlflow_uri, tmp_path, capsys):
    result = train(TrainConfig(experiment="digits", **DIGITS_SETTINGS))
    assert result.test_metrics["test_accuracy"] >= 0.95, result.test_metrics

    run = MlflowClient(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.data_kind"] == "images" and run.data.params["data.n_classes"] == "10"
    assert run.data.params["data.channels"] == "1" and run.data.tags["fitflow.model"] == "cnn"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "digits"
    plots = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(result.run_id, "plots")}
    assert plots == {"plots/learning_curves.png", "plots/confusion_matrix.png", "plots/misclassified.png"}
    # what a user has at prediction time: image paths or bytes; its preprocessing as JSON, no pickle
    info = mlflow.models.get_model_info(result.model_uri)
    assert [(c.name, c.type.name) for c in info.signature.inputs.inputs] == [("path", "string"), ("image", "binary")]
    assert info.saved_input_example_info is not None
    model_dir = Path(mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(tmp_path / "model")))
    preprocessing = json.loads(next(model_dir.rglob("preprocessor.json")).read_text())
    assert preprocessing["classes"] == [str(d) for d in range(10)] and len(preprocessing["mean"]) == 1
    assert not [f for f in model_dir.rglob("*") if f.suffix in (".pkl", ".pickle", ".cloudpickle")]

    # A fresh process, no pickle: the model rebuilds from JSON + a state dict and takes paths or bytes
    paths = sorted(str(p) for p in DIGITS.glob("[37]/*.png"))[:6] + sorted(str(p) for p in DIGITS.glob("9/*.png"))[:4]
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "paths = json.loads(sys.argv[2])\n"
        "by_path = model.predict(pd.DataFrame({'path': paths}))\n"
        "by_bytes = model.predict(pd.DataFrame({'image': [open(p, 'rb').read() for p in paths]}))\n"
        "print(json.dumps([list(by_path['prediction']), list(by_bytes['prediction']), list(by_path.columns)]))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    out = subprocess.run([sys.executable, "-c", code, result.model_uri, json.dumps(paths)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    by_path, by_bytes, columns = json.loads(out.stdout.strip().splitlines()[-1])
    assert by_path == by_bytes
    assert sum(p == Path(path).parent.name for p, path in zip(by_path, paths)) >= 9  # labels are the folder names
    assert columns == ["prediction", *[f"probability_{d}" for d in range(10)]]

    # `fitflow predict` on the folder: path, label and class probabilities, accuracy from the class folders
    predictions = tmp_path / "digits.csv"
    capsys.readouterr()
    assert main(["predict", "--model", result.run_id, "--data", str(DIGITS), "--out", str(predictions)]) == 0
    scored = pd.read_csv(predictions)
    assert list(scored.columns[:3]) == ["path", "label", "prediction"] and len(scored) == 1797
    summary = json.loads(Path(f"{predictions}.summary.json").read_text())
    assert summary["metrics"]["accuracy"] >= 0.95 and summary["metrics"]["rows_with_labels"] == 1797


@pytest.mark.parametrize("layout", ["train_val_test_folders", "csv_manifest", "parquet_manifest"])
def test_other_image_layouts_train_through_the_flow(layout, mlflow_uri, tmp_path):
    if layout == "train_val_test_folders":
        data = write_split_folders(tmp_path / "pets", per_class={"train": 12, "val": 4, "test": 4})
    else:
        data = write_manifest(tmp_path / "pets", per_class=12, name="labels.csv" if layout == "csv_manifest" else "labels.parquet")
    result = train(TrainConfig(data=str(data), epochs=2, image_size=16, batch_size=8, experiment=layout, num_threads=1))
    run = MlflowClient(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["data.data_kind"] == "images"
    assert run.data.params["data.layout"] == ("splits" if layout == "train_val_test_folders" else "manifest")
    if layout == "train_val_test_folders":  # the given splits, as they are
        assert [run.data.params[f"data.rows_{s}"] for s in ("train", "val", "test")] == ["24", "8", "8"]
    assert set(result.test_metrics) == {"test_loss", "test_accuracy", "test_auroc", "test_f1_macro"}


def test_a_torchvision_architecture_starts_from_a_local_weights_file_and_its_model_predicts(mlflow_uri, tmp_path, caplog):
    """model torchvision:NAME with its head sized to the classes, grey images fed as three channels,
    `pretrained` a local state dict whose 10-class head is left out; the logged model rebuilds it."""
    import torchvision

    folder = write_class_folders(tmp_path / "pets", per_class=8, modes=("L",))  # grey: one channel
    saved = torchvision.models.resnet18(num_classes=10).state_dict()  # another head: 10 classes
    torch.save(saved, tmp_path / "resnet18.pt")
    caplog.set_level("INFO", logger="fitflow")
    # sgd at lr 1e-9: one epoch leaves the weights (within 1e-4) where the file started them
    result = train(TrainConfig(data=str(folder), model="torchvision:resnet18", pretrained=str(tmp_path / "resnet18.pt"),
                               optimizer="sgd", lr=1e-9, epochs=1, image_size=32, batch_size=8, experiment="tv",
                               num_threads=1))
    assert "2 tensor(s) left at their initial values (fc.bias, fc.weight)" in caplog.text

    run = MlflowClient(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["fitflow.model"] == "torchvision:resnet18"
    assert run.data.params["data.channels"] == "1"
    pyfunc = mlflow.pyfunc.load_model(result.model_uri)
    net = pyfunc.unwrap_python_model().model
    resnet = net[1]  # behind the grey-to-RGB repeat
    assert isinstance(resnet, torchvision.models.ResNet) and resnet.fc.weight.shape == (3, 512)
    for name in ("conv1.weight", "layer4.1.conv2.weight"):  # another random start: ~0.03 apart on average
        torch.testing.assert_close(resnet.state_dict()[name], saved[name], rtol=0, atol=1e-4)
    predicted = pyfunc.predict(pd.DataFrame({"path": [str(folder / "owl" / "000.png")]}))
    assert list(predicted.columns) == ["prediction", "probability_cat", "probability_dog", "probability_owl"]


@pytest.mark.parametrize("model, pretrained, message", [
    ("torchvision:resnet19", None, "torchvision has no classification model 'resnet19'; did you mean 'resnet18'?"),
    ("torchvision:resnet18", "missing.pt", "pretrained weights file not found"),
    ("torchvision:resnet18", "mobilenet.pt", "shares no weights with the model"),
])
def test_a_bad_torchvision_model_or_weights_file_is_one_line(model, pretrained, message, mlflow_uri, tmp_path,
                                                              capsys):
    import torchvision

    folder = write_class_folders(tmp_path / "pets", per_class=6)
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), tmp_path / "mobilenet.pt")
    weights = ["--pretrained", str(tmp_path / pretrained)] if pretrained else []
    capsys.readouterr()
    assert main(["train", "--data", str(folder), "--model", model, *weights, "--epochs", "1", "--image-size", "16",
                 "--num-threads", "1", "--experiment", "bad-tv"]) == 2
    _assert_one_line_and_no_run_running(capsys, message, mlflow_uri, "bad-tv")
    if message != "shares no weights with the model":  # a name torchvision lacks, a missing file: refused before the run starts
        experiment = MlflowClient(mlflow_uri).get_experiment_by_name("bad-tv")
        assert experiment is None or not MlflowClient(mlflow_uri).search_runs([experiment.experiment_id])


def test_image_preparation_is_a_named_task_cached_by_content_not_by_mtimes(mlflow_uri, tmp_path):
    folder = write_class_folders(tmp_path / "pets", per_class=6)
    config = TrainConfig(data=str(folder), epochs=1, image_size=16, batch_size=8, experiment="image-cache", num_threads=1)
    client = MlflowClient(mlflow_uri)

    def states() -> dict[str, str]:
        return task_states(client.get_run(train(config).run_id).data.tags["prefect.flow_run_id"])

    first = states()
    assert first["index_images"] == "Completed" and first["prepare_images"] == "Completed"
    for image in folder.rglob("*.png"):
        os.utime(image, ns=(1, 1))  # a touch or a copy: the same content
    assert states()["prepare_images"] == "Cached"
    write_image(folder / "dog" / "002.png", pixels(0, 99))  # one image rewritten
    assert states()["prepare_images"] == "Completed"


def test_the_dataset_example_trains_through_the_cli(mlflow_uri, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # `examples` is importable from the checkout, as in the README's command
    argv = ["train", "--data", "examples.digits_gru:make_datasets", "--model", "examples.digits_gru:DigitsGRU",
            "--epochs", "6", "--lr", "0.01", "--batch-size", "32", "--num-threads", "1", "--experiment", "gru"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("test_accuracy=")[1].split()[0])
    assert accuracy >= 0.9, out
    (run,) = MlflowClient(mlflow_uri).search_runs([MlflowClient(mlflow_uri).get_experiment_by_name("gru").experiment_id])
    assert run.data.params["data.task"] == "classification" and run.data.tags["fitflow.model"] == "examples.digits_gru:DigitsGRU"
    assert task_states(run.data.tags["prefect.flow_run_id"])["load_datasets"] == "Completed"
    # the logged model takes arrays of one sample's shape, here (rows, 8, 8)
    info = mlflow.models.get_model_info(run.data.tags["fitflow.model_uri"])
    assert info.signature.inputs.inputs[0].shape == (-1, 8, 8) and info.saved_input_example_info is not None
    from examples.digits_gru import make_datasets

    test = make_datasets()["test"]
    rows = np.stack([test[i][0].numpy() for i in range(40)])
    predicted = mlflow.pyfunc.load_model(run.data.tags["fitflow.model_uri"]).predict(rows)
    assert list(predicted.columns) == ["prediction", *[f"probability_{d}" for d in range(10)]]
    assert (predicted["prediction"].astype(str) == [str(test[i][1]) for i in range(40)]).mean() >= 0.8


def _bad_folder(tmp_path: Path, case: str) -> Path:
    root = tmp_path / case
    if case == "empty folder":
        root.mkdir()
    elif case == "one class":
        write_class_folders(root, classes=("cat",), per_class=6)
    elif case == "class without images":
        write_class_folders(root, per_class=6)
        (root / "emu").mkdir()
        (root / "emu" / "notes.txt").write_text("no images here")
    elif case == "corrupt image":
        write_class_folders(root, per_class=6)
        data = (root / "dog" / "003.png").read_bytes()
        (root / "dog" / "003.png").write_bytes(data[: len(data) // 2])  # truncated
    elif case == "manifest naming missing files":
        manifest = write_manifest(root)
        (root / "images" / "dog_2.png").unlink()
        return manifest
    return root


@pytest.mark.parametrize("case, message", [
    ("empty folder", "is empty"),
    ("one class", "single class"),
    ("class without images", "holds no images"),
    ("corrupt image", "003.png"),
    ("manifest naming missing files", "names 1 file(s) that do not exist"),
])
def test_bad_image_data_is_one_line_and_leaves_no_run_running(case, message, mlflow_uri, tmp_path, capsys):
    data = _bad_folder(tmp_path, case)
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--epochs", "1", "--image-size", "16", "--num-threads", "1",
                 "--experiment", "bad"]) == 2
    _assert_one_line_and_no_run_running(capsys, message, mlflow_uri, "bad")


FACTORIES = '''
import torch
from torch.utils.data import TensorDataset

def raises():
    raise RuntimeError("the bucket is gone")

def not_datasets():
    return 42

def not_pairs():
    return {"train": TensorDataset(torch.zeros(8, 3)), "val": TensorDataset(torch.zeros(4, 3))}

class Pairs(torch.utils.data.Dataset):
    """Items ((a, b), y): a model called as model(a, b)."""

    def __init__(self, n):
        self.a, self.b, self.y = torch.randn(n, 3), torch.randn(n, 2), torch.arange(n) % 2

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.a[i], self.b[i]), self.y[i]

def two_inputs():
    return {"train": Pairs(40), "val": Pairs(10)}

def three_classes():
    x, y = torch.randn(30, 4), torch.arange(30) % 3
    return {"train": TensorDataset(x, y), "val": TensorDataset(x[:9], y[:9])}
'''


class TwoOutputs(torch.nn.Module):
    """Two outputs whatever the data has: a model that does not fit three classes."""

    def __init__(self, in_shape: tuple) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(in_shape[0], 2)

    def forward(self, x):
        return self.linear(x)


class TwoInputs(torch.nn.Module):
    """model(a, b): what a Dataset with tuple inputs trains."""

    def __init__(self, num_outputs: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(5, num_outputs)

    def forward(self, a, b):
        return self.linear(torch.cat([a, b], dim=1))


def test_a_dataset_of_tuple_inputs_trains_and_logs_a_model_without_an_example(mlflow_uri, tmp_path, monkeypatch):
    (tmp_path / "bad_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = train(TrainConfig(data="bad_factories:two_inputs", model="test_image_flow:TwoInputs", epochs=2,
                               experiment="tuples"))
    run = MlflowClient(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["fitflow.model_uri"] == result.model_uri


@pytest.mark.parametrize("data, model, message", [
    ("bad_factories:nowhere", "auto", "has no attribute 'nowhere'"),
    ("no_such_module:make", "auto", "no module named 'no_such_module'"),
    ("bad_factories:raises", "auto", "raised RuntimeError: the bucket is gone"),
    ("bad_factories:not_datasets", "auto", "int"),
    ("bad_factories:not_pairs", "auto", "(x, y)"),
    ("bad_factories:three_classes", "test_image_flow:TwoOutputs", "it must return (batch, 3)"),
])
def test_bad_datasets_and_models_are_one_line_and_leave_no_run_running(data, model, message, mlflow_uri, tmp_path,
                                                                        capsys, monkeypatch):
    (tmp_path / "bad_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    capsys.readouterr()
    assert main(["train", "--data", data, "--model", model, "--epochs", "1", "--experiment", "bad-datasets"]) == 2
    _assert_one_line_and_no_run_running(capsys, message, mlflow_uri, "bad-datasets")


def _assert_one_line_and_no_run_running(capsys, message: str, mlflow_uri: str, experiment_name: str) -> None:
    """The CLI's last stderr line is fitflow's one-line error, and every run it made ended FAILED."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fitflow: error: ") and message in err[-1], err[-3:]
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert all(run.info.status == "FAILED" for run in runs), [run.info.status for run in runs]
