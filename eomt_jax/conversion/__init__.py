"""PyTorch EoMT / DINOv2 / DINOv3 checkpoints -> Flax parameter trees -> converted checkpoint directories
(`pretrained`).

    from eomt_jax import conversion
    dst, config = conversion.convert("pytorch_model.bin", "out/")   # then eomt_jax.pretrained.load("out/")
    dst, config = conversion.convert("coco_panoptic_eomt_large_640_dinov3/pytorch_model.bin", "out/",
                                     base="dinov3-vitl16-pretrain-lvd1689m/")

Accepted sources:
  * the original's model-zoo `pytorch_model.bin`: a flat state dict with `network.*` keys (a Lightning
    checkpoint with a `state_dict` entry is unwrapped). The DINOv3 zoo files (`*_dinov3`) hold the backbone as a
    difference from the gated DINOv3 weights, which must be given as `base` (a Hugging Face directory or
    `model.safetensors`, or Meta's `.pth`); see `dinov3.merge_delta` for how the files combine;
  * a Hugging Face `EomtForUniversalSegmentation` or `EomtDinov3ForUniversalSegmentation` directory
    (`config.json` + `model.safetensors` or `pytorch_model.bin`), or such a weights file alone;
  * a DINOv2 backbone with registers (timm or Hugging Face names) to start training from: the backbone is
    resampled to patch 16 and the requested image size, and the EoMT head is freshly initialised;
  * a DINOv3 backbone (Hugging Face hub or Meta names) to start training from, under a fresh EoMT head.

Every source is first renamed into the official `network.*` naming, then mapped onto the Flax tree by one table
of rules. All problems (unknown keys, missing keys, shape mismatches) are collected and reported together, each key
named as the source names it; nothing is written unless the conversion succeeds.

The architecture is read off the weights. DINOv3 weights do not tell the image size (no position table): it comes
from `overrides`, a Hugging Face config.json, or the zoo name in the source's path
(e.g. `coco_panoptic_eomt_large_1280_dinov3/pytorch_model.bin`), and is an error otherwise.

The steps, one module each: reading (files -> numpy), formats (source names -> official names), dinov3 (the DINOv3
forms' names and the zoo's delta files), architecture (official weights -> EoMTConfig), flax_layout (official
names -> Flax paths), resample (patch kernels), backbone_init (a backbone + fresh head), settings (the task and
class names stored beside the weights); the output format belongs to `eomt_jax.pretrained`; the command line
(`convert/torch_to_flax.py`) is `cli.main`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from eomt_jax import pretrained
from eomt_jax.atomic import check_destination
from eomt_jax.conversion import dinov3
from eomt_jax.conversion.architecture import infer_config
from eomt_jax.conversion.backbone_init import backbone_init, dinov3_backbone_init
from eomt_jax.conversion.errors import ConversionError, problem_report
from eomt_jax.conversion.flax_layout import expected_shapes, official_to_flat
from eomt_jax.conversion.formats import (
    DINOV3_FORMATS,
    detect_format,
    dinov2_to_official,
    hf_eomt_to_official,
    source_names,
)
from eomt_jax.conversion.reading import read_state_dict
from eomt_jax.conversion.resample import resample_patch_kernel
from eomt_jax.conversion.settings import task_metadata
from eomt_jax.models.eomt import EoMTConfig

__all__ = [
    "ConversionError", "convert", "detect_format", "dinov2_to_official", "dinov3", "expected_shapes",
    "hf_eomt_to_official", "infer_config", "official_to_flat", "read_state_dict", "resample_patch_kernel",
]


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
    task: str | None = None,
    dataset: str | None = None,
) -> tuple[Path, EoMTConfig]:
    """Convert `src` into an Orbax checkpoint directory `dst`; returns (dst, model config).

    `base`: the DINOv3 backbone that a zoo DINOv3 file (`*_dinov3/pytorch_model.bin`) is a difference from.
    `task` and `dataset` (its class names) are stored with the weights; each defaults to what a model-zoo name in
    `src` says (`settings.task_metadata`). `metadata` adds further entries.
    """
    check_destination(dst, overwrite=overwrite)  # before reading what may be gigabytes
    sd, hf_config = read_state_dict(src)
    fmt = detect_format(sd, hf_config)
    if base is not None and fmt != "official_dinov3":
        raise ConversionError(f"--base is for the DINOv3 model zoo's delta files; {src} is a {fmt} checkpoint")
    meta = {"source": str(src), "source_format": fmt}
    native_pos = None
    if fmt in DINOV3_FORMATS:
        flat, config = _dinov3(sd, hf_config, fmt, src, base, overrides or {}, seed)
        if base is not None:
            meta["base"] = str(base)
    elif fmt in ("timm_dinov2", "hf_dinov2"):
        flat, config, native_pos = backbone_init(dinov2_to_official(sd, fmt), overrides or {}, seed,
                                                 source_names(fmt))
    else:
        if fmt == "hf_eomt":
            sd = hf_eomt_to_official(sd)
        config = infer_config(sd, hf_config, overrides)
        flat = official_to_flat(sd, expected_shapes(config), source_names(fmt))
    meta.update(task_metadata(src, config.num_classes, task=task, dataset=dataset))
    out = pretrained.write(dst, flat, config, metadata={**meta, **(metadata or {})}, dtype=dtype,
                           overwrite=overwrite, source_pos_embed=native_pos)
    return out, config


def _dinov3(sd, hf_config, fmt, src, base, overrides, seed) -> tuple[dict[str, np.ndarray], EoMTConfig]:
    """A DINOv3 source (`dinov3`) -> (Flax path -> array, model config)."""
    if fmt in ("hf_dinov3", "meta_dinov3"):
        sd, name, missing = dinov3.dinov3_to_official(*dinov3.backbone_to_dinov3(sd, fmt))
        return dinov3_backbone_init(sd, overrides, seed, name, missing)
    problems: list[str] = []
    if fmt == "hf_eomt_dinov3":
        sd, name, missing = dinov3.dinov3_to_official(*dinov3.hf_eomt_to_dinov3(sd))
    else:
        if base is None:
            raise ConversionError(dinov3.missing_base_message(sd, src))
        base_sd, _ = read_state_dict(base)
        base_fmt = detect_format(base_sd)
        if base_fmt not in ("hf_dinov3", "meta_dinov3"):
            raise ConversionError(f"--base {base}: expected a DINOv3 backbone, found a {base_fmt} checkpoint")
        base_sd, base_name = dinov3.backbone_to_dinov3(base_sd, base_fmt)
        sd, problems = dinov3.merge_delta(sd, base_sd, base_name, src=src, base_path=base)
        sd, name, missing = dinov3.dinov3_to_official(sd)  # the delta's own names are the original's DINOv3 ones
    zoo_size = dinov3.zoo_image_size(src)
    try:
        config = infer_config(sd, hf_config, overrides, backbone="dinov3", source_name=name,
                              defaults={"image_size": zoo_size} if zoo_size else None)
    except ConversionError as e:
        if problems or missing:  # one report: what the renaming and the merge found, then this
            raise ConversionError(problem_report(unknown=[], missing=missing, shapes=problems) + "\n" + str(e)
                                  ) from None
        raise
    return official_to_flat(sd, expected_shapes(config), name, missing=missing, problems=problems), config
