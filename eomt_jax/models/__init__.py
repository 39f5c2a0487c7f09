"""The EoMT network (Flax NNX) and its DINOv2 backbone."""

from eomt_jax.models.eomt import EoMT, EoMTConfig, init_model, preset
from eomt_jax.models.vit import resample_pos_embed

__all__ = ["EoMT", "EoMTConfig", "init_model", "preset", "resample_pos_embed"]
