"""Both matchers against `scipy.optimize.linear_sum_assignment` on the unpadded problems, with and without a mesh."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy.optimize import linear_sum_assignment

from eomt_jax.losses import get_matcher, matching
from eomt_jax.mesh import make_mesh

MATCHERS = ["scipy", "optax"]


def _problem(seed, b, q, m, counts):
    """Random float32 costs; `counts[i]` valid slots in image i, at random positions among the M slots."""
    rng = np.random.default_rng(seed)
    cost = rng.uniform(-2, 10, size=(b, q, m)).astype(np.float32)
    valid = np.zeros((b, m), bool)
    for i, n in enumerate(counts):
        valid[i, rng.permutation(m)[:n]] = True
    return cost, valid


def _check_against_scipy(cost, valid, target_to_query):
    """Same pair set and same total cost as scipy on each image's (Q, n) matrix of valid columns."""
    assert target_to_query.dtype == np.int32
    for i in range(cost.shape[0]):
        ours = target_to_query[i]
        assert (ours[~valid[i]] == -1).all(), "padded slots must stay unmatched"
        cols = np.flatnonzero(valid[i])
        if cols.size == 0:
            continue
        rows, picked = linear_sum_assignment(cost[i][:, cols])
        expected = {(int(r), int(cols[c])) for r, c in zip(rows, picked)}
        got = {(int(ours[j]), int(j)) for j in cols if ours[j] >= 0}
        assert len({r for r, _ in got}) == len(got), "a query was assigned twice"
        # Cost sums of ~100 float32 terms of size <= 10: 1e-5 relative is float32 round-off, not a different
        # assignment (a different one would differ by at least the gap between distinct random costs).
        np.testing.assert_allclose(sum(cost[i][r, c] for r, c in got), cost[i][rows, cols[picked]].sum(), rtol=1e-5)
        # Continuous random costs have a unique optimum, so the pairs themselves must agree.
        assert got == expected


CASES = {
    # name: (Q, M, valid targets per image)
    "square": (6, 6, [6, 6, 6, 6]),
    "more_queries": (9, 5, [5, 5, 5, 5]),
    "more_targets": (4, 7, [7, 7, 7, 7]),  # every query is used, three targets per image stay unmatched
    "padded": (8, 6, [6, 5, 1, 0]),  # padding anywhere, including an image with no target at all
    "padded_beyond_queries": (4, 7, [4, 3, 6, 0]),  # more slots than queries; some images fit, one does not
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("matcher", MATCHERS)
def test_matches_scipy_on_the_unpadded_problem(matcher, name):
    q, m, counts = CASES[name]
    cost, valid = _problem(sorted(CASES).index(name), len(counts), q, m, counts)
    out = jax.jit(lambda c, v: get_matcher(matcher)(c, v))(cost, valid)
    _check_against_scipy(cost, valid, np.asarray(out))


@pytest.mark.parametrize("matcher", MATCHERS)
def test_loss_sized_problem(matcher):
    """The training shape class: 200 queries, 100 slots, random fill (one batch of 4 to keep CI fast)."""
    cost, valid = _problem(7, 4, 200, 100, [100, 63, 17, 1])
    _check_against_scipy(cost, valid, np.asarray(jax.jit(get_matcher(matcher))(cost, valid)))


@pytest.mark.parametrize("matcher", MATCHERS)
def test_nan_and_huge_costs_are_cleaned_like_the_original(matcher):
    cost, valid = _problem(3, 2, 6, 4, [4, 3])
    cost[0, 1, 2] = np.nan
    cost[1, 4, :] = np.inf
    out = np.asarray(jax.jit(get_matcher(matcher))(cost, valid))
    # The original clamps to +-1e10 and maps NaN to 0 before solving.
    _check_against_scipy(np.nan_to_num(np.clip(cost, -1e10, 1e10), nan=0.0), valid, out)


@pytest.mark.parametrize("matcher", MATCHERS)
@pytest.mark.parametrize("axes", [(("data", 8),), (("data", 4), ("fsdp", 2))])
def test_on_the_8_device_mesh_each_device_matches_its_own_shard(matcher, axes, monkeypatch):
    mesh = make_mesh(axes)
    batch = 16
    cost, valid = _problem(11, batch, 7, 5, [5, 4, 3, 0, 1, 2, 5, 5] * 2)
    sharding = NamedSharding(mesh, P(mesh.axis_names))
    seen = []
    solve = matching._solve_on_host
    monkeypatch.setattr(matching, "_solve_on_host", lambda c, v: seen.append(c.shape) or solve(c, v))

    fn = jax.jit(lambda c, v: get_matcher(matcher)(c, v, mesh=mesh))
    out = fn(jax.device_put(cost, sharding), jax.device_put(valid, sharding))
    _check_against_scipy(cost, valid, np.asarray(out))
    assert out.sharding.is_equivalent_to(sharding, 2)
    if matcher == "scipy":
        # One host call per device, each with only that device's two examples: the batch is never gathered.
        assert sorted(seen) == [(batch // 8, 7, 5)] * 8
    else:
        assert not seen  # fully on device


def test_unknown_matcher_is_rejected():
    with pytest.raises(ValueError, match="unknown matcher"):
        get_matcher("hungarian")


def test_host_solver_reads_its_inputs_as_numpy_only():
    # Inside the jitted step the callback receives device arrays; indexing them as jax.Arrays would dispatch work
    # to the device that waits on this very callback (a deadlock once enough steps are queued). Inputs that only
    # offer the NumPy array protocol prove the solver converts first and never calls back into JAX.
    class ArrayOnly:
        def __init__(self, a):
            self._a = a

        def __array__(self, dtype=None, copy=None):
            return self._a if dtype is None else self._a.astype(dtype)

    rng = np.random.default_rng(0)
    cost = rng.random((2, 5, 3)).astype(np.float32)
    valid = np.array([[True, True, False], [True, True, True]])
    out = matching._solve_on_host(ArrayOnly(cost), ArrayOnly(valid))
    np.testing.assert_array_equal(out, matching._solve_on_host(cost, valid))
    assert out[0, 2] == -1 and (out[1] >= 0).all()
