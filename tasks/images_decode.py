"""Pixels from image files, bytes or arrays: decode, choose channels, resize, normalise.

One pipeline for training, evaluation and prediction, so a path, its bytes and its decoded
array give the same tensor:
    decode (native channels) -> load_pixels (drop alpha, grey <-> RGB, fit_square) -> normalise

Decoder: torchvision.io.decode_image for PNG, JPEG, GIF and WebP (chosen by magic bytes, not
the suffix), PIL for the rest (BMP) and as the fallback when torchvision refuses a file.
Measured on 2,000 JPEGs, one thread, decode + resize, microseconds per image:
    32x32 -> 32: torchvision 33, PIL 78-87;  64x64 -> 32: 83 vs 110;  256x256 -> 64: 553 vs 508
torchvision is 1.3-2.6x faster on the small images this kind is for; PIL's JPEG draft mode
(DCT downscaling) wins by ~10% only on large JPEGs shrunk a lot. torchvision 0.29 deprecates
its image decoders in favour of TorchCodec (a DeprecationWarning, hidden outside __main__ by
Python's default filters); the PIL fallback is what keeps this working once they are gone.
Resize: the torchvision references' eval preset: the shorter side to `size` (bilinear,
antialias), then a centre crop to size x size; aspect ratios are kept, edges cut.
Alpha: dropped, not composited (what PIL's convert("RGB") and ImageReadMode.RGB do).
EXIF orientation is not applied, as ImageFolder's PIL loader does not apply it either.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tasks.errors import DataError

# torchvision is imported on the first image, not with this module: the trainer and the flow
# import it for every run, and a table's run has no use for torchvision (0.1-0.9 s of CPU).


def _transforms():
    import torchvision.transforms.v2.functional as F

    return F


@functools.cache
def _torchvision_decoder():
    try:  # deprecated in torchvision 0.29, to be removed: PIL decodes everything when it is gone
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:  # pragma: no cover
        return None
    return lambda tensor: decode_image(tensor, mode=ImageReadMode.UNCHANGED)


def _torchvision_decodes(head: bytes) -> bool:
    return (head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a"))
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"))


def read_image(path: str | Path) -> torch.Tensor:
    """A file's pixels as uint8 (C, H, W) with its own channels (1-4); DataError names the file."""
    try:
        data = np.fromfile(path, dtype=np.uint8)  # one read into a writable buffer torch can wrap
    except OSError as err:
        raise DataError(f"image {path} cannot be read ({err.strerror or err}); check that it exists and is readable") from None
    return decode_bytes(data, str(path))


def decode_bytes(data: bytes | bytearray | memoryview | np.ndarray, name: str) -> torch.Tensor:
    """Encoded image bytes -> uint8 (C, H, W), native channels. `name` is what errors call it."""
    buffer = data if isinstance(data, np.ndarray) else np.frombuffer(bytearray(data), dtype=np.uint8)
    decode = _torchvision_decoder()
    if decode is not None and _torchvision_decodes(buffer[:12].tobytes()):
        try:
            image = decode(torch.from_numpy(buffer))
        except RuntimeError:
            pass  # PIL reads some files libjpeg/libpng refuse, and words its errors better
        else:
            image = image[0] if image.ndim == 4 else image  # an animated GIF: its first frame
            return (image >> 8).to(torch.uint8) if image.dtype == torch.uint16 else image  # 16-bit PNG
    return _decode_pil(buffer, name)


def _decode_pil(buffer: np.ndarray, name: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(buffer.tobytes())) as image:
            image.load()  # decoding happens here: a truncated file fails now, not later
            if image.mode.startswith("I;16"):
                pixels = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
            else:
                wanted = {"1": "L", "I": "L", "F": "L", "L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA",
                          "P": "RGBA" if "transparency" in image.info else "RGB", "PA": "RGBA"}.get(image.mode, "RGB")
                pixels = np.array(image.convert(wanted) if image.mode != wanted else image)
    except UnidentifiedImageError:
        raise DataError(f"image {name} cannot be decoded (not a known image format); it is corrupt, truncated "
                        "or not an image: replace or delete it") from None
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"image {name} cannot be decoded ({reason}); it is corrupt, truncated or not an image: replace or delete it") from None
    return from_array(pixels, name)


def from_array(array: np.ndarray, name: str) -> torch.Tensor:
    """A uint8 (H, W) or (H, W, C) array -> uint8 (C, H, W), native channels."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise DataError(f"{name} is an array of {array.dtype}; pass uint8 pixels (0-255)")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or 0 in array.shape:
        raise DataError(f"{name} is an array of shape {array.shape}; pass (H, W) or (H, W, C) with C = 1, 3 or 4")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def is_grey(image: torch.Tensor) -> bool:
    """Grey (with or without alpha). A palette image decodes to RGB: colour, even if its palette is grey."""
    return image.shape[0] in (1, 2)


def fit_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size` (antialiased), then the centre size x size: uint8 (C, size, size)."""
    height, width = image.shape[-2:]
    if min(height, width) != size:
        image = _transforms().resize(image, [size], antialias=True)
    if image.shape[-2:] != (size, size):
        image = _transforms().center_crop(image, [size, size])
    return image.contiguous()


def load_pixels(image: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Decoded native pixels -> the uint8 (channels, size, size) the model's input is made of.

    Alpha is dropped; RGB becomes grey (ITU-R 601 luma, within 1 level of PIL's convert("L"))
    before the resize and grey becomes RGB (repeated) after it, so the resize, the costly step,
    works on the fewest channels.
    """
    if image.shape[0] in (2, 4):
        image = image[:-1]
    if channels == 1 and image.shape[0] == 3:
        image = _transforms().rgb_to_grayscale(image)
    image = fit_square(image, size)
    return image.expand(3, -1, -1).contiguous() if channels == 3 and image.shape[0] == 1 else image


def normalise(batch: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std, per channel."""
    scale = torch.tensor([1 / (255 * s) for s in std], dtype=torch.float32).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32).view(1, -1, 1, 1)
    return batch.to(torch.float32).mul_(scale).sub_(shift)
