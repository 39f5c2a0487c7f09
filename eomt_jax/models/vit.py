"""The DINOv2 and DINOv3 vision transformers, laid out the way EoMT uses them (channels-last Flax NNX).

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


class _ViT(nnx.Module):
    """What the DINOv2 and DINOv3 encoders share: patch embedding, cls + register tokens, blocks, final norm."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
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
        key_bias: bool = True,
    ):
        self.num_registers = num_registers
        self.num_prefix_tokens = 1 + num_registers
        self.patch_embed = PatchEmbed(patch_size, embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                      matmul_dtype=matmul_dtype)
        init = nnx.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, embed_dim), param_dtype))
        if num_registers:
            self.reg_token = nnx.Param(init(rngs.params(), (1, num_registers, embed_dim), param_dtype))
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
                    key_bias=key_bias,
                )
                for _ in range(depth)
            ]
        )
        self.norm = layer_norm(embed_dim, eps, dtype, param_dtype, rngs)

    def patch_tokens(self, x: jax.Array) -> jax.Array:
        """Normalised NHWC image -> patch tokens (B, gh*gw, D), row-major."""
        h, w = x.shape[1:3]
        p = self.patch_embed.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        return self.patch_embed(x)

    def with_prefix(self, tokens: jax.Array) -> jax.Array:
        """Patch tokens -> `[cls | registers | patches]`."""
        prefix = [self.cls_token[...]]
        if self.num_registers:
            prefix.append(self.reg_token[...])
        prefix = jnp.concatenate(prefix, axis=1).astype(tokens.dtype)
        b = tokens.shape[0]
        return jnp.concatenate([jnp.broadcast_to(prefix, (b,) + prefix.shape[1:]), tokens], axis=1)


class DinoV2(_ViT):
    """DINOv2 encoder: learned position embedding stored for a fixed patch grid, added to the patch tokens."""

    def __init__(self, *, grid_size: tuple[int, int], embed_dim: int, param_dtype, rngs: nnx.Rngs, **kwargs):
        super().__init__(embed_dim=embed_dim, param_dtype=param_dtype, rngs=rngs, **kwargs)
        self.grid_size = tuple(grid_size)
        init = nnx.initializers.truncated_normal(0.02)
        self.pos_embed = nnx.Param(init(rngs.params(), (1, grid_size[0] * grid_size[1], embed_dim), param_dtype))

    def embed(self, x: jax.Array) -> jax.Array:
        """Normalised NHWC image -> tokens `[cls | registers | patches]` with positions on the patches only."""
        tokens = self.patch_tokens(x)
        p = self.patch_embed.patch_size
        pos = resample_pos_embed(self.pos_embed[...], self.grid_size, (x.shape[1] // p, x.shape[2] // p))
        return self.with_prefix(tokens + pos.astype(tokens.dtype))

    def rope(self, grid: tuple[int, int], scale: jax.Array | float = 1.0) -> None:
        """DINOv2 has no rotary positions."""
        return None


class DinoV3(_ViT):
    """DINOv3 encoder: no position parameter; 2-D axial RoPE on the patch tokens' queries and keys in every block
    (`rope_tables`), no key bias. Any input whose sides are multiples of the patch size."""

    def __init__(self, *, num_heads: int, embed_dim: int, rope_theta: float, **kwargs):
        super().__init__(num_heads=num_heads, embed_dim=embed_dim, key_bias=False, **kwargs)
        self.head_dim = embed_dim // num_heads
        self.rope_theta = rope_theta

    def embed(self, x: jax.Array) -> jax.Array:
        """Normalised NHWC image -> tokens `[cls | registers | patches]` (positions enter through `rope`)."""
        return self.with_prefix(self.patch_tokens(x))

    def rope(self, grid: tuple[int, int], scale: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
        """(cos, sin) of the patch grid, shared by every block of one forward call."""
        return rope_tables(grid, self.head_dim, self.rope_theta, scale)


def rope_tables(grid: tuple[int, int], head_dim: int, theta: float,
                scale: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
    """DINOv3's 2-D axial rotary tables: (cos, sin), each float32 (gh*gw, head_dim), tokens row-major.

    Patch centres are normalised per axis to (-1, 1) (`2 (i + 0.5) / gh - 1`, likewise for columns) and multiplied
    by `scale` (the training-time rescale; 1 otherwise). With F = head_dim / 4 frequencies `theta^(-4f/head_dim)`,
    the angles `2 pi [y * freqs | x * freqs]` are tiled twice: the layout `[y | x | y | x]` pairs channel d with
    d + head_dim/2 (`apply_rope`).
    """
    gh, gw = grid
    freqs = 1.0 / theta ** (jnp.arange(0, 1, 4 / head_dim, dtype=jnp.float32))
    y = (jnp.arange(gh, dtype=jnp.float32) + 0.5) * (2.0 / gh) - 1.0
    x = (jnp.arange(gw, dtype=jnp.float32) + 0.5) * (2.0 / gw) - 1.0
    coords = jnp.stack(jnp.meshgrid(y, x, indexing="ij"), axis=-1).reshape(gh * gw, 2)
    coords = coords * jnp.asarray(scale, jnp.float32)
    angles = 2 * jnp.pi * (coords[:, :, None] * freqs).reshape(gh * gw, -1)  # [y freqs | x freqs]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate the last gh*gw tokens of x (B, N, heads, head_dim); the tokens before them (queries, cls,
    registers) stay as they are. Rotation in float32: x*cos + rotate_half(x)*sin, with
    rotate_half(x) = [-x2 | x1] for the halves x1, x2 of the head dim."""
    cos, sin = rope
    t = cos.shape[0]
    prefix, patches = x[:, :-t], x[:, -t:].astype(jnp.float32)
    x1, x2 = jnp.split(patches, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    patches = patches * cos[:, None] + rotated * sin[:, None]
    return jnp.concatenate([prefix, patches.astype(x.dtype)], axis=1)


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
        key_bias: bool = True,
    ):
        self.norm1 = layer_norm(dim, eps, dtype, param_dtype, rngs)
        self.attn = Attention(dim, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs, impl=attention,
                              matmul_dtype=matmul_dtype, key_bias=key_bias)
        self.ls1 = LayerScale(dim, layerscale_init, param_dtype=param_dtype)
        self.norm2 = layer_norm(dim, eps, dtype, param_dtype, rngs)
        mlp_cls: Callable[..., nnx.Module] = {"gelu": Mlp, "swiglu": SwiGLUPacked}[mlp_type]
        self.mlp = mlp_cls(dim, mlp_hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul_dtype=matmul_dtype)
        self.ls2 = LayerScale(dim, layerscale_init, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        x = x + self.ls1(self.attn(self.norm1(x), mask, rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (rows ordered q | k | v, each head-major).

    `key_bias=False` (DINOv3): the k third of the qkv bias is multiplied by a constant 0, so it never acts and never
    receives a gradient (with rotary positions a key bias would not cancel in the softmax). `rope`: (cos, sin)
    tables that rotate q and k of the last gh*gw tokens (`apply_rope`).
    """

    def __init__(self, dim: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs, impl: str = "plain",
                 matmul_dtype: str | None = None, key_bias: bool = True):
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.impl = impl
        self.matmul_dtype = matmul_dtype
        self.key_bias = key_bias
        self.qkv = dense(dim, 3 * dim, dtype, param_dtype, rngs, matmul_dtype=matmul_dtype)
        self.proj = dense(dim, dim, dtype, param_dtype, rngs, matmul_dtype=matmul_dtype)

    def project_qkv(self, x: jax.Array) -> jax.Array:
        if self.key_bias:
            return self.qkv(x)
        linear = self.qkv
        dtype = linear.dtype or x.dtype
        d = x.shape[-1]
        y = linear.dot_general(x.astype(dtype), linear.kernel[...].astype(dtype), (((x.ndim - 1,), (0,)), ((), ())))
        bias_mask = jnp.concatenate([jnp.ones((d,)), jnp.zeros((d,)), jnp.ones((d,))])
        return y + (linear.bias[...] * bias_mask.astype(linear.bias.dtype)).astype(y.dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        b, n, d = x.shape
        qkv = self.project_qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
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
