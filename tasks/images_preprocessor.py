"""The image model's eval preset, kept as plain data (JSON, no pickle) and stored with the model.

Like torchvision's `ClassificationPresetEval`: resize (shorter side, antialias) + centre crop
to `image_size`, then normalise with the training split's per-channel mean and std. It also
answers what code written for the table `Preprocessor` asks (`task`, `classes`, `target`,
`target_mean`, `n_features`) and decodes outputs into the same columns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tasks.errors import DataError
from tasks.images_decode import decode_bytes, from_array, load_pixels, normalise, read_image
from tasks.labels import label_set_predictions
from tasks.preprocessing import class_predictions

ImageItem = str | Path | bytes | bytearray | memoryview | np.ndarray


@dataclass
class ImagePreprocessor:
    classes: list[str]
    image_size: int
    channels: int  # 1 (every sampled training image was grey) or 3
    mean: list[float]  # per channel, pixel values in [0, 1], from the training split
    std: list[float]
    task: str = "classification"  # or multilabel: "a|b" labels, a sigmoid per class
    target: str = "label"  # the manifest's label column ("label" for folders)
    target_mean: None = None  # no target scaling: tables' regression targets have one
    target_std: None = None
    n_features: None = None  # images have no feature columns
    kind: str = "images"  # tells a reader of the JSON which preprocessor it holds

    @property
    def target_columns(self) -> list[str]:
        return [self.target]

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """One model input's shape: (channels, image_size, image_size)."""
        return (self.channels, self.image_size, self.image_size)

    def load_images(self, items: Iterable[ImageItem]) -> torch.Tensor:
        """Paths, encoded bytes (PNG, JPEG, ...) or uint8 arrays (H, W) / (H, W, C) -> float32
        (N, C, image_size, image_size), normalised as in training. DataError names a bad item."""
        pixels = [load_pixels(self._decode(item, i), self.channels, self.image_size) for i, item in enumerate(items)]
        if not pixels:
            return torch.empty((0, self.channels, self.image_size, self.image_size))
        return normalise(torch.stack(pixels), self.mean, self.std)

    @staticmethod
    def _decode(item: ImageItem, i: int) -> torch.Tensor:
        if isinstance(item, (str, Path)):
            return read_image(item)
        if isinstance(item, (bytes, bytearray, memoryview)):
            return decode_bytes(item, f"item {i} (bytes)")
        if isinstance(item, np.ndarray):
            return from_array(item, f"item {i}")
        raise DataError(f"item {i} is a {type(item).__name__}; pass image paths, image file bytes or uint8 arrays (H, W) / (H, W, C)")

    def decode(self, outputs: np.ndarray) -> pd.DataFrame:
        """Logits -> `prediction` (the class name; multilabel: the label set `a|b`) and
        `probability_<class>` (softmax; multilabel: sigmoid) columns."""
        if self.task == "multilabel":
            return label_set_predictions(outputs, self.classes)
        return class_predictions(outputs, self.classes)

    # --- plain-data round trip ------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImagePreprocessor:
        if data.get("kind") != "images":
            raise DataError(f"preprocessing of kind {data.get('kind')!r} is not an image preprocessor")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ImagePreprocessor:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
