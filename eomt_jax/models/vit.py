"""DINOv2 vision transformer, laid out the way EoMT uses it (channels-last Flax NNX).

Parameter names mirror the published PyTorch checkpoints (`patch_embed/proj`, `blocks/{i}/attn/qkv`, `ls1/gamma`,
...), so that checkpoint conversion is a rename plus layout changes, and so that optimizer and sharding rules can be
written as regular expressions over familiar paths.

The encoder's block loop is not run here: EoMT interleaves query injection, intermediate predictions and masked
attention with the blocks, so `EoMT` drives `blocks` itself and this module only provides the pieces. Attention and
the matrix products go through `kernels` (CPU inference fast paths; the plain computation everywhere else).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from eomt_jax.models import kernels
from eomt_jax.models.layers import gelu


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
        matmul_dtype: str | None = None,
    ):
        self.grid_size = tuple(grid_size)
        self.num_registers = num_registers
        self.num_prefix_tokens = 1 + num_registers
        self.patch_embed = PatchEmbed(patch_size, embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                      matmul_dtype=matmul_dtype)
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
                    matmul_dtype=matmul_dtype,
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
        matmul_dtype: str | None = None,
    ):
        self.norm1 = layer_norm(dim, eps, dtype, param_dtype, rngs)
        self.attn = Attention(dim, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs, impl=attention,
                              matmul_dtype=matmul_dtype)
        self.ls1 = LayerScale(dim, layerscale_init, param_dtype=param_dtype)
        self.norm2 = layer_norm(dim, eps, dtype, param_dtype, rngs)
        mlp_cls: Callable[..., nnx.Module] = {"gelu": Mlp, "swiglu": SwiGLUPacked}[mlp_type]
        self.mlp = mlp_cls(dim, mlp_hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul_dtype=matmul_dtype)
        self.ls2 = LayerScale(dim, layerscale_init, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.ls1(self.attn(self.norm1(x), mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (rows ordered q | k | v, each head-major).

    `rotate_qk` is the hook where a rotary position variant (DINOv3) applies its rotation to q and k.
    """

    def __init__(self, dim: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs, impl: str = "plain",
                 matmul_dtype: str | None = None):
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.impl = impl
        self.matmul_dtype = matmul_dtype
        self.qkv = dense(dim, 3 * dim, dtype, param_dtype, rngs, matmul_dtype=matmul_dtype)
        self.proj = dense(dim, dim, dtype, param_dtype, rngs, matmul_dtype=matmul_dtype)

    def rotate_qk(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        return q, k

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = self.rotate_qk(q, k)
        if self.matmul_dtype is not None:  # mixed precision: both products on rounded operands, softmax in float32
            q, k, v = (a.astype(self.matmul_dtype) for a in (q, k, v))
        out = kernels.attention(q, k, v, mask, self.impl)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2 (S, B and L backbones)."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs, matmul_dtype: str | None = None):
        self.fc1 = dense(dim, hidden, dtype, param_dtype, rngs, matmul_dtype=matmul_dtype)
        self.fc2 = dense(hidden, dim, dtype, param_dtype, rngs, matmul_dtype=matmul_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class SwiGLUPacked(nnx.Module):
    """Packed SwiGLU of the giant backbone: one fc1 whose first half is the SiLU gate and second half the value."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs, matmul_dtype: str | None = None):
        if hidden % 2:
            raise ValueError(f"packed SwiGLU needs an even fc1 width, got {hidden}")
        self.fc1 = dense(dim, hidden, dtype, param_dtype, rngs, matmul_dtype=matmul_dtype)
        self.fc2 = dense(hidden // 2, dim, dtype, param_dtype, rngs, matmul_dtype=matmul_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, value = jnp.split(self.fc1(x), 2, axis=-1)
        return self.fc2(jax.nn.silu(gate) * value)


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_value: float, *, param_dtype):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class PatchEmbed(nnx.Module):
    """Non-overlapping patch projection: a stride-`patch` convolution, NHWC in, (B, gh*gw, D) out (row-major)."""

    def __init__(self, patch_size: int, embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 matmul_dtype: str | None = None):
        self.patch_size = patch_size
        self.matmul = kernels.matmul(matmul_dtype)
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
        # The convolution as one matmul over flattened patches (same kernel layout): XLA:CPU runs this GEMM much
        # faster than its strided convolution, and on accelerators it is the same GEMM.
        b, h, w, c = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        dtype = self.proj.dtype or x.dtype
        patches = x[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        kernel = self.proj.kernel[...].reshape(p * p * c, -1).astype(dtype)
        patches = patches.reshape(b, gh * gw, p * p * c).astype(dtype)
        tokens = self.matmul(patches, kernel, (((2,), (0,)), ((), ())))
        return tokens + self.proj.bias[...].astype(dtype)


def layer_norm(dim: int, eps: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance: the one-pass E[x^2]-E[x]^2 form loses ~1e-2 on tokens with a large mean offset.
    return nnx.LayerNorm(
        dim, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def dense(d_in: int, d_out: int, dtype, param_dtype, rngs: nnx.Rngs, std: float = 0.02,
          matmul_dtype: str | None = None) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        param_dtype=param_dtype,
        dot_general=kernels.matmul(matmul_dtype),
        kernel_init=nnx.initializers.truncated_normal(std),
        bias_init=nnx.initializers.zeros,
        rngs=rngs,
    )


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
