"""Bilinear sampling of maps at normalised points, the way the original's losses sample masks.

The original samples with `torch.nn.functional.grid_sample(maps, 2 * points - 1, align_corners=False)` and the
default zero padding. Here that is a four-tap gather: a point (x, y) in [0, 1]^2 lands at pixel coordinates
(x * W - 0.5, y * H - 0.5) (pixel centres at i + 0.5), and taps outside the map contribute zero, so values fade
towards the border exactly as grid_sample's do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def point_sample(maps: jax.Array, points: jax.Array) -> jax.Array:
    """Sample every channel of `maps` at `points`, bilinearly, with zero padding outside the map.

    Args:
      maps: (..., C, H, W) of any dtype (bool target masks, bf16 or f32 logits). Only the four taps of each point
        are read and converted, so bool masks at full image resolution are never materialised as floats.
      points: (..., P, 2) float, (x, y) in [0, 1]; the leading dimensions are those of `maps`, and the channels
        share the points (as in grid_sample).

    Returns:
      float32 (..., C, P).
    """
    *lead, c, h, w = maps.shape
    if tuple(points.shape[:-2]) != tuple(lead) or points.shape[-1] != 2:
        raise ValueError(f"points {points.shape} do not fit maps {maps.shape}: expected {(*lead, 'P', 2)}")
    p = points.shape[-2]
    flat = maps.reshape(-1, c, h * w)
    pts = points.reshape(-1, p, 2).astype(jnp.float32)
    x = pts[..., 0] * w - 0.5
    y = pts[..., 1] * h - 0.5
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0

    taps, weights = [], []
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            taps.append((jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32))
            weights.append(jnp.where(inside, wx * wy, 0.0))
    idx = jnp.concatenate(taps, axis=-1)  # (N, 4P): one gather for the four taps
    vals = jnp.take_along_axis(flat, idx[:, None, :], axis=2).astype(jnp.float32)  # (N, C, 4P)
    vals = vals.reshape(vals.shape[0], c, 4, p)
    out = jnp.sum(vals * jnp.stack(weights, axis=1)[:, None], axis=2)
    return out.reshape(*lead, c, p)
