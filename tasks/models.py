"""Models: the configurable MLP, or any nn.Module named by import path.

A model is described by a plain-data spec, {"model": "mlp" | "pkg.mod:Class", "in_features",
"out_features", "kwargs"}, so that the MLflow model can rebuild it from JSON + a state dict.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tasks.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


class MLP(nn.Sequential):
    """Linear -> [BatchNorm] -> activation -> [Dropout] per hidden layer, then a linear head."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_sizes: Sequence[int] = (64, 32),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


def model_spec(model: str, in_features: int, out_features: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "in_features": in_features, "out_features": out_features, "kwargs": dict(kwargs)}


def import_model_class(path: str) -> type[nn.Module]:
    module_name, _, class_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import model '{path}' ({err}); make sure its package is importable (installed, or on PYTHONPATH)") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"model '{path}' is not a torch.nn.Module subclass")
    return cls


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate the model of a spec and check it maps (batch, in) to (batch, out)."""
    cls = MLP if spec["model"] == "mlp" else import_model_class(spec["model"])
    try:
        model = cls(in_features=spec["in_features"], out_features=spec["out_features"], **spec["kwargs"])
    except TypeError as err:
        raise ConfigError(f"cannot build model '{spec['model']}' ({err}); it must accept in_features=, out_features= and the model_kwargs given") from None
    model.eval()
    with torch.inference_mode():
        shape = tuple(model(torch.zeros(2, spec["in_features"])).shape)
    if shape != (2, spec["out_features"]):
        raise ConfigError(f"model '{spec['model']}' returns shape {shape} for a batch of 2 rows; it must return (batch, {spec['out_features']})")
    return model
