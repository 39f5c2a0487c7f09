"""Training augmentation and evaluation resizing on numpy records (channels-last, uint8 images, bool masks).

`TrainTransform` reproduces the original EoMT training augmentation in its order: drop crowd segments,
optional colour jitter, horizontal flip, scale jitter, pad, random crop, drop empty masks (redrawing when
nothing is left), and then pads the targets to a fixed number of slots so that batches have static shapes.
Images are resized with Pillow's bilinear filter (antialiased on downscale, like torchvision's
`antialias=True`); masks with PyTorch's "nearest" rule. All randomness comes from the `np.random.Generator`
that Grain passes in, so a sample is a pure function of (record, seed, index).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# Per-process counts of samples the pipeline altered; reported in the warnings and readable by tests.
COUNTS: collections.Counter = collections.Counter()


def _warn(event: str, message: str) -> None:
    COUNTS[event] += 1
    log.warning("%s (%d so far in this process)", message, COUNTS[event])


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel under PyTorch's "nearest" (floor(i * in / out), float32 like torch)."""
    scale = np.float32(in_size / out_size)
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the first two axes of `array` (H, W, ...) to `size` = (h, w) with PyTorch "nearest"."""
    rows = nearest_indices(array.shape[0], size[0])
    cols = nearest_indices(array.shape[1], size[1])
    return array[rows][:, cols]


def drop_crowd(record: dict[str, Any]) -> dict[str, Any]:
    keep = ~record["is_crowd"]
    return {**record, "masks": record["masks"][keep], "labels": record["labels"][keep],
            "is_crowd": record["is_crowd"][keep]}


# ------------------------------------------------------------------------------------------- colour jitter


def _grey(img: np.ndarray) -> np.ndarray:
    # torchvision's uint8 greyscale: weighted sum truncated to uint8.
    return np.floor(img[..., 0] * np.float32(0.2989) + img[..., 1] * np.float32(0.587)
                    + img[..., 2] * np.float32(0.114))[..., None]


def _blend(img: np.ndarray, other, factor: float) -> np.ndarray:
    # Result is clamped and truncated back to integers, as torchvision does for uint8 tensors.
    return np.floor(np.clip(factor * img + (1.0 - factor) * other, 0, 255)).astype(np.float32)


def _shift_hue(img: np.ndarray, shift: float) -> np.ndarray:
    # torchvision's float HSV round trip (same formulas and order, float32), then truncation to integers.
    rgb = img * np.float32(1 / 255)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    equal = maxc == minc
    chroma = maxc - minc
    sat = chroma / np.where(equal, np.float32(1), maxc)
    divisor = np.where(equal, np.float32(1), chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    hue = np.where(maxc == r, bc - gc, np.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    hue = (np.fmod(hue / 6 + 1, 1) + np.float32(shift)) % 1
    sector = np.floor(hue * 6)
    frac = hue * 6 - sector
    sector = sector.astype(np.int8) % 6
    v = maxc
    p = np.clip(v * (1 - sat), 0, 1)
    q = np.clip(v * (1 - sat * frac), 0, 1)
    t = np.clip(v * (1 - sat * (1 - frac)), 0, 1)
    out = np.stack([np.choose(sector, [v, q, p, p, t, v]), np.choose(sector, [t, v, v, q, p, p]),
                    np.choose(sector, [p, p, t, v, v, q])], -1)
    return np.floor(out * 255)


def draw_color_jitter(rng: np.random.Generator) -> list[tuple[str, float]]:
    """Random photometric operations (Mask2Former-style): brightness, then contrast and saturation+hue in
    random order, each applied with probability 0.5."""
    ops = []
    if rng.random() < 0.5:
        ops.append(("brightness", rng.uniform(1 - 32 / 255, 1 + 32 / 255)))
    contrast_first = rng.random() < 0.5
    contrast = [("contrast", rng.uniform(0.5, 1.5))] if rng.random() < 0.5 else []
    sat_hue = [("saturation", rng.uniform(0.5, 1.5))] if rng.random() < 0.5 else []
    if rng.random() < 0.5:
        sat_hue.append(("hue", rng.uniform(-18 / 360, 18 / 360)))
    return ops + (contrast + sat_hue if contrast_first else sat_hue + contrast)


def apply_color_jitter(image: np.ndarray, ops: list[tuple[str, float]]) -> np.ndarray:
    if not ops:
        return image
    img = image.astype(np.float32)
    for op, factor in ops:
        if op == "brightness":
            img = _blend(img, 0.0, factor)
        elif op == "contrast":
            # torchvision blends around the mean of the (truncated) greyscale image, the mean itself unrounded.
            img = _blend(img, _grey(img).mean(), factor)
        elif op == "saturation":
            img = _blend(img, _grey(img), factor)
        else:
            img = _shift_hue(img, factor)
    return img.astype(np.uint8)


# ------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """Grain random map: source record -> fixed-shape training sample, or None when the sample is skipped.

    Output: `image` uint8 (S, S, 3), `masks` bool (M, S, S), `labels` int32 (M,), `valid` bool (M,),
    `is_crowd` bool (M,) with S = `image_size` and M = `max_instances`. A sample keeps its M largest masks
    when it has more (counted warning). If every mask vanishes from the crop the whole augmentation is
    redrawn, at most `max_redraws` times; after that, or when the record has no non-crowd mask at all, the
    sample is skipped (counted warning) instead of looping forever as the original does.

    With `pack_masks` the masks leave as `masks_packed` uint8 (M, S, ceil(S / 8)) (`np.packbits` along the
    width): 8x fewer bytes to move between worker processes and to the device, where
    `pipeline.make_global_batch` unpacks them back to bool.
    """

    image_size: int
    max_instances: int
    scale_range: tuple[float, float] = (0.1, 2.0)
    color_jitter: bool = False
    max_redraws: int = 10
    pack_masks: bool = False

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        record = drop_crowd(record)
        if len(record["labels"]) == 0:
            _warn("skipped_no_masks", f"skipping image {record['image_id']}: it has no non-crowd segment")
            return None
        for _ in range(1 + self.max_redraws):
            sample = self._draw(record, rng)
            if sample is not None:
                return pad_targets(sample, self.max_instances, record["image_id"], self.pack_masks)
        _warn("skipped_redraws", f"skipping image {record['image_id']}: every mask left the crop in "
                                 f"{1 + self.max_redraws} draws")
        return None

    def _draw(self, record, rng):
        h, w = record["image"].shape[:2]
        aug = draw_augmentation(rng, (h, w), self.image_size, self.scale_range, self.color_jitter)
        return apply_augmentation(record, aug, self.image_size)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The random choices of one training view: colour ops, flip, resized size, crop offset."""

    jitter: tuple[tuple[str, float], ...]
    flip: bool
    resized: tuple[int, int]  # (h, w) after scale jitter
    offset: tuple[int, int]  # (top, left) of the crop in the resized image


def draw_augmentation(rng: np.random.Generator, image_hw: tuple[int, int], size: int,
                      scale_range: tuple[float, float], color_jitter: bool) -> Augmentation:
    h, w = image_hw
    jitter = tuple(draw_color_jitter(rng)) if color_jitter else ()
    flip = bool(rng.random() < 0.5)
    # Scale jitter as torchvision's ScaleJitter: relative to the fit-inside size, truncated to integers.
    ratio = min(size / h, size / w) * rng.uniform(*scale_range)
    new_h, new_w = max(1, int(h * ratio)), max(1, int(w * ratio))
    # Padding to at least `size` is bottom/right, so the crop offset is 0 along a side shorter than `size`.
    top = int(rng.integers(0, max(new_h - size, 0) + 1))
    left = int(rng.integers(0, max(new_w - size, 0) + 1))
    return Augmentation(jitter, flip, (new_h, new_w), (top, left))


def apply_augmentation(record: dict[str, Any], aug: Augmentation, size: int) -> dict[str, Any] | None:
    """The (size, size) view `aug` of a record, without masks that left the crop; None if none is left."""
    image, masks = record["image"], record["masks"]
    h, w = image.shape[:2]
    (new_h, new_w), (top, left) = aug.resized, aug.offset
    crop_h, crop_w = min(size, new_h - top), min(size, new_w - left)

    # Resizing only the crop window gives the same pixels as resizing the whole image and cropping, at a
    # fraction of the cost when the scale is large. Masks are checked first so that a redraw costs little.
    rows = nearest_indices(h, new_h)[top:top + crop_h]
    cols = nearest_indices(w, new_w)[left:left + crop_w]
    if aug.flip:
        cols = w - 1 - cols
    cropped = masks[:, rows][:, :, cols]
    keep = cropped.any(axis=(1, 2))
    if not keep.any():
        return None

    img = Image.fromarray(apply_color_jitter(image, list(aug.jitter)))
    if aug.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    sy, sx = h / new_h, w / new_w
    box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
    img = np.asarray(img.resize((crop_w, crop_h), Image.Resampling.BILINEAR, box=box))

    out_image = np.zeros((size, size, 3), np.uint8)
    out_image[:crop_h, :crop_w] = img
    out_masks = np.zeros((int(keep.sum()), size, size), bool)
    out_masks[:, :crop_h, :crop_w] = cropped[keep]
    return {"image": out_image, "masks": out_masks, "labels": record["labels"][keep],
            "is_crowd": record["is_crowd"][keep]}


def pad_targets(sample: dict[str, Any], max_instances: int, image_id: str = "?",
                pack_masks: bool = False) -> dict[str, np.ndarray]:
    """Pad masks/labels/is_crowd to `max_instances` slots with a `valid` flag; keep the largest masks if more.

    With `pack_masks`, the masks are returned bit-packed along the width as `masks_packed`.
    """
    masks, labels, crowd = sample["masks"], sample["labels"], sample["is_crowd"]
    n = len(labels)
    if n > max_instances:
        _warn("truncated", f"image {image_id} has {n} masks; keeping the {max_instances} largest")
        order = np.sort(np.argsort(-masks.sum(axis=(1, 2)), kind="stable")[:max_instances])
        masks, labels, crowd, n = masks[order], labels[order], crowd[order], max_instances
    if pack_masks:  # pack only the real masks: the padding slots are zero bytes either way
        masks = np.packbits(masks, axis=-1)
    out_masks = np.zeros((max_instances, *masks.shape[1:]), masks.dtype)
    out_masks[:n] = masks
    out_labels = np.zeros(max_instances, np.int32)
    out_labels[:n] = labels
    valid = np.zeros(max_instances, bool)
    valid[:n] = True
    out_crowd = np.zeros(max_instances, bool)
    out_crowd[:n] = crowd
    return {"image": sample["image"], "masks_packed" if pack_masks else "masks": out_masks, "labels": out_labels,
            "valid": valid, "is_crowd": out_crowd}
