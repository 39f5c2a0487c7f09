"""End-to-end inference on a list of images: pre-processing, one batched forward, jitted post-processing.

`forward_fn(images) -> (mask_logits_list, class_logits_list)` is any callable with the network's contract
(float32 (B, S, S, 3) in [0, 1] in, lists over prediction points out, the final prediction last), e.g. a jitted
`EoMT` model. Results are numpy arrays at each image's original size, for the final prediction (or for every
prediction point with `all_outputs=True`: a list over points, final last).

Compilation: the network always sees S×S inputs; the post-processing compiles once per output canvas, which is
the batch's largest original size rounded up to `canvas_multiple` per axis. The semantic path also pads the
window count to a multiple of `window_multiple` so that batches with slightly different window counts reuse
the network's compilation.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from eomt_jax.inference import postprocess, preprocess, semantic
from eomt_jax.inference.resize import round_up

ForwardFn = Callable[[np.ndarray], tuple[Sequence, Sequence]]


def _square(image_size) -> int:
    if isinstance(image_size, int):
        return image_size
    h, w = image_size
    if h != w:
        raise ValueError(f"only square image sizes are supported, got {image_size}")
    return int(h)


def _forward(forward_fn, images_uint8, all_outputs):
    mask_list, class_list = forward_fn(preprocess.to_model_input(images_uint8))
    if len(mask_list) != len(class_list) or not len(mask_list):
        raise ValueError("forward_fn must return two equally long, non-empty lists (mask and class logits)")
    pairs = list(zip(mask_list, class_list))
    return pairs if all_outputs else pairs[-1:]


def _letterbox(images, size):
    if not len(images):
        raise ValueError("no images given")
    padded, resized, orig = [], [], []
    for image in images:
        image = preprocess.check_image(image)
        p, r = preprocess.resize_and_pad(image, size)
        padded.append(p)
        resized.append(r)
        orig.append(image.shape[:2])
    return np.stack(padded), np.asarray(resized, np.int32), np.asarray(orig, np.int32)


def predict_panoptic(forward_fn: ForwardFn, images: Sequence[np.ndarray], image_size, *,
                     stuff_classes: Sequence[int], score_threshold: float = postprocess.SCORE_THRESHOLD,
                     overlap_threshold: float = postprocess.OVERLAP_THRESHOLD, canvas_multiple: int = 128,
                     all_outputs: bool = False, with_scores: bool = False):
    """Per image an (H, W, 2) int32 array: category (C = unassigned) and segment id (-1 = unassigned, else 0, 1,
    ...). With `with_scores`, per image a pair (that array, (Q,) float32 segment scores indexed by segment id;
    see `postprocess.panoptic_postprocess`)."""
    size = _square(image_size)
    padded, resized, orig = _letterbox(images, size)
    canvas = postprocess.canvas_for(orig, canvas_multiple)
    results = []
    for mask_logits, class_logits in _forward(forward_fn, padded, all_outputs):
        out = postprocess.panoptic_postprocess(
            mask_logits, class_logits, resized, orig, image_size=size, canvas_hw=canvas,
            stuff_classes=stuff_classes, score_threshold=score_threshold, overlap_threshold=overlap_threshold,
            with_scores=with_scores)
        pan, scores = (np.asarray(out[0]), np.asarray(out[1])) if with_scores else (np.asarray(out), None)
        crops = [pan[i, :h, :w] for i, (h, w) in enumerate(orig)]
        results.append(list(zip(crops, scores)) if with_scores else crops)
    return results if all_outputs else results[0]


def predict_instance(forward_fn: ForwardFn, images: Sequence[np.ndarray], image_size, *,
                     top_k: int = postprocess.TOP_K, canvas_multiple: int = 128, all_outputs: bool = False):
    """Per image a dict: `masks` (K, H, W) bool, `labels` (K,) int32, `scores` (K,) float32, `class_scores`,
    `queries`; K = min(top_k, Q·C), sorted by class probability."""
    size = _square(image_size)
    padded, resized, orig = _letterbox(images, size)
    canvas = postprocess.canvas_for(orig, canvas_multiple)
    results = []
    for mask_logits, class_logits in _forward(forward_fn, padded, all_outputs):
        out = postprocess.instance_postprocess(mask_logits, class_logits, resized, orig, image_size=size,
                                               canvas_hw=canvas, top_k=int(top_k))
        out = {k: np.asarray(v) for k, v in out.items()}
        per_image = []
        for i, (h, w) in enumerate(orig):
            d = {k: v[i] for k, v in out.items()}
            d["masks"] = d["masks"][:, :h, :w]
            per_image.append(d)
        results.append(per_image)
    return results if all_outputs else results[0]


def predict_semantic(forward_fn: ForwardFn, images: Sequence[np.ndarray], image_size, *,
                     window_multiple: int = 8, canvas_multiple: int = 128, all_outputs: bool = False,
                     max_windows: int = preprocess.MAX_WINDOWS):
    """Per image an (H, W) int32 array of class indices in [0, C). An image needing more than `max_windows`
    windows is letterboxed to that many (see `preprocess`)."""
    size = _square(image_size)
    if not len(images):
        raise ValueError("no images given")
    cuts = [preprocess.semantic_windows(image, size, max_windows) for image in images]
    windows = np.concatenate([c.windows for c in cuts])
    image_of = np.concatenate([np.full(len(c.starts), i, np.int32) for i, c in enumerate(cuts)])
    starts = np.concatenate([np.asarray(c.starts, np.int32) for c in cuts])
    total = round_up(len(windows), window_multiple)
    pad = total - len(windows)
    windows = np.concatenate([windows, np.zeros((pad, size, size, 3), np.uint8)])
    image_of = np.concatenate([image_of, np.full(pad, -1, np.int32)])
    starts = np.concatenate([starts, np.zeros(pad, np.int32)])

    resized = np.asarray([c.resized_hw for c in cuts], np.int32)
    orig = np.asarray([c.orig_hw for c in cuts], np.int32)
    canvas_long = round_up(resized.max(), canvas_multiple)
    canonical = np.where((resized[:, 0] > resized[:, 1])[:, None], orig[:, ::-1], orig)
    out_canvas = postprocess.canvas_for(canonical, canvas_multiple)

    results = []
    for mask_logits, class_logits in _forward(forward_fn, windows, all_outputs):
        scores = semantic.window_class_scores(mask_logits, class_logits, window_size=size)
        labels = np.asarray(semantic.stitch_windows(scores, image_of, starts, resized, orig,
                                                    canvas_long=canvas_long, out_canvas=out_canvas))
        per_image = []
        for i, c in enumerate(cuts):
            lab = labels[i]
            if c.portrait:
                per_image.append(lab[:c.orig_hw[1], :c.orig_hw[0]].T.copy())
            else:
                per_image.append(lab[:c.orig_hw[0], :c.orig_hw[1]])
        results.append(per_image)
    return results if all_outputs else results[0]


def predict(task: str, forward_fn: ForwardFn, images: Sequence[np.ndarray], image_size, *,
            stuff_classes: Sequence[int] = (), score_threshold: float = postprocess.SCORE_THRESHOLD,
            overlap_threshold: float = postprocess.OVERLAP_THRESHOLD, top_k: int = postprocess.TOP_K,
            all_outputs: bool = False, with_scores: bool = False):
    """`predict_panoptic`, `predict_instance` or `predict_semantic`, chosen by `task`, with the settings that
    apply to it (the thresholds and `with_scores` to panoptic, `top_k` to instance)."""
    if task == "panoptic":
        return predict_panoptic(forward_fn, images, image_size, stuff_classes=stuff_classes,
                                score_threshold=score_threshold, overlap_threshold=overlap_threshold,
                                all_outputs=all_outputs, with_scores=with_scores)
    if task == "instance":
        return predict_instance(forward_fn, images, image_size, top_k=top_k, all_outputs=all_outputs)
    if task == "semantic":
        return predict_semantic(forward_fn, images, image_size, all_outputs=all_outputs)
    raise ValueError(f"task must be panoptic, instance or semantic, got {task!r}")
