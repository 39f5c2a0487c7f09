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
