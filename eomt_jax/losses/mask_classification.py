"""The mask-classification loss EoMT trains with (Mask2Former-style), for padded targets; pure and jittable.

Every network output (the K intermediate predictions and the final one) is scored on its own, with equal weight:

1. Matching (no gradient). On `num_points` uniform random points shared by all queries and targets of an image,
   cost = 5 * mean BCE + 5 * dice (on point samples of the mask logits and of the full-resolution target masks)
   + 2 * (-softmax probability of the target's class); Hungarian assignment per image (`matching.py`).
2. Mask losses, per matched (query, target) pair, on `num_points` points: the `importance_sample_ratio` share
   are the most uncertain (smallest |logit|) of `oversample_ratio` x `num_points` uniform points, the rest fresh
   uniform points. Point BCE (mean over points) and dice, summed over pairs, divided by `num_masks`.
3. Classification: cross-entropy of every query against its matched target's class, or "no object" (index C)
   when unmatched, weighted (1 per real class, `no_object_coefficient` for no object) and reduced as a weighted
   mean over all queries of the batch.

Total = sum over outputs of 5 * loss_mask + 5 * loss_dice + 2 * loss_ce.

Normalisation. Inside the data-parallel jitted step the arrays are global, so `valid.sum()` counts the targets of
the global batch, and `num_masks` = max(that count, 1). The original all-reduces the per-device counts, divides by
the number of devices and has every device divide its own sum by that average; averaging the devices' gradients
then gives (sum over all pairs) / (global count) — the value computed here (the original clamps the per-device
average instead of the global count at 1, which differs only for batches with fewer targets than devices). The CE
weighted mean is taken over the global batch; the original averages per-device weighted means, which is the same
on one device and nearly the same whenever the devices hold similar numbers of matched queries.

Both normalisers depend on the targets only (`batch_normalisers`): every matcher gives min(valid targets, Q)
queries a target in each image. Gradient accumulation computes them once for the global batch and passes them
to every microbatch, so that the microbatches' losses (and gradients) add up to those of the global batch.

Randomness is per image: image b draws its points from `fold_in(key, image_index[b])` (default: its position b in
the batch), so an image gets the same points whether it is scored with the whole batch or in a microbatch of it.

Padding never changes a value: padded target slots (`valid` False) take no part in matching, point losses, class
targets or counts, whatever their masks and labels hold.

Precision: logits are cast to float32 first, so the softmax, the matching costs and every loss run in float32
even for a bf16 network.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from eomt_jax.losses.matching import Matcher, match
from eomt_jax.losses.point_sampling import point_sample

_HIGHEST = jax.lax.Precision.HIGHEST


class SamplePoints(NamedTuple):
    """The random points of one output, (x, y) in [0, 1]. P = num_points, M = target slots.

    matching:    (B, P, 2) shared by all queries and targets of an image, for the matching costs.
    oversampled: (B, M, oversample_ratio * P, 2) candidates for the uncertain points of each target slot's pair.
    random:      (B, M, P - int(importance_sample_ratio * P), 2) uniform points added to the uncertain ones.
    """

    matching: jax.Array
    oversampled: jax.Array
    random: jax.Array


def draw_points(
    key: jax.Array,
    batch_size: int,
    num_slots: int,
    *,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    image_index: jax.Array | None = None,
) -> SamplePoints:
    """Fresh uniform points for one output (counts rounded down with `int`, as the original does).

    Image b draws from `fold_in(key, image_index[b])`; `image_index` (batch_size,) int defaults to arange.
    """
    num_uncertain = int(importance_sample_ratio * num_points)
    image_index = jnp.arange(batch_size) if image_index is None else jnp.asarray(image_index)
    if image_index.shape != (batch_size,):
        raise ValueError(f"image_index must have shape ({batch_size},), got {image_index.shape}")

    def one_image(i):
        k_match, k_over, k_rand = jax.random.split(jax.random.fold_in(key, i), 3)
        return SamplePoints(
            matching=jax.random.uniform(k_match, (num_points, 2)),
            oversampled=jax.random.uniform(k_over, (num_slots, int(oversample_ratio * num_points), 2)),
            random=jax.random.uniform(k_rand, (num_slots, num_points - num_uncertain, 2)),
        )

    return jax.vmap(one_image)(image_index)


def batch_normalisers(
    valid: jax.Array, num_queries: int, no_object_coefficient: float = 0.1
) -> tuple[jax.Array, jax.Array]:
    """(num_masks, class_weight_sum) of a batch of targets, float32 scalars, known before the network runs.

    num_masks = max(number of valid targets, 1), the mask-loss normaliser. class_weight_sum = the sum of the CE
    weights over all B x Q queries, the CE normaliser: each image has min(valid targets, Q) matched queries
    (weight 1; every matcher assigns that many), the others weigh `no_object_coefficient`.
    """
    per_image = jnp.sum(valid, axis=-1)
    matched = jnp.sum(jnp.minimum(per_image, num_queries)).astype(jnp.float32)
    unmatched = valid.shape[0] * num_queries - matched
    num_masks = jnp.maximum(jnp.sum(per_image).astype(jnp.float32), 1.0)
    return num_masks, matched + no_object_coefficient * unmatched


def matching_cost(
    mask_logits: jax.Array,
    class_logits: jax.Array,
    masks: jax.Array,
    labels: jax.Array,
    points: jax.Array,
    *,
    mask_coefficient: float = 5.0,
    dice_coefficient: float = 5.0,
    class_coefficient: float = 2.0,
) -> jax.Array:
    """(B, Q, M) float32 matching costs, queries x target slots (padded slots get arbitrary finite values).

    mask_logits (B, Q, h, w), class_logits (B, Q, C + 1), masks (B, M, H, W), labels (B, M), points (B, P, 2).
    """
    num_classes = class_logits.shape[-1] - 1
    x = point_sample(mask_logits, points)  # (B, Q, P) float32
    t = point_sample(masks, points)  # (B, M, P), soft at mask borders
    inv_p = 1.0 / points.shape[-2]
    # Mean BCE of every (query, target) pair as two matmuls: BCE(x, t) = t * BCE(x, 1) + (1 - t) * BCE(x, 0).
    bce = (
        jnp.einsum("bqp,bmp->bqm", jax.nn.softplus(-x), t, precision=_HIGHEST)
        + jnp.einsum("bqp,bmp->bqm", jax.nn.softplus(x), 1.0 - t, precision=_HIGHEST)
    ) * inv_p
    s = jax.nn.sigmoid(x)
    overlap = jnp.einsum("bqp,bmp->bqm", s, t, precision=_HIGHEST)
    dice = 1.0 - (2.0 * overlap + 1.0) / (s.sum(-1)[:, :, None] + t.sum(-1)[:, None, :] + 1.0)
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
    # Padded slots may hold any label; clip so the gather stays in range (their costs are ignored).
    safe_labels = jnp.clip(labels, 0, num_classes)
    cls = -jnp.take_along_axis(probs, safe_labels[:, None, :], axis=2)
    return mask_coefficient * bce + dice_coefficient * dice + class_coefficient * cls


def _pair_points(pred: jax.Array, points: SamplePoints) -> jax.Array:
    """(B, M, P, 2) loss points per slot: the most uncertain oversampled points, then the uniform ones."""
    num_uncertain = points.matching.shape[-2] - points.random.shape[-2]
    candidates = point_sample(pred[:, :, None], points.oversampled)[:, :, 0]  # (B, M, rP)
    _, top = jax.lax.top_k(-jnp.abs(candidates), num_uncertain)
    uncertain = jnp.take_along_axis(points.oversampled, top[..., None], axis=2)
    return jnp.concatenate([uncertain, points.random], axis=2)


def output_loss(
    mask_logits: jax.Array,
    class_logits: jax.Array,
    targets: dict[str, jax.Array],
    points: SamplePoints,
    *,
    num_masks: jax.Array,
    class_weight_sum: jax.Array | None = None,
    no_object_coefficient: float = 0.1,
    mask_coefficient: float = 5.0,
    dice_coefficient: float = 5.0,
    class_coefficient: float = 2.0,
    matcher: str | Matcher = "scipy",
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] | None = None,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """The unweighted terms of one network output, given its random points.

    `class_weight_sum` is the CE normaliser; None: this batch's own sum of the CE weights.

    Returns ({"loss_mask", "loss_dice", "loss_ce"}, target_to_query (B, M) int32 with -1 for unmatched slots).
    """
    masks, labels, valid = targets["masks"], targets["labels"], targets["valid"]
    mask_logits = mask_logits.astype(jnp.float32)
    class_logits = class_logits.astype(jnp.float32)
    b, q = class_logits.shape[:2]
    num_classes = class_logits.shape[-1] - 1

    cost = matching_cost(
        jax.lax.stop_gradient(mask_logits),
        jax.lax.stop_gradient(class_logits),
        masks,
        labels,
        points.matching,
        mask_coefficient=mask_coefficient,
        dice_coefficient=dice_coefficient,
        class_coefficient=class_coefficient,
    )
    target_to_query = match(cost, valid, matcher, mesh, batch_axes)
    matched = target_to_query >= 0

    # Mask losses: one row per target slot, holding its matched query's logits; unmatched rows are masked out.
    query = jnp.where(matched, target_to_query, 0)
    pred = jnp.take_along_axis(mask_logits, query[:, :, None, None], axis=1)  # (B, M, h, w)
    pair_points = jax.lax.stop_gradient(_pair_points(jax.lax.stop_gradient(pred), points))
    x = point_sample(pred[:, :, None], pair_points)[:, :, 0]  # (B, M, P)
    t = point_sample(masks[:, :, None], pair_points)[:, :, 0]
    bce = jnp.mean(jax.nn.softplus(x) - x * t, axis=-1)
    s = jax.nn.sigmoid(x)
    dice = 1.0 - (2.0 * (s * t).sum(-1) + 1.0) / (s.sum(-1) + t.sum(-1) + 1.0)
    loss_mask = jnp.where(matched, bce, 0.0).sum() / num_masks
    loss_dice = jnp.where(matched, dice, 0.0).sum() / num_masks

    # Classification: the class of the matched target for each query, "no object" (C) for the others.
    assigned = (target_to_query[:, None, :] == jnp.arange(q)[None, :, None]) & matched[:, None, :]  # (B, Q, M)
    target_class = jnp.where(
        assigned.any(-1), jnp.sum(jnp.where(assigned, labels[:, None, :], 0), axis=-1), num_classes
    )
    weight = jnp.where(target_class == num_classes, no_object_coefficient, 1.0)
    log_probs = jax.nn.log_softmax(class_logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, target_class[..., None], axis=-1)[..., 0]
    loss_ce = jnp.sum(weight * nll) / (jnp.sum(weight) if class_weight_sum is None else class_weight_sum)
    return {"loss_mask": loss_mask, "loss_dice": loss_dice, "loss_ce": loss_ce}, target_to_query


def output_names(num_outputs: int) -> list[str]:
    """Metric suffixes in output order: '_block_-K' ... '_block_-1' for the intermediate outputs, '' for the final."""
    k = num_outputs - 1
    return [f"_block_{j - k}" for j in range(k)] + [""]


def mask_classification_loss_from_points(
    mask_logits: Sequence[jax.Array],
    class_logits: Sequence[jax.Array],
    targets: dict[str, jax.Array],
    points: Sequence[SamplePoints],
    *,
    num_classes: int,
    no_object_coefficient: float = 0.1,
    mask_coefficient: float = 5.0,
    dice_coefficient: float = 5.0,
    class_coefficient: float = 2.0,
    matcher: str | Matcher = "scipy",
    num_masks: jax.Array | float | None = None,
    class_weight_sum: jax.Array | float | None = None,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`mask_classification_loss` with the random points given explicitly (one `SamplePoints` per output).

    This is the deterministic core: tests inject the same points into the PyTorch reference and into this.
    """
    if not (len(mask_logits) == len(class_logits) == len(points)) or not mask_logits:
        raise ValueError(
            f"need one mask output, class output and point set per network output, got {len(mask_logits)}, "
            f"{len(class_logits)} and {len(points)}"
        )
    for cl in class_logits:
        if cl.shape[-1] != num_classes + 1:
            raise ValueError(f"class logits have {cl.shape[-1]} entries, expected num_classes + 1 = {num_classes + 1}")
    if num_masks is None:
        num_masks = jnp.maximum(jnp.sum(targets["valid"]).astype(jnp.float32), 1.0)
    num_masks = jnp.asarray(num_masks, jnp.float32)
    if class_weight_sum is not None:
        class_weight_sum = jnp.asarray(class_weight_sum, jnp.float32)

    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    for suffix, ml, cl, pts in zip(output_names(len(mask_logits)), mask_logits, class_logits, points):
        terms, target_to_query = output_loss(
            ml,
            cl,
            targets,
            pts,
            num_masks=num_masks,
            class_weight_sum=class_weight_sum,
            no_object_coefficient=no_object_coefficient,
            mask_coefficient=mask_coefficient,
            dice_coefficient=dice_coefficient,
            class_coefficient=class_coefficient,
            matcher=matcher,
            mesh=mesh,
            batch_axes=batch_axes,
        )
        total = total + (
            mask_coefficient * terms["loss_mask"]
            + dice_coefficient * terms["loss_dice"]
            + class_coefficient * terms["loss_ce"]
        )
        metrics.update({f"{name}{suffix}": value for name, value in terms.items()})
    metrics["num_masks"] = num_masks
    # Matched targets of the final output; below the valid count only if an image has more targets than queries.
    metrics["num_matched"] = jnp.sum(target_to_query >= 0).astype(jnp.float32)
    return total, metrics


def mask_classification_loss(
    mask_logits: Sequence[jax.Array],
    class_logits: Sequence[jax.Array],
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
    matcher: str | Matcher = "scipy",
    num_masks: jax.Array | float | None = None,
    class_weight_sum: jax.Array | float | None = None,
    image_index: jax.Array | None = None,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """EoMT's training loss over all network outputs, pure and jittable.

    Args:
      mask_logits: per output (intermediate ones first, final last), (B, Q, h, w) mask logits (any float dtype).
      class_logits: per output, (B, Q, num_classes + 1) class logits; the last index is "no object".
      targets: `masks` bool (B, M, H, W) at image resolution, `labels` int (B, M), `valid` bool (B, M).
      key: PRNG key; every output draws its own fresh points from it, every image its own (see `image_index`).
      num_classes: C, the number of real classes.
      num_points, oversample_ratio, importance_sample_ratio: point sampling, as in the original (12544, 3, 0.75).
      no_object_coefficient: CE weight of the "no object" class.
      mask_coefficient, dice_coefficient, class_coefficient: weights of the terms in the total and in the
        matching cost.
      matcher: 'scipy' (host) | 'optax' (on device) | a function with the signature of `matching.scipy_matcher`.
      num_masks: the mask-loss normaliser; default max(number of valid targets in the batch, 1). Under a
        data-parallel jit the batch is the global one, which reproduces the original's normalisation.
      class_weight_sum: the CE normaliser; default the sum of this batch's CE weights. Pass the global batch's
        `batch_normalisers` (with `num_masks`) when scoring a microbatch of it.
      image_index: (B,) int, each image's position in the global batch, from which its random points derive
        (default arange(B)).
      mesh, batch_axes: match per device shard under `jax.shard_map` (see `matching.py`); None for no shard_map.

    Returns:
      (total, metrics): the weighted sum over outputs, and the unweighted terms `loss_mask`, `loss_dice`,
      `loss_ce` (suffixed `_block_-K` ... `_block_-1` for the intermediate outputs, none for the final one), plus
      `num_masks` and `num_matched`.
    """
    b, m = targets["valid"].shape
    keys = jax.random.split(key, len(mask_logits))
    points = [
        draw_points(
            k,
            b,
            m,
            num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
            image_index=image_index,
        )
        for k in keys
    ]
    return mask_classification_loss_from_points(
        mask_logits,
        class_logits,
        targets,
        points,
        num_classes=num_classes,
        no_object_coefficient=no_object_coefficient,
        mask_coefficient=mask_coefficient,
        dice_coefficient=dice_coefficient,
        class_coefficient=class_coefficient,
        matcher=matcher,
        num_masks=num_masks,
        class_weight_sum=class_weight_sum,
        mesh=mesh,
        batch_axes=batch_axes,
    )
