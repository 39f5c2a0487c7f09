"""Training loss: Hungarian matching, point sampling and the mask-classification loss."""

from eomt_jax.losses.mask_classification import (
    SamplePoints,
    batch_normalisers,
    draw_points,
    mask_classification_loss,
    mask_classification_loss_from_points,
    matching_cost,
    output_loss,
    output_names,
)
from eomt_jax.losses.matching import MATCHERS, get_matcher, match, optax_matcher, scipy_matcher
from eomt_jax.losses.point_sampling import point_sample

__all__ = [
    "MATCHERS",
    "SamplePoints",
    "batch_normalisers",
    "draw_points",
    "get_matcher",
    "mask_classification_loss",
    "mask_classification_loss_from_points",
    "match",
    "matching_cost",
    "optax_matcher",
    "output_loss",
    "output_names",
    "point_sample",
    "scipy_matcher",
]
