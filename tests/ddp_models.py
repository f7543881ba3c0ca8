"""A model for tests/test_ddp.py, named by import path (`ddp_models:FailsOnRank`) so DDP workers import it."""

import os

import torch
from torch import nn


class FailsOnRank(nn.Module):
    """Trains normally except in DDP rank `rank`, whose `step`-th training forward raises."""

    def __init__(self, in_features: int, out_features: int, rank: int = 1, step: int = 2) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.rank, self.step, self.steps = rank, step, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
            if self.steps == self.step and os.environ.get("RANK") == str(self.rank):
                raise ValueError(f"rank {self.rank} cannot go on")
        return self.linear(x)
