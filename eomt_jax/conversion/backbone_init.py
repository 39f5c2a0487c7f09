"""A DINOv2 or DINOv3 backbone as a training start, under a freshly initialised EoMT head (queries, class and mask
heads, upscaler). DINOv2 weights are resampled to the EoMT patch size and image grid; DINOv3's patch 16 is EoMT's and
its positions are rotary, so its weights are taken as they are."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from flax import nnx

from eomt_jax.conversion.architecture import infer_config
from eomt_jax.conversion.errors import ConversionError
from eomt_jax.conversion.flax_layout import official_to_flat
from eomt_jax.conversion.formats import BB, is_square
from eomt_jax.conversion.resample import resample_patch_kernel
from eomt_jax.models.eomt import EoMT, EoMTConfig
from eomt_jax.models.vit import resample_pos_embed
from eomt_jax.tree import flatten_paths


def backbone_init(
    sd: dict[str, np.ndarray], overrides: dict[str, Any], seed: int,
    source_name: Callable[[str], str] = lambda key: key,
) -> tuple[dict[str, np.ndarray], EoMTConfig, np.ndarray]:
    """DINOv2 backbone (official names, native patch/grid) + fresh EoMT head, resampled to patch 16 (or
    `overrides["patch_size"]`) and the requested image size; returns (Flax path -> array, model config, the
    backbone's position embedding on its native grid)."""
    _require_head(overrides, "DINOv2")
    patch = int(overrides.get("patch_size", 16))
    n_pos = sd[BB + "pos_embed"].shape[1]
    if not is_square(n_pos):
        raise ConversionError(f"DINOv2 pos_embed has {n_pos} positions, expected a square grid")
    native_grid = int(round(math.sqrt(n_pos)))
    sd[BB + "patch_embed.proj.weight"] = resample_patch_kernel(sd[BB + "patch_embed.proj.weight"], patch)
    # Infer the backbone shape from the weights and take the head settings from the overrides.
    probe = dict(sd)
    probe["network.q.weight"] = np.zeros((overrides["num_queries"], 1), np.float32)
    probe["network.class_head.weight"] = np.zeros((overrides["num_classes"] + 1, 1), np.float32)
    grid_override = {k: v for k, v in overrides.items() if k != "image_size"}
    config = infer_config(probe, None, {**grid_override, "image_size": native_grid * patch})
    config = config.replace(image_size=overrides["image_size"])
    native_pos = np.asarray(sd[BB + "pos_embed"], np.float32)
    pos = resample_pos_embed(native_pos, (native_grid, native_grid), config.grid_size)
    sd[BB + "pos_embed"] = np.asarray(pos)
    return _with_fresh_head(sd, config, seed, source_name), config, native_pos


def dinov3_backbone_init(
    sd: dict[str, np.ndarray], overrides: dict[str, Any], seed: int,
    source_name: Callable[[str], str] = lambda key: key, missing: Sequence[str] = (),
) -> tuple[dict[str, np.ndarray], EoMTConfig]:
    """DINOv3 backbone (official names, `conversion.dinov3`) + fresh EoMT head; returns (Flax path -> array, model
    config). The head settings and the image size come from `overrides`; `missing`: keys the renaming found
    missing, reported with the rest."""
    _require_head(overrides, "DINOv3")
    probe = dict(sd)
    probe["network.q.weight"] = np.zeros((overrides["num_queries"], 1), np.float32)
    probe["network.class_head.weight"] = np.zeros((overrides["num_classes"] + 1, 1), np.float32)
    config = infer_config(probe, None, overrides, backbone="dinov3", source_name=source_name)
    return _with_fresh_head(sd, config, seed, source_name, missing), config


def _require_head(overrides: dict[str, Any], family: str) -> None:
    required = ("num_classes", "num_queries", "num_blocks", "image_size")
    absent = [k for k in required if k not in overrides]
    if absent:
        raise ConversionError(
            f"a {family} backbone carries no EoMT head; pass {', '.join(absent)} (e.g. with --config or --set)"
        )


def _with_fresh_head(sd: dict[str, np.ndarray], config: EoMTConfig, seed: int,
                     source_name: Callable[[str], str], missing: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """A freshly initialised network's parameters, with the backbone's replaced by `sd` (checked key by key)."""
    fresh = EoMT(config, rngs=nnx.Rngs(seed))
    _, state = nnx.split(fresh)
    flat = {k: np.asarray(v) for k, v in flatten_paths(state).items()}
    shapes = {k: v.shape for k, v in flat.items() if k.startswith("backbone/")}
    backbone = official_to_flat(sd, shapes, source_name, missing=missing)
    flat.update(backbone)
    return flat
