"""Evaluation: the loop over a validation split (`--mode=eval`, and periodic evaluation during training),
streaming metrics (PQ, mIoU, mask AP), and scoring of prediction files in the standard formats."""

from eomt_jax.evaluation.loop import evaluate, run
from eomt_jax.evaluation.metrics import InstanceAP, MeanIoU, PanopticQuality, make_metric

__all__ = ["InstanceAP", "MeanIoU", "PanopticQuality", "evaluate", "make_metric", "run"]
