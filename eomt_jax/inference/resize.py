"""Bilinear resizing of logits with sizes that may be traced, so one compiled program serves every image size.

PyTorch's `F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing) is what the original applies to
mask logits and class-score maps. It is separable: along one axis, output pixel `o` reads input pixels `i0` and
`i1 = min(i0 + 1, n_in - 1)` with weights `1 - t` and `t`, where `src = max((o + 0.5) * n_in / n_out - 0.5, 0)`,
`i0 = floor(src)`, `t = src - i0`. We build that rule as a dense (out_len, in_len) matrix from *traced* sizes:
the array shapes are fixed (a padded canvas) while the valid sizes are data, and rows/columns outside the valid
region are zero. A resize is then two matmuls, which the accelerator runs at full speed.

Cropping is free in this form: reading only the first `n_in` of `in_len` input pixels *is* the crop, which is how
"crop the padded logits to the resized image, then resize to the original size" becomes one matrix.
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


def resize_bilinear(x: jax.Array, out_size: tuple[int, int]) -> jax.Array:
    """Static-size bilinear resize of the last two axes (PyTorch `align_corners=False`, no antialiasing)."""
    h, w = x.shape[-2:]
    rows = bilinear_matrix(out_size[0], h, out_size[0], h)
    cols = bilinear_matrix(out_size[1], w, out_size[1], w)
    return apply_separable(x, rows, cols)


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple
