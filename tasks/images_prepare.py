"""The `images` data kind, step 2: splits, channels and normalisation (`prepare_images`).

Only a seeded sample of at most 2,000 training images is decoded here (for the channel count
and the per-channel mean/std); the rest are decoded by the loaders. So a corrupt image is
named here when it is in the sample and by the loader that meets it otherwise. The result
holds paths, not pixels: Prefect pickles it as the cached result (1 MB for 20k images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from tasks.errors import ConfigError, DataError
from tasks.images import ImageSource
from tasks.images_decode import is_grey, load_pixels, read_image
from tasks.images_preprocessor import ImagePreprocessor

log = logging.getLogger("fitflow")

STATS_SAMPLE = 2000  # images decoded for mean/std: the estimate's error is ~1/sqrt(pixels), long negligible


@dataclass
class ImageSplit:
    paths: list[str]
    targets: torch.Tensor  # int64 class indices, or float32 multi-hot (images, classes) for multilabel


@dataclass
class ImagesPrepared:
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    preprocessor: ImagePreprocessor
    facts: dict[str, int | str]
    source_digest: str


def prepare_images(source: ImageSource, image_size: int, val_fraction: float = 0.15, test_fraction: float = 0.15,
                   seed: int = 42) -> ImagesPrepared:
    """Split (stratified, seeded, unless the layout has splits), then fit the eval preset on train."""
    if image_size < 1:
        raise ConfigError(f"image_size must be a positive number of pixels, got {image_size}")
    if min(val_fraction, test_fraction) < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be >= 0 "
                          "and leave images for training (sum < 1)")
    splits = _splits(source, val_fraction, test_fraction, seed)
    train_paths = splits["train"].paths
    rng = np.random.default_rng(seed)
    sample = sorted(rng.choice(len(train_paths), min(STATS_SAMPLE, len(train_paths)), replace=False))
    channels, mean, std = _pixel_stats([train_paths[i] for i in sample], image_size)
    preprocessor = ImagePreprocessor(list(source.classes), image_size, channels, mean, std, task=source.task,
                                     target=source.target)
    facts: dict[str, int | str] = {
        "task": source.task,
        "data_kind": "images",
        "layout": source.layout,
        "rows_train": len(splits["train"].paths),
        "rows_val": len(splits["val"].paths),
        "rows_test": len(splits["test"].paths),
        "n_classes": len(source.classes),
        "image_size": image_size,
        "channels": channels,
        "skipped_files": source.skipped,
    }
    log.info("prepared images (%s): %d train / %d val / %d test, %d classes, %d channel(s) at %dx%d",
             source.layout, facts["rows_train"], facts["rows_val"], facts["rows_test"], len(source.classes),
             channels, image_size, image_size)
    return ImagesPrepared(splits["train"], splits["val"], splits["test"], preprocessor, facts, source.digest())


def _splits(source: ImageSource, val_fraction: float, test_fraction: float, seed: int) -> dict[str, ImageSplit]:
    """The layout's own splits; what it lacks (all three for a pool) is carved out of train."""
    base = source.splits.get("train", source.splits.get("all"))
    wanted_val = 0.0 if "val" in source.splits else val_fraction
    wanted_test = 0.0 if "test" in source.splits else test_fraction
    # Multi-label sets are too many combinations to stratify by: one group, a seeded shuffle
    labels = np.array([0 if source.task == "multilabel" else label for _, label in base], dtype=np.int64)
    parts = stratified_split(labels, wanted_val, wanted_test, seed)
    carved = dict(zip(("train", "val", "test"), ([base[i] for i in rows] for rows in parts)))
    items = {"train": carved["train"], "val": source.splits.get("val", carved["val"]),
             "test": source.splits.get("test", carved["test"])}
    empty = [name for name, split in items.items() if not split]
    if empty:
        raise DataError(f"{len(base)} images in {source.root} are too few to split into train/val/test "
                        f"(val_fraction={val_fraction}, test_fraction={test_fraction}, {empty[0]} would be empty); "
                        "provide at least 3 images per class")
    return {name: ImageSplit([p for p, _ in split], _targets([label for _, label in split], len(source.classes), source.task))
            for name, split in items.items()}


def _targets(labels: list, n_classes: int, task: str) -> torch.Tensor:
    """Class indices as int64, or label sets (tuples of class indices) as float32 multi-hot rows."""
    if task != "multilabel":
        return torch.tensor(labels, dtype=torch.int64)
    targets = torch.zeros((len(labels), n_classes), dtype=torch.float32)
    for row, classes in enumerate(labels):
        targets[row, list(classes)] = 1.0
    return targets


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of train/val/test, per class, reproducible from the seed.

    Like tasks/data.py's split_rows, plus: a class with >= 3 images has at least one in each
    split asked for (rounding alone leaves small classes out of val and test), and every
    class keeps at least one training image.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n = len(rows)
        n_test = max(round(n * test_fraction), int(test_fraction > 0 and n >= 3))
        n_val = max(round(n * val_fraction), int(val_fraction > 0 and n >= 3))
        while n_test + n_val > n - 1:  # keep one for training: shrink the larger of the two
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        parts[2].append(rows[:n_test])
        parts[1].append(rows[n_test:n_test + n_val])
        parts[0].append(rows[n_test + n_val:])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, test


def _pixel_stats(paths: list[str], size: int) -> tuple[int, list[float], list[float]]:
    """Channels (1 when every image is grey, else 3) and per-channel mean/std in [0, 1].

    One decode per image: the sums are taken over the RGB form, and a grey image's RGB form is
    its grey plane three times, so when all are grey channel 0's sums are the grey sums.
    """
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    all_grey = True
    for path in paths:
        native = read_image(path)
        all_grey &= is_grey(native)
        pixels = load_pixels(native, 3, size).to(torch.float64)
        total += pixels.sum(dim=(1, 2))
        squares += pixels.square().sum(dim=(1, 2))
    count = len(paths) * size * size
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.full_like(std, 255.0))  # a constant channel: divide by 1, not 0
    channels = 1 if all_grey else 3
    return channels, (mean / 255).tolist()[:channels], (std / 255).tolist()[:channels]
