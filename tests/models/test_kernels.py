"""CPU inference fast paths of `eomt_jax.models.kernels`: the same numbers as the whole-array program, which is
what differentiation always sees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eomt_jax.models import EoMTConfig, init_model, kernels

CFG = EoMTConfig(embed_dim=32, depth=3, num_heads=2, image_size=32, num_queries=200, num_classes=3,
                 num_blocks=2, mlp_hidden=64)


def test_cpu_inference_loops_equal_the_whole_computation_and_gradients_use_the_whole_one():
    """On CPUs, inference runs attention in query-row chunks and the upscaling's conv + LayerNorm in bands of rows
    (loops); differentiated, the network is the plain whole-array program, so a train step has no loop in it."""
    # More query rows than one chunk holds, so the loop really runs several chunks, masks included.
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 3, 700, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.uniform(size=(2, 700, 700)) > 0.3) | jnp.eye(700, dtype=bool)
    fast = jax.jit(kernels.plain_attention)
    assert "while" in fast.lower(q, k, v, mask).compile().as_text()
    np.testing.assert_allclose(fast(q, k, v, mask), kernels.whole_attention(q, k, v, mask), atol=1e-6, rtol=0)

    def objective(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask)))

    grads = jax.jit(jax.grad(objective(kernels.plain_attention), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(objective(kernels.whole_attention), argnums=(0, 1, 2)))(q, k, v)
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

    g = grad_of(kernels.dot_general)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(grad_of(jax.lax.dot_general), np.float32))
    # Forward: the float32-accumulated product rounded once.
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda a, b: kernels.dot_general(a, b, dims))(a, b), np.float32),
        np.asarray(jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32)).astype(jnp.bfloat16), np.float32),
    )


def _qkv_and_mask(n: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(2, n, 2, 16)), dtype) for _ in range(3))
    # EoMT's structure: only the first rows (the queries) are masked, and never fully.
    mask = jnp.ones((2, n, n), bool).at[:, :5, 8:].set(jnp.asarray(rng.uniform(size=(2, 5, n - 8)) > 0.5))
    return q, k, v, mask


def test_attention_padded_to_even_length_is_the_same_attention():
    """The form the fused path hands cuDNN when differentiated (odd EoMT lengths padded by one token: a key cut off
    by the key length or the bias, a query row dropped) computes the same attention and gradients: run here with
    XLA's implementation, it equals the unpadded one exactly (the padding key's weight is exactly 0)."""
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v, mask = _qkv_and_mask(37, dtype)
        for m in (None, mask):
            def ref(q, k, v):
                return jax.nn.dot_product_attention(q, k, v, mask=None if m is None else m[:, None],
                                                    implementation="xla")

            def padded(q, k, v):
                return kernels.even_length_attention(q, k, v, m, "xla")

            np.testing.assert_array_equal(jax.jit(padded)(q, k, v), jax.jit(ref)(q, k, v))

            def grads(f):
                objective = lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32)))  # noqa: E731
                return jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(q, k, v)

            if dtype == jnp.float32:  # the gradients' padding is dtype-independent: one dtype is enough
                for a, b in zip(grads(padded), grads(ref)):
                    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    bias = kernels.padded_mask_bias(mask, jnp.bfloat16)
    assert bias.shape == (2, 1, 38, 38) and bias.dtype == jnp.bfloat16
    assert (bias[:, :, :37, 37] < -1e12).all() and (bias[:, :, 37, :37] == 0).all()  # padding key / query row
    np.testing.assert_array_equal(bias[:, 0, :37, :37] == 0, mask)


def test_fused_attention_asks_cudnn_only_where_it_takes_the_operands():
    """cuDNN is requested by name only for bf16/fp16 operands with a head size it takes, and only when installed;
    everywhere else, and on every non-GPU platform, the fused path is XLA's attention. On CPUs it equals the plain
    path up to float rounding, masks included."""
    q, k, v, mask = _qkv_and_mask(37, jnp.float32)
    assert not kernels.cudnn_takes(q, k, v)  # float32: XLA on GPUs too
    bf16 = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    assert kernels.cudnn_takes(*bf16) == kernels.cudnn_installed()
    wide = jnp.zeros((1, 4, 1, kernels.CUDNN_MAX_HEAD_DIM + 8), jnp.bfloat16)
    assert not kernels.cudnn_takes(wide, wide, wide)
    for m in (None, mask):
        fused = kernels.attention(q, k, v, m, "fused")
        np.testing.assert_array_equal(
            fused, jax.nn.dot_product_attention(q, k, v, mask=None if m is None else m[:, None]))
        np.testing.assert_allclose(fused, kernels.attention(q, k, v, m, "plain"), atol=1e-6, rtol=0)
