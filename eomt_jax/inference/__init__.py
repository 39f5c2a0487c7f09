"""Inference around the network: input geometry, the jitted forward, panoptic/instance post-processing and
sliding-window semantic inference (reproducing the original EoMT evaluation exactly; see each module), the
standard prediction files and overlay pictures."""

from eomt_jax.inference.forward import make_forward
from eomt_jax.inference.pipeline import predict, predict_instance, predict_panoptic, predict_semantic
from eomt_jax.inference.postprocess import (canvas_for, instance_postprocess, instance_topk, panoptic_merge,
                                            panoptic_postprocess, revert_mask_logits)
from eomt_jax.inference.preprocess import resize_and_pad, semantic_windows, short_side_size, window_starts
from eomt_jax.inference.semantic import stitch_windows, window_class_scores

__all__ = ["canvas_for", "instance_postprocess", "instance_topk", "make_forward", "panoptic_merge",
           "panoptic_postprocess", "predict", "revert_mask_logits", "predict_instance", "predict_panoptic",
           "predict_semantic", "resize_and_pad", "semantic_windows", "short_side_size", "window_starts",
           "stitch_windows", "window_class_scores"]
