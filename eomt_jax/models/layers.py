"""Elementwise layers shared by the network (`vit`, `eomt`) and its CPU kernels (`kernels`); imports nothing of the
package, so that every model module can use them without an import cycle."""

from __future__ import annotations

import jax
import jax.numpy as jnp


# torch.nn.GELU / HF "gelu" is the exact erf form; jax.nn.gelu defaults to the tanh approximation.
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, 0.5 x (1 + erf(x / sqrt 2)), as PyTorch computes it.

    `jax.nn.gelu(approximate=False)` goes through erfc, which XLA:CPU evaluates much more slowly than erf; the two
    differ by float32 rounding only (< 1e-6 absolute).
    """
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype)))
