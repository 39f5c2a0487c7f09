"""Hungarian matching of queries to (padded) targets, inside the jitted step.

Two interchangeable solvers, both returning `target_to_query` (B, M) int32 (-1 for padding):

* "scipy": `scipy.optimize.linear_sum_assignment` on the host through `jax.pure_callback`. Under a mesh it runs
  inside `jax.shard_map` over the batch axes, so every device's examples are matched by its own process: the global
  batch is never gathered onto one host.
* "optax": `optax.assignment.hungarian_algorithm`, vmapped, fully on the device. Padded target columns get a
  constant cost, which changes every complete assignment by the same amount and so leaves the optimum intact.

Matching carries no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from scipy.optimize import linear_sum_assignment


def _scipy_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
    b, _, m = cost.shape
    out = np.full((b, m), -1, np.int32)
    for i in range(b):
        cols = np.flatnonzero(valid[i])
        if cols.size == 0:
            continue
        rows, picked = linear_sum_assignment(cost[i][:, cols])
        out[i, cols[picked]] = rows
    return out


def _scipy(cost: jax.Array, valid: jax.Array) -> jax.Array:
    shape = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
    return jax.pure_callback(_scipy_host, shape, cost, valid, vmap_method="sequential")


def _optax(cost: jax.Array, valid: jax.Array) -> jax.Array:
    def one(c, v):
        c = jnp.where(v[None, :], c, 0.0)
        rows, cols = optax.assignment.hungarian_algorithm(c)
        t2q = jnp.full(v.shape, -1, jnp.int32).at[cols].set(rows.astype(jnp.int32))
        return jnp.where(v, t2q, -1)

    return jax.vmap(one)(cost, valid)


SOLVERS = {"scipy": _scipy, "optax": _optax}


def match(cost: jax.Array, valid: jax.Array, solver: str = "scipy", mesh=None) -> jax.Array:
    """cost (B, Q, M) float32, valid (B, M) bool -> target_to_query (B, M) int32, -1 where not valid.

    Every valid target is assigned a distinct query (needs Q >= number of valid targets).
    """
    if solver not in SOLVERS:
        raise ValueError(f"matcher must be one of {sorted(SOLVERS)}, got {solver!r}")
    if cost.shape[1] < cost.shape[2]:
        raise ValueError(f"{cost.shape[1]} queries cannot be matched to up to {cost.shape[2]} targets; "
                         "set data.max_instances <= model.num_queries")
    cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
    # As upstream: keep the solver away from inf/NaN.
    cost = jnp.nan_to_num(jnp.clip(cost, -1e10, 1e10), nan=0.0)
    fn = SOLVERS[solver]
    if mesh is None or solver == "optax":
        # The on-device solver is partitioned by XLA along the batch like any other batched op.
        return fn(cost, valid)
    axes = tuple(mesh.axis_names)
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(axes), P(axes)), out_specs=P(axes))(cost, valid)
