"""Regenerate data/digits/: scikit-learn's handwritten digits as PNG class folders.

    python3 -m venv /tmp/skl && /tmp/skl/bin/pip install scikit-learn pillow
    /tmp/skl/bin/python data/make_digits.py

scikit-learn is not a fitflow dependency: only this script needs it. Each of the 1797 images
(8x8 pixels, grey levels 0-16, higher = more ink) is written as it is, an 8x8 grayscale PNG with
the level scaled to 0-255 (round(v * 255 / 16): lossless, 16 maps to 255), to
`data/digits/<digit>/<row>.png`, where <row> is its row in `sklearn.datasets.load_digits()`
(0000-1796), so every file traces back to its source row. No upscaling: a loader resizes to the
size a model wants, and a nearest-neighbour 16x16 copy would hold the same information in more
bytes. The output is byte-for-byte reproducible (no timestamps or other metadata in the PNGs).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parent / "digits"


def main() -> None:
    digits = load_digits()  # ships inside scikit-learn: nothing is downloaded
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), 0-255
    if OUT.exists():
        shutil.rmtree(OUT)
    for label in range(10):
        (OUT / str(label)).mkdir(parents=True)
    for row, (image, label) in enumerate(zip(pixels, digits.target)):
        Image.fromarray(image).save(OUT / str(label) / f"{row:04d}.png", optimize=True)
    counts = np.bincount(digits.target, minlength=10)
    print(f"wrote {len(pixels)} images to {OUT}: per class {counts.tolist()}")


if __name__ == "__main__":
    main()
