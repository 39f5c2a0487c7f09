"""Panoptic and instance post-processing of EoMT outputs, jitted with fixed shapes.

Every function here takes one prediction point's logits for a batch of letterboxed images (long side resized
to S, zero-padded bottom/right to S×S, see `preprocess.resize_and_pad`) plus the per-image sizes the host
remembered, as int32 arrays: `resized_hw` (B, 2), the image size inside the S×S input, and `orig_hw` (B, 2),
the original size. Results come out at original resolution on a fixed **canvas** (`canvas_hw`, static): image b
occupies `[:orig_hw[b, 0], :orig_hw[b, 1]]`, the rest is filler to crop on the host. Because the sizes are
traced, one compilation serves every image that fits the canvas; callers pick canvases from a few buckets
(`canvas_for`), so a dataset of arbitrary sizes compiles a handful of times. A batch row with size (0, 0) (the
evaluation pipeline's padding) is allowed and yields an empty result.

The mask-logit geometry follows the original exactly: bilinear upsampling (align_corners=False) from the
network's H/4 grid to S×S, crop to `resized_hw`, bilinear resize to `orig_hw`. All three steps are linear along
each axis, so they are applied as one precomputed matrix per axis (see `resize.py`); the result equals the
three-step version up to float32 rounding and never materialises the S×S logits.
"""

from __future__ import annotations

import fractions
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eomt_jax.inference.resize import _PRECISION, apply_separable, bilinear_matrix, round_up

# Matches the original's defaults (`mask_thresh`, `overlap_thresh`, `eval_top_k_instances`).
SCORE_THRESHOLD = 0.8
OVERLAP_THRESHOLD = 0.8
TOP_K = 100


def canvas_for(orig_hw, multiple: int = 128) -> tuple[int, int]:
    """The output canvas for a batch: the largest original height and width, each rounded up to `multiple`."""
    orig_hw = np.asarray(orig_hw).reshape(-1, 2)
    return (max(round_up(orig_hw[:, 0].max(), multiple), multiple),
            max(round_up(orig_hw[:, 1].max(), multiple), multiple))


def _image_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def _check(mask_logits, class_logits, resized_hw, orig_hw, image_size, canvas_hw):
    if mask_logits.ndim != 4 or class_logits.ndim != 3:
        raise ValueError(f"expected mask logits (B, Q, H/4, W/4) and class logits (B, Q, C+1), got "
                         f"{mask_logits.shape} and {class_logits.shape}")
    if mask_logits.shape[:2] != class_logits.shape[:2]:
        raise ValueError(f"mask logits {mask_logits.shape} and class logits {class_logits.shape} disagree on (B, Q)")
    if class_logits.shape[-1] < 2:
        raise ValueError(f"class logits need at least one class plus 'no object', got {class_logits.shape}")
    s_h, s_w = image_size
    if (mask_logits.shape[2] * 4, mask_logits.shape[3] * 4) != (s_h, s_w):
        raise ValueError(f"mask logits {mask_logits.shape[2:]} are not 1/4 of the image size {(s_h, s_w)}: "
                         "image_size must be the size the network was run at")
    b = mask_logits.shape[0]
    for name, a in (("resized_hw", resized_hw), ("orig_hw", orig_hw)):
        if tuple(np.shape(a)) != (b, 2):
            raise ValueError(f"{name} must be ({b}, 2), got {np.shape(a)}")
    if len(canvas_hw) != 2 or min(canvas_hw) < 1:
        raise ValueError(f"canvas_hw must be two positive ints, got {canvas_hw}")


def _revert_one(mask_logits, resized_hw, orig_hw, image_size, canvas_hw):
    """(Q, S/4, S/4) logits of one image -> (Q, *canvas_hw) at original resolution (upsample, crop, resize)."""
    s_h, s_w = image_size
    g_h, g_w = mask_logits.shape[-2:]
    up_rows = bilinear_matrix(s_h, g_h, s_h, g_h)
    up_cols = bilinear_matrix(s_w, g_w, s_w, g_w)
    rows = jnp.matmul(bilinear_matrix(orig_hw[0], resized_hw[0], canvas_hw[0], s_h), up_rows, precision=_PRECISION)
    cols = jnp.matmul(bilinear_matrix(orig_hw[1], resized_hw[1], canvas_hw[1], s_w), up_cols, precision=_PRECISION)
    return apply_separable(mask_logits.astype(jnp.float32), rows, cols)


def _per_image(fn, *batched):
    # One image at a time: the (Q, H, W) float32 logits of a COCO image at 640x640 with Q = 200 take 330 MB, and
    # the merge needs several such arrays; a whole batch at once would multiply that by B for no speed gain.
    return jax.lax.map(lambda args: fn(*args), batched)


def _valid(orig_hw, canvas_hw):
    return ((jnp.arange(canvas_hw[0]) < orig_hw[0])[:, None]
            & (jnp.arange(canvas_hw[1]) < orig_hw[1])[None, :])


@functools.partial(jax.jit, static_argnames=("image_size", "canvas_hw"))
def revert_mask_logits(mask_logits, resized_hw, orig_hw, *, image_size, canvas_hw):
    """Mask logits at original resolution: (B, Q, S/4, S/4) -> (B, Q, *canvas_hw) float32 (outside the image: 0)."""
    image_size = _image_size(image_size)
    _check(mask_logits, jnp.zeros(mask_logits.shape[:2] + (2,)), resized_hw, orig_hw, image_size, canvas_hw)
    return jax.vmap(functools.partial(_revert_one, image_size=image_size, canvas_hw=canvas_hw))(
        mask_logits, jnp.asarray(resized_hw, jnp.int32), jnp.asarray(orig_hw, jnp.int32))


# ------------------------------------------------------------------------------------------- panoptic


def _ratio_as_fraction(threshold: float) -> tuple[int, int]:
    # The original compares Python floats, `new_area / orig_area < threshold`. For areas below 2**24 that equals the
    # exact rational test `q * new < p * orig` with p/q = threshold, which int32 computes without rounding.
    frac = fractions.Fraction(threshold).limit_denominator(100)
    if float(frac) != threshold or not 0 <= frac <= 1:
        raise ValueError(f"overlap_threshold must be in [0, 1] with denominator <= 100 (e.g. 0.8), got {threshold}")
    return frac.numerator, frac.denominator


def panoptic_merge(mask_logits, class_logits, valid, *, is_stuff, score_threshold=SCORE_THRESHOLD,
                   overlap_threshold=OVERLAP_THRESHOLD):
    """MaskFormer-style merge of one image: (Q, H, W) logits, (Q, C+1) class logits -> (H, W, 2) int32.

    Channel 0 is the category, channel 1 the segment id (0, 1, 2, ... in query order); unassigned pixels and
    pixels outside `valid` (H, W) bool are (C, -1). `is_stuff` is a (C,) bool array.

    The original loops over the kept queries in order and paints each accepted one. Painted regions are
    disjoint (each lies inside that query's argmax region), so the loop is equivalent to: decide per query
    whether it is accepted and which segment id it gets (a stuff query reuses the id of the first accepted
    query of its class), then look every pixel's winning query up once.
    """
    num_q, num_c = class_logits.shape[0], class_logits.shape[-1] - 1
    p, q = _ratio_as_fraction(overlap_threshold)
    if mask_logits.shape[-2] * mask_logits.shape[-1] * max(p, q) >= 2**31:
        raise ValueError(f"canvas {mask_logits.shape[-2:]} too large for exact int32 area ratios")

    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
    scores = probs.max(-1)
    classes = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    # Strict `>` and the argmax over all C+1 entries (a query whose best guess is "no object" is dropped).
    keep = (classes != num_c) & (scores > score_threshold)

    m = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
    weighted = jnp.where(keep[:, None, None], scores[:, None, None] * m, -jnp.inf)
    owner = jnp.argmax(weighted, axis=0).astype(jnp.int32)  # first query on ties, as torch's argmax
    owner_prob = jnp.take_along_axis(m, owner[None], axis=0)[0]

    orig_area = jnp.sum((m >= 0.5) & valid[None], axis=(1, 2), dtype=jnp.int32)
    owner_flat = owner.reshape(-1)
    new_area = jnp.zeros(num_q, jnp.int32).at[owner_flat].add(valid.reshape(-1).astype(jnp.int32))
    final_area = jnp.zeros(num_q, jnp.int32).at[owner_flat].add(
        (valid & (owner_prob >= 0.5)).reshape(-1).astype(jnp.int32))
    accepted = (keep & (orig_area > 0) & (new_area > 0) & (final_area > 0)
                & ~(q * new_area < p * orig_area))

    cls = jnp.minimum(classes, num_c - 1)  # a "no object" argmax is never accepted; clamp only for the lookup
    same_class = accepted[None, :] & (classes[None, :] == classes[:, None])  # [k, j]: accepted j of k's class
    earlier = jnp.arange(num_q)[None, :] < jnp.arange(num_q)[:, None]
    merged = accepted & is_stuff[cls] & jnp.any(same_class & earlier, axis=1)
    opens = accepted & ~merged
    new_id = jnp.cumsum(opens.astype(jnp.int32)) - 1
    first_of_class = jnp.argmax(same_class, axis=1)
    segment = jnp.where(merged, new_id[first_of_class], new_id)

    painted = valid & accepted[owner] & (owner_prob >= 0.5)
    category = jnp.where(painted, classes[owner], num_c)
    segment_id = jnp.where(painted, segment[owner], -1)
    return jnp.stack([category, segment_id], axis=-1).astype(jnp.int32)


def panoptic_postprocess(mask_logits, class_logits, resized_hw, orig_hw, *, image_size, canvas_hw,
                         stuff_classes: Sequence[int], score_threshold=SCORE_THRESHOLD,
                         overlap_threshold=OVERLAP_THRESHOLD):
    """Per-pixel panoptic predictions of a batch: (B, *canvas_hw, 2) int32 (category, segment id).

    `stuff_classes`: the class indices whose segments merge into one per class (COCO: 80..132).
    """
    return _panoptic_postprocess(mask_logits, class_logits, resized_hw, orig_hw, image_size=image_size,
                                 canvas_hw=tuple(canvas_hw), stuff_classes=tuple(int(c) for c in stuff_classes),
                                 score_threshold=float(score_threshold), overlap_threshold=float(overlap_threshold))


@functools.partial(jax.jit, static_argnames=("image_size", "canvas_hw", "stuff_classes", "score_threshold",
                                             "overlap_threshold"))
def _panoptic_postprocess(mask_logits, class_logits, resized_hw, orig_hw, *, image_size, canvas_hw,
                          stuff_classes, score_threshold, overlap_threshold):
    image_size = _image_size(image_size)
    _check(mask_logits, class_logits, resized_hw, orig_hw, image_size, canvas_hw)
    num_c = class_logits.shape[-1] - 1
    stuff = np.zeros(num_c, bool)
    stuff_idx = np.asarray(tuple(stuff_classes), np.int64)
    if stuff_idx.size and (stuff_idx.min() < 0 or stuff_idx.max() >= num_c):
        raise ValueError(f"stuff_classes must lie in [0, {num_c}), got {sorted(stuff_classes)}")
    stuff[stuff_idx] = True

    def one(masks, classes, rhw, ohw):
        logits = _revert_one(masks, rhw, ohw, image_size, canvas_hw)
        return panoptic_merge(logits, classes, _valid(ohw, canvas_hw), is_stuff=jnp.asarray(stuff),
                              score_threshold=score_threshold, overlap_threshold=overlap_threshold)

    return _per_image(one, mask_logits, class_logits, jnp.asarray(resized_hw, jnp.int32),
                      jnp.asarray(orig_hw, jnp.int32))


# ------------------------------------------------------------------------------------------- instance


def instance_topk(mask_logits, class_logits, valid, *, top_k=TOP_K):
    """Instance predictions of one image from (Q, H, W) mask logits and (Q, C+1) class logits.

    The top `top_k` (query, class) pairs over the flattened Q×C class probabilities (softmax over C+1, the
    no-object column dropped afterwards, no renormalisation); a query may appear with several classes. Each
    pair's mask is `logit > 0` inside `valid`; its score is the class probability times the mean sigmoid inside
    the mask. Pairs come sorted by class probability, ties broken by the lower flat index (query·C + class).
    """
    num_q, num_c = class_logits.shape[0], class_logits.shape[-1] - 1
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, :num_c]
    k = min(top_k, num_q * num_c)
    class_prob, flat = jax.lax.top_k(probs.reshape(-1), k)
    query = (flat // num_c).astype(jnp.int32)
    label = (flat % num_c).astype(jnp.int32)

    logits = mask_logits.astype(jnp.float32)
    binary = (logits > 0) & valid[None]
    inside = jnp.sum(jnp.where(binary, jax.nn.sigmoid(logits), 0.0), axis=(1, 2))
    mask_score = inside / (jnp.sum(binary, axis=(1, 2), dtype=jnp.int32).astype(jnp.float32) + 1e-6)
    return {"masks": binary[query], "labels": label, "scores": class_prob * mask_score[query],
            "class_scores": class_prob, "queries": query}


@functools.partial(jax.jit, static_argnames=("image_size", "canvas_hw", "top_k"))
def instance_postprocess(mask_logits, class_logits, resized_hw, orig_hw, *, image_size, canvas_hw, top_k=TOP_K):
    """Instance predictions of a batch: `masks` (B, K, *canvas_hw) bool, `labels` (B, K) int32, `scores`,
    `class_scores` (B, K) float32 and `queries` (B, K) int32, with K = min(top_k, Q·C)."""
    image_size = _image_size(image_size)
    _check(mask_logits, class_logits, resized_hw, orig_hw, image_size, canvas_hw)
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")

    def one(masks, classes, rhw, ohw):
        logits = _revert_one(masks, rhw, ohw, image_size, canvas_hw)
        return instance_topk(logits, classes, _valid(ohw, canvas_hw), top_k=top_k)

    return _per_image(one, mask_logits, class_logits, jnp.asarray(resized_hw, jnp.int32),
                      jnp.asarray(orig_hw, jnp.int32))
