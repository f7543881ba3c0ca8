"""User-style nn.Modules, named by import path in tests (`custom_models:TinyNet`)."""

import os

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


class CrashOnceNet(nn.Module):
    """A user's model whose device fails once: the `crash_at`-th training step raises, unless
    `marker` exists (it is created at the crash), so a retried task runs through."""

    def __init__(self, in_features: int, out_features: int, crash_at: int, marker: str, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, out_features))
        self.crash_at, self.marker, self.steps = crash_at, marker, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
            if self.steps == self.crash_at and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                raise RuntimeError("simulated device failure")
        return self.body(x)


class CrashOnceCNN(nn.Module):
    """CrashOnceNet for images: a small conv net sized by in_shape/num_outputs, as fitflow's own
    image models are, whose `crash_at`-th training step raises unless `marker` exists."""

    def __init__(self, in_shape: tuple, num_outputs: int, crash_at: int, marker: str) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_shape[0], 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_outputs))
        self.crash_at, self.marker, self.steps = crash_at, marker, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
            if self.steps == self.crash_at and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                raise RuntimeError("simulated device failure")
        return self.body(x)
