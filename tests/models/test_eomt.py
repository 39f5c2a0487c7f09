"""Masked-attention mechanics of the Flax EoMT that the parity tests cannot reach (random disabling, tracing)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eomt_jax.models import EoMTConfig, init_model

CFG = EoMTConfig(embed_dim=32, depth=3, num_heads=2, image_size=32, num_queries=200, num_classes=3,
                 num_blocks=2, mlp_hidden=64)


def test_probabilities_are_traced_so_annealing_never_recompiles():
    net = init_model(CFG)
    graphdef, state = nnx.split(net)
    traces = []

    def forward(state, images, probs, key):
        traces.append(1)
        return nnx.merge(graphdef, state)(images, probs, key=key)

    fn = jax.jit(forward)
    images = jnp.zeros((2, 32, 32, 3))
    outs = []
    for i, p in enumerate([1.0, 0.7, 0.2, 0.0]):
        masks, _ = fn(state, images, jnp.full((2,), p), jax.random.key(i))
        outs.append(np.asarray(masks[-1]))
    assert len(traces) == 1 and fn._cache_size() == 1
    assert not np.allclose(outs[0], outs[-1])  # the probability really reaches the computation


def test_random_disabling_is_per_image_and_query():
    net = init_model(CFG)
    rng = np.random.default_rng(0)
    b, q, n = 4, CFG.num_queries, CFG.num_queries + 5 + 4
    logits = jnp.asarray(rng.normal(size=(b, q, 8, 8)) - 3.0)  # mostly negative: masks block most patches
    for p in (0.0, 0.3, 1.0):
        mask = np.asarray(net.attention_mask(logits, jnp.float32(p), jax.random.key(1), n, (2, 2)))
        assert mask.shape == (b, n, n)
        # Only query rows x patch columns may be masked.
        assert mask[:, q:, :].all() and mask[:, :q, : q + 5].all()
        block = mask[:, :q, q + 5 :]
        masked_rows = ~block.all(-1)  # queries whose mask survived
        thresholded = ~np.asarray(
            jax.image.resize(logits, (b, q, 2, 2), "bilinear", antialias=False) > 0
        ).reshape(b, q, 4).all(-1)
        # A query whose own mask hides nothing looks "disabled" either way; count among the others.
        kept = masked_rows[thresholded].mean()
        if p in (0.0, 1.0):
            assert kept == p
        else:
            # 800 Bernoulli(p) draws: 5 standard deviations.
            assert abs(kept - p) < 5 * np.sqrt(p * (1 - p) / thresholded.sum())
            # Different images draw differently.
            assert not (masked_rows[0] == masked_rows[1]).all()


def test_bad_inputs_are_rejected_clearly():
    net = init_model(CFG)
    import pytest

    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        net(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        net(jnp.zeros((1, 40, 32, 3)))
    with pytest.raises(ValueError, match=r"attn_mask_probs must have shape \(2,\)"):
        net(jnp.zeros((1, 32, 32, 3)), jnp.ones((3,)))


def test_fused_attention_equals_the_plain_path():
    """jax.nn.dot_product_attention (cuDNN on GPUs, XLA here) computes the same network, masks included."""
    plain = init_model(CFG)
    fused = init_model(CFG.replace(attention="fused"))
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
    for probs in (jnp.ones(2), jnp.zeros(2)):
        a, ca = plain(images, probs)
        b, cb = fused(images, probs)
        for x, y in zip(a + ca, b + cb):
            # Same float32 arithmetic up to summation order.
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


def test_bfloat16_compute_stays_close_to_float32():
    net32 = init_model(CFG)
    net16 = init_model(CFG.replace(dtype="bfloat16"))
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
    a, ca = net32(images, masked_attn=False)
    b, cb = net16(images, masked_attn=False)
    assert b[0].dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits (~0.4% per rounding); relative to the logits' range, a few percent at most.
    for x, y in ((a[0], b[0]), (ca[0], cb[0])):
        x, y = np.asarray(x), np.asarray(y, np.float32)
        assert np.abs(x - y).max() / np.abs(x).max() < 0.05
