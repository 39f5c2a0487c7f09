"""Masked-attention annealing: the per-block probability of applying the query-to-patch attention mask.

Training starts with masked attention in each of the last K blocks and phases it out block by block, earliest block
first, so that the trained network needs no masks. The probabilities are a pure function of the step counter and
the config's start/end steps, evaluated inside the jitted train step (one compilation for the whole run).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_schedule(starts: Sequence[int], ends: Sequence[int]) -> None:
    """Raise ValueError unless starts/ends are equally long sequences of ints with 0 <= start < end."""
    starts, ends = tuple(starts), tuple(ends)
    if len(starts) != len(ends) or not starts:
        raise ValueError(f"annealing starts {starts} and ends {ends} must be non-empty, one of each per block")
    for j, (s, e) in enumerate(zip(starts, ends)):
        if int(s) != s or int(e) != e or not 0 <= s < e:
            raise ValueError(f"annealing of block {j}: need integers 0 <= start < end, got start {s}, end {e}")


def attn_mask_probs(step, starts: Sequence[int], ends: Sequence[int], power: float = 0.9) -> jax.Array:
    """(K,) float32 probabilities of masking in each of the K masked blocks at `step`.

    For block j: 1 while step < starts[j], (1 - (step - starts[j]) / (ends[j] - starts[j])) ** power in between,
    0 from ends[j] on.

    Which step: pass the number of optimizer updates applied *before* the batch (the train state's step, 0 for
    the first batch). Upstream recomputes the probabilities after each batch from the post-update global step and
    uses them for the next batch, so batch n runs with the value at n -- the same thing; its first batch runs with
    the initial ones, which is also the value at 0 because every start is >= 0 and every end > start. The value
    upstream stores in a checkpoint taken after n updates is `attn_mask_probs(n, ...)`.

    `step` may be a traced integer; `starts`, `ends` and `power` are static config values.
    """
    check_schedule(starts, ends)
    s = jnp.asarray(step, jnp.float32)
    start = jnp.asarray(np.asarray(starts, np.float32))
    end = jnp.asarray(np.asarray(ends, np.float32))
    # Explicit branches rather than a clipped ratio: the ends must be exactly 1 and 0, and XLA may evaluate the
    # ratio with a rounded reciprocal.
    poly = jnp.clip((end - s) / (end - start), 0.0, 1.0) ** power
    return jnp.where(s < start, 1.0, jnp.where(s >= end, 0.0, poly)).astype(jnp.float32)
