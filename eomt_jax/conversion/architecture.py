"""Reading the EoMT architecture (`EoMTConfig`) off official-named weights (DINOv2 or DINOv3 backbone),
cross-checked against a Hugging Face config.json and the user's overrides."""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import numpy as np

from eomt_jax.conversion.errors import ConversionError, problem_report
from eomt_jax.conversion.formats import BB, is_square
from eomt_jax.models.eomt import EoMTConfig


def infer_config(
    sd: dict[str, np.ndarray], hf_config: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
    *, backbone: str = "dinov2", defaults: dict[str, Any] | None = None,
    source_name: Callable[[str], str] = lambda key: key,
) -> EoMTConfig:
    """Read the architecture off official-named weights; `overrides` (from --config / --set) take precedence
    for what cannot be read (heads, a non-square image size) and are cross-checked against what can.

    `backbone` says which family the weights are ("dinov2" or "dinov3"). DINOv3 weights hold no grid-dependent
    tensor, so their image size must come from `hf_config`, `overrides` or `defaults` (lowest precedence; e.g. the
    image size of a zoo name); their LayerNorm eps defaults to DINOv3's 1e-5. `source_name` names a missing key as
    the source does.
    """
    overrides = dict(overrides or {})
    need = [
        BB + "cls_token",
        BB + "patch_embed.proj.weight",
        *([BB + "pos_embed"] if backbone == "dinov2" else []),
        "network.q.weight",
        "network.class_head.weight",
        BB + "blocks.0.mlp.fc1.weight",
        BB + "blocks.0.mlp.fc2.weight",
    ]
    absent = [source_name(k) for k in need if k not in sd]
    if absent:
        raise ConversionError(problem_report(unknown=[], missing=absent, shapes=[]))
    dim = sd[BB + "cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(re.escape(BB) + r"blocks\.(\d+)\.", k)))
    patch = sd[BB + "patch_embed.proj.weight"].shape[-1]
    registers = sd[BB + "reg_token"].shape[1] if BB + "reg_token" in sd else 0  # (1, 0, D) when none
    hidden_in = sd[BB + "blocks.0.mlp.fc1.weight"].shape[0]
    hidden_out = sd[BB + "blocks.0.mlp.fc2.weight"].shape[1]
    if hidden_in == hidden_out:
        mlp_type = "gelu"
    elif hidden_in == 2 * hidden_out:
        mlp_type = "swiglu"
    else:
        raise ConversionError(
            f"blocks.0.mlp: fc1 has {hidden_in} outputs and fc2 {hidden_out} inputs; expected equal widths "
            "(GELU MLP) or fc1 twice fc2 (packed SwiGLU)"
        )
    inferred: dict[str, Any] = dict(
        backbone=backbone,
        embed_dim=dim,
        depth=depth,
        patch_size=patch,
        num_registers=registers,
        mlp_type=mlp_type,
        mlp_hidden=hidden_in,
        num_queries=sd["network.q.weight"].shape[0],
        num_classes=sd["network.class_head.weight"].shape[0] - 1,
    )
    if "network.attn_mask_probs" in sd:
        inferred["num_blocks"] = sd["network.attn_mask_probs"].shape[0]

    fixed: dict[str, Any] = {}
    if hf_config:
        fixed["num_heads"] = hf_config.get("num_attention_heads")
        fixed["layer_norm_eps"] = hf_config.get("layer_norm_eps")
        fixed["num_blocks"] = hf_config.get("num_blocks")
        if hf_config.get("image_size") is not None:
            fixed["image_size"] = hf_config["image_size"]
        if backbone == "dinov3":
            fixed["rope_theta"] = (hf_config.get("rope_parameters") or {}).get("rope_theta",
                                                                                hf_config.get("rope_theta"))
            if "pos_embed_rescale" in hf_config:  # null: no training-time rescale
                fixed["rope_rescale"] = hf_config["pos_embed_rescale"] or 1.0
        fixed = {k: v for k, v in fixed.items() if v is not None}

    problems = []
    for source in (fixed, overrides):
        for k, v in source.items():
            if k in inferred and _norm(v) != _norm(inferred[k]):
                problems.append(f"{k}: the weights say {inferred[k]!r} but the configuration says {v!r}")
    if problems:
        raise ConversionError("architecture mismatch:\n  " + "\n  ".join(problems))
    family_defaults = {"layer_norm_eps": 1e-5} if backbone == "dinov3" else {}
    merged = {**family_defaults, **(defaults or {}), **inferred, **fixed, **overrides}
    merged.setdefault("num_heads", dim // 64 if dim % 64 == 0 else None)
    if merged["num_heads"] is None:
        raise ConversionError(f"cannot infer num_heads for width {dim} (not a multiple of 64); pass it explicitly")
    if "num_blocks" not in merged:
        raise ConversionError(
            "the checkpoint has no attn_mask_probs, so K (num_blocks) is unknown; pass it explicitly"
        )
    if backbone == "dinov3":
        if "image_size" not in merged:
            raise ConversionError(
                "DINOv3 weights do not tell the image size (no position table: the rotary positions follow the "
                "input); pass it with --set image_size=640 (or (height, width)), or with --config, or keep the "
                "model's zoo name (e.g. coco_panoptic_eomt_large_1280_dinov3) in the source's path"
            )
        return EoMTConfig.from_dict(merged)
    n_pos = sd[BB + "pos_embed"].shape[1]
    if "image_size" not in merged:
        if not is_square(n_pos):
            raise ConversionError(
                f"pos_embed has {n_pos} positions, not a square grid; pass image_size (height, width) explicitly"
            )
        merged["image_size"] = int(round(math.sqrt(n_pos))) * patch
    cfg = EoMTConfig.from_dict(merged)
    if cfg.grid_size[0] * cfg.grid_size[1] != n_pos:
        raise ConversionError(
            f"pos_embed has {n_pos} positions but image_size {cfg.image_size} with patch {patch} "
            f"needs a {cfg.grid_size[0]}x{cfg.grid_size[1]} grid"
        )
    return cfg


def _norm(v):
    if isinstance(v, (list, tuple)):
        return tuple(_norm(x) for x in v)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    return v
