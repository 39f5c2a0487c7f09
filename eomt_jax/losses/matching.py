"""Bipartite matching of queries to targets, callable inside a jitted training step.

A matcher takes a batch of cost matrices `cost` (B, Q, M) — queries x padded target slots — and `valid` (B, M),
and returns `target_to_query` (B, M) int32: the query assigned to each target slot, or -1 where the slot is padding
(or, only if an image has more targets than queries, where a target got no query). The assignment minimises the
total cost over the valid targets of each image, exactly as `scipy.optimize.linear_sum_assignment` on the
unpadded (Q, n) matrix does, which is what the original trains with. No gradient flows through a matching.

Two implementations, same contract, chosen by name (`config.loss.matcher`) or passed as any function with the
signature of `scipy_matcher`:

* `scipy_matcher`: `linear_sum_assignment` on the host through `jax.pure_callback`.
* `optax_matcher`: `optax.assignment.hungarian_algorithm`, vmapped, fully on device (no host round-trip); a
  vmapped solve lasts as long as its slowest image.

On CPUs scipy is the faster of the two, by far when the target slots are padded (the realistic case): a vmapped
Hungarian solve does the work of the full slot count for every image.

With a `mesh`, both run under `jax.shard_map` over the batch axes: every device solves only its own examples
(each process's host callback sees only its local shards), so the global batch is never gathered anywhere.
Without a mesh the matcher is plain traced code; a host callback then receives the whole (global) batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from jax.sharding import Mesh, PartitionSpec as P

Matcher = Callable[..., jax.Array]


def clean_cost(cost: jax.Array) -> jax.Array:
    """The original's guard before solving: clamp to +-1e10 and map NaN to 0 (float32)."""
    cost = jnp.clip(cost.astype(jnp.float32), -1e10, 1e10)
    return jnp.where(jnp.isnan(cost), 0.0, cost)


def _solve_on_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(b, Q, M) costs and (b, M) validity -> (b, M) int32 query per target slot, -1 where none."""
    # The callback may receive jax.Arrays: index them as NumPy views only. Slicing a jax.Array here would
    # dispatch a computation to the device that is itself waiting for this callback, and with enough steps
    # queued ahead the run deadlocks.
    cost, valid = np.asarray(cost), np.asarray(valid)
    out = np.full(valid.shape, -1, np.int32)
    for k in range(cost.shape[0]):
        cols = np.flatnonzero(valid[k])
        if cols.size == 0:
            continue
        rows, picked = scipy.optimize.linear_sum_assignment(cost[k][:, cols])
        out[k, cols[picked]] = rows
    return out


def _scipy_local(cost: jax.Array, valid: jax.Array) -> jax.Array:
    shape = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
    # Looked up at trace time (not bound at import) so tests can observe which shards reach the host.
    return jax.pure_callback(_solve_on_host, shape, cost, valid, vmap_method="sequential")


def _optax_one(cost: jax.Array, valid: jax.Array) -> jax.Array:
    # Padded slots get one constant per image, just above the largest valid cost. With Q >= M every slot is
    # assigned, so a constant adds the same amount to every assignment and the valid part stays optimal. With
    # Q < M, a query on a padded slot could always move to a free valid slot and lower the total, so padded slots
    # are used only once every valid target has a query (or every query has a valid target).
    top = jnp.max(jnp.where(valid, cost, -jnp.inf))
    # The relative term keeps the pad strictly above `top` even for clamped 1e10 costs, where float32 top + 1 == top.
    pad_cost = jnp.where(jnp.isfinite(top), top + 1.0 + 1e-3 * jnp.abs(top), 0.0)
    rows, cols = optax.assignment.hungarian_algorithm(jnp.where(valid[None, :], cost, pad_cost))
    out = jnp.full(valid.shape, -1, jnp.int32).at[cols].set(rows.astype(jnp.int32))
    return jnp.where(valid, out, -1)


def _optax_local(cost: jax.Array, valid: jax.Array) -> jax.Array:
    return jax.vmap(_optax_one)(cost, valid)


def _per_shard(local: Callable, cost, valid, mesh: Mesh | None, batch_axes: Sequence[str] | None):
    cost = jax.lax.stop_gradient(clean_cost(cost))
    if mesh is None:
        return local(cost, valid)
    axes = tuple(mesh.axis_names) if batch_axes is None else tuple(batch_axes)
    spec = P(axes)
    # Matching is per example, so no collective is needed: each device returns its own rows of the result.
    # check_vma=False: optax's solver starts its while-loop carries from constants, which the varying-axes type
    # check rejects; with no collectives inside there is nothing for the check to protect.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)
    return sharded(cost, valid)


def scipy_matcher(
    cost: jax.Array, valid: jax.Array, *, mesh: Mesh | None = None, batch_axes: Sequence[str] | None = None
) -> jax.Array:
    """Match on the host with `scipy.optimize.linear_sum_assignment` (the original's solver).

    Args:
      cost: (B, Q, M) float matching costs (lower is better).
      valid: (B, M) bool, False for padded target slots.
      mesh: when given, match under `jax.shard_map` so that each device's examples are solved by its own host.
      batch_axes: the mesh axes the batch is split over (default: all of them, as `eomt_jax.mesh` shards it).

    Returns:
      (B, M) int32 query index per target slot, -1 for padding.
    """
    return _per_shard(_scipy_local, cost, valid, mesh, batch_axes)


def optax_matcher(
    cost: jax.Array, valid: jax.Array, *, mesh: Mesh | None = None, batch_axes: Sequence[str] | None = None
) -> jax.Array:
    """Match on device with `optax.assignment.hungarian_algorithm`; same arguments and result as `scipy_matcher`.

    When an image has more valid targets than queries, the queries go to a minimum-cost subset of the targets,
    as with scipy.
    """
    return _per_shard(_optax_local, cost, valid, mesh, batch_axes)


MATCHERS: dict[str, Matcher] = {"scipy": scipy_matcher, "optax": optax_matcher}


def get_matcher(matcher: str | Matcher) -> Matcher:
    """A matcher by config name ('scipy' | 'optax'), or the function itself."""
    if callable(matcher):
        return matcher
    if matcher not in MATCHERS:
        raise ValueError(f"unknown matcher {matcher!r}; expected one of {sorted(MATCHERS)} or a function")
    return MATCHERS[matcher]


def match(
    cost: jax.Array,
    valid: jax.Array,
    matcher: str | Matcher = "scipy",
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] | None = None,
) -> jax.Array:
    """(B, Q, M) costs, (B, M) validity -> (B, M) query per target slot (-1: none), with the chosen matcher."""
    return get_matcher(matcher)(cost, valid, mesh=mesh, batch_axes=batch_axes)
