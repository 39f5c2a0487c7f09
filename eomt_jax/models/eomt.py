"""EoMT: learned queries prepended to the last K blocks of a DINOv2 or DINOv3 ViT, with a class and a mask head.

Call contract (everything downstream relies on it):

    mask_logits, class_logits = model(images)            # images: float32 (B, H, W, 3) in [0, 1]

Both results are lists over prediction points, the final prediction last: K + 1 entries when masked attention is
enabled (one prediction at the input of each of the last K blocks, plus the final one), otherwise 1. Mask logits
are (B, Q, H/4, W/4) for patch 16 (the patch grid upsampled `num_upscale` times by 2), class logits (B, Q, C + 1)
with index C meaning "no object".

The modules here are the plain network; the CPU inference fast paths (attention in row chunks, banded upscaling,
bf16 products with float32 accumulation) are in `kernels`, which the network calls at a few points.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from eomt_jax.models import kernels
from eomt_jax.models.layers import gelu
from eomt_jax.models.vit import DinoV2, DinoV3, layer_norm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Precision policies: the compute dtype of the activations and of the matrix products' operands.
#   float32         everything in float32
#   bfloat16        everything in bfloat16 (residual stream, norms' outputs, products), softmax in float32
#   mixed_bfloat16  as PyTorch's autocast computes (the original trains and validates under fp16 autocast): the
#                   residual stream, LayerNorms, LayerScale, position embedding, softmax and the heads' outputs in
#                   float32; the matrix products (qkv, proj, MLP, patch embedding, transposed convolution, mask
#                   product, attention's two products) on bfloat16 operands with float32 accumulation.
PRECISIONS = {
    "float32": dict(dtype="float32", matmul_dtype=None),
    "bfloat16": dict(dtype="bfloat16", matmul_dtype=None),
    "mixed_bfloat16": dict(dtype="float32", matmul_dtype="bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class EoMTConfig:
    """Architecture hyper-parameters; everything needed to rebuild the network from a checkpoint."""

    # Backbone family: "dinov2" (learned position embedding on a fixed grid, key bias) or "dinov3" (2-D axial
    # RoPE on the patch tokens, no position parameter, no key bias).
    backbone: str = "dinov2"
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    patch_size: int = 16
    image_size: tuple[int, int] = (640, 640)  # the grid the position embedding is stored for
    num_registers: int = 4
    mlp_type: str = "gelu"  # "gelu" | "swiglu" (packed, giant)
    mlp_hidden: int = 4096  # fc1 output width
    num_queries: int = 200
    num_classes: int = 133
    num_blocks: int = 4  # K: blocks that see the queries
    layer_norm_eps: float = 1e-6  # the backbone's LayerNorms (DINOv3: 1e-5); the upscaling blocks always use 1e-6
    layerscale_init: float = 1e-5
    # DINOv3 RoPE: base period of the frequencies, and the training-time augmentation that multiplies the patch
    # coordinates by one log-uniform factor in [1/rope_rescale, rope_rescale] per step (1.0: none).
    rope_theta: float = 100.0
    rope_rescale: float = 2.0
    masked_attn_enabled: bool = True
    dtype: str = "float32"  # activation / compute dtype
    param_dtype: str = "float32"
    attention: str = "plain"  # "plain" (einsum + softmax) | "fused" (jax.nn.dot_product_attention)
    # Mixed precision: operands of the matrix products rounded to this dtype (float32 accumulation and results),
    # the rest computed in `dtype`. None: the products take `dtype` operands. See `PRECISIONS`.
    matmul_dtype: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "image_size", _pair(self.image_size))
        if self.matmul_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"matmul_dtype must be None, 'bfloat16' or 'float16', got {self.matmul_dtype!r}")
        if self.backbone not in ("dinov2", "dinov3"):
            raise ValueError(f"backbone must be 'dinov2' or 'dinov3', got {self.backbone!r}")
        if self.backbone == "dinov3" and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"a DINOv3 backbone needs a head dim divisible by 4 (RoPE), got "
                             f"{self.embed_dim}/{self.num_heads}")
        if not self.rope_rescale >= 1.0:
            raise ValueError(f"rope_rescale must be >= 1 (1 = no training-time rescale), got {self.rope_rescale}")
        if self.attention not in ("plain", "fused"):
            raise ValueError(f"attention must be 'plain' or 'fused', got {self.attention!r}")
        if self.mlp_type not in ("gelu", "swiglu"):
            raise ValueError(f"mlp_type must be 'gelu' or 'swiglu', got {self.mlp_type!r}")
        if not 1 <= self.num_blocks <= self.depth:
            raise ValueError(f"num_blocks (K) must be in [1, depth={self.depth}], got {self.num_blocks}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for s in self.image_size:
            if s % self.patch_size:
                raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_upscale(self) -> int:
        return max(1, int(math.floor(math.log2(self.patch_size))) - 2)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_registers

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EoMTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown EoMT model config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def replace(self, **kw) -> "EoMTConfig":
        return dataclasses.replace(self, **kw)

    @property
    def precision(self) -> str:
        """The precision policy (`PRECISIONS`) of `dtype` and `matmul_dtype`."""
        if self.matmul_dtype is not None:
            return f"mixed_{self.matmul_dtype}"
        return str(self.dtype)

    def with_precision(self, precision: str) -> "EoMTConfig":
        """This config computing under a `PRECISIONS` policy (the parameters keep their dtype)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        return self.replace(**PRECISIONS[precision])


def _pair(x) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    x = tuple(int(v) for v in x)
    if len(x) != 2:
        raise ValueError(f"expected an int or a pair (height, width), got {x}")
    return x


# size: (embed_dim, depth, mlp_type, mlp_hidden = fc1 output width, num_blocks K)
SIZES = {
    "dinov2": {
        "S": (384, 12, "gelu", 1536, 3),
        "B": (768, 12, "gelu", 3072, 3),
        "L": (1024, 24, "gelu", 4096, 4),
        # DINOv2-g: packed SwiGLU, fc1 1536 -> 8192 (gate | value), fc2 4096 -> 1536.
        "g": (1536, 40, "swiglu", 8192, 5),
    },
    # DINOv3 (facebookresearch/dinov3 hub/backbones.py). The EoMT zoo uses S, B and L; the "+" sizes have SwiGLU
    # MLPs of hidden width int(int(D * 6) * 2 / 3) rounded up to a multiple of 8, packed gate | value into fc1, and
    # K chosen here as for DINOv2 models of the same depth.
    "dinov3": {
        "S": (384, 12, "gelu", 1536, 3),
        "S+": (384, 12, "swiglu", 2 * 1536, 3),
        "B": (768, 12, "gelu", 3072, 3),
        "L": (1024, 24, "gelu", 4096, 4),
        "L+": (1024, 24, "swiglu", 2 * 4096, 4),
        "H+": (1280, 32, "swiglu", 2 * 5120, 4),
    },
}
_LAYER_NORM_EPS = {"dinov2": 1e-6, "dinov3": 1e-5}


def preset(size: str, *, num_classes: int, num_queries: int, image_size, backbone: str = "dinov2",
           **overrides) -> EoMTConfig:
    """The model-zoo architectures (patch 16, 4 registers, 64-wide heads): DINOv2 S, B, L, g; DINOv3 S, S+, B, L,
    L+, H+."""
    if backbone not in SIZES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(SIZES)}")
    if size not in SIZES[backbone]:
        raise ValueError(f"unknown EoMT size {size!r} for the {backbone} backbone; expected one of "
                         f"{sorted(SIZES[backbone])}")
    dim, depth, mlp_type, hidden, k = SIZES[backbone][size]
    kw = dict(
        backbone=backbone,
        layer_norm_eps=_LAYER_NORM_EPS[backbone],
        embed_dim=dim,
        depth=depth,
        num_heads=dim // 64,
        patch_size=16,
        image_size=image_size,
        num_registers=4,
        mlp_type=mlp_type,
        mlp_hidden=hidden,
        num_queries=num_queries,
        num_classes=num_classes,
        num_blocks=k,
    )
    kw.update(overrides)
    return EoMTConfig(**kw)


class EoMT(nnx.Module):
    """The network: a DINOv2 or DINOv3 `backbone` whose last K blocks also see the learned queries `q`; `predict`
    reads class logits off the queries (`class_head`) and mask logits off the queries (`mask_head`) and the
    `upscale`d patch features."""

    def __init__(self, config: EoMTConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        if c.backbone == "dinov2":
            positions = dict(grid_size=c.grid_size)
        else:
            positions = dict(rope_theta=c.rope_theta)
        self.backbone = {"dinov2": DinoV2, "dinov3": DinoV3}[c.backbone](
            **positions,
            embed_dim=c.embed_dim,
            depth=c.depth,
            num_heads=c.num_heads,
            patch_size=c.patch_size,
            num_registers=c.num_registers,
            mlp_type=c.mlp_type,
            mlp_hidden=c.mlp_hidden,
            eps=c.layer_norm_eps,
            layerscale_init=c.layerscale_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            attention=c.attention,
            matmul_dtype=c.matmul_dtype,
        )
        self.q = nnx.Embed(
            c.num_queries,
            c.embed_dim,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(1.0),
            rngs=rngs,
        )
        self.class_head = _torch_default_linear(c.embed_dim, c.num_classes + 1, dtype, param_dtype, rngs,
                                                c.matmul_dtype)
        self.mask_head = MaskHead(c.embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                  matmul_dtype=c.matmul_dtype)
        # LayerNorm2d of the upscale blocks uses eps 1e-6 whatever the backbone's eps.
        self.upscale = nnx.List(
            [
                ScaleBlock(c.embed_dim, 1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                           matmul_dtype=c.matmul_dtype)
                for _ in range(c.num_upscale)
            ]
        )
        self.attn_mask_probs = Buffer(jnp.ones((c.num_blocks,), jnp.float32))

    # -- prediction head -------------------------------------------------------------------------------------------

    def predict(self, x: jax.Array, grid: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        """Heads on a token stream `[queries | cls | registers | patches]` (final LayerNorm applied to a copy)."""
        c = self.config
        x = self.backbone.norm(x)
        q = x[:, : c.num_queries]
        class_logits = self.class_head(q)
        patches = x[:, c.num_queries + c.num_prefix_tokens :]
        b, _, d = patches.shape
        gh, gw = grid
        feat = patches.reshape(b, gh, gw, d)
        for block in self.upscale:
            feat = block(feat)
        return kernels.mask_logits(self.mask_head(q), feat, c.matmul_dtype), class_logits

    def attention_mask(
        self,
        mask_logits: jax.Array,
        keep_prob: jax.Array,
        key: jax.Array,
        num_tokens: int,
        grid: tuple[int, int],
        image_index: jax.Array | None = None,
    ) -> jax.Array:
        """Boolean (B, N, N) mask, True = may attend; only query rows x patch columns are ever masked.

        Mask logits are bilinearly downsampled (no antialiasing, half-pixel centres) to the patch grid and
        thresholded at > 0. Each (image, query) keeps its mask with probability `keep_prob`, otherwise the query
        attends to every patch; `u < p` makes p = 1 always mask and p = 0 never mask. Image b draws from
        `fold_in(key, image_index[b])` (default index: b).
        """
        c = self.config
        b, nq = mask_logits.shape[:2]
        gh, gw = grid
        small = jax.image.resize(
            mask_logits.astype(jnp.float32), (b, nq, gh, gw), method="bilinear", antialias=False
        )
        allowed = (small > 0).reshape(b, nq, gh * gw)
        image_index = jnp.arange(b) if image_index is None else image_index
        u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (nq,)))(image_index)
        keep = u < keep_prob
        allowed = allowed | ~keep[:, :, None]
        rest = num_tokens - nq
        return jnp.pad(
            allowed,
            ((0, 0), (0, rest), (c.num_prefix_tokens + nq, 0)),
            constant_values=True,
        )

    # -- forward ---------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images: jax.Array,
        attn_mask_probs: jax.Array | None = None,
        *,
        key: jax.Array | None = None,
        masked_attn: bool | None = None,
        image_index: jax.Array | None = None,
        remat: str = "none",
        rope_scale: jax.Array | float = 1.0,
    ) -> tuple[list[jax.Array], list[jax.Array]]:
        """Run the network.

        Args:
          images: float (B, H, W, 3) RGB in [0, 1]; normalised with the ImageNet statistics here.
          attn_mask_probs: (K,) per-block probability of keeping the attention mask; a traced array so that
            annealing it during training never recompiles. Defaults to the stored buffer.
          key: PRNG key for the per-(image, query) random disabling of masks; a fixed key is used when omitted
            (only matters when a probability is strictly between 0 and 1).
          masked_attn: overrides `config.masked_attn_enabled` (static).
          image_index: (B,) int, each image's position in the global batch: its random draws derive from it, so
            an image is masked alike in the whole batch and in a microbatch of it (default arange(B)).
          remat: a `REMAT_POLICIES` name (static); the parameters and their paths are the same for every policy.
          rope_scale: DINOv3 only: factor on the patch coordinates of the rotary positions (the training-time
            augmentation draws it, see `draw_rope_scale`; 1 otherwise); may be traced.
        """
        c = self.config
        masked = c.masked_attn_enabled if masked_attn is None else masked_attn
        check_remat(remat)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
        dtype = jnp.dtype(c.dtype)
        mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
        std = jnp.asarray(IMAGENET_STD, jnp.float32)
        x = ((images.astype(jnp.float32) - mean) / std).astype(dtype)
        p = c.patch_size
        grid = (images.shape[1] // p, images.shape[2] // p)

        if masked:
            probs = self.attn_mask_probs[...] if attn_mask_probs is None else attn_mask_probs
            probs = jnp.asarray(probs, jnp.float32)
            if probs.shape != (c.num_blocks,):
                raise ValueError(f"attn_mask_probs must have shape ({c.num_blocks},), got {probs.shape}")
            keys = jax.random.split(jax.random.key(0) if key is None else key, c.num_blocks)

        x = self.backbone.embed(x)
        rope = self.backbone.rope(grid, rope_scale)
        b = x.shape[0]
        first = c.depth - c.num_blocks
        mask_out, class_out = [], []
        for i, block in enumerate(self.backbone.blocks):
            mask = None
            if i == first:
                queries = jnp.broadcast_to(self.q.embedding[...].astype(x.dtype), (b, c.num_queries, c.embed_dim))
                x = jnp.concatenate([queries, x], axis=1)
            if masked and i >= first:
                mask_logits, class_logits = self.predict(x, grid)
                mask_out.append(mask_logits)
                class_out.append(class_logits)
                j = i - first
                mask = self.attention_mask(mask_logits, probs[j], keys[j], x.shape[1], grid, image_index)
            x = _run_block(block, x, mask, rope, remat)
        mask_logits, class_logits = self.predict(x, grid)
        mask_out.append(mask_logits)
        class_out.append(class_logits)
        return mask_out, class_out


class Buffer(nnx.Variable):
    """Non-trainable state that is saved with the model (the per-block masked-attention probabilities)."""


class MaskHead(nnx.Module):
    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, matmul_dtype: str | None = None):
        self.fc1 = _torch_default_linear(dim, dim, dtype, param_dtype, rngs, matmul_dtype)
        self.fc2 = _torch_default_linear(dim, dim, dtype, param_dtype, rngs, matmul_dtype)
        self.fc3 = _torch_default_linear(dim, dim, dtype, param_dtype, rngs, matmul_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc3(gelu(self.fc2(gelu(self.fc1(x)))))


def _torch_default_linear(d_in, d_out, dtype, param_dtype, rngs, matmul_dtype=None) -> nnx.Linear:
    # New heads are initialised like a fresh torch.nn.Linear (uniform +-1/sqrt(fan_in)), as in the original training.
    bound = 1.0 / math.sqrt(d_in)
    uniform = lambda key, shape, dt=param_dtype: jax.random.uniform(key, shape, dt, -bound, bound)  # noqa: E731
    return nnx.Linear(
        d_in, d_out, dtype=dtype, param_dtype=param_dtype, kernel_init=uniform, bias_init=uniform,
        dot_general=kernels.matmul(matmul_dtype), rngs=rngs,
    )


class ScaleBlock(nnx.Module):
    """2x upsampling of the patch features: ConvTranspose 2x2/2 -> exact GELU -> depthwise 3x3 (no bias) -> LN."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs, matmul_dtype: str | None = None):
        self.dtype = dtype
        self.conv1 = ConvTranspose2x2(dim, param_dtype=param_dtype, rngs=rngs, matmul_dtype=matmul_dtype)
        self.conv2 = DepthwiseConv3x3(dim, param_dtype=param_dtype, rngs=rngs)
        self.norm = layer_norm(dim, eps, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        graphdef, state = nnx.split((self.conv2, self.norm))
        return kernels.gelu_conv_norm(graphdef)(self.conv1(x), state)


class ConvTranspose2x2(nnx.Module):
    """ConvTranspose with kernel 2 and stride 2; kernel laid out (kh, kw, in, out).

    Kernel = stride makes the output 2x2 blocks disjoint, so it is a per-pixel matmul followed by a pixel shuffle.
    """

    def __init__(self, dim: int, *, param_dtype, rngs: nnx.Rngs, matmul_dtype: str | None = None):
        bound = 1.0 / math.sqrt(dim * 4)
        self.matmul = kernels.matmul(matmul_dtype)
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (2, 2, dim, dim), param_dtype, -bound, bound))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (dim,), param_dtype, -bound, bound))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, d = x.shape
        kernel = self.kernel[...].astype(x.dtype)  # (a, c, in, out)
        y = self.matmul(
            x.reshape(-1, d), kernel.transpose(2, 0, 1, 3).reshape(d, -1), (((1,), (0,)), ((), ()))
        )
        # y: (b*h*w, a*c*out)
        y = y.reshape(b, h, w, 2, 2, -1).transpose(0, 1, 3, 2, 4, 5)  # pixel shuffle
        return y.reshape(b, 2 * h, 2 * w, -1) + self.bias[...].astype(x.dtype)


class DepthwiseConv3x3(nnx.Module):
    """3x3 depthwise convolution, stride 1, zero padding 1, no bias; kernel (3, 3, 1, C) as Flax's grouped Conv.

    Written as nine shifted multiply-adds: XLA's grouped convolution (and its gradient) is several times slower on
    CPUs, and the shifted form is as fast as a fused elementwise kernel elsewhere.
    """

    def __init__(self, dim: int, *, param_dtype, rngs: nnx.Rngs):
        bound = 1.0 / 3.0  # torch's default for a depthwise 3x3 (fan_in 9)
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (3, 3, 1, dim), param_dtype, -bound, bound))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.on_padded(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))

    def on_padded(self, padded: jax.Array) -> jax.Array:
        """The convolution of an input zero-padded by one pixel on each side: (B, H+2, W+2, C) -> (B, H, W, C)."""
        h, w = padded.shape[1] - 2, padded.shape[2] - 2
        kernel = self.kernel[...].astype(padded.dtype)
        out = jnp.zeros(padded.shape[:1] + (h, w) + padded.shape[3:], padded.dtype)
        for i in range(3):
            for j in range(3):
                out = out + padded[:, i : i + h, j : j + w, :] * kernel[i, j, 0]
        return out


# Rematerialisation of each transformer block (`config.remat`): what a block keeps for the backward pass; the rest
# is recomputed from the block's input. "block" keeps nothing; "block_save_dots" keeps the outputs of the
# matmuls without batch dimensions (qkv, attention projection, MLP), recomputing attention scores, softmax,
# norms and GELU.
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "block_save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(name: str) -> None:
    if name not in REMAT_POLICIES:
        raise ValueError(f"config.remat must be one of {sorted(REMAT_POLICIES)}, got {name!r}")


def _run_block(block: nnx.Module, x: jax.Array, mask: jax.Array | None, rope, remat: str) -> jax.Array:
    policy = REMAT_POLICIES[remat]
    if policy is None:
        return block(x, mask, rope)
    # A pure function of the block's state: the checkpoint wraps the computation, not the module, so the
    # parameter tree (and every checkpoint key) is the same with and without remat.
    graphdef, state = nnx.split(block)
    run = jax.checkpoint(lambda state, x, mask, rope: nnx.merge(graphdef, state)(x, mask, rope), policy=policy)
    return run(state, x, mask, rope)


def draw_rope_scale(config: EoMTConfig, key: jax.Array) -> jax.Array:
    """DINOv3's training-time position augmentation: one factor, log-uniform in [1/r, r] for r =
    `config.rope_rescale`, for the whole batch and every block; 1 for DINOv2 or r = 1.

    The original's backbone draws one factor per forward call in training mode, so each of its GPUs draws its own
    for its share of the batch; the train step draws one per optimizer step for the global batch.
    """
    if config.backbone != "dinov3" or config.rope_rescale == 1.0:
        return jnp.ones((), jnp.float32)
    log_r = math.log(config.rope_rescale)
    return jnp.exp(jax.random.uniform(key, (), jnp.float32, -log_r, log_r))


def init_model(config: EoMTConfig, seed: int = 0) -> EoMT:
    return EoMT(config, rngs=nnx.Rngs(seed))
