"""The loss against transformers' `EomtLoss` (the original's loss) with the same random points injected into both."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P
from transformers import EomtConfig
from transformers.models.eomt.modeling_eomt import EomtLoss

from eomt_jax.losses import (
    SamplePoints,
    draw_points,
    mask_classification_loss,
    mask_classification_loss_from_points,
    output_loss,
)
from eomt_jax.mesh import make_mesh

# Tiny shapes: 2 images, 7 queries, 4 classes, 4 target slots (3 and 2 valid), 32x24 targets, 8x6 mask logits,
# 3 outputs (2 intermediate + final), 16 points (12 uncertain of 48 candidates + 4 uniform).
B, Q, C, M, H, W, h, w, NP, OUTPUTS = 2, 7, 4, 4, 32, 24, 8, 6, 16, 3
COEFFS = dict(no_object_coefficient=0.1, mask_coefficient=5.0, dice_coefficient=5.0, class_coefficient=2.0)


def _problem(seed, batch=B, slots=M, counts=(3, 2)):
    rng = np.random.default_rng(seed)
    masks = np.zeros((batch, slots, H, W), bool)
    labels = np.zeros((batch, slots), np.int32)
    valid = np.zeros((batch, slots), bool)
    for b in range(batch):
        for j in rng.permutation(slots)[: counts[b % len(counts)]]:
            y0, x0 = rng.integers(0, H - 8), rng.integers(0, W - 8)
            masks[b, j, y0 : y0 + rng.integers(4, 16), x0 : x0 + rng.integers(4, 16)] = True
            labels[b, j] = rng.integers(0, C)
            valid[b, j] = True
    # Padded slots hold garbage (random masks, out-of-range labels): they must not matter.
    masks[~valid] = rng.uniform(size=masks[~valid].shape) < 0.5
    labels[~valid] = rng.choice([-1, C, C + 3], size=int((~valid).sum()))
    # Logits of O(3): a spread of confident and uncertain pixels, so importance sampling has something to pick.
    mask_logits = [3 * rng.normal(size=(batch, Q, h, w)).astype(np.float32) for _ in range(OUTPUTS)]
    class_logits = [rng.normal(size=(batch, Q, C + 1)).astype(np.float32) for _ in range(OUTPUTS)]
    points = [
        SamplePoints(*(np.asarray(a) for a in draw_points(jax.random.key(100 * seed + i), batch, slots, num_points=NP)))
        for i in range(OUTPUTS)
    ]
    return dict(masks=masks, labels=labels, valid=valid), mask_logits, class_logits, points


def _reference(targets, mask_logits, class_logits, points, monkeypatch):
    """transformers' EomtLoss on the same problem, replaying our points through its torch.rand calls.

    It scores the final output first, then the intermediate ones in order; per output it draws one (1, P, 2)
    matching set per image, then the oversampled and the uniform points of the matched pairs in its pair order
    (image, then query, as linear_sum_assignment returns them). Returns the terms and each output's matching.
    """
    cfg = EomtConfig(num_labels=C, train_num_points=NP, oversample_ratio=3.0, importance_sample_ratio=0.75,
                     no_object_weight=0.1, class_weight=2.0, mask_weight=5.0, dice_weight=5.0)
    loss = EomtLoss(cfg, weight_dict={})
    valid = targets["valid"]
    torch_order = [OUTPUTS - 1] + list(range(OUTPUTS - 1))
    matchings = []
    original_matcher = loss.matcher.forward
    loss.matcher.forward = lambda *a: matchings.append(original_matcher(*a)) or matchings[-1]
    calls = iter(range(10**6))

    def rand(*shape, **kwargs):
        n = next(calls)
        pts = points[torch_order[n // (B + 2)]]
        step = n % (B + 2)
        if step < B:
            return torch.from_numpy(pts.matching[step][None].copy())
        slots = [(b, int(np.flatnonzero(valid[b])[t])) for b, (_, tgt) in enumerate(matchings[-1]) for t in tgt]
        source = pts.oversampled if step == B else pts.random
        return torch.from_numpy(np.stack([source[b, j] for b, j in slots]))

    monkeypatch.setattr(torch, "rand", rand)
    tt = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    ref = loss(
        tt(mask_logits[-1]),
        tt(class_logits[-1]),
        [tt(targets["masks"][b][valid[b]]).float() for b in range(B)],
        [tt(targets["labels"][b][valid[b]]).long() for b in range(B)],
        auxiliary_predictions=[
            {"masks_queries_logits": tt(ml), "class_queries_logits": tt(cl)}
            for ml, cl in zip(mask_logits[:-1], class_logits[:-1])
        ],
    )
    monkeypatch.undo()
    assert next(calls) == OUTPUTS * (B + 2), "the reference drew a different number of random arrays"
    names = {"loss_mask": "loss_mask", "loss_dice": "loss_dice", "loss_ce": "loss_cross_entropy"}
    terms = {}
    for i in range(OUTPUTS):
        ours_suffix = "" if i == OUTPUTS - 1 else f"_block_{i - (OUTPUTS - 1)}"
        ref_suffix = "" if i == OUTPUTS - 1 else f"_{i}"
        terms.update({f"{k}{ours_suffix}": float(ref[f"{v}{ref_suffix}"]) for k, v in names.items()})
    matching_by_output = [matchings[torch_order.index(i)] for i in range(OUTPUTS)]
    return terms, matching_by_output


@pytest.mark.parametrize("matcher", ["scipy", "optax"])
def test_every_term_of_every_output_equals_the_transformers_loss(matcher, monkeypatch):
    targets, mask_logits, class_logits, points = _problem(0)
    ref, ref_matchings = _reference(targets, mask_logits, class_logits, points, monkeypatch)

    fn = jax.jit(lambda ml, cl, t, p: mask_classification_loss_from_points(ml, cl, t, p, num_classes=C,
                                                                           matcher=matcher, **COEFFS))
    total, terms = fn(mask_logits, class_logits, targets, points)
    assert set(terms) == set(ref) | {"num_masks", "num_matched"}
    for name, value in ref.items():
        # Sums of at most 5 pairs x 16 points of O(1) float32 values, same points on both sides: 1e-5 absolute
        # leaves room for summation-order round-off only.
        np.testing.assert_allclose(float(terms[name]), value, atol=1e-5, rtol=0, err_msg=name)
    expected_total = sum(5 * ref[f"loss_mask{s}"] + 5 * ref[f"loss_dice{s}"] + 2 * ref[f"loss_ce{s}"]
                         for s in ("", "_block_-1", "_block_-2"))
    np.testing.assert_allclose(float(total), expected_total, rtol=1e-6)
    assert float(terms["num_masks"]) == float(terms["num_matched"]) == 5.0

    # The matchings themselves agree with the reference's, output by output.
    matching = jax.jit(lambda ml, cl, p: output_loss(ml, cl, targets, p, num_masks=jnp.float32(5), matcher=matcher,
                                                      **COEFFS)[1])
    for i in range(OUTPUTS):
        t2q = np.asarray(matching(mask_logits[i], class_logits[i], points[i]))
        for b, (src, tgt) in enumerate(ref_matchings[i]):
            slots = np.flatnonzero(targets["valid"][b])
            assert {(int(s), int(slots[t])) for s, t in zip(src, tgt)} == {
                (int(t2q[b, j]), int(j)) for j in slots
            }, f"output {i}, image {b}"


@pytest.mark.parametrize("matcher", ["scipy", "optax"])
def test_padding_never_changes_a_value(matcher):
    """Adding garbage-filled padded slots (first and last, so slot indices shift) changes no term."""
    targets, mask_logits, class_logits, points = _problem(1)
    # One output: every output runs the same code, and each extra one only adds compile time.
    mask_logits, class_logits, points = mask_logits[-1:], class_logits[-1:], points[-1:]
    rng = np.random.default_rng(5)

    def pad(a, fill):
        return np.concatenate([fill[:, :1], a, fill[:, 1:]], axis=1)

    padded = dict(
        masks=pad(targets["masks"], np.ones((B, 2, H, W), bool)),
        labels=pad(targets["labels"], np.full((B, 2), 1, np.int32)),  # a real class: only `valid` may exclude it
        valid=pad(targets["valid"], np.zeros((B, 2), bool)),
    )
    padded_points = [
        SamplePoints(p.matching, pad(p.oversampled, rng.uniform(size=(B, 2) + p.oversampled.shape[2:])),
                     pad(p.random, rng.uniform(size=(B, 2) + p.random.shape[2:])))
        for p in points
    ]
    fn = jax.jit(lambda t, p: mask_classification_loss_from_points(mask_logits, class_logits, t, p, num_classes=C,
                                                                   matcher=matcher))
    total, terms = fn(targets, points)
    total_padded, terms_padded = fn(padded, padded_points)
    for name in terms:
        # Same pairs and points; only the order of a 5-term sum may differ (float32 round-off).
        np.testing.assert_allclose(float(terms_padded[name]), float(terms[name]), rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(float(total_padded), float(total), rtol=1e-6)


def test_bf16_logits_are_scored_in_float32():
    targets, mask_logits, class_logits, points = _problem(2)
    mask_logits, class_logits, points = mask_logits[-1:], class_logits[-1:], points[-1:]
    ml16 = [jnp.asarray(x, jnp.bfloat16) for x in mask_logits]
    cl16 = [jnp.asarray(x, jnp.bfloat16) for x in class_logits]
    fn = jax.jit(lambda ml, cl: mask_classification_loss_from_points(ml, cl, targets, points, num_classes=C))
    total16, terms16 = fn(ml16, cl16)
    total32, terms32 = fn([x.astype(jnp.float32) for x in ml16], [x.astype(jnp.float32) for x in cl16])
    assert total16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in terms16.values())
    # Same (bf16-representable) inputs: any bf16 arithmetic inside would show as ~1e-3 relative differences.
    for name in terms32:
        np.testing.assert_allclose(float(terms16[name]), float(terms32[name]), rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(float(total16), float(total32), rtol=1e-6)


def test_public_loss_draws_fresh_points_and_differentiates():
    targets, mask_logits, class_logits, _ = _problem(3)
    mask_logits, class_logits = mask_logits[:2], class_logits[:2]  # one intermediate output is enough here

    def loss(ml, cl, key):
        return mask_classification_loss(ml, cl, targets, key, num_classes=C, num_points=NP)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (total, terms), grads = fn(mask_logits, class_logits, jax.random.key(0))
    (again, _), _ = fn(mask_logits, class_logits, jax.random.key(0))
    (other, _), _ = fn(mask_logits, class_logits, jax.random.key(1))
    assert float(again) == float(total)
    assert float(other) != float(total)  # the points are random, so a new key changes the mask terms
    assert float(terms["num_masks"]) == 5.0
    for g in grads[0] + grads[1]:  # every output gets a gradient, on masks and classes
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
    # Each output draws its own points: two outputs with identical logits still get different mask terms.
    (_, t), _ = fn([mask_logits[0]] * 2, [class_logits[0]] * 2, jax.random.key(0))
    assert float(t["loss_mask"]) != float(t["loss_mask_block_-1"])


def test_a_batch_without_targets_scores_only_no_object():
    targets, mask_logits, class_logits, points = _problem(4)
    targets["valid"][:] = False
    total, terms = jax.jit(mask_classification_loss_from_points, static_argnames="num_classes")(
        mask_logits, class_logits, targets, points, num_classes=C)
    assert float(terms["num_masks"]) == 1.0 and float(terms["num_matched"]) == 0.0  # clamped normaliser
    assert float(terms["loss_mask"]) == float(terms["loss_dice"]) == 0.0
    logp = jax.nn.log_softmax(class_logits[-1], axis=-1)
    np.testing.assert_allclose(float(terms["loss_ce"]), float(-logp[..., C].mean()), rtol=1e-6)
    assert np.isfinite(float(total))


@pytest.mark.parametrize("matcher", ["scipy", "optax"])
def test_8_device_mesh_gives_the_single_device_loss_and_gradient(matcher):
    """The global batch sharded over 8 devices, matched per shard: the same loss and gradient as one device."""
    batch = 8
    targets, mask_logits, class_logits, _ = _problem(5, batch=batch, counts=(3, 2, 0, 4))
    mesh = make_mesh([("data", 4), ("fsdp", 2)])
    sharded = NamedSharding(mesh, P(mesh.axis_names))
    put = lambda tree: jax.device_put(tree, sharded)  # noqa: E731
    # The final output alone: per-output work is identical, and compiling three on 8 devices is slow in CI.
    mask_logits, class_logits = mask_logits[-1:], class_logits[-1:]

    def fn(mesh):
        loss = lambda ml, cl, t: mask_classification_loss(  # noqa: E731
            ml, cl, t, jax.random.key(0), num_classes=C, num_points=NP, matcher=matcher, mesh=mesh)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    (total, terms), grads = fn(None)(mask_logits, class_logits, targets)
    (total8, terms8), grads8 = fn(mesh)(put(mask_logits), put(class_logits), put(targets))
    assert float(terms8["num_masks"]) == float(targets["valid"].sum())  # the global count, not a per-device one
    for name in terms:
        # Identical arithmetic up to the partitioning of the batch reductions (float32 round-off).
        np.testing.assert_allclose(float(terms8[name]), float(terms[name]), rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(float(total8), float(total), rtol=1e-6)
    # Float32 round-off of the differently partitioned batch sums (relative), atol for entries near zero.
    for g8, g in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(g8), np.asarray(g), rtol=1e-5, atol=1e-7)
