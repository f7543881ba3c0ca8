"""Models: the configurable MLP (tables), a small residual CNN (images), torchvision's
architectures by name, or any nn.Module named by import path.

A model is described by a plain-data spec, {"model": "mlp" | "cnn" | "torchvision:resnet18" |
"pkg.mod:Class", "in_features", "in_shape", "out_features", "kwargs"}, so that the MLflow model
can rebuild it from JSON + a state dict.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tasks.errors import ConfigError
from tasks.training import call_model

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


class LinearAndMLP(nn.Module):
    """A linear model of the inputs plus an MLP ("wide and deep", Cheng et al. 2016): linear(x) + mlp(x).

    The network can then represent a linear model's solution exactly, which the MLP alone only
    approximates. The MLP's output layer starts at zero, so the network starts as its linear path;
    for tables fitflow starts that path at the linear baseline's fit (tasks/linear_fit.py): training
    starts from logistic or ridge regression and the MLP learns what it misses.
    """

    def __init__(self, in_features: int, out_features: int, **mlp: Any) -> None:
        super().__init__()
        self.mlp = MLP(in_features, out_features, **mlp)
        self.linear = nn.Linear(in_features, out_features)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (projected when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels else
                         nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class CNN(nn.Sequential):
    """A small residual conv net for images: a stem, three stages (width, 2x, 4x; the last two
    halve the resolution), global average pooling and a linear head. About 0.2 M parameters at
    width 32: an epoch of a few thousand small images takes seconds on a CPU."""

    def __init__(self, in_shape: Sequence[int], num_outputs: int, width: int = 32, dropout: float = 0.0) -> None:
        channels = in_shape[0]
        super().__init__(
            nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            ResidualBlock(width, width),
            ResidualBlock(width, 2 * width, stride=2),
            ResidualBlock(2 * width, 4 * width, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(4 * width, num_outputs),
        )


class RepeatChannels(nn.Module):
    """Grey images into a network built for `channels` (torchvision's take 3): the one channel repeated."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x


def model_spec(model: str, in_features: int | None, out_features: int, kwargs: dict[str, Any],
               in_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """The plain-data description of a model: what `build_model` needs, as JSON."""
    return {"model": model, "in_features": in_features, "in_shape": list(in_shape) if in_shape else None,
            "out_features": out_features, "kwargs": dict(kwargs)}


def is_builtin(name: str) -> bool:
    """One of fitflow's own networks (mlp, cnn, a torchvision architecture), not a class by import path."""
    return name in ("mlp", "cnn") or name.startswith("torchvision:")


def class_path(cls: type) -> str:
    """'package.module:Class', the name `import_model_class` reads back."""
    return f"{cls.__module__}:{cls.__qualname__}"


def import_model_class(path: str) -> type[nn.Module]:
    module_name, _, class_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import model '{path}' ({err}); make sure its package is importable (installed, or on PYTHONPATH)") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"model '{path}' is not a torch.nn.Module subclass")
    return cls


def build_model(spec: dict[str, Any], sample: Any = None) -> nn.Module:
    """Instantiate the model of a spec and check its output is (batch, out_features).

    The check runs a batch of two zero inputs of the spec's shape, or `sample` (one real batch,
    for inputs whose shape or type a spec does not hold: tuples, dicts, token ids).
    """
    name = spec["model"]
    if name == "mlp":  # specs logged before linear_path existed have no such key: the MLP alone
        kwargs = dict(spec["kwargs"])
        mlp_class = LinearAndMLP if kwargs.pop("linear_path", False) else MLP
        model: nn.Module = mlp_class(in_features=spec["in_features"], out_features=spec["out_features"], **kwargs)
    elif name == "cnn":
        model = _construct(CNN, name, spec)
    elif name.startswith("torchvision:"):
        model = _torchvision_model(name.removeprefix("torchvision:"), spec)
    else:
        model = _construct(import_model_class(name), name, spec)
    if sample is None and spec.get("in_shape"):
        sample = torch.zeros(2, *spec["in_shape"])
    elif sample is None and spec.get("in_features"):
        sample = torch.zeros(2, spec["in_features"])
    if sample is not None:
        check_outputs(model, sample, spec["out_features"], name)
    return model


def _construct(cls: type[nn.Module], name: str, spec: dict[str, Any]) -> nn.Module:
    """Call the class with the sizes its constructor names: in_features/out_features (tables),
    in_shape (one sample's shape), num_outputs, plus model_kwargs."""
    accepted = inspect.signature(cls).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    sizes = {"in_features": spec.get("in_features"), "out_features": spec["out_features"],
             "in_shape": tuple(spec["in_shape"]) if spec.get("in_shape") else None, "num_outputs": spec["out_features"]}
    given = {key: value for key, value in sizes.items() if value is not None and (key in accepted or takes_all)}
    try:
        return cls(**given, **spec["kwargs"])
    except TypeError as err:
        raise ConfigError(f"cannot build model '{name}' ({err}); its constructor gets {', '.join(given) or 'no size'} "
                          "(those of in_features, out_features, in_shape, num_outputs it names) and the model_kwargs given") from None


def _torchvision_model(arch: str, spec: dict[str, Any]) -> nn.Module:
    """A torchvision architecture with random weights and its classifier sized to the classes.

    `num_classes` sizes the head at construction; weights of a checkpoint come later
    (tasks/trainer.py, `pretrained`), never from the internet.
    """
    import torchvision

    _check_torchvision_name(arch)
    try:
        net = torchvision.models.get_model(arch, weights=None, num_classes=spec["out_features"], **spec["kwargs"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build torchvision:{arch} ({err}); check model_kwargs") from None
    channels = spec["in_shape"][0] if spec.get("in_shape") else 3
    return nn.Sequential(RepeatChannels(3), net) if channels == 1 else net


def check_model_name(name: str) -> None:
    """A ConfigError unless `name` names a model: mlp, cnn, an architecture torchvision has, or an
    import path of an nn.Module class (imported now, as training would)."""
    if name.startswith("torchvision:"):
        _check_torchvision_name(name.removeprefix("torchvision:"))
    elif not is_builtin(name):
        import_model_class(name)


def _check_torchvision_name(arch: str) -> None:
    import torchvision

    known = torchvision.models.list_models(torchvision.models)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=1)
        raise ConfigError(f"torchvision has no classification model '{arch}'" + (f"; did you mean '{close[0]}'?" if close else
                          "; see torchvision.models.list_models()"))


def check_outputs(model: nn.Module, sample: Any, out_features: int, name: str) -> None:
    """One forward pass in eval mode: the output must be (batch, out_features)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            output = call_model(model, sample)
    finally:
        model.train(was_training)
    batch = _batch_size(sample)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != (batch, out_features):
        raise ConfigError(f"model '{name}' returns {shape} for a batch of {batch}; it must return (batch, {out_features}): "
                          f"one output per class (or 1 for regression)")


def _batch_size(sample: Any) -> int:
    if isinstance(sample, torch.Tensor):
        return len(sample)
    first = next(iter(sample.values())) if isinstance(sample, dict) else sample[0]
    return _batch_size(first)


def check_pretrained_file(path: str) -> None:
    """A `pretrained` path that names no readable file, refused before the run starts; what the file
    holds is checked as it loads (load_pretrained): reading it here would read a large file twice."""
    if not os.path.isfile(path):
        raise ConfigError(f"pretrained weights file not found: {path}; give the path of a saved state dict")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"pretrained weights file {path} is not readable by this user; check its permissions")


def load_pretrained(model: nn.Module, path: str) -> list[str]:
    """Start `model` from the weights in a local file; returns the names left at their initial values.

    The file is a state dict (`torch.save(model.state_dict(), path)`, torchvision's checkpoints),
    or a fitflow checkpoint holding one under "model". Tensors whose shape differs (a classifier
    head for another number of classes) are left out; a file that shares no tensor with the
    model is an error, not a silent fresh start. Loaded with weights_only: no code runs.
    """
    check_pretrained_file(path)  # again: the file may have gone since the check before the run
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code, a truncated file, another format
        raise ConfigError(f"pretrained file {path} is not a torch state dict ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); save one with torch.save(model.state_dict(), path)") from None
    state = saved.get("model", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"pretrained file {path} holds no state dict (a mapping of names to tensors)")
    target = model[1] if isinstance(model, nn.Sequential) and isinstance(model[0], RepeatChannels) else model
    own = target.state_dict()
    usable = {name: tensor for name, tensor in state.items() if name in own and own[name].shape == tensor.shape}
    if not usable:
        raise ConfigError(f"pretrained file {path} shares no weights with the model (no name with the same shape); "
                          "was it saved from the same architecture?")
    target.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))
