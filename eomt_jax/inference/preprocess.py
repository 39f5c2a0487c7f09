"""Host-side input geometry for evaluation and prediction (numpy + Pillow, uint8 images (H, W, 3)).

Panoptic and instance models see each image resized so its long side is S and zero-padded bottom/right to S×S
(`resize_and_pad`, shared with the evaluation data pipeline). Semantic models see the image resized so its short
side is S, cut into S×S windows along the long side (`semantic_windows`). Both resizes use Pillow's bilinear
filter on uint8 pixels, which antialiases when shrinking, and Python's `round` for the new size (half to even),
exactly as the original does.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from eomt_jax.data.transforms import resize_and_pad

__all__ = ["resize_and_pad", "check_image", "short_side_size", "window_starts", "SemanticWindows",
           "semantic_windows", "to_model_input"]


def check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    return image


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 3) -> float32 in [0, 1], the network's input (it normalises internally)."""
    return np.asarray(images, np.float32) / np.float32(255.0)


def short_side_size(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(h, w) after scaling so that the short side becomes `size` (the original's rounding)."""
    h, w = int(hw[0]), int(hw[1])
    factor = max(size / h, size / w)
    return round(h * factor), round(w * factor)


def window_starts(long_side: int, size: int) -> list[int]:
    """Offsets of the S×S windows along a long side of `long_side` >= S pixels.

    n = ceil(long / S) windows spread evenly so the first starts at 0 and the last ends at the border:
    the overlap n·S − long is shared out as a fractional step S − overlap / (n − 1), truncated per window.
    """
    if long_side < size:
        raise ValueError(f"long side {long_side} is shorter than the window size {size}")
    n = math.ceil(long_side / size)
    overlap = n * size - long_side
    step = size - overlap / (n - 1) if overlap > 0 else size
    starts = [int(j * step) for j in range(n)]
    # Deviation: with 4+ windows the truncated float step can leave the last window one pixel short of the border;
    # the original then divides 0 by 0 there (NaN scores). We align the last window to the border instead, which
    # changes nothing whenever the original's result is defined.
    starts[-1] = long_side - size
    return starts


@dataclasses.dataclass(frozen=True)
class SemanticWindows:
    """One image cut for sliding-window inference.

    `windows` uint8 (n, S, S, 3); `starts` their offsets along the long side of the resized image;
    `resized_hw` the image size after the short-side resize; `orig_hw` the original size; `portrait` whether
    the long side is the height (windows then slide vertically).
    """

    windows: np.ndarray
    starts: tuple[int, ...]
    resized_hw: tuple[int, int]
    orig_hw: tuple[int, int]

    @property
    def portrait(self) -> bool:
        # The original decides the sliding axis with a strict comparison: square images slide along the width.
        return self.resized_hw[0] > self.resized_hw[1]


def semantic_windows(image: np.ndarray, size: int) -> SemanticWindows:
    image = check_image(image)
    orig_hw = image.shape[:2]
    new_h, new_w = short_side_size(orig_hw, size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    portrait = new_h > new_w
    starts = window_starts(max(new_h, new_w), size)
    if portrait:
        windows = np.stack([resized[s:s + size, :size] for s in starts])
    else:
        windows = np.stack([resized[:size, s:s + size] for s in starts])
    return SemanticWindows(windows, tuple(starts), (new_h, new_w), (int(orig_hw[0]), int(orig_hw[1])))
