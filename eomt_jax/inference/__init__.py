"""Evaluation and prediction around the network: input geometry, panoptic/instance post-processing and
sliding-window semantic inference, reproducing the original EoMT evaluation exactly (see each module)."""

from eomt_jax.inference.postprocess import (canvas_for, instance_postprocess, instance_topk, panoptic_merge,
                                            panoptic_postprocess, revert_mask_logits)
from eomt_jax.inference.predict import predict_instance, predict_panoptic, predict_semantic
from eomt_jax.inference.preprocess import resize_and_pad, semantic_windows, short_side_size, window_starts
from eomt_jax.inference.semantic import stitch_windows, window_class_scores

__all__ = ["canvas_for", "instance_postprocess", "instance_topk", "panoptic_merge", "panoptic_postprocess",
           "revert_mask_logits", "predict_instance", "predict_panoptic", "predict_semantic", "resize_and_pad",
           "semantic_windows", "short_side_size", "window_starts", "stitch_windows", "window_class_scores"]
