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

Nor are an image's (Q, H, W) logits at original resolution ever held at once (10 GB for a 12-megapixel photo and
200 queries): they are produced one band of rows at a time (`resize.band_rows`, a static `band_rows` overrides
it), and each band contributes per-query sums (mask areas, sigmoid totals) and per-pixel results (the winning
query, the kept masks). Per pixel the arithmetic is the same whatever the band height.
"""

from __future__ import annotations

import fractions
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eomt_jax.inference import resize
from eomt_jax.inference.resize import (_PRECISION, apply_rows_first, apply_separable, band_slice, bilinear_matrix,
                                       round_up)

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


def _revert_matrices(grid_hw, resized_hw, orig_hw, image_size, out_hw):
    """Row (out_hw[0], g_h) and column (out_hw[1], g_w) matrices of upsample, crop and resize from the network's
    grid to the original size; rows and columns beyond the original size are zero."""
    s_h, s_w = image_size
    g_h, g_w = grid_hw
    up_rows = bilinear_matrix(s_h, g_h, s_h, g_h)
    up_cols = bilinear_matrix(s_w, g_w, s_w, g_w)
    rows = jnp.matmul(bilinear_matrix(orig_hw[0], resized_hw[0], out_hw[0], s_h), up_rows, precision=_PRECISION)
    cols = jnp.matmul(bilinear_matrix(orig_hw[1], resized_hw[1], out_hw[1], s_w), up_cols, precision=_PRECISION)
    return rows, cols


def _revert_one(mask_logits, resized_hw, orig_hw, image_size, canvas_hw):
    """(Q, S/4, S/4) logits of one image -> (Q, *canvas_hw) at original resolution (upsample, crop, resize)."""
    rows, cols = _revert_matrices(mask_logits.shape[-2:], resized_hw, orig_hw, image_size, canvas_hw)
    return apply_separable(mask_logits.astype(jnp.float32), rows, cols)


class _Bands:
    """One image's logits at original resolution, band by band: `logits(i)` (Q, rows, W) and `valid(i)`
    (rows, W) for band i of `count`; `crop` cuts stacked bands (..., count·rows, W) back to the canvas."""

    def __init__(self, mask_logits, resized_hw, orig_hw, image_size, canvas_hw, rows):
        self.rows, self.canvas_hw, self.orig_hw = rows, canvas_hw, orig_hw
        self.count = -(-canvas_hw[0] // rows)
        self.height = self.count * rows
        self._x = mask_logits.astype(jnp.float32)
        self._rows, self._cols = _revert_matrices(mask_logits.shape[-2:], resized_hw, orig_hw, image_size,
                                                  (self.height, canvas_hw[1]))

    def logits(self, i):
        return apply_rows_first(self._x, band_slice(self._rows, i, self.rows), self._cols)

    def valid(self, i):
        row = i * self.rows + jnp.arange(self.rows)
        return (row < self.orig_hw[0])[:, None] & (jnp.arange(self.canvas_hw[1]) < self.orig_hw[1])[None, :]

    def crop(self, stacked):
        return stacked[..., : self.canvas_hw[0], :]


def _per_image(fn, *batched):
    # One image at a time: the merge's per-band arrays would otherwise be multiplied by B for no speed gain.
    return jax.lax.map(lambda args: fn(*args), batched)


def _valid(orig_hw, canvas_hw):
    return ((jnp.arange(canvas_hw[0]) < orig_hw[0])[:, None]
            & (jnp.arange(canvas_hw[1]) < orig_hw[1])[None, :])


@functools.partial(jax.jit, static_argnames=("image_size", "canvas_hw"))
def revert_mask_logits(mask_logits, resized_hw, orig_hw, *, image_size, canvas_hw):
    """Mask logits at original resolution: (B, Q, S/4, S/4) -> (B, Q, *canvas_hw) float32 (outside the image: 0).
    Holds every map at full resolution: for inspection and tests; the post-processing works band by band."""
    image_size = _image_size(image_size)
    _check(mask_logits, jnp.zeros(mask_logits.shape[:2] + (2,)), resized_hw, orig_hw, image_size, canvas_hw)
    return jax.vmap(functools.partial(_revert_one, image_size=image_size, canvas_hw=canvas_hw))(
        mask_logits, jnp.asarray(resized_hw, jnp.int32), jnp.asarray(orig_hw, jnp.int32))


# ------------------------------------------------------------------------------------------- panoptic


def _ratio_as_fraction(threshold: float, num_pixels: int) -> tuple[int, int]:
    # The original compares Python floats, `new_area / orig_area < threshold`. For areas below 2**24 that equals the
    # exact rational test `q * new < p * orig` with p/q = threshold, which int32 computes without rounding.
    frac = fractions.Fraction(threshold).limit_denominator(100)
    if float(frac) != threshold or not 0 <= frac <= 1:
        raise ValueError(f"overlap_threshold must be in [0, 1] with denominator <= 100 (e.g. 0.8), got {threshold}")
    if num_pixels * max(frac.numerator, frac.denominator) >= 2**31:
        raise ValueError(f"canvas of {num_pixels} pixels too large for exact int32 area ratios")
    return frac.numerator, frac.denominator


def _query_classes(class_logits, score_threshold):
    """Per query: best probability and class over all C+1 entries, and whether it is kept (a real class scoring
    strictly above the threshold; a query whose best guess is "no object" is dropped)."""
    num_c = class_logits.shape[-1] - 1
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
    scores = probs.max(-1)
    classes = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    return scores, classes, (classes != num_c) & (scores > score_threshold)


def _owners(mask_logits, valid, scores, keep):
    """Per pixel: the kept query with the highest score × sigmoid (the first on ties, as torch's argmax) and
    whether that query's own mask covers the pixel. Per query, inside `valid`: (3, Q) int32 pixel counts of its
    mask (sigmoid >= 0.5), of the region it wins, and of the covered part of that region."""
    num_q = mask_logits.shape[0]
    m = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
    weighted = jnp.where(keep[:, None, None], scores[:, None, None] * m, -jnp.inf)
    owner = jnp.argmax(weighted, axis=0).astype(jnp.int32)
    covered = jnp.take_along_axis(m, owner[None], axis=0)[0] >= 0.5
    orig_area = jnp.sum((m >= 0.5) & valid[None], axis=(1, 2), dtype=jnp.int32)
    owner_flat = owner.reshape(-1)
    new_area = jnp.zeros(num_q, jnp.int32).at[owner_flat].add(valid.reshape(-1).astype(jnp.int32))
    final_area = jnp.zeros(num_q, jnp.int32).at[owner_flat].add((valid & covered).reshape(-1).astype(jnp.int32))
    return owner, covered, jnp.stack([orig_area, new_area, final_area])


def _segments(classes, keep, areas, is_stuff, ratio):
    """Which queries are painted, and their segment ids (0, 1, ... in query order; a stuff query joins the
    segment of the first accepted query of its class)."""
    num_q, num_c = classes.shape[0], is_stuff.shape[0]
    p, q = ratio
    orig_area, new_area, final_area = areas
    accepted = (keep & (orig_area > 0) & (new_area > 0) & (final_area > 0)
                & ~(q * new_area < p * orig_area))
    cls = jnp.minimum(classes, num_c - 1)  # a "no object" argmax is never accepted; clamp only for the lookup
    same_class = accepted[None, :] & (classes[None, :] == classes[:, None])  # [k, j]: accepted j of k's class
    earlier = jnp.arange(num_q)[None, :] < jnp.arange(num_q)[:, None]
    merged = accepted & is_stuff[cls] & jnp.any(same_class & earlier, axis=1)
    opens = accepted & ~merged
    new_id = jnp.cumsum(opens.astype(jnp.int32)) - 1
    first_of_class = jnp.argmax(same_class, axis=1)
    return accepted, jnp.where(merged, new_id[first_of_class], new_id)


def _paint(owner, covered, valid, accepted, classes, segment, num_c):
    painted = valid & accepted[owner] & covered
    category = jnp.where(painted, classes[owner], num_c)
    segment_id = jnp.where(painted, segment[owner], -1)
    return jnp.stack([category, segment_id], axis=-1).astype(jnp.int32)


def _segment_scores(scores, accepted, segment):
    """(Q,) float32: at index k the class probability of the query that opened segment k (the first query
    painting it; a stuff segment's later queries only join it), 0 where there is no segment k."""
    num_q = scores.shape[0]
    queries = jnp.arange(num_q, dtype=jnp.int32)
    first = jnp.full(num_q, num_q, jnp.int32).at[jnp.where(accepted, segment, num_q)].min(queries, mode="drop")
    return jnp.where(first < num_q, scores[jnp.minimum(first, num_q - 1)], 0.0)


def panoptic_merge(mask_logits, class_logits, valid, *, is_stuff, score_threshold=SCORE_THRESHOLD,
                   overlap_threshold=OVERLAP_THRESHOLD):
    """MaskFormer-style merge of one image: (Q, H, W) logits, (Q, C+1) class logits -> (H, W, 2) int32.

    Channel 0 is the category, channel 1 the segment id (0, 1, 2, ... in query order); unassigned pixels and
    pixels outside `valid` (H, W) bool are (C, -1). `is_stuff` is a (C,) bool array.

    The original loops over the kept queries in order and paints each accepted one. Painted regions are
    disjoint (each lies inside that query's argmax region), so the loop is equivalent to: decide per query
    whether it is accepted and which segment id it gets (a stuff query reuses the id of the first accepted
    query of its class), then look every pixel's winning query up once. The decision needs only per-query pixel
    counts, which is what lets `panoptic_postprocess` work band by band.
    """
    ratio = _ratio_as_fraction(overlap_threshold, mask_logits.shape[-2] * mask_logits.shape[-1])
    scores, classes, keep = _query_classes(class_logits, score_threshold)
    owner, covered, areas = _owners(mask_logits, valid, scores, keep)
    accepted, segment = _segments(classes, keep, areas, is_stuff, ratio)
    return _paint(owner, covered, valid, accepted, classes, segment, class_logits.shape[-1] - 1)


def panoptic_postprocess(mask_logits, class_logits, resized_hw, orig_hw, *, image_size, canvas_hw,
                         stuff_classes: Sequence[int], score_threshold=SCORE_THRESHOLD,
                         overlap_threshold=OVERLAP_THRESHOLD, band_rows: int | None = None,
                         with_scores: bool = False):
    """Per-pixel panoptic predictions of a batch: (B, *canvas_hw, 2) int32 (category, segment id).

    `stuff_classes`: the class indices whose segments merge into one per class (COCO: 80..132).
    With `with_scores`, also the segments' scores, (B, Q) float32: [b, k] is the class probability of the query
    that opened segment k of image b (0 where image b has no segment k).
    """
    return _panoptic_postprocess(mask_logits, class_logits, resized_hw, orig_hw, image_size=image_size,
                                 canvas_hw=tuple(canvas_hw), stuff_classes=tuple(int(c) for c in stuff_classes),
                                 score_threshold=float(score_threshold), overlap_threshold=float(overlap_threshold),
                                 band_rows=band_rows, with_scores=bool(with_scores))


@functools.partial(jax.jit, static_argnames=("image_size", "canvas_hw", "stuff_classes", "score_threshold",
                                             "overlap_threshold", "band_rows", "with_scores"))
def _panoptic_postprocess(mask_logits, class_logits, resized_hw, orig_hw, *, image_size, canvas_hw,
                          stuff_classes, score_threshold, overlap_threshold, band_rows, with_scores):
    image_size = _image_size(image_size)
    _check(mask_logits, class_logits, resized_hw, orig_hw, image_size, canvas_hw)
    num_q, num_c = class_logits.shape[1], class_logits.shape[-1] - 1
    stuff = np.zeros(num_c, bool)
    stuff_idx = np.asarray(tuple(stuff_classes), np.int64)
    if stuff_idx.size and (stuff_idx.min() < 0 or stuff_idx.max() >= num_c):
        raise ValueError(f"stuff_classes must lie in [0, {num_c}), got {sorted(stuff_classes)}")
    stuff[stuff_idx] = True
    ratio = _ratio_as_fraction(overlap_threshold, canvas_hw[0] * canvas_hw[1])
    rows = resize.band_rows(num_q, canvas_hw, band_rows)

    def one(masks, class_logits_one, rhw, ohw):
        scores, classes, keep = _query_classes(class_logits_one, score_threshold)
        bands = _Bands(masks, rhw, ohw, image_size, canvas_hw, rows)

        def band(areas, i):
            owner, covered, counts = _owners(bands.logits(i), bands.valid(i), scores, keep)
            return areas + counts, (owner, covered)

        areas, (owner, covered) = jax.lax.scan(band, jnp.zeros((3, num_q), jnp.int32), jnp.arange(bands.count))
        owner = bands.crop(owner.reshape(bands.height, canvas_hw[1]))
        covered = bands.crop(covered.reshape(bands.height, canvas_hw[1]))
        accepted, segment = _segments(classes, keep, areas, jnp.asarray(stuff), ratio)
        painted = _paint(owner, covered, _valid(ohw, canvas_hw), accepted, classes, segment, num_c)
        return (painted, _segment_scores(scores, accepted, segment)) if with_scores else painted

    return _per_image(one, mask_logits, class_logits, jnp.asarray(resized_hw, jnp.int32),
                      jnp.asarray(orig_hw, jnp.int32))


# ------------------------------------------------------------------------------------------- instance


def _instance_pairs(class_logits, top_k):
    """The top `top_k` (query, class) pairs over the flattened Q×C class probabilities: (prob, query, label)."""
    num_q, num_c = class_logits.shape[0], class_logits.shape[-1] - 1
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, :num_c]
    class_prob, flat = jax.lax.top_k(probs.reshape(-1), min(top_k, num_q * num_c))
    return class_prob, (flat // num_c).astype(jnp.int32), (flat % num_c).astype(jnp.int32)


def _mask_sums(mask_logits, valid):
    """Per query: binary masks `logit > 0` inside `valid`, their sigmoid totals and pixel counts."""
    logits = mask_logits.astype(jnp.float32)
    binary = (logits > 0) & valid[None]
    inside = jnp.sum(jnp.where(binary, jax.nn.sigmoid(logits), 0.0), axis=(1, 2))
    return binary, inside, jnp.sum(binary, axis=(1, 2), dtype=jnp.int32)


def _instances(class_prob, query, label, masks, inside, count):
    mask_score = inside / (count.astype(jnp.float32) + 1e-6)
    return {"masks": masks, "labels": label, "scores": class_prob * mask_score[query], "class_scores": class_prob,
            "queries": query}


def instance_topk(mask_logits, class_logits, valid, *, top_k=TOP_K):
    """Instance predictions of one image from (Q, H, W) mask logits and (Q, C+1) class logits.

    The top `top_k` (query, class) pairs over the flattened Q×C class probabilities (softmax over C+1, the
    no-object column dropped afterwards, no renormalisation); a query may appear with several classes. Each
    pair's mask is `logit > 0` inside `valid`; its score is the class probability times the mean sigmoid inside
    the mask. Pairs come sorted by class probability, ties broken by the lower flat index (query·C + class).
    """
    class_prob, query, label = _instance_pairs(class_logits, top_k)
    binary, inside, count = _mask_sums(mask_logits, valid)
    return _instances(class_prob, query, label, binary[query], inside, count)


def instance_postprocess(mask_logits, class_logits, resized_hw, orig_hw, *, image_size, canvas_hw, top_k=TOP_K,
                         band_rows: int | None = None):
    """Instance predictions of a batch: `masks` (B, K, *canvas_hw) bool, `labels` (B, K) int32, `scores`,
    `class_scores` (B, K) float32 and `queries` (B, K) int32, with K = min(top_k, Q·C)."""
    return _instance_postprocess(mask_logits, class_logits, resized_hw, orig_hw, image_size=image_size,
                                 canvas_hw=tuple(canvas_hw), top_k=int(top_k), band_rows=band_rows)


@functools.partial(jax.jit, static_argnames=("image_size", "canvas_hw", "top_k", "band_rows"))
def _instance_postprocess(mask_logits, class_logits, resized_hw, orig_hw, *, image_size, canvas_hw, top_k,
                          band_rows):
    image_size = _image_size(image_size)
    _check(mask_logits, class_logits, resized_hw, orig_hw, image_size, canvas_hw)
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")
    num_q = class_logits.shape[1]
    rows = resize.band_rows(num_q, canvas_hw, band_rows)

    def one(masks, class_logits_one, rhw, ohw):
        class_prob, query, label = _instance_pairs(class_logits_one, top_k)
        bands = _Bands(masks, rhw, ohw, image_size, canvas_hw, rows)

        def band(i, carry):
            kept, inside, count = carry
            binary, band_inside, band_count = _mask_sums(bands.logits(i), bands.valid(i))
            # Written into place: only the K kept masks ever exist at full resolution, never all Q.
            kept = jax.lax.dynamic_update_slice_in_dim(kept, binary[query], i * rows, axis=1)
            return kept, inside + band_inside, count + band_count

        init = (jnp.zeros((query.shape[0], bands.height, canvas_hw[1]), bool), jnp.zeros(num_q, jnp.float32),
                jnp.zeros(num_q, jnp.int32))
        kept, inside, count = jax.lax.fori_loop(0, bands.count, band, init)
        return _instances(class_prob, query, label, bands.crop(kept), inside, count)

    return _per_image(one, mask_logits, class_logits, jnp.asarray(resized_hw, jnp.int32),
                      jnp.asarray(orig_hw, jnp.int32))
