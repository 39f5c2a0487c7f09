"""PyTorch EoMT / DINOv2 checkpoints -> Flax parameter trees -> Orbax checkpoint directories.

Accepted sources:
  * the original's model-zoo `pytorch_model.bin`: a flat state dict with `network.*` keys (a Lightning
    checkpoint with a `state_dict` entry is unwrapped);
  * a Hugging Face `EomtForUniversalSegmentation` directory (`config.json` + `model.safetensors` or
    `pytorch_model.bin`), or such a weights file alone;
  * a DINOv2 backbone with registers (timm or Hugging Face names) to start training from: the backbone is
    resampled to patch 16 and the requested image size, and the EoMT head is freshly initialised.

Every source is first renamed into the official `network.*` naming, then mapped onto the Flax tree by one table
of rules. All problems (unknown keys, missing keys, shape mismatches) are collected and reported together.
"""

from __future__ import annotations

import json
import math
import os
import sys
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from eomt_jax.models.eomt import IMAGENET_MEAN, IMAGENET_STD, EoMTConfig


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message lists every offending key."""


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_state_dict(src: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """Load a checkpoint as float32 numpy arrays, without executing pickled code.

    Returns (state dict, Hugging Face config.json contents or None).
    """
    path = Path(src)
    hf_config = None
    if path.is_dir():
        cfg_file = path / "config.json"
        if cfg_file.exists():
            try:
                hf_config = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise ConversionError(f"{cfg_file}: not valid JSON ({e})") from None
        weights = [path / f for f in _WEIGHT_FILES if (path / f).exists()]
        if not weights:
            raise ConversionError(f"{path}: no weights found; expected one of {', '.join(_WEIGHT_FILES)}")
        path = weights[0]
    elif not path.exists():
        raise ConversionError(f"{path}: no such file or directory")

    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated headers/data
            raise ConversionError(f"{path}: cannot read safetensors file ({e})") from None
    else:
        sd = _torch_load(path)
    return {k: _to_float32(k, v, path) for k, v in sd.items()}, hf_config


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path}: reading PyTorch pickle files needs torch; install it (CPU build is enough) "
            "or convert from a .safetensors file"
        ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{path}: cannot load as a PyTorch state dict ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not hasattr(v, "detach"):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor")
        out[k.replace("._orig_mod", "").replace("_orig_mod.", "")] = v.detach().to(torch.float32).numpy()
    return out


def _to_float32(key: str, v, path: Path) -> np.ndarray:
    a = np.asarray(v)
    if not np.issubdtype(a.dtype, np.floating) and a.dtype != np.dtype("bfloat16"):
        raise ConversionError(f"{path}: entry {key!r} has dtype {a.dtype}, expected a floating-point tensor")
    return a.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Formats -> official names
# ----------------------------------------------------------------------------------------------------------------


def detect_format(keys) -> str:
    keys = set(keys)
    if any(k.startswith("network.") for k in keys):
        return "official"
    stripped = {_strip_hf_prefix(k) for k in keys}
    if "query.weight" in stripped and any(k.startswith("embeddings.") for k in stripped):
        return "hf_eomt"
    if any(k.startswith("encoder.layer.") for k in stripped) and "embeddings.cls_token" in stripped:
        return "hf_dinov2"
    if "cls_token" in keys and any(k.startswith("blocks.") for k in keys):
        return "timm_dinov2"
    raise ConversionError(
        "unrecognised checkpoint: expected official EoMT keys (network.*), Hugging Face EoMT keys "
        "(embeddings.*, layers.*, query.weight), or a DINOv2 backbone (timm blocks.* or HF encoder.layer.*); "
        f"first keys: {sorted(keys)[:8]}"
    )


def _strip_hf_prefix(k: str) -> str:
    for p in ("model.", "eomt."):
        if k.startswith(p):
            return k[len(p) :]
    return k


_BB = "network.encoder.backbone."

# Hugging Face EomtForUniversalSegmentation -> official names. Entries are (pattern, replacement); keys that need
# tensor surgery (split q/k/v projections, gated MLP halves) are handled in hf_eomt_to_official.
_HF_RENAMES: list[tuple[str, str]] = [
    (r"^embeddings\.cls_token$", _BB + "cls_token"),
    (r"^embeddings\.register_tokens$", _BB + "reg_token"),
    (r"^embeddings\.position_embeddings\.weight$", _BB + "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", _BB + r"patch_embed.proj.\1"),
    (r"^layers\.(\d+)\.(norm1|norm2)\.(weight|bias)$", _BB + r"blocks.\1.\2.\3"),
    (r"^layers\.(\d+)\.attention\.out_proj\.(weight|bias)$", _BB + r"blocks.\1.attn.proj.\2"),
    (r"^layers\.(\d+)\.layer_scale1\.lambda1$", _BB + r"blocks.\1.ls1.gamma"),
    (r"^layers\.(\d+)\.layer_scale2\.lambda1$", _BB + r"blocks.\1.ls2.gamma"),
    (r"^layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", _BB + r"blocks.\1.mlp.\2.\3"),
    (r"^layers\.(\d+)\.mlp\.weights_in\.(weight|bias)$", _BB + r"blocks.\1.mlp.fc1.\2"),
    (r"^layers\.(\d+)\.mlp\.weights_out\.(weight|bias)$", _BB + r"blocks.\1.mlp.fc2.\2"),
    (r"^layers\.(\d+)\.mlp\.down_proj\.(weight|bias)$", _BB + r"blocks.\1.mlp.fc2.\2"),
    (r"^layernorm\.(weight|bias)$", _BB + r"norm.\1"),
    (r"^query\.weight$", "network.q.weight"),
    (r"^class_predictor\.(weight|bias)$", r"network.class_head.\1"),
    (r"^mask_head\.fc1\.(weight|bias)$", r"network.mask_head.0.\1"),
    (r"^mask_head\.fc2\.(weight|bias)$", r"network.mask_head.2.\1"),
    (r"^mask_head\.fc3\.(weight|bias)$", r"network.mask_head.4.\1"),
    (r"^upscale_block\.block\.(\d+)\.(conv1|conv2)\.(weight|bias)$", r"network.upscale.\1.\2.\3"),
    (r"^upscale_block\.block\.(\d+)\.layernorm2d\.(weight|bias)$", r"network.upscale.\1.norm.\2"),
    (r"^attn_mask_probs$", "network.attn_mask_probs"),
    (r"^criterion\.empty_weight$", "criterion.empty_weight"),
]


def _apply_renames(sd, renames, fused: Callable[[str, np.ndarray, dict], bool], unknown: list[str]):
    out: dict[str, np.ndarray] = {}
    groups: dict[str, Any] = {}
    for key, value in sd.items():
        if fused(key, value, groups):
            continue
        for pat, rep in renames:
            if re.match(pat, key):
                out[re.sub(pat, rep, key)] = value
                break
        else:
            unknown.append(key)
    return out, groups


def hf_eomt_to_official(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sd = {_strip_hf_prefix(k): v for k, v in sd.items()}
    sd.pop("embeddings.position_ids", None)
    unknown: list[str] = []
    qkv_re = re.compile(r"^layers\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)$")
    glu_re = re.compile(r"^layers\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)$")

    def fused(key, value, groups):
        for rx, kind in ((qkv_re, "qkv"), (glu_re, "glu")):
            m = rx.match(key)
            if m:
                groups.setdefault((kind, m.group(1), m.group(3)), {})[m.group(2)] = value
                return True
        return False

    out, groups = _apply_renames(sd, _HF_RENAMES, fused, unknown)
    missing: list[str] = []
    for (kind, block, leaf), parts in sorted(groups.items()):
        if kind == "qkv":
            # The fused projection's rows are [q; k; v], each head-major, as in the original checkpoints.
            order, target = ("q", "k", "v"), f"{_BB}blocks.{block}.attn.qkv.{leaf}"
            prefix = f"layers.{block}.attention."
        else:
            # Packed SwiGLU: the first half of fc1 is the SiLU gate, the second half the value.
            order, target = ("gate", "up"), f"{_BB}blocks.{block}.mlp.fc1.{leaf}"
            prefix = f"layers.{block}.mlp."
        absent = [p for p in order if p not in parts]
        if absent:
            missing += [f"{prefix}{p}_proj.{leaf}" for p in absent]
            continue
        out[target] = np.concatenate([parts[p] for p in order], axis=0)
    if unknown or missing:
        raise ConversionError(_problem_report(unknown=unknown, missing=missing, shapes=[]))
    if _BB + "pos_embed" in out:
        out[_BB + "pos_embed"] = out[_BB + "pos_embed"][None]
    return out


# DINOv2 backbone-only checkpoints -> official names (under network.encoder.backbone.)
_TIMM_DINO_RENAMES: list[tuple[str, str]] = [
    (r"^(cls_token|reg_token|pos_embed)$", _BB + r"\1"),
    (r"^patch_embed\.proj\.(weight|bias)$", _BB + r"patch_embed.proj.\1"),
    (r"^blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)$", _BB + r"blocks.\1.\2.\3"),
    (r"^blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$", _BB + r"blocks.\1.attn.\2.\3"),
    (r"^blocks\.(\d+)\.(ls1|ls2)\.gamma$", _BB + r"blocks.\1.\2.gamma"),
    (r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", _BB + r"blocks.\1.mlp.\2.\3"),
    (r"^norm\.(weight|bias)$", _BB + r"norm.\1"),
]
_TIMM_DINO_IGNORED = re.compile(r"^(mask_token|head\..*|fc_norm\..*)$")

_HF_DINO_RENAMES: list[tuple[str, str]] = [
    (r"^embeddings\.cls_token$", _BB + "cls_token"),
    (r"^embeddings\.register_tokens$", _BB + "reg_token"),
    (r"^embeddings\.position_embeddings$", _BB + "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", _BB + r"patch_embed.proj.\1"),
    (r"^encoder\.layer\.(\d+)\.(norm1|norm2)\.(weight|bias)$", _BB + r"blocks.\1.\2.\3"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$", _BB + r"blocks.\1.attn.proj.\2"),
    (r"^encoder\.layer\.(\d+)\.attention\.o_proj\.(weight|bias)$", _BB + r"blocks.\1.attn.proj.\2"),
    (r"^encoder\.layer\.(\d+)\.layer_scale1\.lambda1$", _BB + r"blocks.\1.ls1.gamma"),
    (r"^encoder\.layer\.(\d+)\.layer_scale2\.lambda1$", _BB + r"blocks.\1.ls2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", _BB + r"blocks.\1.mlp.\2.\3"),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.(weight|bias)$", _BB + r"blocks.\1.mlp.fc1.\2"),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.(weight|bias)$", _BB + r"blocks.\1.mlp.fc2.\2"),
    (r"^layernorm\.(weight|bias)$", _BB + r"norm.\1"),
]
_HF_DINO_IGNORED = re.compile(r"^(embeddings\.mask_token|embeddings\.position_ids|pooler\..*)$")


def dinov2_to_official(sd: dict[str, np.ndarray], fmt: str) -> dict[str, np.ndarray]:
    """Backbone-only DINOv2 (timm or HF names) -> official backbone keys, still at its native patch/grid size."""
    unknown: list[str] = []
    if fmt == "timm_dinov2":
        sd = {k: v for k, v in sd.items() if not _TIMM_DINO_IGNORED.match(k)}
        out, _ = _apply_renames(sd, _TIMM_DINO_RENAMES, lambda *a: False, unknown)
    else:
        sd = {_strip_hf_prefix(k): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not _HF_DINO_IGNORED.match(k)}
        # Hub files name the projections attention.attention.{query,key,value}; recent transformers releases
        # save them as attention.{q,k,v}_proj.
        qkv_re = re.compile(
            r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$"
        )
        short = {"q": "query", "k": "key", "v": "value"}

        def fused(key, value, groups):
            m = qkv_re.match(key)
            if m:
                name = m.group(2) or short[m.group(3)]
                groups.setdefault((m.group(1), m.group(4)), {})[name] = value
                return True
            return False

        out, groups = _apply_renames(sd, _HF_DINO_RENAMES, fused, unknown)
        missing = []
        for (block, leaf), parts in sorted(groups.items()):
            absent = [p for p in ("query", "key", "value") if p not in parts]
            if absent:
                missing += [f"encoder.layer.{block}.attention.attention.{p}.{leaf}" for p in absent]
                continue
            out[f"{_BB}blocks.{block}.attn.qkv.{leaf}"] = np.concatenate(
                [parts["query"], parts["key"], parts["value"]], axis=0
            )
        if missing:
            raise ConversionError(_problem_report(unknown=unknown, missing=missing, shapes=[]))
        # HF keeps the cls position in the table; timm folds it into the cls token. Fold it here too.
        pos = out.get(_BB + "pos_embed")
        if pos is not None and _is_square(pos.shape[1] - 1) and not _is_square(pos.shape[1]):
            out[_BB + "cls_token"] = out[_BB + "cls_token"] + pos[:, :1]
            out[_BB + "pos_embed"] = pos[:, 1:]
    if unknown:
        raise ConversionError(_problem_report(unknown=unknown, missing=[], shapes=[]))
    return out


def _is_square(n: int) -> bool:
    r = int(round(math.sqrt(n)))
    return r * r == n


# ----------------------------------------------------------------------------------------------------------------
# Architecture inference
# ----------------------------------------------------------------------------------------------------------------


def infer_config(
    sd: dict[str, np.ndarray], hf_config: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> EoMTConfig:
    """Read the architecture off official-named weights; `overrides` (from --config / --set) take precedence
    for what cannot be read (heads, a non-square image size) and are cross-checked against what can."""
    overrides = dict(overrides or {})
    need = [
        _BB + "cls_token",
        _BB + "patch_embed.proj.weight",
        _BB + "pos_embed",
        "network.q.weight",
        "network.class_head.weight",
        _BB + "blocks.0.mlp.fc1.weight",
        _BB + "blocks.0.mlp.fc2.weight",
    ]
    absent = [k for k in need if k not in sd]
    if absent:
        raise ConversionError(_problem_report(unknown=[], missing=absent, shapes=[]))
    dim = sd[_BB + "cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(re.escape(_BB) + r"blocks\.(\d+)\.", k)))
    patch = sd[_BB + "patch_embed.proj.weight"].shape[-1]
    registers = sd[_BB + "reg_token"].shape[1] if _BB + "reg_token" in sd else 0  # (1, 0, D) when none
    hidden_in = sd[_BB + "blocks.0.mlp.fc1.weight"].shape[0]
    hidden_out = sd[_BB + "blocks.0.mlp.fc2.weight"].shape[1]
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
    n_pos = sd[_BB + "pos_embed"].shape[1]

    fixed: dict[str, Any] = {}
    if hf_config:
        fixed["num_heads"] = hf_config.get("num_attention_heads")
        fixed["layer_norm_eps"] = hf_config.get("layer_norm_eps")
        fixed["num_blocks"] = hf_config.get("num_blocks")
        if hf_config.get("image_size") is not None:
            fixed["image_size"] = hf_config["image_size"]
        fixed = {k: v for k, v in fixed.items() if v is not None}

    problems = []
    for source in (fixed, overrides):
        for k, v in source.items():
            if k in inferred and _norm(v) != _norm(inferred[k]):
                problems.append(f"{k}: the weights say {inferred[k]!r} but the configuration says {v!r}")
    if problems:
        raise ConversionError("architecture mismatch:\n  " + "\n  ".join(problems))
    merged = {**inferred, **fixed, **overrides}
    merged.setdefault("num_heads", dim // 64 if dim % 64 == 0 else None)
    if merged["num_heads"] is None:
        raise ConversionError(f"cannot infer num_heads for width {dim} (not a multiple of 64); pass it explicitly")
    if "num_blocks" not in merged:
        raise ConversionError(
            "the checkpoint has no attn_mask_probs, so K (num_blocks) is unknown; pass it explicitly"
        )
    if "image_size" not in merged:
        if not _is_square(n_pos):
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


# ----------------------------------------------------------------------------------------------------------------
# Official names -> Flax tree
# ----------------------------------------------------------------------------------------------------------------


def _t(a):  # torch Linear (out, in) -> Flax (in, out)
    return a.T


def _conv(a):  # OIHW -> HWIO
    return a.transpose(2, 3, 1, 0)


def _conv_t(a):  # ConvTranspose (in, out, kh, kw) -> (kh, kw, in, out); our op is a direct matmul, no flip
    return a.transpose(2, 3, 0, 1)


def _copy(a):
    return a


# (pattern over official keys, Flax path template, transform). Ordered; first match wins.
_RULES: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
    (r"network\.encoder\.backbone\.(cls_token|reg_token|pos_embed)", r"backbone/\1", _copy),
    (r"network\.encoder\.backbone\.patch_embed\.proj\.weight", "backbone/patch_embed/proj/kernel", _conv),
    (r"network\.encoder\.backbone\.patch_embed\.proj\.bias", "backbone/patch_embed/proj/bias", _copy),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.(norm1|norm2)\.weight", r"backbone/blocks/\1/\2/scale", _copy),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.(norm1|norm2)\.bias", r"backbone/blocks/\1/\2/bias", _copy),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.attn\.(qkv|proj)\.weight", r"backbone/blocks/\1/attn/\2/kernel", _t),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.attn\.(qkv|proj)\.bias", r"backbone/blocks/\1/attn/\2/bias", _copy),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.(ls1|ls2)\.gamma", r"backbone/blocks/\1/\2/gamma", _copy),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.weight", r"backbone/blocks/\1/mlp/\2/kernel", _t),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.bias", r"backbone/blocks/\1/mlp/\2/bias", _copy),
    (r"network\.encoder\.backbone\.norm\.weight", "backbone/norm/scale", _copy),
    (r"network\.encoder\.backbone\.norm\.bias", "backbone/norm/bias", _copy),
    (r"network\.q\.weight", "q/embedding", _copy),
    (r"network\.class_head\.weight", "class_head/kernel", _t),
    (r"network\.class_head\.bias", "class_head/bias", _copy),
    (r"network\.mask_head\.0\.weight", "mask_head/fc1/kernel", _t),
    (r"network\.mask_head\.2\.weight", "mask_head/fc2/kernel", _t),
    (r"network\.mask_head\.4\.weight", "mask_head/fc3/kernel", _t),
    (r"network\.mask_head\.0\.bias", "mask_head/fc1/bias", _copy),
    (r"network\.mask_head\.2\.bias", "mask_head/fc2/bias", _copy),
    (r"network\.mask_head\.4\.bias", "mask_head/fc3/bias", _copy),
    (r"network\.upscale\.(\d+)\.conv1\.weight", r"upscale/\1/conv1/kernel", _conv_t),
    (r"network\.upscale\.(\d+)\.conv1\.bias", r"upscale/\1/conv1/bias", _copy),
    (r"network\.upscale\.(\d+)\.conv2\.weight", r"upscale/\1/conv2/kernel", _conv),
    (r"network\.upscale\.(\d+)\.norm\.weight", r"upscale/\1/norm/scale", _copy),
    (r"network\.upscale\.(\d+)\.norm\.bias", r"upscale/\1/norm/bias", _copy),
    (r"network\.attn_mask_probs", "attn_mask_probs", _copy),
]


def official_to_flat(sd: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Map official-named tensors onto Flax paths ('a/b/c'), checking every key and shape against `expected`.

    Collects every unknown key, missing key and shape mismatch, then raises once.
    """
    sd = dict(sd)
    # Loss-only buffer, regenerated from the loss config at training time.
    sd.pop("criterion.empty_weight", None)
    # Models without registers may still store an empty (1, 0, D) register table.
    if _BB + "reg_token" in sd and sd[_BB + "reg_token"].size == 0:
        del sd[_BB + "reg_token"]
    unknown, shapes = [], []
    for name, const in (("pixel_mean", IMAGENET_MEAN), ("pixel_std", IMAGENET_STD)):
        v = sd.pop(f"network.encoder.{name}", None)
        if v is not None and not np.allclose(v.reshape(-1), const, atol=1e-6):
            shapes.append(
                f"network.encoder.{name}: values {v.reshape(-1).tolist()} differ from the ImageNet statistics "
                f"{list(const)} that the network applies"
            )
    flat: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        for pat, template, fn in _RULES:
            m = re.fullmatch(pat, key)
            if m:
                path = m.expand(template)
                flat[path] = fn(value)
                break
        else:
            unknown.append(key)
            continue
        if path not in expected:
            unknown.append(key)
            del flat[path]
        elif flat[path].shape != tuple(expected[path]):
            shapes.append(f"{key}: shape {tuple(value.shape)} maps to {flat[path].shape}, expected {tuple(expected[path])}")
    missing = [p for p in expected if p not in flat]
    if unknown or missing or shapes:
        raise ConversionError(_problem_report(unknown=unknown, missing=missing, shapes=shapes))
    return flat


def _problem_report(unknown, missing, shapes) -> str:
    lines = ["the checkpoint does not match the EoMT architecture:"]
    if unknown:
        lines.append(f"  {len(unknown)} unexpected key(s): " + ", ".join(sorted(unknown)))
    if missing:
        lines.append(f"  {len(missing)} missing key(s): " + ", ".join(sorted(missing)))
    for s in shapes:
        lines.append("  " + s)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# DINOv2 initialisation helpers (patch 14 -> 16, pos grid 37 -> image grid)
# ----------------------------------------------------------------------------------------------------------------


def resample_patch_kernel(w: np.ndarray, new_size: int) -> np.ndarray:
    """FlexiViT pseudo-inverse resize of a patch-embedding kernel (OIHW), as timm resamples DINOv2 14 -> 16.

    R maps a flattened old-size patch to its bicubic (antialiased) resize; the new kernel solves
    <x, w_old> = <R x, w_new> in the least-squares sense: w_new = pinv(R^T) w_old.
    """
    import jax
    import jax.numpy as jnp

    old = w.shape[-1]
    if old == new_size:
        return w
    basis = np.eye(old * old, dtype=np.float32).reshape(old * old, old, old)
    resize = jax.vmap(lambda b: jax.image.resize(b, (new_size, new_size), method="bicubic", antialias=True))
    mat = np.asarray(resize(jnp.asarray(basis))).reshape(old * old, new_size * new_size).T  # (new², old²)
    pinv = np.linalg.pinv(mat.T)  # (new², old²)
    o, i = w.shape[:2]
    flat = w.reshape(o * i, old * old)
    return (flat @ pinv.T).reshape(o, i, new_size, new_size).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Orbax output
# ----------------------------------------------------------------------------------------------------------------

CONFIG_FILE = "eomt_config.json"
PARAMS_DIR = "params"


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def write_checkpoint(
    dst: str | os.PathLike,
    flat: dict[str, np.ndarray],
    config: EoMTConfig,
    *,
    metadata: dict[str, Any] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write parameters (Orbax) + model hyper-parameters (JSON) into `dst`, atomically.

    Everything is written into a temporary sibling directory that is renamed into place only when complete, so an
    interrupted conversion never leaves a partial `dst`.
    """
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from eomt_jax.atomic import atomic_directory

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    dst = Path(dst).absolute()
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        params = {
            k: jnp.asarray(v, jnp.float32 if k == "attn_mask_probs" else dtype) for k, v in flat.items()
        }
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS_DIR, unflatten(params))
        ckptr.wait_until_finished()
        meta = {"model": config.replace(param_dtype=dtype).to_dict(), **(metadata or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return dst


# ----------------------------------------------------------------------------------------------------------------
# Whole conversion
# ----------------------------------------------------------------------------------------------------------------


def expected_shapes(config: EoMTConfig) -> dict[str, tuple[int, ...]]:
    """Flax path -> shape for a config, computed abstractly (nothing is allocated)."""
    from flax import nnx

    from eomt_jax.models.eomt import EoMT
    from eomt_jax.tree import flatten_paths

    abstract = nnx.eval_shape(lambda: EoMT(config, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    return {k: tuple(v.shape) for k, v in flatten_paths(state).items()}


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
    if fmt in ("timm_dinov2", "hf_dinov2"):
        flat, config = _backbone_init(dinov2_to_official(sd, fmt), overrides or {}, seed)
    else:
        config = infer_config(sd, hf_config, overrides)
        flat = official_to_flat(sd, expected_shapes(config))
    meta = {"source": str(src), "source_format": fmt, **(metadata or {})}
    out = write_checkpoint(dst, flat, config, metadata=meta, dtype=dtype, overwrite=overwrite)
    return out, config


def _backbone_init(sd: dict[str, np.ndarray], overrides: dict[str, Any], seed: int):
    """DINOv2 backbone + fresh EoMT head, resampled to patch 16 and the requested image size."""
    from flax import nnx

    from eomt_jax.models.eomt import EoMT
    from eomt_jax.models.vit import resample_pos_embed
    from eomt_jax.tree import flatten_paths

    required = ("num_classes", "num_queries", "num_blocks", "image_size")
    absent = [k for k in required if k not in overrides]
    if absent:
        raise ConversionError(
            f"a DINOv2 backbone carries no EoMT head; pass {', '.join(absent)} (e.g. with --config or --set)"
        )
    patch = int(overrides.get("patch_size", 16))
    n_pos = sd[_BB + "pos_embed"].shape[1]
    if not _is_square(n_pos):
        raise ConversionError(f"DINOv2 pos_embed has {n_pos} positions, expected a square grid")
    native_grid = int(round(math.sqrt(n_pos)))
    sd[_BB + "patch_embed.proj.weight"] = resample_patch_kernel(sd[_BB + "patch_embed.proj.weight"], patch)
    # Infer the backbone shape from the weights and take the head settings from the overrides.
    probe = dict(sd)
    probe["network.q.weight"] = np.zeros((overrides["num_queries"], 1), np.float32)
    probe["network.class_head.weight"] = np.zeros((overrides["num_classes"] + 1, 1), np.float32)
    grid_override = {k: v for k, v in overrides.items() if k != "image_size"}
    config = infer_config(probe, None, {**grid_override, "image_size": native_grid * patch})
    config = config.replace(image_size=overrides["image_size"])
    pos = resample_pos_embed(sd[_BB + "pos_embed"], (native_grid, native_grid), config.grid_size)
    sd[_BB + "pos_embed"] = np.asarray(pos)
    fresh = EoMT(config, rngs=nnx.Rngs(seed))
    _, state = nnx.split(fresh)
    flat = {k: np.asarray(v) for k, v in flatten_paths(state).items()}
    backbone = official_to_flat(
        sd, {k: v.shape for k, v in flat.items() if k.startswith("backbone/")}
    )
    flat.update(backbone)
    return flat, config


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def load_config_file(spec: str):
    """`path/to/config.py[:arg]` -> the ConfigDict returned by its `get_config(arg)`."""
    import importlib.util

    file, _, arg = spec.partition(":")
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"_eomt_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def _model_overrides(config_spec: str | None, sets: list[str]) -> dict[str, Any]:
    import ast
    import dataclasses

    known = {f.name for f in dataclasses.fields(EoMTConfig)}
    out: dict[str, Any] = {}
    if config_spec:
        cfg = load_config_file(config_spec)
        model = cfg.get("model") if hasattr(cfg, "get") else None
        if model is None:
            raise ValueError(f"{config_spec}: the config has no 'model' section")
        model = model.to_dict() if hasattr(model, "to_dict") else dict(model)
        out.update({k: v for k, v in model.items() if k in known})
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        if key not in known:
            raise ValueError(f"--set {key}: unknown model field; expected one of {sorted(known)}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    # Runtime switches are not architecture: never let them make a cross-check fail.
    for k in ("masked_attn_enabled", "dtype", "param_dtype", "attention"):
        out.pop(k, None)
    return out


def _resolve_src(src: str) -> str:
    if Path(src).exists() or src.count("/") != 1 or src.startswith((".", "/")):
        return src
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConversionError(f"{src}: no such file, and huggingface_hub is not installed to fetch it") from None
    return snapshot_download(src, allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="torch_to_flax.py", description="Convert PyTorch EoMT / DINOv2 weights into an Orbax checkpoint."
    )
    parser.add_argument("--src", required=True, help="pytorch_model.bin, HF EoMT dir/file, DINOv2 weights, or hub id")
    parser.add_argument("--dst", required=True, help="output checkpoint directory (must not exist)")
    parser.add_argument("--config", help="config file[:arg] whose `model` section overrides/cross-checks")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model field override")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored weight dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    parser.add_argument("--seed", type=int, default=0, help="init seed of a fresh head (backbone sources)")
    parser.add_argument("--dataset", help="store this dataset's class names with the weights (e.g. coco_panoptic)")
    args = parser.parse_args(argv)
    try:
        overrides = _model_overrides(args.config, args.set)
        metadata = {}
        if args.dataset:
            from eomt_jax.predict import dataset_classes

            names, stuff = dataset_classes(args.dataset)
            metadata = {"dataset": args.dataset, "class_names": names, "stuff_classes": stuff}
        out, config = convert(
            _resolve_src(args.src), args.dst, overrides=overrides, dtype=args.dtype, overwrite=args.overwrite,
            seed=args.seed, metadata=metadata,
        )
        if metadata and len(metadata["class_names"]) != config.num_classes:
            shutil.rmtree(out)
            raise ConversionError(
                f"--dataset {args.dataset} has {len(metadata['class_names'])} classes, the weights {config.num_classes}"
            )
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {config}")
    return 0
