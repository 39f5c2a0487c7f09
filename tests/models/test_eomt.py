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


def test_cpu_inference_loops_equal_the_whole_computation_and_gradients_use_the_whole_one():
    """On CPUs, inference runs attention in query-row chunks and the upscaling's conv + LayerNorm in bands of rows
    (loops); differentiated, the network is the plain whole-array program, so a train step has no loop in it."""
    from eomt_jax.models import vit

    # More query rows than one chunk holds, so the loop really runs several chunks, masks included.
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 3, 700, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.uniform(size=(2, 700, 700)) > 0.3) | jnp.eye(700, dtype=bool)
    fast = jax.jit(vit._plain_attention)
    assert "while" in fast.lower(q, k, v, mask).compile().as_text()
    np.testing.assert_allclose(fast(q, k, v, mask), vit._whole_attention(q, k, v, mask), atol=1e-6, rtol=0)

    def objective(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask)))

    grads = jax.jit(jax.grad(objective(vit._plain_attention), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(objective(vit._whole_attention), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(grads, ref):
        # The same operations; XLA may fuse them differently inside the custom-gradient call (float32 rounding).
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)

    # The whole network: same outputs as the plain computation, and no loop in its gradient's program.
    net = init_model(CFG)
    graphdef, state = nnx.split(net)
    images = jnp.asarray(rng.uniform(0, 1, (2, 32, 32, 3)), jnp.float32)

    def loss(state):
        masks, classes = nnx.merge(graphdef, state)(images, masked_attn=False)
        return sum(jnp.mean(jnp.sin(x)) for x in masks + classes)

    hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
    assert " while(" not in hlo and "while." not in hlo
    assert "while" in jax.jit(loss).lower(state).compile().as_text()  # inference keeps its loops


def test_cpu_bfloat16_inference_multiplies_with_float32_accumulation():
    """On CPUs, bf16 inference hands every matrix product to XLA:CPU as bf16 x bf16 -> f32 (the form its bf16
    matrix kernels take), rounding each product once; differentiated, the dots are the plain bf16 ones."""
    import re

    from eomt_jax.models import vit

    net = init_model(CFG.replace(dtype="bfloat16"))
    graphdef, state = nnx.split(net)
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, masked_attn=False))
    hlo = forward.lower(state, images).compile().as_text()
    dots = re.findall(r"= (\w+)\[[^\]]*\][^=]*? dot\(([^)]*)\)", hlo)
    operands = dict(re.findall(r"%(\S+) = (\w+)\[", hlo))
    bf16_dots = [out for out, args in dots
                 if all(operands.get(a.strip().lstrip("%")) == "bf16" for a in args.split(","))]
    # Patch embedding, 3 x (qkv, proj, fc1, fc2), mask MLP (3), class head, 2 transposed convs, mask product; the
    # two attention products per block already accumulate in float32.
    assert len(bf16_dots) >= 1 + 3 * 4 + 3 + 1 + 2 + 1
    assert set(bf16_dots) == {"f32"}

    # The explicit widening is a CPU inference path only: the gradient is the plain bf16 product's.
    a, b = (jnp.asarray(np.random.default_rng(1).normal(size=s), jnp.bfloat16) for s in ((4, 8), (8, 3)))
    dims = (((1,), (0,)), ((), ()))

    def grad_of(dot):
        return jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(dot(a, b, dims).astype(jnp.float32)))))(a)

    g = grad_of(vit.dot_general)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(grad_of(jax.lax.dot_general), np.float32))
    # Forward: the float32-accumulated product rounded once.
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda a, b: vit.dot_general(a, b, dims))(a, b), np.float32),
        np.asarray(jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32)).astype(jnp.bfloat16), np.float32),
    )
