"""Masked-attention annealing: the per-block probability of applying the query-to-patch attention mask.

Training starts with masked attention in each of the last K blocks and phases it out block by block, earliest block
first, so that the trained network needs no masks. The probabilities are a pure function of the step counter and
the config's start/end steps, evaluated inside the jitted train step (one compilation for the whole run).

A config gives the start and end steps directly (`config.anneal.starts/ends`) or as fractions of the run's length
(`config.schedule.anneal_starts/anneal_ends`, turned into steps by `steps_from_fractions`); `original_fractions`
is the shape of the original's schedules, the default of `configs/custom.py`. Annealing must end before the last
step (`unfinished_blocks`), else the trained network is evaluated without the masks it was trained with.
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


def original_fractions(num_blocks: int, first_block_end: float | None = None) -> tuple[tuple[float, ...],
                                                                                       tuple[float, ...]]:
    """(starts, ends) as fractions of the run: the shape of the original's schedules for K = `num_blocks`.

    Every DINOv2 config of the original (`configs/dinov2/{coco,ade20k,cityscapes}/*/*.yaml`) anneals block j over
    one sixth of the run, the starts spread evenly from 1/6 to 2/3: EoMT-L (K=4) 1/6-2/6, 2/6-3/6, 3/6-4/6,
    4/6-5/6; S and B (K=3) 2/12-4/12, 5/12-7/12, 8/12-10/12; g (K=5) starts 1.5/12 apart. This is exact for the
    COCO panoptic configs (multiples of 7,391 steps, one epoch, over 12 or 24 epochs) and within 0.2 % for ADE20K
    and Cityscapes. A single block (K=1) anneals over 1/6-2/6. The DINOv3 panoptic and semantic configs anneal
    block 0 from the first step to step 3000 instead: `first_block_end` is that end as a fraction (3000 / their
    length); their other blocks follow the DINOv2 shape (exactly for COCO).
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    spread = [j / (num_blocks - 1) if num_blocks > 1 else 0.0 for j in range(num_blocks)]
    starts = [1 / 6 + x / 2 for x in spread]
    ends = [x + 1 / 6 for x in starts]
    if first_block_end is not None:
        starts[0], ends[0] = 0.0, float(first_block_end)
    return tuple(starts), tuple(ends)


def to_step(fraction: float, total_steps: int) -> int:
    """round(fraction * total_steps), halves up."""
    return int(fraction * total_steps + 0.5)


def steps_from_fractions(starts: Sequence[float], ends: Sequence[float], total_steps: int) -> tuple[tuple[int, ...],
                                                                                                  tuple[int, ...]]:
    """Start and end steps of fractions of a `total_steps` run; an end is at least one step after its start, so
    that a short run keeps every phase."""
    s = tuple(to_step(f, total_steps) for f in starts)
    e = tuple(max(to_step(f, total_steps), a + 1) for f, a in zip(ends, s))
    return s, e


def unfinished_blocks(ends: Sequence[int], total_steps: int) -> list[int]:
    """The blocks still masked with a probability above 0 at the last step (step total_steps - 1): the blocks whose
    end is later than that step."""
    return [j for j, e in enumerate(ends) if e > total_steps - 1]
