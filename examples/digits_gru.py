"""The `dataset` kind, worked: the shipped digits read row by row as sequences by a GRU.

    fitflow train --data examples.digits_gru:make_datasets --model examples.digits_gru:DigitsGRU --epochs 15

`make_datasets` is the factory fitflow calls (with `data_kwargs`); `DigitsGRU` is the model it
builds with `num_outputs` = the number of classes. Nothing here is fitflow-specific: the factory
returns plain torch Datasets, the model is a plain nn.Module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

DIGITS = Path(__file__).resolve().parents[1] / "data" / "digits"  # data/README.md: where it comes from


class DigitRows(Dataset):
    """Item i: (the image as 8 rows of 8 pixels in 0-1, float32 (8, 8); the digit, an int)."""

    def __init__(self, images: torch.Tensor, targets: list[int]) -> None:
        self.images, self.targets = images, targets  # `targets`: fitflow reads the classes from it

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


def make_datasets(val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
                  root: str | Path = DIGITS) -> dict:
    """Train/val/test splits of the digit folders, stratified by class and seeded."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())  # ImageFolder's order: "0".."9"
    files = [(path, label) for label, name in enumerate(classes) for path in sorted((root / name).glob("*.png"))]
    if not files:
        raise FileNotFoundError(f"no PNG files in the class folders of {root}")
    # 1797 images of 64 bytes: decoding them all once costs well under a second
    images = torch.from_numpy(np.stack([np.asarray(Image.open(path).convert("L")) for path, _ in files]))
    images = images.float() / 255
    labels = np.array([label for _, label in files])
    rng = np.random.default_rng(seed)
    split = {"train": [], "val": [], "test": []}
    for label in range(len(classes)):  # stratified: every split has each digit in the same share
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_val, n_test = round(len(rows) * val_fraction), round(len(rows) * test_fraction)
        split["val"] += rows[:n_val].tolist()
        split["test"] += rows[n_val:n_val + n_test].tolist()
        split["train"] += rows[n_val + n_test:].tolist()
    out: dict = {name: DigitRows(images[rows], labels[rows].tolist()) for name, rows in split.items() if rows}
    out["classes"] = classes
    return out


class DigitsGRU(nn.Module):
    """A GRU reads the 8 rows top to bottom; a linear head maps its last state to the classes."""

    def __init__(self, num_outputs: int, hidden_size: int = 64, row_size: int = 8) -> None:
        super().__init__()
        self.gru = nn.GRU(row_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, rows, pixels per row)
        _, last = self.gru(x)  # last: (1, batch, hidden)
        return self.head(last[0])
