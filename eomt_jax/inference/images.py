"""Images as the network's pipeline takes them: uint8 RGB (H, W, 3) numpy arrays, from files, Pillow images or
arrays, with one clear error for anything else.

Files are read with their EXIF orientation applied (as they are displayed); 16-bit and float images (Pillow
modes I;16, I, F) are scaled to 8 bits (16-bit: value / 257; float: [0, 1] or [0, 255] as the values fit); other
modes are converted to RGB (alpha dropped).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def _gray_to_rgb8(values: np.ndarray, scale: float) -> np.ndarray:
    gray = np.clip(np.round(values.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def to_rgb8(im: Image.Image) -> np.ndarray:
    """A Pillow image as uint8 RGB (H, W, 3), high-bit-depth modes scaled rather than clipped."""
    if im.mode.startswith("I;16"):
        return _gray_to_rgb8(np.asarray(im), 255 / 65535)
    if im.mode == "I":  # 32-bit integers: how Pillow may hold a 16-bit grayscale PNG or TIFF
        values = np.asarray(im)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"32-bit integer pixels in [{values.min()}, {values.max()}]: expected [0, 65535]")
        return _gray_to_rgb8(values, 255 / 65535)
    if im.mode == "F":
        values = np.asarray(im)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 255:
            raise ValueError(f"float pixels in [{values.min()}, {values.max()}]: expected [0, 1] or [0, 255]")
        return _gray_to_rgb8(values, 255.0 if values.max() <= 1 else 1.0)
    return np.asarray(im.convert("RGB"))


def first_line(e: BaseException) -> str:
    """An exception as one line: its message's first line, prefixed by its type unless it is a ValueError or
    OSError (whose messages name the problem themselves)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


def load_image(path: str | os.PathLike) -> np.ndarray:
    """The image as it is displayed (EXIF orientation applied), uint8 RGB; ValueError naming the file otherwise."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here
            return to_rgb8(ImageOps.exif_transpose(im))
    except Exception as e:  # noqa: BLE001 - whatever the decoder raises, this image cannot be read
        raise ValueError(f"cannot read image ({first_line(e)})") from None


def as_rgb8(image) -> np.ndarray:
    """A file path, a Pillow image or a uint8 array (H, W, 3) or (H, W, 4) (alpha dropped) as uint8 RGB
    (H, W, 3); ValueError saying what was expected otherwise."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{path}: no such image file")
        try:
            return load_image(path)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if isinstance(image, Image.Image):
        return to_rgb8(ImageOps.exif_transpose(image))
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected an image path, a PIL image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        hint = (" (floats in [0, 1]: pass (image * 255).round().astype(np.uint8))"
                if np.issubdtype(image.dtype, np.floating) else "")
        raise ValueError(f"expected a uint8 array with values 0..255, got {image.dtype}{hint}")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        hint = " (a grayscale image: pass np.stack([image] * 3, -1))" if image.ndim == 2 else ""
        raise ValueError(f"expected an RGB array (H, W, 3) or RGBA (H, W, 4), got shape {image.shape}{hint}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    return np.ascontiguousarray(image[..., :3])
