"""The `images` data kind, step 3: loaders of decoded, cached, augmented batches.

The shapes are tasks/loaders.py's, so `fit` runs unchanged: `BatchIndices` cuts the seeded,
per-epoch, DDP-sharded batches, and the dataset's item is a whole batch (float32 (B, C, H, W)
normalised, int64 (B,)), built in the main process (`BatchLoader`) or in DataLoader workers.
The sampler also hands the dataset the epoch, which workers cannot otherwise know (each holds
a copy of the dataset), so augmentation draws are a function of (seed, epoch, batch).

Decoded-image cache: the uint8 pixels at image_size (N x C x S x S bytes per split) in
memory, so epochs after the first read no files and decode nothing: one gather per batch.
With workers it lives in shared memory (/dev/shm), allocated before the workers start; each
worker fills the rows it decodes and marks them in a shared `filled` flag, and every process
reads the rows filled so far. A row is written by one worker only (each row is in one batch
per epoch), and the flag is set after its pixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.errors import ConfigError, DataError
from tasks.images_augment import AUGMENTS, augment_batch
from tasks.images_decode import load_pixels, normalise, read_image
from tasks.images_prepare import ImageSplit, ImagesPrepared
from tasks.images_preprocessor import ImagePreprocessor
from tasks.loaders import Batch, BatchIndices, BatchLoader, Loaders, worker_seed_generator

CACHES = ("auto", "on", "off")
_AUTO_SHARE = 4  # auto caches while the pixels fit in a quarter of the memory available


class ImageBatches(BatchIndices):
    """BatchIndices whose items are (epoch, rows): the dataset seeds augmentation from them."""

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        epoch = self.epoch  # read at the first batch, as BatchIndices draws its permutation then
        for rows in super().__iter__():
            yield epoch, rows


class ImageCache:
    """One split's decoded pixels and which rows hold them; shared with workers when asked."""

    def __init__(self, rows: int, channels: int, size: int, shared: bool) -> None:
        self.pixels = torch.empty((rows, channels, size, size), dtype=torch.uint8)
        self.filled = torch.zeros(rows, dtype=torch.bool)
        if shared:  # before any worker starts: they inherit or receive the same memory
            self.pixels.share_memory_()
            self.filled.share_memory_()


class ImageBatchDataset(Dataset[Batch]):
    """`dataset[(epoch, rows)]` is one batch: pixels from the cache or the files, then augmented."""

    def __init__(self, split: ImageSplit, preprocessor: ImagePreprocessor, augment: str = "none",
                 seed: int = 0, cache: ImageCache | None = None) -> None:
        self.paths, self.targets = split.paths, split.targets
        self.channels, self.size = preprocessor.channels, preprocessor.image_size
        self.mean, self.std = preprocessor.mean, preprocessor.std
        self.augment, self.seed, self.cache = augment, seed, cache

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, torch.Tensor]) -> Batch:
        epoch, rows = key
        pixels = self.pixels(rows)
        if self.augment != "none":
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, int(rows[0])]))
            pixels = augment_batch(pixels, self.augment, rng)
        return normalise(pixels, self.mean, self.std), self.targets.index_select(0, rows)

    def pixels(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, S, S) of `rows`, decoding (and caching) the rows not cached yet."""
        cache = self.cache
        if cache is not None and bool(cache.filled.index_select(0, rows).all()):
            return cache.pixels.index_select(0, rows)  # after the first epoch: one gather, no file read
        out = torch.empty((len(rows), self.channels, self.size, self.size), dtype=torch.uint8)
        for k, row in enumerate(rows.tolist()):
            if cache is not None and cache.filled[row]:
                out[k] = cache.pixels[row]
                continue
            out[k] = load_pixels(read_image(self.paths[row]), self.channels, self.size)
            if cache is not None:
                cache.pixels[row] = out[k]
                cache.filled[row] = True  # after the pixels: a reader that sees the flag sees them
        return out


class ImageLoader(DataLoader):
    """A DataLoader whose workers' DataErrors arrive as the one line they were raised with.

    DataLoader re-raises a worker's exception with "Caught DataError in DataLoader worker
    process 0." and the worker's traceback as its message; the CLI prints a DataError's message
    as the one line that tells the user which file to fix.
    """

    def __iter__(self):
        try:
            yield from super().__iter__()
        except DataError as err:
            lines = [line for line in str(err).splitlines() if line.strip()]
            raise DataError(lines[-1].split("DataError: ", 1)[-1]) from None


def make_image_loaders(prepared: ImagesPrepared, batch_size: int, drop_last: bool = False, num_workers: int = 0,
                       pin_memory: bool = False, seed: int = 0, augment: str = "none", cache: str = "auto",
                       rank: int = 0, world_size: int = 1) -> Loaders:
    """Train (shuffled, augmented) and val/test (in order, every image, never augmented) loaders.

    `cache`: auto (train and val, while they fit in a quarter of the available memory; test is
    read once, so caching it only costs memory), on (all three; ConfigError if they cannot
    fit), off (decode every epoch). `batch_size` is the global batch under DDP.
    """
    if augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    for name in ("train", "val", "test"):
        if len(getattr(prepared, name).paths) < world_size:
            raise ConfigError(f"the {name} split has fewer images than the {world_size} DDP processes; use fewer devices")
    caches = plan_caches(prepared, cache, shared=num_workers > 0, world_size=world_size)
    eval_batch = 2 * batch_size  # inference keeps no activations for backward: twice the batch fits

    def loader(name: str, size: int, shuffle: bool, drop: bool, preset: str):
        split = getattr(prepared, name)
        dataset = ImageBatchDataset(split, prepared.preprocessor, preset, seed, caches[name])
        batches = ImageBatches(len(split.paths), size, shuffle, drop, seed, rank=rank, world_size=world_size)
        if num_workers == 0:
            return BatchLoader(dataset, batches, pin_memory)
        return ImageLoader(dataset, sampler=batches, batch_size=None, num_workers=num_workers,
                           pin_memory=pin_memory, persistent_workers=True, generator=worker_seed_generator(seed))

    return Loaders(
        train=loader("train", batch_size, True, drop_last, augment),
        val=loader("val", eval_batch, False, False, "none"),
        test=loader("test", eval_batch, False, False, "none"),
    )


def plan_caches(prepared: ImagesPrepared, cache: str, shared: bool,
                world_size: int = 1) -> dict[str, ImageCache | None]:
    """One ImageCache per split that gets one (see make_image_loaders), within the memory budget."""
    if cache not in CACHES:
        raise ConfigError(f"image_cache must be one of {', '.join(CACHES)}, got {cache!r}")
    names = {"off": (), "auto": ("train", "val"), "on": ("train", "val", "test")}[cache]
    channels, size = prepared.preprocessor.channels, prepared.preprocessor.image_size
    budget = available_memory()
    if shared:  # shared tensors are files in /dev/shm: a container's default is only 64 MiB
        budget = min(budget, _shared_memory_free())
    if cache == "auto":  # every DDP process on a machine holds its own cache
        budget //= _AUTO_SHARE * world_size
    caches: dict[str, ImageCache | None] = dict.fromkeys(("train", "val", "test"))
    for name in names:
        rows = len(getattr(prepared, name).paths)
        need = rows * channels * size * size
        if need > budget:
            if cache == "on":
                raise ConfigError(f"image_cache on needs {need / 2**30:.2f} GiB more for the {name} split's decoded images "
                                  f"but {budget / 2**30:.2f} GiB is free{' in /dev/shm' if shared else ''}; "
                                  "use image_cache auto or off, or a smaller image_size")
            continue
        caches[name] = ImageCache(rows, channels, size, shared)
        budget -= need
    return caches


def available_memory() -> int:
    """Bytes of memory available (MemAvailable: free plus reclaimable page cache)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # no /proc (macOS): physical memory


def _shared_memory_free() -> int:
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:  # no /dev/shm (macOS): torch shares through other files
        return available_memory()
    return stat.f_bavail * stat.f_frsize
