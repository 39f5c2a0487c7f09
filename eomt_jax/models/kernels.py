"""CPU inference fast paths of the network, and its choice of attention implementation.

The network modules (`vit`, `eomt`) call into this module through a few functions:

- `attention(q, k, v, mask, impl)`: scaled dot-product attention, impl "plain" (einsum + softmax with float32
  scores) or "fused" (`jax.nn.dot_product_attention`: cuDNN's fused kernel on GPUs where the shapes allow, XLA
  elsewhere);
- `dot_general`: the matrix product of the dense layers (passed to `nnx.Linear`), the patch embedding and the
  transposed convolutions;
- `gelu_conv_norm(graphdef)`: GELU -> depthwise 3x3 convolution -> LayerNorm of an upscaling block;
- `mask_product(queries, feat)`: the mask logits of query embeddings and a feature map;
- `matmul(matmul_dtype)`, `mask_logits(..., matmul_dtype)`: the same products under mixed precision (operands
  rounded to `matmul_dtype`, float32 accumulation and results), the policy of PyTorch's autocast.

Each is defined by a whole-array reference program, the network as written. Some also have a faster CPU form of
the same arithmetic: loops over chunks of rows that keep their working set in cache, and bf16 products handed to
XLA:CPU with float32 accumulation. `cpu_inference_path` runs the fast form only on CPUs and only when the function
is not differentiated: it is a `jax.custom_vjp` whose primal is a `jax.lax.platform_dependent` choice between the
two forms, and whose forward and backward passes under differentiation are the reference's. Gradients, and every
accelerator, therefore always see the whole-array reference program, so training, remat and `--mode=compile`'s
memory report see the same program on CPUs as elsewhere. The fast forms differ from the reference by float rounding
only (summation order, matmul blocking).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from eomt_jax.models.layers import gelu


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


# -- matrix products ----------------------------------------------------------------------------------------------


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


@functools.lru_cache(maxsize=None)
def matmul(matmul_dtype: str | None = None) -> Callable:
    """The `dot_general` of the dense layers, the patch embedding and the transposed convolutions under a precision
    policy: `dot_general` when the operands stay in the activation dtype (`matmul_dtype` None); otherwise (mixed
    precision, as PyTorch's autocast computes) both operands rounded to `matmul_dtype`, the products accumulated
    and returned in float32. One function per dtype, so that models built alike compare equal."""
    if matmul_dtype is None:
        return dot_general
    operand = jnp.dtype(matmul_dtype)

    def mixed(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
        return jax.lax.dot_general(lhs.astype(operand), rhs.astype(operand), dimension_numbers, precision,
                                   preferred_element_type=jnp.float32, **kwargs)

    return mixed


# -- attention ----------------------------------------------------------------------------------------------------


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, impl: str = "plain") -> jax.Array:
    """Scaled dot-product attention: the attended values, (B, N, heads, head_dim) like q, k and v.

    mask: bool (B, N, N), True = may attend, or None.
    impl "plain": einsum + softmax with scores and softmax in float32 whatever the activation dtype. CPU inference
    processes the queries in row chunks (`plain_attention`), the same arithmetic per row.
    impl "fused": `fused_attention`: cuDNN's flash-attention kernel on CUDA GPUs where it takes the operands,
    `jax.nn.dot_product_attention`'s XLA form elsewhere.
    """
    if impl == "fused":
        return fused_attention(q, k, v, mask)
    if impl != "plain":
        raise ValueError(f"attention implementation must be 'plain' or 'fused', got {impl!r}")
    # Heads next to batch, so that both dots are plain batched matmuls: with (B, N, H, D) operands XLA:CPU
    # transposes the whole (B, H, N, N) probability matrix before the second dot.
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    return plain_attention(q, k, v, mask).transpose(0, 2, 1, 3)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`jax.nn.dot_product_attention` on (B, N, heads, head_dim) operands, mask bool (B, N, N) or None: cuDNN's
    flash-attention kernel when the program is compiled for a CUDA GPU and cuDNN takes the operands
    (`cudnn_takes`), XLA's attention (full score matrices) otherwise.

    `implementation=None` would never pick cuDNN (jax 0.10 "defaults to XLA for now"), so cuDNN is asked for
    by name, inside a `jax.lax.platform_dependent` choice: one traced program serves a GPU, a CPU, and a GPU
    compiled for from another machine (`--target_topology=gpu:...`), each lowering its own branch. A mask becomes
    an additive bias; differentiated, odd sequence lengths are padded by one token (`even_length_attention`).
    """
    def xla(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None],
                                            implementation="xla")

    if not cudnn_takes(q, k, v):
        return xla(q, k, v, mask)
    return jax.lax.platform_dependent(q, k, v, mask, cuda=_cudnn_attention, default=xla)


# Head sizes cuDNN's flash attention takes for bf16/fp16: multiples of 8 up to 128 (jax allows 256 only on an
# attached Hopper or newer GPU; compiling for a GPU from another machine it checks the local, CPU, backend).
CUDNN_MAX_HEAD_DIM = 128


@functools.cache
def cudnn_installed() -> bool:
    """Whether cuDNN can be called from JAX here (the CUDA plugin and its cuDNN wheel are installed; a GPU need
    not be)."""
    try:
        # The check jax.nn.dot_product_attention(implementation="cudnn") makes before tracing anything.
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        check_cudnn_version()
        return True
    except Exception:  # not installed (RuntimeError), or jax moved the check: take the XLA path
        return False


def cudnn_takes(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether `fused_attention` may ask cuDNN for these operands: bf16 or fp16, one dtype, a head size cuDNN
    takes, and cuDNN installed. Everything else (float32 activations, say) takes the XLA path on GPUs too."""
    head_dim = q.shape[-1]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and q.dtype == k.dtype == v.dtype
            and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM and cudnn_installed())


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    if q.shape[1] % 2 or k.shape[1] % 2:
        return _odd_length_cudnn_attention(q, k, v, mask)
    return even_length_attention(q, k, v, mask, "cudnn")


def even_length_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` of (B, N, heads, head_dim) operands, mask bool (B, N, N) or None, computed on
    operands padded to an even N: the same attention (float rounding apart), in the form cuDNN differentiates.

    jax 0.10's cuDNN attention refuses odd sequence lengths when differentiated (it checks them whenever a bias
    could be present, and it counts "no bias" as one), and EoMT's are odd (1805 tokens at 640, 6605 at 1280). One
    padding token makes them even. Unmasked, the padding key is cut off by the key length (cuDNN's padding mask,
    no bias tensor); masked, by the bias (`padded_mask_bias`). The padding query row is dropped.
    """
    n = q.shape[1]
    if mask is None:
        if n % 2 == 0:
            return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
        lengths = jnp.full((q.shape[0],), n, jnp.int32)
        q, k, v = (_pad_tokens(a, n + 1) for a in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                           implementation=implementation)
        return out[:, :n]
    bias = padded_mask_bias(mask, q.dtype)
    q, k, v = (_pad_tokens(a, bias.shape[-1]) for a in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)[:, :n]


@jax.custom_vjp
def _odd_length_cudnn_attention(q, k, v, mask):
    # Not differentiated (inference), cuDNN takes odd lengths as they are: no padding, no bias for unmasked
    # attention. Differentiated, the forward and backward passes are those of the padded form.
    bias = None if mask is None else jnp.where(mask, 0.0, _large_negative(q.dtype)).astype(q.dtype)[:, None]
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")


def _odd_length_fwd(q, k, v, mask):
    return jax.vjp(lambda q, k, v, mask: even_length_attention(q, k, v, mask, "cudnn"), q, k, v, mask)


def _odd_length_bwd(vjp, cotangent):
    return vjp(cotangent)


_odd_length_cudnn_attention.defvjp(_odd_length_fwd, _odd_length_bwd)


def _large_negative(dtype) -> float:
    # What JAX turns a bool mask into for cuDNN: finite, so that cuDNN never subtracts two infinities.
    return -(2.0**41) if jnp.dtype(dtype) == jnp.bfloat16 else -(2.0**15)


def padded_mask_bias(mask: jax.Array, dtype) -> jax.Array:
    """The additive (B, 1, N', N') bias of a bool (B, N, N) mask, N' = N rounded up to even: 0 where a query may
    attend, a large negative number where it may not and at the padding key (whose weight is then exactly 0);
    the padding query row sees every real key."""
    n = mask.shape[-1]
    pad, neg = n % 2, _large_negative(dtype)
    bias = jnp.where(mask, 0.0, neg).astype(dtype)[:, None]
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, pad)), constant_values=neg)
    return jnp.pad(bias, ((0, 0), (0, 0), (0, pad), (0, 0)))


def _pad_tokens(a: jax.Array, n: int) -> jax.Array:
    return jnp.pad(a, ((0, 0), (0, n - a.shape[1]), (0, 0), (0, 0)))


def whole_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The reference "plain" attention on (B, H, N, D) operands; mask: bool (B, N, N) or None."""
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


# Most query rows (summed over the batch) per chunk on CPUs. A few chunks of about this size are faster than both
# the whole score matrix (out of cache) and many smaller chunks (each chunk's loop step has a fixed cost).
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


# "plain" attention on (B, H, N, D) operands, mask bool (B, N, N) or None: `whole_attention`, which CPU inference
# runs in row chunks.
plain_attention = cpu_inference_path(_chunked_attention, whole_attention)


# -- upscaling ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def gelu_conv_norm(graphdef) -> Callable:
    """(x, state of (conv2, norm)) -> norm(conv2(gelu(x))); CPU inference runs it a band of rows at a time.

    `graphdef` is that of the pair (depthwise 3x3 convolution with an `on_padded` method, LayerNorm) of an upscaling
    block; the function is built once per graphdef.

    Differentiated, only x is kept for the backward pass, which recomputes the rest (elementwise work): kept, the
    GELU's and LayerNorm's intermediates and the nine shifted copies of the depthwise convolution would be most of
    a train step's activation memory, at the 4x-upscaled resolution, for each of the K + 1 outputs.
    """

    @jax.checkpoint
    def whole(x, state):
        conv, norm = nnx.merge(graphdef, state)
        return norm(conv(gelu(x)))

    def in_bands(x, state):
        # Whole-map, XLA:CPU's library fusion of the nine shifted multiply-adds with the LayerNorm materialises every
        # shifted copy of the (B, H, W, C) map in memory first; a band's copies stay in cache. Same arithmetic, except
        # that a bfloat16 map's GELU and each band's convolution run in float32 (CPUs have no bf16 vector arithmetic:
        # XLA:CPU would convert around each of the nine products); the map stays bf16 in memory (GELU's output
        # rounded once, as the whole-map path stores it) and each band is rounded once, at the LayerNorm's output.
        conv, norm = nnx.merge(graphdef, state)
        compute = jnp.promote_types(x.dtype, jnp.float32)
        x = gelu(x.astype(compute)).astype(x.dtype)
        h = x.shape[1]
        rows = max(r for r in range(1, 17) if h % r == 0)
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))

        def band(i, out):
            window = jax.lax.dynamic_slice_in_dim(padded, i * rows, rows + 2, axis=1).astype(compute)
            y = norm(conv.on_padded(window)).astype(out.dtype)
            return jax.lax.dynamic_update_slice_in_dim(out, y, i * rows, axis=1)

        # Bands overwrite x (dead once padded): no zero-filled output buffer to write first.
        return jax.lax.fori_loop(0, h // rows, band, x.astype(norm.dtype or x.dtype))

    return cpu_inference_path(in_bands, whole)


# -- mask logits --------------------------------------------------------------------------------------------------


def _mask_product_cpu(queries: jax.Array, feat: jax.Array) -> jax.Array:
    # As one (B, Q, C) x (B, H*W, C) dot: XLA:CPU then reads the map in place instead of transposing it first.
    b, h, w, c = feat.shape
    return dot_general(queries, feat.reshape(b, h * w, c), (((2,), (2,)), ((0,), (0,)))).reshape(b, -1, h, w)


def _mask_product_einsum(queries: jax.Array, feat: jax.Array) -> jax.Array:
    # On TPUs this form needs less memory in a train step than the reshaped dot.
    return jnp.einsum("bqc,bhwc->bqhw", queries, feat)


# Mask logits (B, Q, H, W) of query embeddings (B, Q, C) and a feature map (B, H, W, C).
mask_product = cpu_inference_path(_mask_product_cpu, _mask_product_einsum)


def mask_logits(queries: jax.Array, feat: jax.Array, matmul_dtype: str | None = None) -> jax.Array:
    """`mask_product`, or under mixed precision (`matmul_dtype`) the product of operands rounded to it, accumulated
    and returned in float32."""
    if matmul_dtype is None:
        return mask_product(queries, feat)
    operand = jnp.dtype(matmul_dtype)
    return jnp.einsum("bqc,bhwc->bqhw", queries.astype(operand), feat.astype(operand),
                      preferred_element_type=jnp.float32)
