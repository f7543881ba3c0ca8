"""What one DDP rank adds to the single-process trainer: the pieces tasks/trainer.py marks "DDP".

A `Rank` is this process' place in the process group. The trainer asks it for a replica of
the model (gradients averaged in backward) and for the callbacks that keep the ranks in step:
the epoch's train loss over every rank's rows, a checkpoint that only rank 0 writes, dropout
draws per rank, and one stop decision for all. Validation needs nothing here: `evaluate`
all-reduces its loss and torchmetrics gathers every rank's outputs, so every rank sees the
metrics of the whole split and early stopping, best weights and the schedule agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tasks.callbacks import Callback, FitState
from tasks.checkpoints import Checkpoints


@dataclass(frozen=True)
class Rank:
    """This process in the DDP group, from the environment torch's elastic agent sets."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @classmethod
    def from_environment(cls, device_name: str) -> Rank:
        import os

        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        cuda = device_name != "cpu" and torch.cuda.is_available()
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        return cls(rank, local_rank, int(os.environ["WORLD_SIZE"]), device)

    @property
    def writes(self) -> bool:
        """Rank 0 alone prints, checkpoints, logs and runs the caller's callbacks."""
        return self.rank == 0

    @contextmanager
    def joined(self) -> Iterator[None]:
        """Member of the process group (NCCL on GPUs, gloo on CPU) while inside."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None)
        try:
            yield
        finally:
            dist.destroy_process_group()

    def replicate(self, model: torch.nn.Module) -> torch.nn.Module:
        return Replica(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def checkpoints(self, checkpoints: Checkpoints) -> Callback:
        """Every rank resumes from rank 0's newest checkpoint; rank 0 alone writes them."""
        return checkpoints if self.writes else ResumeOnly(checkpoints)


class Replica(DistributedDataParallel):
    """DDP whose state dict is the model's own (no `module.` prefix): checkpoints fit any strategy."""

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state_dict, strict, assign)


class GlobalTrainLoss(Callback):
    """`train_loss` over every rank's rows (the loop measured its own shard's); first, before anything reads it."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def on_epoch_end(self, state: FitState) -> None:
        both = all_reduce(torch.tensor([state.logs["train_loss"] * self.rows, self.rows], dtype=torch.float64))
        state.logs["train_loss"] = state.history[-1]["train_loss"] = float(both[0] / both[1])


class ResumeOnly(Callback):
    """A rank other than 0 restores the newest checkpoint at the start and writes none."""

    def __init__(self, checkpoints: Checkpoints) -> None:
        self.checkpoints = checkpoints

    def on_fit_start(self, state: FitState) -> None:
        self.checkpoints.on_fit_start(state)


class RankSeed(Callback):
    """Each epoch's dropout draws come from (seed, epoch, rank): independent across ranks, and a
    resumed rank draws what it would have drawn (a checkpoint holds rank 0's generators only).
    After the checkpoint callback, which restores the generators."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed, rank

    def on_fit_start(self, state: FitState) -> None:
        self._reseed(state.epoch)

    def on_epoch_end(self, state: FitState) -> None:
        self._reseed(state.epoch)

    def _reseed(self, epoch: int) -> None:
        torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0]))


class AgreeToStop(Callback):
    """One all-reduce per epoch: if any rank stops, all stop (a rank left alone would wait forever). Last."""

    def on_epoch_end(self, state: FitState) -> None:
        state.stop = bool(all_reduce(torch.tensor([int(state.stop)]), dist.ReduceOp.MAX).item())


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor; NCCL reduces CUDA tensors only, so it goes there and back."""
    on_backend = tensor.cuda() if dist.get_backend() == "nccl" else tensor
    dist.all_reduce(on_backend, op=op)
    return on_backend.cpu()
