"""Loaders for in-memory tabular tensors: one gather per batch.

The textbook `DataLoader(TensorDataset(x, y), shuffle=True)` fetches rows one by one and
collates them: 20-70x slower here than one `index_select` per batch, and 2.3x slower for a
whole small-MLP epoch (benchmarks/). `BatchLoader` shuffles with `randperm` and
gathers each batch with `index_select`; with `num_workers > 0` the same gathers run in
DataLoader workers (a dataset whose items are whole batches), with `pin_memory` on CUDA.
On a GPU with room for the data, the tensors live on the GPU and batches are gathered there:
no host-to-device copy per batch at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tasks.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]
_EVAL_BATCH = 1024  # inference keeps no activations for backward, so bigger batches are free speed


class BatchIndices(Sampler[torch.Tensor]):
    """Index tensors of each batch; a new permutation per epoch when shuffling.

    The permutation is a pure function of (seed, epoch), like DistributedSampler's: a resumed
    run sets the epoch and gets the order the uninterrupted run had, with no generator state
    to save. `fit` calls `set_epoch` before each epoch; without it, epochs count up from 0.

    Under DDP (`world_size` > 1) every rank draws the same permutation and cuts the same global
    batches of `batch_size` rows; rank r takes the r-th of `world_size` near-equal pieces of each.
    So the ranks' shards never overlap and cover every row, every rank runs the same number of
    steps (a rank with one step less would leave the others waiting in DDP's all-reduce), and a
    step's rows are the rows of the same step of a single-process run. A tail with fewer rows
    than ranks joins the batch before it, so that no rank gets an empty batch.
    """

    def __init__(self, n_rows: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 device: torch.device | None = None, rank: int = 0, world_size: int = 1) -> None:
        self.n_rows, self.batch_size, self.shuffle, self.drop_last = n_rows, batch_size, shuffle, drop_last
        self.seed, self.epoch, self.device = seed, 0, device
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.n_rows, self.batch_size)
        return full + int(rest > 0 and not self.drop_last and (rest >= self.world_size or full == 0))

    def __iter__(self) -> Iterator[torch.Tensor]:
        # A generator: the permutation is drawn at the first batch, not when iter() is called.
        # DataLoader's worker iterator calls iter() twice at start; an eager draw would skip one.
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = self.order(epoch)
        if self.device is not None:
            order = order.to(self.device)  # one copy per epoch; the batches then gather on the device
        yield from self._cut(order)

    def _cut(self, order: torch.Tensor) -> Iterator[torch.Tensor]:
        steps = len(self)
        for i in range(steps):
            end = self.n_rows if i == steps - 1 and not self.drop_last else (i + 1) * self.batch_size
            rows = order[i * self.batch_size : end]
            yield rows.tensor_split(self.world_size)[self.rank] if self.world_size > 1 else rows

    def rows_per_epoch(self) -> int:
        """Rows this rank sees per epoch (the same every epoch: only the order changes)."""
        return sum(len(rows) for rows in self._cut(torch.arange(self.n_rows)))

    def order(self, epoch: int) -> torch.Tensor:
        """The row order of an epoch (on the CPU: the same order on any device)."""
        if not self.shuffle:
            return torch.arange(self.n_rows)
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        return torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(seed))


class GatherDataset(Dataset[Batch]):
    """A dataset whose item is a whole batch: `dataset[index_tensor]` is one gather."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, rows: torch.Tensor) -> Batch:
        return self.features.index_select(0, rows), self.targets.index_select(0, rows)


class BatchLoader:
    """Iterates (features, targets) batches in the main process, no collate, no workers.

    `sampler` is named as DataLoader's is, so `loader.sampler.set_epoch(epoch)` works on both.
    """

    def __init__(self, dataset: GatherDataset, sampler: BatchIndices, pin_memory: bool = False) -> None:
        self.dataset, self.sampler, self.pin_memory = dataset, sampler, pin_memory

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        for rows in self.sampler:
            features, targets = self.dataset[rows]
            if self.pin_memory:  # page-locked memory lets the host-to-GPU copy run asynchronously
                features, targets = features.pin_memory(), targets.pin_memory()
            yield features, targets


@dataclass
class Loaders:
    train: BatchLoader | DataLoader
    val: BatchLoader | DataLoader
    test: BatchLoader | DataLoader | None  # None: no test split (Prepared.test)


def worker_seed_generator(seed: int) -> torch.Generator:
    """The generator a DataLoader draws its workers' base seed from when an iterator starts.

    Its own, not torch's global one (DataLoader's default): dropout draws from the global
    generator, whose state each epoch checkpoint saves, and a persistent worker loader starts its
    iterator in the first epoch only, a resumed run in the epoch it resumes at. Drawn from the
    global generator, that seed would shift the resumed run's dropout masks off the uninterrupted
    run's, and make results depend on num_workers.
    """
    return torch.Generator().manual_seed(seed)


def make_loader(
    features: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> BatchLoader | DataLoader:
    """A loader over in-memory arrays; with `device`, the data lives there (no per-batch copies).

    With `world_size` > 1 it yields rank `rank`'s piece of every batch (see BatchIndices).
    """
    # np.require copies only arrays that are read-only (pandas' copy-on-write) or not contiguous
    x = torch.from_numpy(np.require(features, np.float32, ["C", "W"]))
    y = torch.from_numpy(np.require(targets, None, ["C", "W"]))
    if y.dtype != torch.int64:  # regression: (rows, 1) so that loss(model(x), y) needs no reshaping;
        y = y.float().reshape(len(y), -1)  # multilabel targets are (rows, classes) already
    if device is not None:
        x, y = x.to(device), y.to(device)
    dataset = GatherDataset(x, y)
    batches = BatchIndices(len(y), batch_size, shuffle, drop_last, seed, device, rank, world_size)
    if num_workers == 0 or device is not None:  # worker processes cannot share device tensors
        return BatchLoader(dataset, batches, pin_memory and device is None)
    return DataLoader(
        dataset, sampler=batches, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=True, generator=worker_seed_generator(seed),
    )


def make_loaders(
    prepared,
    batch_size: int,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """Train (shuffled, optional drop_last) and val/test (in order, every row) loaders.

    `device`: keep all three splits resident there (see `tasks.device.resident_device`).
    `rank`, `world_size`: this DDP process's shard of each split; `batch_size` is the global batch.
    """
    for split in ("train", "val", "test"):
        if getattr(prepared, split) is not None and len(getattr(prepared, split).targets) < world_size:
            raise ConfigError(f"the {split} split has fewer rows than the {world_size} DDP processes; use fewer devices")
    eval_batch = max(batch_size, _EVAL_BATCH)
    common = {"num_workers": num_workers, "pin_memory": pin_memory, "device": device, "rank": rank, "world_size": world_size}
    return Loaders(
        train=make_loader(prepared.train.features, prepared.train.targets, batch_size, True, drop_last, seed=seed, **common),
        val=make_loader(prepared.val.features, prepared.val.targets, eval_batch, **common),
        test=make_loader(prepared.test.features, prepared.test.targets, eval_batch, **common) if prepared.test else None,
    )
