"""Overlay pictures of predictions: panoptic (class colours, segment borders, class names), instance (outlines with
class names and scores), semantic (a fixed palette). Inputs are numpy arrays at the image's resolution."""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def palette(n: int) -> np.ndarray:
    """n well-separated RGB colours (golden-ratio hue steps), uint8 (n, 3); stable for a given index."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    rgb = [colorsys.hsv_to_rgb(h, 0.65 + 0.35 * (i % 2), 0.95 - 0.25 * ((i // 2) % 2)) for i, h in enumerate(hues)]
    return (np.asarray(rgb) * 255).astype(np.uint8).reshape(n, 3)


def _borders(ids: np.ndarray) -> np.ndarray:
    edge = np.zeros(ids.shape, bool)
    edge[1:, :] |= ids[1:, :] != ids[:-1, :]
    edge[:-1, :] |= ids[1:, :] != ids[:-1, :]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[:, :-1] |= ids[:, 1:] != ids[:, :-1]
    return edge


def _blend(image: np.ndarray, colour: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * colour[mask]
    return out.clip(0, 255).astype(np.uint8)


def _label(draw: ImageDraw.ImageDraw, xy, text: str) -> None:
    x, y = xy
    box = draw.textbbox((x, y), text)
    draw.rectangle(box, fill=(0, 0, 0))
    draw.text((x, y), text, fill=(255, 255, 255))


def panoptic_overlay(image: np.ndarray, panoptic: np.ndarray, class_names: Sequence[str],
                     alpha: float = 0.55) -> np.ndarray:
    """panoptic: (H, W, 2) int (category, segment id); category == len(class_names) or id -1 = unassigned."""
    num_classes = len(class_names)
    cat, seg = panoptic[..., 0], panoptic[..., 1]
    assigned = (seg >= 0) & (cat < num_classes)
    colours = palette(max(num_classes, 1))[np.clip(cat, 0, max(num_classes - 1, 0))]
    out = _blend(image, colours.astype(np.float32), assigned, alpha)
    out[_borders(np.where(assigned, seg, -1))] = 0
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    for s in np.unique(seg[assigned]):
        ys, xs = np.nonzero(seg == s)
        c = int(np.bincount(cat[ys, xs]).argmax())
        _label(draw, (int(np.median(xs)), int(np.median(ys))), class_names[c])
    return np.asarray(pil)


def instance_overlay(image: np.ndarray, masks: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                     class_names: Sequence[str], score_threshold: float = 0.5, alpha: float = 0.45) -> np.ndarray:
    """masks (K, H, W) bool; only instances scoring at least `score_threshold` are drawn."""
    out = image.copy()
    keep = [k for k in np.argsort(-scores) if scores[k] >= score_threshold and masks[k].any()]
    colours = palette(max(len(keep), 1))
    for i, k in enumerate(reversed(keep)):  # highest score drawn last, on top
        colour = np.broadcast_to(colours[i].astype(np.float32), out.shape)
        out = _blend(out, colour, masks[k], alpha)
        out[_borders(masks[k].astype(np.int8)) & masks[k]] = colours[i]
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    for k in keep:
        ys, xs = np.nonzero(masks[k])
        _label(draw, (int(xs.min()), int(ys.min())), f"{class_names[int(labels[k])]} {scores[k]:.2f}")
    return np.asarray(pil)


def semantic_overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.6,
                     ignore_index: int = 255) -> np.ndarray:
    colours = palette(max(num_classes, 1))[np.clip(labels, 0, max(num_classes - 1, 0))].astype(np.float32)
    return _blend(image, colours, (labels >= 0) & (labels < num_classes) & (labels != ignore_index), alpha)


def overlay(task: str, image: np.ndarray, pred, class_names: Sequence[str]) -> np.ndarray:
    """The overlay picture of one prediction of `eomt_jax.inference.pipeline.predict(task, ...)`."""
    if task == "panoptic":
        return panoptic_overlay(image, pred, class_names)
    if task == "instance":
        return instance_overlay(image, pred["masks"], pred["labels"], pred["scores"], class_names)
    if task == "semantic":
        return semantic_overlay(image, pred, len(class_names))
    raise ValueError(f"task must be panoptic, instance or semantic, got {task!r}")
