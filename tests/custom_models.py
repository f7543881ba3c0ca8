"""User-style nn.Modules, named by import path in tests (`custom_models:TinyNet`)."""

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_features: int, out_features: int, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class NaNAfterFirstStep(nn.Module):
    """Healthy for the shape check and the first step, then returns NaN: a diverging model."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.linear(x)
        return out * float("nan") if self.training and self.calls > 2 else out
