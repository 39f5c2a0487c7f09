"""Point sampling, matching and the loss against their references (torch grid_sample, scipy, transformers)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import PartitionSpec as P
from scipy.optimize import linear_sum_assignment
from transformers import EomtConfig
from transformers.models.eomt.modeling_eomt import EomtLoss

from eomt_jax.losses import mask_classification_loss, match, output_loss, point_sample
from eomt_jax.mesh import make_mesh


def test_point_sample_matches_torch_grid_sample():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 7, 9)).astype(np.float32)
    pts = rng.uniform(-0.05, 1.05, size=(3, 50, 2)).astype(np.float32)
    pts[:, :4] = [[0, 0], [1, 1], [0, 1], [1, 0]]  # borders, where zero padding matters
    ours = np.asarray(point_sample(jnp.asarray(maps), jnp.asarray(pts)))
    ref = F.grid_sample(torch.from_numpy(maps)[:, None], torch.from_numpy(2 * pts - 1)[:, :, None],
                        mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0, :, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)  # float32 rounding of the interpolation weights


def _pairs(t2q, valid):
    return {(int(q), int(m)) for m, q in enumerate(t2q) if valid[m]}


@pytest.mark.parametrize("solver", ["scipy", "optax"])
@pytest.mark.parametrize("q,m", [(6, 6), (9, 5), (12, 12)])
def test_matchers_agree_with_scipy(solver, q, m):
    rng = np.random.default_rng(q * 31 + m)
    b = 4
    cost = rng.uniform(0, 10, size=(b, q, m)).astype(np.float32)
    valid = np.zeros((b, m), bool)
    for i, n in enumerate([m, m - 1, 1, 0]):
        valid[i, rng.permutation(m)[:n]] = True  # padded columns anywhere, including an image with none
    t2q = np.asarray(jax.jit(lambda c, v: match(c, v, solver))(cost, valid))
    for i in range(b):
        cols = np.flatnonzero(valid[i])
        assert (t2q[i][~valid[i]] == -1).all()
        if cols.size == 0:
            continue
        rows, picked = linear_sum_assignment(cost[i][:, cols])
        ref_cost = cost[i][rows, cols[picked]].sum()
        ours_cost = cost[i][t2q[i][cols], cols].sum()
        assert len(set(t2q[i][cols])) == cols.size  # distinct queries
        np.testing.assert_allclose(ours_cost, ref_cost, rtol=1e-6)
        # Continuous random costs have a unique optimum: the pairs themselves agree.
        assert _pairs(t2q[i], valid[i]) == {(int(r), int(cols[c])) for r, c in zip(rows, picked)}


def test_scipy_matcher_runs_per_device_shard():
    mesh = make_mesh([("data", 4), ("fsdp", 2)])
    rng = np.random.default_rng(0)
    cost = rng.uniform(size=(8, 5, 3)).astype(np.float32)
    valid = rng.uniform(size=(8, 3)) < 0.7
    sharding = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
    c, v = jax.device_put(cost, sharding), jax.device_put(valid, sharding)
    out = jax.jit(lambda c, v: match(c, v, "scipy", mesh))(c, v)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(match(cost, valid, "scipy")))
    assert out.sharding.is_equivalent_to(sharding, 2)


# ---------------------------------------------------------------------------------------------- loss parity

B, Q, C, M, H, W, h, w, NP = 2, 7, 4, 4, 32, 24, 8, 6, 16


def _random_problem(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((B, M, H, W), bool)
    labels = np.zeros((B, M), np.int32)
    valid = np.zeros((B, M), bool)
    for b, n in enumerate([3, 2]):
        for j in range(n):
            y0, x0 = rng.integers(0, H - 8), rng.integers(0, W - 8)
            masks[b, j, y0 : y0 + rng.integers(4, 12), x0 : x0 + rng.integers(4, 12)] = True
            labels[b, j] = rng.integers(0, C)
            valid[b, j] = True
    # Padding holds garbage: it must not matter.
    masks[~valid] = rng.uniform(size=masks[~valid].shape) < 0.5
    labels[~valid] = 3
    outputs = [(rng.normal(size=(B, Q, h, w)).astype(np.float32) * 3, rng.normal(size=(B, Q, C + 1)).astype(np.float32))
               for _ in range(2)]
    return masks, labels, valid, outputs, rng


def _hf_loss():
    cfg = EomtConfig(num_labels=C, train_num_points=NP, oversample_ratio=3.0, importance_sample_ratio=0.75)
    return EomtLoss(cfg, weight_dict={"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0})


def test_loss_terms_equal_the_transformers_loss(monkeypatch):
    masks, labels, valid, outputs, rng = _random_problem(0)
    k = int(0.75 * NP)
    num_masks = jnp.float32(valid.sum())
    hf = _hf_loss()
    for ml, cl in outputs:
        mp = rng.uniform(size=(B, NP, 2)).astype(np.float32)
        op = rng.uniform(size=(B, M, 3 * NP, 2)).astype(np.float32)
        rp = rng.uniform(size=(B, M, NP - k, 2)).astype(np.float32)
        ours, t2q = output_loss(
            ml, cl, jnp.asarray(masks), jnp.asarray(labels), jnp.asarray(valid), mp, op, rp, num_masks=num_masks,
            num_uncertain=k, no_object_coefficient=0.1, mask_coefficient=5.0, dice_coefficient=5.0,
            class_coefficient=2.0, matcher="scipy")
        t2q = np.asarray(t2q)
        # The transformers loss orders matched pairs by (image, query); replay our points in that order.
        order = sorted((b, int(t2q[b, m]), m) for b in range(B) for m in range(M) if valid[b, m])
        replay = [torch.from_numpy(mp[b][None]) for b in range(B)]
        replay.append(torch.from_numpy(np.stack([op[b, m] for b, _, m in order])))
        replay.append(torch.from_numpy(np.stack([rp[b, m] for b, _, m in order])))
        monkeypatch.setattr(torch, "rand", lambda *a, **kw: replay.pop(0))
        ref = hf(
            torch.from_numpy(ml), torch.from_numpy(cl),
            [torch.from_numpy(masks[b][valid[b]]).float() for b in range(B)],
            [torch.from_numpy(labels[b][valid[b]]).long() for b in range(B)],
        )
        monkeypatch.undo()
        assert not replay
        for ours_key, ref_key in (("loss_mask", "loss_mask"), ("loss_dice", "loss_dice"), ("loss_ce", "loss_cross_entropy")):
            np.testing.assert_allclose(float(ours[ours_key]), float(ref[ref_key]), atol=1e-5, rtol=0, err_msg=ours_key)


@pytest.mark.parametrize("solver", ["scipy", "optax"])
def test_padding_never_changes_the_loss(solver):
    """Two extra padded slots holding garbage (full masks, a real label) leave every term unchanged."""
    masks, labels, valid, outputs, rng = _random_problem(1)
    k = int(0.75 * NP)
    mp = rng.uniform(size=(B, NP, 2)).astype(np.float32)
    op = rng.uniform(size=(B, M + 2, 3 * NP, 2)).astype(np.float32)
    rp = rng.uniform(size=(B, M + 2, NP - k, 2)).astype(np.float32)
    masks2 = np.concatenate([masks, np.ones((B, 2, H, W), bool)], 1)
    labels2 = np.concatenate([labels, np.ones((B, 2), np.int32)], 1)
    valid2 = np.concatenate([valid, np.zeros((B, 2), bool)], 1)
    kw = dict(num_masks=jnp.float32(valid.sum()), num_uncertain=k, no_object_coefficient=0.1, mask_coefficient=5.0,
              dice_coefficient=5.0, class_coefficient=2.0, matcher=solver)
    ml, cl = outputs[0]
    a, _ = output_loss(ml, cl, masks, labels, valid, mp, op[:, :M], rp[:, :M], **kw)
    b, _ = output_loss(ml, cl, masks2, labels2, valid2, mp, op, rp, **kw)
    for key in a:
        np.testing.assert_allclose(float(a[key]), float(b[key]), rtol=1e-6, err_msg=key)


def test_loss_has_one_set_of_terms_per_output_and_gradients():
    masks, labels, valid, outputs, _ = _random_problem(2)
    targets = dict(masks=masks, labels=labels, valid=valid)

    def f(mls):
        total, terms = mask_classification_loss(mls, [o[1] for o in outputs], targets, jax.random.key(1),
                                                num_classes=C, num_points=NP)
        return total, terms

    (total, terms), grads = jax.value_and_grad(f, has_aux=True)([jnp.asarray(o[0]) for o in outputs])
    assert set(terms) == {"loss_mask", "loss_dice", "loss_ce", "loss_mask_block_-1", "loss_dice_block_-1",
                          "loss_ce_block_-1", "num_masks"}
    expected = sum(5 * terms[f"loss_mask{s}"] + 5 * terms[f"loss_dice{s}"] + 2 * terms[f"loss_ce{s}"]
                   for s in ("", "_block_-1"))
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in grads)
