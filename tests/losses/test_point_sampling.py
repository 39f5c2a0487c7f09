"""Point sampling against `torch.nn.functional.grid_sample` (bilinear, align_corners=False, zero padding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from eomt_jax.losses import point_sample


def _torch_sample(maps: np.ndarray, points: np.ndarray, requires_grad: bool = False):
    """The original's sampling: grid_sample on (N, C, H, W) at grid 2p - 1 shaped (N, P, 1, 2)."""
    t = torch.tensor(maps, requires_grad=requires_grad)
    out = F.grid_sample(t, torch.from_numpy(2 * points - 1)[:, :, None], mode="bilinear", padding_mode="zeros",
                        align_corners=False)[..., 0]
    return t, out


def _points(rng, n, p):
    pts = rng.uniform(-0.1, 1.1, size=(n, p, 2)).astype(np.float32)  # a few outside the map, where padding acts
    # Corners, edges and exact pixel centres of a 7 x 9 map: where the zero-padding taps and floor() matter.
    pts[:, :6] = [[0, 0], [1, 1], [0, 1], [1, 0], [0.5 / 9, 0.5 / 7], [8.5 / 9, 3.5 / 7]]
    return pts


def test_values_and_gradients_match_grid_sample():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 3, 7, 9)).astype(np.float32)
    pts = _points(rng, 2, 64)
    cotangent = rng.normal(size=(2, 3, 64)).astype(np.float32)

    ours, vjp = jax.vjp(lambda m: point_sample(m, jnp.asarray(pts)), jnp.asarray(maps))
    t, ref = _torch_sample(maps, pts, requires_grad=True)
    (ref * torch.from_numpy(cotangent)).sum().backward()
    # float32 rounding of the interpolation weights and of the 4-term sums (values are O(1)).
    np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(cotangent))[0]), t.grad.numpy(), atol=1e-5, rtol=0)


def test_bool_and_bf16_maps_sample_to_float32():
    rng = np.random.default_rng(1)
    masks = rng.uniform(size=(2, 4, 7, 9)) < 0.5
    pts = _points(rng, 2, 32)
    ours = point_sample(jnp.asarray(masks), jnp.asarray(pts))
    assert ours.dtype == jnp.float32
    # Bool target masks give soft labels at borders, exactly as grid_sample on the float mask.
    np.testing.assert_allclose(np.asarray(ours), _torch_sample(masks.astype(np.float32), pts)[1].numpy(),
                               atol=1e-5, rtol=0)
    logits = jnp.asarray(rng.normal(size=(2, 4, 7, 9)), jnp.bfloat16)
    sampled = point_sample(logits, jnp.asarray(pts))
    assert sampled.dtype == jnp.float32
    # bf16 inputs are only read: the interpolation itself runs in float32 on the (exact) bf16 values.
    np.testing.assert_allclose(np.asarray(sampled), np.asarray(point_sample(logits.astype(jnp.float32), pts)),
                               atol=1e-6, rtol=0)


def test_leading_dimensions_are_batch_dimensions():
    rng = np.random.default_rng(2)
    maps = rng.normal(size=(2, 3, 1, 5, 6)).astype(np.float32)
    pts = rng.uniform(size=(2, 3, 10, 2)).astype(np.float32)
    ours = np.asarray(point_sample(maps, pts))
    assert ours.shape == (2, 3, 1, 10)
    ref = _torch_sample(maps.reshape(6, 1, 5, 6), pts.reshape(6, 10, 2))[1].numpy().reshape(2, 3, 1, 10)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
