"""Loading a logged fitflow model for scoring without running any code that came with it.

`mlflow.pyfunc.load_model` executes a model's `model_code.py` (fitflow models are "models from
code") with the model's own copy of `tasks/` first on sys.path: whoever can log a model to the
tracking server could run code on every machine that scores it. fitflow's own scoring paths
read the model as data instead: the MLmodel file (YAML, read with safe_load), the model spec
and preprocessing (JSON) and the weights (a state dict, `torch.load(weights_only=True)`), and
rebuild the network with this checkout's `tasks/`. The files are checked to be a fitflow model
before anything is built.

A network fitflow does not define (`pkg.mod:Class`) is code the spec names: importing and
constructing it runs code, so it is built only when the caller trusts the model
(`--trust-model-code`); its packed source (the model's `code/` folder) is then importable after
everything installed here.
"""

from __future__ import annotations

import json
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch
import yaml

from tasks.errors import ConfigError
from tasks.models import build_model, is_builtin
from tasks.serving import FitflowModel, load_preprocessor

ARTIFACTS = ("preprocessor", "model_spec", "weights")
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # how MLflow loads a model from code, as fitflow logs it
PREPROCESSING_KINDS = ("table", "images", "tensors")


def load_fitflow_model(uri: str, trust_model_code: bool = False, tracking_uri: str | None = None,
                       own_network: str | None = None) -> FitflowModel:
    """The FitflowModel logged at `uri`, rebuilt from its data files; ConfigError when it is not a
    fitflow model, or when its network is custom code and `trust_model_code` is False.

    `own_network`: the network this process trains anyway (the registry gate re-scoring a champion
    of the same `pkg.mod:Class`): built from this machine's code, never from the model's packed copy."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri))
        files = fitflow_files(folder, uri)
        spec = json.loads(files["model_spec"].read_text(encoding="utf-8"))
        if not is_builtin(spec["model"]) and spec["model"] != own_network:
            if not trust_model_code:
                raise ConfigError(f"model {uri} builds its network from custom code ('{spec['model']}'), which would be "
                                  "imported and run on this machine; pass --trust-model-code if you trust whoever logged it")
            sys.path.append(str(folder / "code"))  # after this checkout and the installed packages: they win
        model = FitflowModel()
        model.preprocessor = load_preprocessor(str(files["preprocessor"]))
        model.model = _network(spec, files["weights"], uri)
    return model


def fitflow_files(folder: Path, uri: str) -> dict[str, Path]:
    """The spec, preprocessing and weights files of a fitflow model in `folder`, after checking
    that its MLmodel describes one; ConfigError naming what differs otherwise."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"model {uri} is not a fitflow model ({why}); fitflow scores only models trained by fitflow")

    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        raise refuse("no readable MLmodel file") from None
    pyfunc = (mlmodel.get("flavors") or {}).get("python_function") if isinstance(mlmodel, dict) else None
    if not isinstance(pyfunc, dict) or pyfunc.get("loader_module") != CODE_LOADER:
        raise refuse("it is not a python_function model from code")
    artifacts = pyfunc.get("artifacts")
    if not isinstance(artifacts, dict) or sorted(artifacts) != sorted(ARTIFACTS):
        raise refuse(f"its artifacts are not {', '.join(ARTIFACTS)}")
    files = {}
    for name in ARTIFACTS:
        path = (folder / str((artifacts[name] or {}).get("path", ""))).resolve()
        if not path.is_relative_to(folder.resolve()) or not path.is_file():
            raise refuse(f"artifact '{name}' is missing")
        files[name] = path
    try:
        spec = json.loads(files["model_spec"].read_text(encoding="utf-8"))
        kind = json.loads(files["preprocessor"].read_text(encoding="utf-8")).get("kind", "table")
    except (ValueError, AttributeError):
        raise refuse("its spec or preprocessing is not JSON of a fitflow model") from None
    if not (isinstance(spec, dict) and isinstance(spec.get("model"), str) and isinstance(spec.get("kwargs"), dict)
            and isinstance(spec.get("out_features"), int)) or kind not in PREPROCESSING_KINDS:
        raise refuse("its spec or preprocessing is not JSON of a fitflow model")
    return files


def _network(spec: dict[str, Any], weights: Path, uri: str) -> torch.nn.Module:
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ConfigError(f"model {uri}: its weights are not a state dict of tensors ({type(err).__name__}); "
                          "log the model again with fitflow") from None
    try:
        net = build_model(spec)
        net.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"model {uri}: its spec and weights do not build a network ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); log the model again with fitflow") from None
    return net.eval()
