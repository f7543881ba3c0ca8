"""Tiny real image files for tests: class folders, split folders and manifests written with PIL.

Each class gets its own colour family (class k: red ramp, green ramp, ...), so labels are
learnable and images differ; the pixels are a pure function of (class, index).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".webp": "WEBP"}


def pixels(label: int, index: int, size: int = 16) -> np.ndarray:
    """uint8 (size, size, 3): a gradient in the class's colour with a per-image offset."""
    ramp = np.linspace(0, 200, size, dtype=np.float64)
    image = np.zeros((size, size, 3), dtype=np.float64)
    image[..., label % 3] = ramp[None, :] + 5 * (index % 10)
    image[..., (label + 1) % 3] = ramp[:, None] * (label // 3 % 2)
    image[size // 4 : size // 2, size // 4 : size // 2, :] = 40 * (index % 5)  # a square that moves the mean
    return image.clip(0, 255).astype(np.uint8)


def encode(array: np.ndarray, suffix: str = ".png", mode: str = "RGB") -> bytes:
    """The file bytes of `array` saved as `suffix` after converting to PIL `mode`."""
    image = Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, FORMATS[suffix.lower()])
    return buffer.getvalue()


def write_image(path: Path, array: np.ndarray, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(array, path.suffix, mode))
    return path


def write_class_folders(root: Path, classes=("cat", "dog", "owl"), per_class: int = 8, suffixes=(".png",),
                        modes=("RGB",), size: int = 16) -> Path:
    """root/<class>/<i><suffix>, cycling through `suffixes` and PIL `modes`."""
    for label, name in enumerate(classes):
        for i in range(per_class):
            suffix, mode = suffixes[i % len(suffixes)], modes[i % len(modes)]
            write_image(root / name / f"{i:03d}{suffix}", pixels(label, i, size), mode)
    return root


def write_split_folders(root: Path, classes=("cat", "dog"), per_class=None, test: bool = True) -> Path:
    """root/train, root/val (and root/test), each in the class-folder layout."""
    per_class = per_class or {"train": 6, "val": 3, "test": 3}
    for split in ("train", "val", "test") if test else ("train", "val"):
        write_class_folders(root / split, classes, per_class[split])
    return root


def write_manifest(root: Path, classes=("cat", "dog"), per_class: int = 6, name: str = "labels.csv",
                   path_column: str = "path", label_column: str = "label") -> Path:
    """root/images/<class>_<i>.png and a manifest beside them (CSV or Parquet by `name`)."""
    rows = []
    for label, cls in enumerate(classes):
        for i in range(per_class):
            write_image(root / "images" / f"{cls}_{i}.png", pixels(label, i))
            rows.append({path_column: f"images/{cls}_{i}.png", label_column: cls})
    frame = pd.DataFrame(rows)
    manifest = root / name
    frame.to_parquet(manifest) if manifest.suffix == ".parquet" else frame.to_csv(manifest, index=False)
    return manifest


TAG_MARKS = ("blue", "green", "red")  # the multi-label manifest's classes, each a mark an image may carry


def tagged_pixels(tags: tuple[str, ...], index: int, size: int = 16) -> np.ndarray:
    """uint8 (size, size, 3): dim noise (a pure function of `index`) plus one mark per tag: a red
    square top left, a blue bar at the bottom, a green column on the right."""
    noise = np.random.default_rng(index).integers(0, 60, size=(size, size, 3))
    image = noise.astype(np.uint8)
    if "red" in tags:
        image[2 : size // 2, 2 : size // 2, 0] = 230
    if "blue" in tags:
        image[size - 5 : size - 2, :, 2] = 230
    if "green" in tags:
        image[:, size - 4 : size - 1, 1] = 230
    return image


def write_multilabel_manifest(root: Path, images: int = 48, name: str = "tags.csv") -> Path:
    """root/images/<i>.png and a manifest whose `label` is the image's tags as `a|b` (empty: no tag).
    Image i carries the tags of the bits of i % 8, so every combination of the three occurs."""
    rows = []
    for i in range(images):
        tags = tuple(tag for bit, tag in enumerate(TAG_MARKS) if i % 8 >> bit & 1)
        write_image(root / "images" / f"{i:03d}.png", tagged_pixels(tags, i))
        rows.append({"path": f"images/{i:03d}.png", "label": "|".join(tags)})
    manifest = root / name
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
