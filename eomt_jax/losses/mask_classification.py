"""The mask-classification loss of EoMT (Mask2Former-style), for padded targets, pure and jittable.

For each network output (K + 1 with masked attention), independently:
  1. match queries to targets (Hungarian) on the cost 5 * BCE + 2 * (-class prob) + 5 * dice, with mask costs on
     `num_points` uniform random points shared by all queries and targets of an image;
  2. for every matched pair, pick `num_points` points: the `importance_sample_ratio` share of the most uncertain
     (|logit| smallest) among `oversample_ratio` x as many uniform points, plus fresh uniform points;
     point-sampled BCE and dice, summed over pairs and divided by the number of targets in the global batch;
  3. cross-entropy of every query against its matched label or "no object" (weight `no_object_coefficient`),
     weighted mean over all queries of the batch.
Total = sum over outputs of 5 * mask + 5 * dice + 2 * CE.

Normalisation: in the jitted data-parallel step the arrays are global, so `num_masks` is the global target
count; that equals upstream's per-device count averaged over devices combined with gradient averaging. The CE
weighted mean is taken over the global batch (upstream averages per-device weighted means; the two agree when every
device holds the same weight total, and exactly on one device).
Padding (`valid` False) never changes a value: padded targets take no part in matching, point losses or counts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from eomt_jax.losses.matching import match
from eomt_jax.losses.point_sampling import point_sample


def pairwise_costs(mask_pts: jax.Array, tgt_pts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """mask_pts (Q, P) logits, tgt_pts (M, P) in [0, 1] -> mean BCE (Q, M) and dice cost (Q, M)."""
    p = mask_pts.shape[-1]
    pos = jax.nn.softplus(-mask_pts)  # BCE against target 1
    neg = jax.nn.softplus(mask_pts)  # BCE against target 0
    bce = (pos @ tgt_pts.T + neg @ (1.0 - tgt_pts).T) / p
    sig = jax.nn.sigmoid(mask_pts)
    numer = 2.0 * sig @ tgt_pts.T
    denom = sig.sum(-1)[:, None] + tgt_pts.sum(-1)[None, :]
    dice = 1.0 - (numer + 1.0) / (denom + 1.0)
    return bce, dice


def output_loss(
    mask_logits: jax.Array,
    class_logits: jax.Array,
    masks: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    matcher_points: jax.Array,
    oversample_points: jax.Array,
    random_points: jax.Array,
    *,
    num_masks: jax.Array,
    num_uncertain: int,
    no_object_coefficient: float,
    mask_coefficient: float,
    dice_coefficient: float,
    class_coefficient: float,
    matcher: str,
    mesh=None,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Loss terms of one network output with explicit random points (for exact parity tests).

    matcher_points (B, P, 2); oversample_points (B, M, P * oversample, 2); random_points (B, M, P - num_uncertain, 2).
    Returns ({"loss_mask", "loss_dice", "loss_ce"}, target_to_query (B, M)).
    """
    mask_logits = mask_logits.astype(jnp.float32)
    class_logits = class_logits.astype(jnp.float32)
    b, q, h, w = mask_logits.shape
    m = masks.shape[1]
    num_classes = class_logits.shape[-1] - 1
    tmasks = masks.astype(jnp.float32)

    # -- matching (no gradient) --------------------------------------------------------------------------------
    sg_masks = jax.lax.stop_gradient(mask_logits)
    probs = jax.nn.softmax(jax.lax.stop_gradient(class_logits), axis=-1)
    safe_labels = jnp.where(valid, labels, 0)

    def image_cost(pred, tgt, prob, lab, pts):
        pred_pts = point_sample(pred, jnp.broadcast_to(pts, (q,) + pts.shape))
        tgt_pts = point_sample(tgt, jnp.broadcast_to(pts, (m,) + pts.shape))
        bce, dice = pairwise_costs(pred_pts, tgt_pts)
        cls = -jnp.take(prob, lab, axis=-1)
        return mask_coefficient * bce + class_coefficient * cls + dice_coefficient * dice

    cost = jax.vmap(image_cost)(sg_masks, tmasks, probs, safe_labels, matcher_points)
    t2q = match(cost, valid, matcher, mesh)
    matched = t2q >= 0

    # -- mask losses on matched pairs, one row per target slot ---------------------------------------------------
    query = jnp.where(matched, t2q, 0)
    pred = jnp.take_along_axis(mask_logits, query[:, :, None, None], axis=1)  # (B, M, h, w)
    flat_pred = pred.reshape(b * m, h, w)
    over = oversample_points.reshape(b * m, -1, 2)
    uncertainty = -jnp.abs(point_sample(jax.lax.stop_gradient(flat_pred), over))
    _, top = jax.lax.top_k(uncertainty, num_uncertain)
    certain_pts = jnp.take_along_axis(over, top[:, :, None], axis=1)
    points = jax.lax.stop_gradient(jnp.concatenate([certain_pts, random_points.reshape(b * m, -1, 2)], axis=1))
    logits = point_sample(flat_pred, points)
    target = jax.lax.stop_gradient(point_sample(tmasks.reshape(b * m, *masks.shape[2:]), points))
    bce = jnp.mean(jax.nn.softplus(logits) - logits * target, axis=-1)
    sig = jax.nn.sigmoid(logits)
    dice = 1.0 - (2.0 * (sig * target).sum(-1) + 1.0) / (sig.sum(-1) + target.sum(-1) + 1.0)
    weight = matched.reshape(-1).astype(jnp.float32)
    loss_mask = (bce * weight).sum() / num_masks
    loss_dice = (dice * weight).sum() / num_masks

    # -- classification ----------------------------------------------------------------------------------------
    q2t = jnp.full((b, q), -1, jnp.int32)
    q2t = jax.vmap(lambda row, t, ok: row.at[jnp.where(ok, t, q)].set(jnp.arange(m, dtype=jnp.int32), mode="drop"))(
        q2t, t2q, matched
    )
    target_class = jnp.where(q2t >= 0, jnp.take_along_axis(safe_labels, jnp.maximum(q2t, 0), axis=1), num_classes)
    class_weight = jnp.where(target_class == num_classes, no_object_coefficient, 1.0)
    logp = jax.nn.log_softmax(class_logits, axis=-1)
    nll = -jnp.take_along_axis(logp, target_class[..., None], axis=-1)[..., 0]
    loss_ce = (class_weight * nll).sum() / class_weight.sum()
    return {"loss_mask": loss_mask, "loss_dice": loss_dice, "loss_ce": loss_ce}, t2q


def output_names(num_outputs: int) -> list[str]:
    """'' for the final output, '_block_-K' ... '_block_-1' for the intermediate ones."""
    k = num_outputs - 1
    return [f"_block_{j - k}" for j in range(k)] + [""]


def mask_classification_loss(
    mask_logits: list[jax.Array],
    class_logits: list[jax.Array],
    targets: dict[str, jax.Array],
    key: jax.Array,
    *,
    num_classes: int,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    no_object_coefficient: float = 0.1,
    mask_coefficient: float = 5.0,
    dice_coefficient: float = 5.0,
    class_coefficient: float = 2.0,
    matcher: str = "scipy",
    mesh=None,
) -> tuple[jax.Array, dict[str, Any]]:
    """Total loss over all outputs and the per-term values (`loss_mask`, `loss_dice`, `loss_ce`, suffixed per
    intermediate output), plus `num_masks`. targets: masks bool (B, M, H, W), labels int32 (B, M), valid (B, M)."""
    masks, labels, valid = targets["masks"], targets["labels"], targets["valid"]
    if class_logits[-1].shape[-1] != num_classes + 1:
        raise ValueError(f"class logits have {class_logits[-1].shape[-1]} entries, expected num_classes + 1 = "
                         f"{num_classes + 1}")
    b, m = valid.shape
    num_masks = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_over = int(oversample_ratio * num_points)
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, Any] = {}
    for i, (name, ml, cl) in enumerate(zip(output_names(len(mask_logits)), mask_logits, class_logits)):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        terms, _ = output_loss(
            ml, cl, masks, labels, valid,
            jax.random.uniform(k1, (b, num_points, 2)),
            jax.random.uniform(k2, (b, m, num_over, 2)),
            jax.random.uniform(k3, (b, m, num_points - num_uncertain, 2)),
            num_masks=num_masks, num_uncertain=num_uncertain, no_object_coefficient=no_object_coefficient,
            mask_coefficient=mask_coefficient, dice_coefficient=dice_coefficient,
            class_coefficient=class_coefficient, matcher=matcher, mesh=mesh,
        )
        total = total + (mask_coefficient * terms["loss_mask"] + dice_coefficient * terms["loss_dice"]
                         + class_coefficient * terms["loss_ce"])
        metrics.update({f"{k}{name}": v for k, v in terms.items()})
    metrics["num_masks"] = num_masks
    return total, metrics
