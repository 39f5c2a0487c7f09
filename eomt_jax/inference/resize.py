"""Bilinear resizing of logits with sizes that may be traced, so one compiled program serves every image size.

PyTorch's `F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing) is what the original applies to
mask logits and class-score maps. It is separable: along one axis, output pixel `o` reads input pixels `i0` and
`i1 = min(i0 + 1, n_in - 1)` with weights `1 - t` and `t`, where `src = max((o + 0.5) * n_in / n_out - 0.5, 0)`,
`i0 = floor(src)`, `t = src - i0`. We build that rule as a dense (out_len, in_len) matrix from *traced* sizes:
the array shapes are fixed (a padded canvas) while the valid sizes are data, and rows/columns outside the valid
region are zero. A resize is then two matmuls, which the accelerator runs at full speed.

Cropping is free in this form: reading only the first `n_in` of `in_len` input pixels *is* the crop, which is how
"crop the padded logits to the resized image, then resize to the original size" becomes one matrix.

Resizing to an original photo's size is where memory grows with the photo: Q mask-logit maps of 12 megapixels
take 10 GB in float32. The post-processing therefore produces full-resolution maps one band of output rows at a
time (`band_rows` rows, `apply_rows_first`), keeping only what each band contributes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Thresholds such as `logit > 0` follow these resizes, so never let a TPU/GPU default to reduced-precision matmuls.
_PRECISION = jax.lax.Precision.HIGHEST


def bilinear_matrix(out_size, in_size, out_len: int, in_len: int) -> jax.Array:
    """(out_len, in_len) float32 matrix of PyTorch's bilinear rule from `in_size` to `out_size` pixels.

    `out_size` / `in_size` may be traced int scalars (at most `out_len` / `in_len`); rows `>= out_size` are zero
    and columns `>= in_size` are never read. A size of 0 (a padding row of a batch) gives an all-zero matrix.
    """
    out_size = jnp.asarray(out_size, jnp.int32)
    in_size = jnp.asarray(in_size, jnp.int32)
    # float32 arithmetic on purpose: PyTorch computes the scale and source coordinate in float32 as well.
    scale = in_size.astype(jnp.float32) / jnp.maximum(out_size, 1).astype(jnp.float32)
    o = jnp.arange(out_len, dtype=jnp.float32)
    src = jnp.maximum(scale * (o + 0.5) - 0.5, 0.0)
    i0 = jnp.floor(src).astype(jnp.int32)
    i0 = jnp.minimum(i0, jnp.maximum(in_size - 1, 0))
    t = src - i0.astype(jnp.float32)
    i1 = jnp.minimum(i0 + 1, jnp.maximum(in_size - 1, 0))
    cols = jnp.arange(in_len, dtype=jnp.int32)
    m = (jnp.where(cols[None, :] == i0[:, None], 1.0 - t[:, None], 0.0)
         + jnp.where(cols[None, :] == i1[:, None], t[:, None], 0.0))
    valid = (jnp.arange(out_len) < out_size)[:, None] & (in_size > 0)
    return jnp.where(valid, m, 0.0).astype(jnp.float32)


def apply_separable(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """`rows @ x @ cols.T` over the last two axes of `x` (..., h, w) -> (..., rows.shape[0], cols.shape[0])."""
    y = jnp.einsum("...hw,ow->...ho", x, cols, precision=_PRECISION)
    return jnp.einsum("oh,...hw->...ow", rows, y, precision=_PRECISION)


def apply_rows_first(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """`apply_separable` contracting the rows first: for a band of a few output rows, the intermediate is
    (..., band, w) instead of (..., h, out_width)."""
    y = jnp.einsum("oh,...hw->...ow", rows, x, precision=_PRECISION)
    return jnp.einsum("...hw,ow->...ho", y, cols, precision=_PRECISION)


# A band of float32 maps at original resolution stays within this many bytes (a few such arrays are alive at once).
BAND_BYTES = 64 * 2**20


def band_rows(num_maps: int, out_hw: tuple[int, int], requested: int | None = None) -> int:
    """Output rows per band for `num_maps` float32 maps of width `out_hw[1]`: `requested` when given, else the
    largest power of two up to 128 (so bands tile canvases that are multiples of 128) within `BAND_BYTES`, at
    least 1, and no taller than the output needs."""
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"band_rows must be positive, got {requested}")
        return int(requested)
    rows = 128
    while rows > 1 and num_maps * rows * int(out_hw[1]) * 4 > BAND_BYTES:
        rows //= 2
    while rows > 1 and rows // 2 >= int(out_hw[0]):
        rows //= 2
    return rows


def band_slice(x: jax.Array, i, rows: int, axis: int = 0) -> jax.Array:
    """Band `i` (traced) of `rows` rows along `axis`."""
    return jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=axis)


def resize_bilinear(x: jax.Array, out_size: tuple[int, int]) -> jax.Array:
    """Static-size bilinear resize of the last two axes (PyTorch `align_corners=False`, no antialiasing)."""
    h, w = x.shape[-2:]
    rows = bilinear_matrix(out_size[0], h, out_size[0], h)
    cols = bilinear_matrix(out_size[1], w, out_size[1], w)
    return apply_separable(x, rows, cols)


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple
