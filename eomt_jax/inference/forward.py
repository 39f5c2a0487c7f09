"""The network as a `forward_fn` for the inference pipeline: jitted once, fed fixed-size batches.

    forward = make_forward(model, batch_size=8, masked_attn=False)
    mask_logits, class_logits = forward(images)     # images: float32 (N, S, S, 3) in [0, 1], any N
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def make_forward(model: nnx.Module, batch_size: int, masked_attn: bool):
    """A forward_fn for the `eomt_jax.inference.pipeline` functions: jitted, padding every call to `batch_size`
    images (one compilation) and cutting the padding off the outputs."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images):
        return nnx.merge(graphdef, state)(images, masked_attn=masked_attn)

    def forward(images: np.ndarray):
        n = images.shape[0]
        outs = ([], [])
        for start in range(0, n, batch_size):
            chunk = images[start : start + batch_size]
            pad = batch_size - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            masks, classes = run(state, jnp.asarray(chunk))
            outs[0].append([m[: batch_size - pad] for m in masks])
            outs[1].append([c[: batch_size - pad] for c in classes])
        merge = lambda parts: [jnp.concatenate(p, axis=0) for p in zip(*parts)]  # noqa: E731
        return merge(outs[0]), merge(outs[1])

    return forward
