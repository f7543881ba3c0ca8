"""What one DDP rank adds to the single-process trainer: the pieces tasks/trainer.py marks "DDP".

A `Rank` is this process' place in the process group. The trainer asks it for a replica of
the model (gradients averaged in backward) and for the callbacks that keep the ranks in step:
the epoch's train loss over every rank's rows, a checkpoint that only rank 0 reads and writes
and every rank on every machine resumes from, dropout
draws per rank, and one stop decision for all. Validation needs nothing here: `evaluate`
all-reduces its loss and tasks/metrics.py its metrics' sums (the exact AUROC gathers every rank's
outputs), so every rank sees the metrics of the whole split and early stopping, best weights and the schedule agree.
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
from tasks.checkpoints import Checkpoints, restore


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

    def checkpoints(self, checkpoints: Checkpoints | None, stateful: dict[str, Callback]) -> Callback:
        """Every rank, on every machine, resumes from rank 0's newest checkpoint; rank 0 alone writes them.
        `checkpoints`: the run's (None where there is no run: machines other than 0, a run without tracking)."""
        return SharedResume(checkpoints if self.writes else None, stateful)


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


class SharedResume(Callback):
    """Rank 0 reads the newest checkpoint and sends it to every rank, which all restore it: every
    machine resumes at the same epoch. Machines other than 0 have no run and no checkpoint folder
    (or an old one); were they to read their own, they would start at another epoch than machine
    0, and the ranks would then train different epochs against each other. Rank 0 alone writes.

    One broadcast at the start (the checkpoint, pickled between this run's own processes: the file
    itself was read with weights_only); none per epoch.
    """

    def __init__(self, checkpoints: Checkpoints | None, stateful: dict[str, Callback]) -> None:
        self.checkpoints, self.stateful = checkpoints, stateful

    def on_fit_start(self, state: FitState) -> None:
        found = self.checkpoints.newest() if self.checkpoints is not None else None
        sent = [found]
        dist.broadcast_object_list(sent, src=0)
        if sent[0] is None:
            return
        path, saved = sent[0]
        if self.checkpoints is not None:
            self.checkpoints.restore(state, path, saved)
        else:
            restore(state, saved, self.stateful, path)

    def on_epoch_end(self, state: FitState) -> None:
        if self.checkpoints is not None:
            self.checkpoints.on_epoch_end(state)

    def on_fit_end(self, state: FitState) -> None:
        if self.checkpoints is not None:
            self.checkpoints.on_fit_end(state)  # the last write, on its thread, is waited for


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
