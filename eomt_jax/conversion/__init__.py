"""PyTorch EoMT / DINOv2 checkpoints -> Flax parameter trees -> converted checkpoint directories (`pretrained`).

    from eomt_jax import conversion
    dst, config = conversion.convert("pytorch_model.bin", "out/")   # then eomt_jax.pretrained.load("out/")

Accepted sources:
  * the original's model-zoo `pytorch_model.bin`: a flat state dict with `network.*` keys (a Lightning
    checkpoint with a `state_dict` entry is unwrapped);
  * a Hugging Face `EomtForUniversalSegmentation` directory (`config.json` + `model.safetensors` or
    `pytorch_model.bin`), or such a weights file alone;
  * a DINOv2 backbone with registers (timm or Hugging Face names) to start training from: the backbone is
    resampled to patch 16 and the requested image size, and the EoMT head is freshly initialised.

Every source is first renamed into the official `network.*` naming, then mapped onto the Flax tree by one table
of rules. All problems (unknown keys, missing keys, shape mismatches) are collected and reported together.

The steps, one module each: reading (files -> numpy), formats (source names -> official names), architecture
(official weights -> EoMTConfig), flax_layout (official names -> Flax paths), resample (patch kernels),
backbone_init (DINOv2 + fresh head); the output format belongs to `eomt_jax.pretrained`; the command line
(`convert/torch_to_flax.py`) is `cli.main`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from eomt_jax import pretrained
from eomt_jax.conversion.architecture import infer_config
from eomt_jax.conversion.backbone_init import backbone_init
from eomt_jax.conversion.errors import ConversionError
from eomt_jax.conversion.flax_layout import expected_shapes, official_to_flat
from eomt_jax.conversion.formats import detect_format, dinov2_to_official, hf_eomt_to_official, source_names
from eomt_jax.conversion.reading import read_state_dict
from eomt_jax.conversion.resample import resample_patch_kernel
from eomt_jax.models.eomt import EoMTConfig

__all__ = [
    "ConversionError", "convert", "detect_format", "dinov2_to_official", "expected_shapes", "hf_eomt_to_official",
    "infer_config", "official_to_flat", "read_state_dict", "resample_patch_kernel",
]


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    overrides: dict[str, Any] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
) -> tuple[Path, EoMTConfig]:
    """Convert `src` into an Orbax checkpoint directory `dst`; returns (dst, model config)."""
    sd, hf_config = read_state_dict(src)
    fmt = detect_format(sd)
    if fmt == "hf_eomt":
        sd = hf_eomt_to_official(sd)
    native_pos = None
    if fmt in ("timm_dinov2", "hf_dinov2"):
        flat, config, native_pos = backbone_init(dinov2_to_official(sd, fmt), overrides or {}, seed,
                                                 source_names(fmt))
    else:
        config = infer_config(sd, hf_config, overrides)
        flat = official_to_flat(sd, expected_shapes(config), source_names(fmt))
    meta = {"source": str(src), "source_format": fmt, **(metadata or {})}
    out = pretrained.write(dst, flat, config, metadata=meta, dtype=dtype, overwrite=overwrite,
                           source_pos_embed=native_pos)
    return out, config
