"""Training loss: Hungarian matching, point sampling and the mask-classification loss."""

from eomt_jax.losses.mask_classification import mask_classification_loss, output_loss, output_names
from eomt_jax.losses.matching import match
from eomt_jax.losses.point_sampling import point_sample

__all__ = ["mask_classification_loss", "match", "output_loss", "output_names", "point_sample"]
