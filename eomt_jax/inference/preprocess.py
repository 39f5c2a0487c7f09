"""Host-side input geometry for evaluation and prediction (numpy + Pillow, uint8 images (H, W, 3)).

Panoptic and instance models see each image resized so its long side is S and zero-padded bottom/right to S×S
(`resize_and_pad`). Semantic models see the image resized so its short side is S, cut into S×S windows along the
long side (`semantic_windows`). Both resizes use Pillow's bilinear filter on uint8 pixels, which antialiases when
shrinking, and Python's `round` for the new size (half to even), exactly as the original does.

Two extremes the original cannot handle are defined here: a side that would round to 0 pixels (a 2×3000 image
at S = 640) is kept at 1 pixel; and an image so elongated that its short-side resize would need more than
`MAX_WINDOWS` windows (1500 for 2×3000 at S = 64, with score maps to match) is instead resized so its long side
spans `MAX_WINDOWS` windows, its short side zero-padded to S as the letterboxed panoptic input is.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

__all__ = ["resize_and_pad", "check_image", "long_side_size", "short_side_size", "semantic_size", "window_starts",
           "SemanticWindows", "semantic_windows", "to_model_input", "MAX_WINDOWS"]

# Windows per image at most; more would only come from panoramas beyond 8:1, whose (n, C, S, S) window scores
# would exhaust memory (n = 1500 for a 2×3000 strip).
MAX_WINDOWS = 8


def check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    return image


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 3) -> float32 in [0, 1], the network's input (it normalises internally)."""
    return np.asarray(images, np.float32) / np.float32(255.0)


def _scaled(hw: tuple[int, int], factor: float) -> tuple[int, int]:
    return max(1, round(int(hw[0]) * factor)), max(1, round(int(hw[1]) * factor))


def long_side_size(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(h, w) after scaling so that the long side becomes `size` (the original's rounding; at least 1 pixel)."""
    return _scaled(hw, min(size / int(hw[0]), size / int(hw[1])))


def short_side_size(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(h, w) after scaling so that the short side becomes `size` (the original's rounding)."""
    return _scaled(hw, max(size / int(hw[0]), size / int(hw[1])))


def semantic_size(hw: tuple[int, int], size: int, max_windows: int = MAX_WINDOWS) -> tuple[int, int]:
    """The sliding-window input size: `short_side_size`, unless that needs more than `max_windows` windows;
    then the long side spans exactly `max_windows` windows and the short side is below `size`."""
    new_hw = short_side_size(hw, size)
    if math.ceil(max(new_hw) / size) <= max_windows:
        return new_hw
    return long_side_size(hw, max_windows * size)


def resize_and_pad(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Evaluation input: resize so the long side is `size` (Pillow bilinear), zero-pad bottom/right to
    (size, size). Returns the padded image and the resized (h, w) before padding."""
    image = check_image(image)
    new_h, new_w = long_side_size(image.shape[:2], size)
    out = np.zeros((size, size, 3), np.uint8)
    out[:new_h, :new_w] = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    return out, (new_h, new_w)


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
    `resized_hw` the image size after the resize (`semantic_size`; a short side below S is zero-padded in the
    windows); `orig_hw` the original size; `portrait` whether the long side is the height (windows then slide
    vertically).
    """

    windows: np.ndarray
    starts: tuple[int, ...]
    resized_hw: tuple[int, int]
    orig_hw: tuple[int, int]

    @property
    def portrait(self) -> bool:
        # The original decides the sliding axis with a strict comparison: square images slide along the width.
        return self.resized_hw[0] > self.resized_hw[1]


def semantic_windows(image: np.ndarray, size: int, max_windows: int = MAX_WINDOWS) -> SemanticWindows:
    image = check_image(image)
    orig_hw = image.shape[:2]
    new_h, new_w = semantic_size(orig_hw, size, max_windows)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    if min(new_h, new_w) < size:
        padded = np.zeros((max(new_h, size), max(new_w, size), 3), np.uint8)
        padded[:new_h, :new_w] = resized
        resized = padded
    portrait = new_h > new_w
    starts = window_starts(max(new_h, new_w), size)
    if portrait:
        windows = np.stack([resized[s:s + size, :size] for s in starts])
    else:
        windows = np.stack([resized[:size, s:s + size] for s in starts])
    return SemanticWindows(windows, tuple(starts), (new_h, new_w), (int(orig_hw[0]), int(orig_hw[1])))
