"""MLflow's `pytorch` flavor beside fitflow's pyfunc, in one logged model.

`mlflow.pytorch.load_model` reads one of two files: `model.pth`, a pickle of the whole module
(refused when MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false, and it runs whatever code the pickle
names), or `model.pt2`, a `torch.export` program: a graph of torch operators with the weights as
tensors, no pickle (MLflow checks the archive when pickle is refused) and no model code needed
to load it. fitflow writes the second, so the model loads the same way both flavors are read
with pickle off. What that costs: the loaded network is a `torch.fx.GraphModule`, not the
original class, traced in eval mode (dropout off, batch norm on its running statistics), and
torch refuses `.train()` / `.eval()` on it. The original class is the pyfunc's network
(`mlflow.pyfunc.load_model(uri).unwrap_python_model().model`), rebuilt from the state dict.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import mlflow.pytorch
import torch
from mlflow.models import Model

log = logging.getLogger("fitflow")
FLAVOR = mlflow.pytorch.FLAVOR_NAME
# torch.export keeps its tracer state in module globals: two exports at once in one process (sweep
# trials logging their models from parallel threads) break each other's traces. One at a time; an
# export of an MLP or CNN takes about 0.2 s after the first.
_EXPORTING = threading.Lock()


def export(model: torch.nn.Module, inputs: Any, folder: Path) -> Path | None:
    """Save `model` (on the CPU, in eval mode) as an MLflow pytorch model in pt2 format under
    `folder`, traced on `inputs`; returns its path, or None when it cannot be exported.

    A network that fitflow trained but torch.export cannot trace (data-dependent control flow,
    inputs given as a tuple or dict, which MLflow's pt2 format does not take) still gets its
    pyfunc: the reason is logged and the run goes on.
    """
    if not isinstance(inputs, torch.Tensor):
        log.warning("the model takes its inputs as a %s: it is logged without the pytorch flavor "
                    "(MLflow's pt2 format takes tensors only); load it with mlflow.pyfunc", type(inputs).__name__)
        return None
    if len(inputs) < 2:  # torch.export fixes a dimension of size 1 as a constant: keep the batch size free
        inputs = torch.cat([inputs, inputs])
    path = folder / "pytorch"
    try:
        with _EXPORTING:
            mlflow.pytorch.save_model(model, str(path), serialization_format="pt2", input_example=inputs.numpy(),
                                      pip_requirements=["torch"])  # only the flavor is kept: skips requirement inference
    except Exception as err:  # noqa: BLE001  (torch.export's errors share no base; the pyfunc stays usable)
        shutil.rmtree(path, ignore_errors=True)
        log.warning("torch.export cannot trace the model (%s: %s); it is logged without the pytorch flavor, "
                    "load it with mlflow.pyfunc", type(err).__name__, str(err).strip().split("\n", 1)[0][:300])
        return None
    return path


def save_model(path: str, mlflow_model: Model, pytorch_model: Path | None, **pyfunc_kwargs) -> None:
    """`Model.log`'s flavor hook: the pyfunc model at `path`, plus the `pytorch` flavor saved by
    `export` when there is one (its data folder and its flavor entry in the same MLmodel)."""
    mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **pyfunc_kwargs)
    if pytorch_model is None:
        return
    conf = Model.load(str(pytorch_model)).flavors[FLAVOR]
    shutil.copytree(pytorch_model / conf["model_data"], Path(path) / conf["model_data"])
    mlflow_model.add_flavor(FLAVOR, **conf)
    mlflow_model.model_size_bytes = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    mlflow_model.save(str(Path(path) / "MLmodel"))
