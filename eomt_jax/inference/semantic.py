"""Sliding-window semantic segmentation, jitted with fixed shapes.

The host cuts each image into S×S windows along its long side (`preprocess.semantic_windows`); all windows of
a batch go through the network together. Per window, the class scores are
`score[c] = Σ_q softmax(class_logits)[q, c] · sigmoid(upsampled mask_logits[q])` for the C real classes (the
no-object probability is dropped after the softmax, without renormalising). Scores of overlapping windows are
averaged on the resized image, resized back to the original size (bilinear) and argmaxed.

To serve portrait and landscape images with one program, stitching works in a *canonical* orientation: short
side first. A portrait image's windows are transposed before they are placed; the labels come back transposed
too (`SemanticBatch.crop` undoes it on the host). Bilinear resizing is separable with the same rule per axis,
so transposing, resizing and transposing back equals resizing in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eomt_jax.inference import resize
from eomt_jax.inference.resize import apply_rows_first, apply_separable, band_slice, bilinear_matrix


@functools.partial(jax.jit, static_argnames=("window_size",))
def window_class_scores(mask_logits, class_logits, *, window_size: int):
    """(N, Q, S/4, S/4) mask logits and (N, Q, C+1) class logits -> (N, C, S, S) float32 class scores."""
    if mask_logits.ndim != 4 or class_logits.ndim != 3 or mask_logits.shape[:2] != class_logits.shape[:2]:
        raise ValueError(f"expected mask logits (N, Q, S/4, S/4) and class logits (N, Q, C+1), got "
                         f"{mask_logits.shape} and {class_logits.shape}")
    if mask_logits.shape[2] * 4 != window_size or mask_logits.shape[3] * 4 != window_size:
        raise ValueError(f"mask logits {mask_logits.shape[2:]} are not 1/4 of the window size {window_size}")
    g_h, g_w = mask_logits.shape[2:]
    rows = bilinear_matrix(window_size, g_h, window_size, g_h)
    cols = bilinear_matrix(window_size, g_w, window_size, g_w)
    num_c = class_logits.shape[-1] - 1

    def one(args):
        masks, classes = args
        probs = jax.nn.softmax(classes.astype(jnp.float32), axis=-1)[:, :num_c]
        up = jax.nn.sigmoid(apply_separable(masks.astype(jnp.float32), rows, cols))
        return jnp.einsum("qhw,qc->chw", up, probs, precision=jax.lax.Precision.HIGHEST)

    # One window at a time: the upsampled (Q, S, S) logits of a whole batch of windows would not fit in memory
    # at Cityscapes sizes (Q = 200, S = 1024: 800 MB per window).
    return jax.lax.map(one, (mask_logits, class_logits))


@functools.partial(jax.jit, static_argnames=("canvas_long", "out_canvas", "band_rows"))
def stitch_windows(scores, window_image, window_start, resized_hw, orig_hw, *, canvas_long: int,
                   out_canvas: tuple[int, int], band_rows: int | None = None):
    """Average window scores per image, resize to the original size, argmax -> canonical labels.

    scores (N, C, S, S) from `window_class_scores`; window_image (N,) int32, the image each window belongs to
    (-1: a padding window, ignored); window_start (N,) its offset along the long side; resized_hw / orig_hw
    (B, 2) int32 natural (h, w) sizes. `canvas_long` (static) must be >= every resized long side and
    `out_canvas` (static) >= every original (short, long) size. Returns (B, *out_canvas) int32 labels in the
    canonical orientation: image b's labels are `[:short_b, :long_b]`, transposed if the image is portrait.
    The resize to the original size runs in bands of `band_rows` output rows (default: `resize.band_rows`).
    """
    if scores.ndim != 4 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"expected window scores (N, C, S, S), got {scores.shape}")
    n, num_c, size, _ = scores.shape
    if jnp.shape(window_image) != (n,) or jnp.shape(window_start) != (n,):
        raise ValueError(f"window_image and window_start must be ({n},), got {jnp.shape(window_image)} and "
                         f"{jnp.shape(window_start)}")
    b = jnp.shape(resized_hw)[0]
    if jnp.shape(resized_hw) != (b, 2) or jnp.shape(orig_hw) != (b, 2):
        raise ValueError(f"resized_hw and orig_hw must be (B, 2), got {jnp.shape(resized_hw)} and "
                         f"{jnp.shape(orig_hw)}")
    if canvas_long < size:
        raise ValueError(f"canvas_long {canvas_long} is shorter than the window size {size}")
    resized_hw = jnp.asarray(resized_hw, jnp.int32)
    orig_hw = jnp.asarray(orig_hw, jnp.int32)
    portrait = resized_hw[:, 0] > resized_hw[:, 1]
    resized_long = jnp.max(resized_hw, axis=1)
    resized_short = jnp.minimum(jnp.min(resized_hw, axis=1), size)
    orig_c = jnp.where(portrait[:, None], orig_hw[:, ::-1], orig_hw)

    image = jnp.asarray(window_image, jnp.int32)
    real = image >= 0
    image = jnp.maximum(image, 0)
    start = jnp.asarray(window_start, jnp.int32)

    def place(w, carry):
        sums, counts = carry
        window = jnp.where(portrait[image[w]], scores[w].swapaxes(-1, -2), scores[w])
        window = jnp.where(real[w], window, 0.0)
        at = (image[w], 0, 0, start[w])
        sums = jax.lax.dynamic_update_slice(
            sums, jax.lax.dynamic_slice(sums, at, (1, num_c, size, size)) + window[None], at)
        at1 = (image[w], start[w])
        counts = jax.lax.dynamic_update_slice(
            counts, jax.lax.dynamic_slice(counts, at1, (1, size)) + real[w].astype(jnp.float32), at1)
        return sums, counts

    sums = jnp.zeros((b, num_c, size, canvas_long), jnp.float32)
    counts = jnp.zeros((b, canvas_long), jnp.float32)
    sums, counts = jax.lax.fori_loop(0, n, place, (sums, counts))
    # Columns beyond an image's resized width are never read by the resize below, but 0/0 there would still
    # poison the matmul with NaN.
    mean = jnp.where(counts[:, None, None, :] > 0, sums / jnp.maximum(counts, 1.0)[:, None, None, :], 0.0)

    rows_per_band = resize.band_rows(num_c, out_canvas, band_rows)
    num_bands = -(-out_canvas[0] // rows_per_band)

    def resize_one(x, oc, short_b, long_b):
        # The rows read only the first `short_b` of the window's S rows: a letterboxed (padded) short side is cut.
        rows = bilinear_matrix(oc[0], short_b, num_bands * rows_per_band, size)
        cols = bilinear_matrix(oc[1], long_b, out_canvas[1], canvas_long)

        def band(_, i):
            # Band by band: the (C, *out_canvas) scores of a 12-megapixel photo would take C × 50 MB.
            scores = apply_rows_first(x, band_slice(rows, i, rows_per_band), cols)
            return None, jnp.argmax(scores, axis=0).astype(jnp.int32)

        _, labels = jax.lax.scan(band, None, jnp.arange(num_bands))
        return labels.reshape(num_bands * rows_per_band, out_canvas[1])[: out_canvas[0]]

    # Per image, so only one image's bands are alive at a time.
    return jax.lax.map(lambda a: resize_one(*a), (mean, orig_c, resized_short, resized_long))
