"""DINOv2 vision transformer, laid out the way EoMT uses it (channels-last Flax NNX).

Parameter names mirror the published PyTorch checkpoints (`patch_embed/proj`, `blocks/{i}/attn/qkv`, `ls1/gamma`,
...), so that checkpoint conversion is a rename plus layout changes, and so that optimizer and sharding rules can be
written as regular expressions over familiar paths.

The encoder's block loop is not run here: EoMT interleaves query injection, intermediate predictions and masked
attention with the blocks, so `EoMT` drives `blocks` itself and this module only provides the pieces.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# torch.nn.GELU / HF "gelu" is the exact erf form; jax.nn.gelu defaults to the tanh approximation.
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, 0.5 x (1 + erf(x / sqrt 2)), as PyTorch computes it.

    `jax.nn.gelu(approximate=False)` goes through erfc, which XLA:CPU evaluates about 7x slower than erf; the two
    differ by float32 rounding only (< 1e-6 absolute).
    """
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype)))


def layer_norm(dim: int, eps: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance: the one-pass E[x^2]-E[x]^2 form loses ~1e-2 on tokens with a large mean offset.
    return nnx.LayerNorm(
        dim, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def dense(d_in: int, d_out: int, dtype, param_dtype, rngs: nnx.Rngs, std: float = 0.02) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        param_dtype=param_dtype,
        dot_general=dot_general,
        kernel_init=nnx.initializers.truncated_normal(std),
        bias_init=nnx.initializers.zeros,
        rngs=rngs,
    )


def attention_weights_and_values(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, impl: str = "plain"
) -> jax.Array:
    """Scaled dot-product attention. q, k, v: (B, N, heads, head_dim); mask: bool (B, N, N), True = may attend.

    impl "plain": einsum + softmax with scores and softmax in float32 whatever the activation dtype. CPU inference
    processes the queries in row chunks (`_chunked_attention`), the same arithmetic per row.
    impl "fused": `jax.nn.dot_product_attention`, which picks cuDNN's fused kernel on GPUs where the shapes
    allow and falls back to XLA elsewhere.
    """
    if impl == "fused":
        return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None])
    if impl != "plain":
        raise ValueError(f"attention implementation must be 'plain' or 'fused', got {impl!r}")
    # Heads next to batch, so that both dots are plain batched matmuls: with (B, N, H, D) operands XLA:CPU
    # transposes the whole (B, H, N, N) probability matrix before the second dot.
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    return _plain_attention(q, k, v, mask).transpose(0, 2, 1, 3)


def cpu_inference_path(fast: Callable, reference: Callable) -> Callable:
    """A function equal to `reference` that runs `fast` instead on CPUs when it is not differentiated.

    The CPU fast paths are loops that keep their working set in cache. Differentiated, a loop stacks its
    per-iteration residuals into buffers that XLA:CPU copies and converts several times over (tens of GiB for an
    EoMT-L train step), so gradients always come from `reference`: whenever the function is differentiated its
    forward pass is `reference`'s, on every backend. Training, remat and `--mode=compile`'s memory report therefore
    see the same program on CPUs as on accelerators. Arguments are arrays or pytrees of arrays (no closures over
    traced values: pass parameters in).
    """

    @jax.custom_vjp
    def fn(*args):
        return jax.lax.platform_dependent(*args, cpu=fast, default=reference)

    def fwd(*args):
        return jax.vjp(reference, *args)  # (output, the reference's backward function as the residuals)

    def bwd(vjp, cotangent):
        return vjp(cotangent)

    fn.defvjp(fwd, bwd)
    return fn


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs) -> jax.Array:
    """`jax.lax.dot_general`, except that CPU inference multiplies bfloat16 operands with float32 accumulation
    explicitly and rounds the product to bfloat16 once.

    XLA:CPU hands only such dots to its matrix library's bf16 kernels (AMX or AVX512-BF16 on recent x86 CPUs,
    several times the float32 rate); a bf16 -> bf16 dot takes a generic path slower than float32. Accelerators
    accumulate bf16 products in float32 anyway, so they, and every differentiated use, run the plain dot.
    """
    def plain(lhs, rhs):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                   preferred_element_type=preferred_element_type, **kwargs)

    if not (lhs.dtype == rhs.dtype == jnp.bfloat16 and preferred_element_type in (None, jnp.bfloat16)):
        return plain(lhs, rhs)

    def widened(lhs, rhs):
        out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=jnp.float32, **kwargs)
        return out.astype(jnp.bfloat16)

    return cpu_inference_path(widened, plain)(lhs, rhs)


def _whole_attention(q, k, v, mask):
    return _attend(q, k, v, None if mask is None else mask[:, None])


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _exp_as(x: jax.Array, dtype) -> jax.Array:
    """exp(x) rounded to `dtype`, differentiated through the rounded value: the backward pass keeps only that."""
    return jnp.exp(x).astype(dtype)


@_exp_as.defjvp
def _exp_as_jvp(dtype, primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _exp_as(x, dtype)
    # Checkpointed, so that the widening of y happens in the backward pass and y itself is what is kept.
    return y, jax.checkpoint(lambda y, dx: (y.astype(dx.dtype) * dx).astype(dtype))(y, dx)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """q: (..., Nq, D), k, v: (..., Nk, D), mask: bool broadcastable to (..., Nq, Nk) or None."""
    # The scale is applied to q (N x D values, not N x N scores) and the softmax is normalised after the product
    # with v (one pass less over the N x N matrix); mathematically the same softmax, float rounding apart.
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    scores = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        # No row is ever fully masked (queries always see queries, cls and registers), so a finite fill is safe.
        # An additive bias rather than a select: differentiated, a select keeps an N x N value for its backward
        # pass, an addition of a constant keeps nothing.
        scores = scores + jnp.where(mask, 0.0, -1e30).astype(jnp.float32)
    # The row maximum only keeps exp in range; the result does not depend on it, so neither does the gradient.
    # The weights are rounded to the activation dtype once and that copy serves both the product and the sum: it is
    # the only N x N value a backward pass keeps (bf16 training keeps 2 bytes per score, not 2 + 4).
    weights = _exp_as(scores - jax.lax.stop_gradient(scores).max(-1, keepdims=True), v.dtype)
    out = jnp.einsum("...qk,...kd->...qd", weights, v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(weights, axis=-1, keepdims=True, dtype=jnp.float32)).astype(v.dtype)


# Most query rows (summed over the batch) per chunk on CPUs. On a 2-core AVX-512 machine, 1605 tokens attend fastest
# in 2 chunks of 803 rows (4 chunks of 402: ~25% slower, whole: ~8% slower).
CPU_ATTENTION_CHUNK = 1024


def _chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`_attend` on (B, H, N, D) one head and one chunk of query rows at a time (a loop, not a vmap).

    The full (B, H, N, N) score matrix (62 MB for one 640x640 image with 6 heads) does not fit in a CPU cache, and
    XLA:CPU streams it through memory once per softmax pass; a chunk's scores stay in cache. Each query row still
    sees every key and gets the same exact softmax, so only the matmul blocking (float rounding) changes. This is
    what PyTorch's CPU flash-attention kernel gains, without its online softmax. The batch stays a vectorised
    dimension, so a batch-sharded input is never gathered.
    """
    b, h, n, d = q.shape
    num = -(-(b * n) // CPU_ATTENTION_CHUNK)
    rows = -(-n // num)  # equal chunks; the padded query rows are computed and dropped
    num = -(-n // rows)
    pad = num * rows - n
    if mask is not None:
        mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)), constant_values=True)

    def head(j, out):
        kj, vj = k[:, j], v[:, j]

        def chunk(i, out):
            m = None if mask is None else jax.lax.dynamic_slice_in_dim(mask, i * rows, rows, axis=1)
            return out.at[:, j, i].set(_attend(out[:, j, i], kj, vj, m))

        return jax.lax.fori_loop(0, num, chunk, out)

    # Each chunk's result overwrites its queries: the loop needs no separate output buffer.
    out = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, h, num, rows, d)
    out = jax.lax.fori_loop(0, h, head, out)
    return out.reshape(b, h, num * rows, d)[:, :, :n]


# q, k, v: (B, H, N, D); mask: bool (B, N, N) or None.
_plain_attention = cpu_inference_path(_chunked_attention, _whole_attention)


class PatchEmbed(nnx.Module):
    """Non-overlapping patch projection: a stride-`patch` convolution, NHWC in, (B, gh*gw, D) out (row-major)."""

    def __init__(self, patch_size: int, embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.proj = nnx.Conv(
            3,
            embed_dim,
            kernel_size=(patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.initializers.lecun_normal(),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        # The convolution as one matmul over flattened patches (same kernel layout): XLA:CPU runs this GEMM about
        # twice as fast as its strided convolution, and on accelerators it is the same GEMM.
        b, h, w, c = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        dtype = self.proj.dtype or x.dtype
        patches = x[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        kernel = self.proj.kernel[...].reshape(p * p * c, -1).astype(dtype)
        tokens = dot_general(patches.reshape(b, gh * gw, p * p * c).astype(dtype), kernel, (((2,), (0,)), ((), ())))
        return tokens + self.proj.bias[...].astype(dtype)


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_value: float, *, param_dtype):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (rows ordered q | k | v, each head-major).

    `rotate_qk` is the hook where a rotary position variant (DINOv3) applies its rotation to q and k.
    """

    def __init__(self, dim: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs, impl: str = "plain"):
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.impl = impl
        self.qkv = dense(dim, 3 * dim, dtype, param_dtype, rngs)
        self.proj = dense(dim, dim, dtype, param_dtype, rngs)

    def rotate_qk(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        return q, k

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = self.rotate_qk(q, k)
        out = attention_weights_and_values(q, k, v, mask, self.impl)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2 (S, B and L backbones)."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = dense(dim, hidden, dtype, param_dtype, rngs)
        self.fc2 = dense(hidden, dim, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class SwiGLUPacked(nnx.Module):
    """Packed SwiGLU of the giant backbone: one fc1 whose first half is the SiLU gate and second half the value."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        if hidden % 2:
            raise ValueError(f"packed SwiGLU needs an even fc1 width, got {hidden}")
        self.fc1 = dense(dim, hidden, dtype, param_dtype, rngs)
        self.fc2 = dense(hidden // 2, dim, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, value = jnp.split(self.fc1(x), 2, axis=-1)
        return self.fc2(jax.nn.silu(gate) * value)


class Block(nnx.Module):
    """Pre-norm transformer block with LayerScale: x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        mlp_type: str,
        *,
        eps: float,
        layerscale_init: float,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        attention: str = "plain",
    ):
        self.norm1 = layer_norm(dim, eps, dtype, param_dtype, rngs)
        self.attn = Attention(dim, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs, impl=attention)
        self.ls1 = LayerScale(dim, layerscale_init, param_dtype=param_dtype)
        self.norm2 = layer_norm(dim, eps, dtype, param_dtype, rngs)
        mlp_cls: Callable[..., nnx.Module] = {"gelu": Mlp, "swiglu": SwiGLUPacked}[mlp_type]
        self.mlp = mlp_cls(dim, mlp_hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ls2 = LayerScale(dim, layerscale_init, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.ls1(self.attn(self.norm1(x), mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resample_pos_embed(pos_embed: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> jax.Array:
    """Resample a patch-grid position embedding (1, gh*gw, D) to another grid.

    Bicubic with antialiasing and half-pixel centres, as timm resamples DINOv2 position embeddings; PyTorch's
    antialiased bicubic uses the a = -0.5 kernel, which is the kernel `jax.image.resize` uses.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    d = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, old_grid[0], old_grid[1], d).astype(jnp.float32)
    out = jax.image.resize(grid, (1, new_grid[0], new_grid[1], d), method="bicubic", antialias=True)
    return out.reshape(1, new_grid[0] * new_grid[1], d).astype(pos_embed.dtype)


class DinoV2(nnx.Module):
    """DINOv2 encoder pieces: patch embedding, cls + register tokens, patch-grid position embedding, blocks, norm."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        grid_size: tuple[int, int],
        num_registers: int,
        mlp_type: str,
        mlp_hidden: int,
        eps: float,
        layerscale_init: float,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        attention: str = "plain",
    ):
        self.grid_size = tuple(grid_size)
        self.num_registers = num_registers
        self.num_prefix_tokens = 1 + num_registers
        self.patch_embed = PatchEmbed(patch_size, embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, embed_dim), param_dtype))
        if num_registers:
            self.reg_token = nnx.Param(init(rngs.params(), (1, num_registers, embed_dim), param_dtype))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, grid_size[0] * grid_size[1], embed_dim), param_dtype))
        self.blocks = nnx.List(
            [
                Block(
                    embed_dim,
                    num_heads,
                    mlp_hidden,
                    mlp_type,
                    eps=eps,
                    layerscale_init=layerscale_init,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                    attention=attention,
                )
                for _ in range(depth)
            ]
        )
        self.norm = layer_norm(embed_dim, eps, dtype, param_dtype, rngs)

    def embed(self, x: jax.Array) -> jax.Array:
        """Normalised NHWC image -> tokens `[cls | registers | patches]` with positions on the patches only."""
        b, h, w, _ = x.shape
        p = self.patch_embed.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        tokens = self.patch_embed(x)
        pos = resample_pos_embed(self.pos_embed[...], self.grid_size, (h // p, w // p))
        tokens = tokens + pos.astype(tokens.dtype)
        prefix = [self.cls_token[...]]
        if self.num_registers:
            prefix.append(self.reg_token[...])
        prefix = jnp.concatenate(prefix, axis=1).astype(tokens.dtype)
        return jnp.concatenate([jnp.broadcast_to(prefix, (b,) + prefix.shape[1:]), tokens], axis=1)
