"""Source formats and their renaming into the official EoMT names (`network.*`, as in the original's model zoo).

`detect_format` tells the kind of checkpoint from its keys: "official", "hf_eomt" (Hugging Face
EomtForUniversalSegmentation), "hf_dinov2" or "timm_dinov2" (backbone only), and their DINOv3 counterparts
(`DINOV3_FORMATS`, renamed by `conversion.dinov3`). `hf_eomt_to_official` and `dinov2_to_official` rename the
DINOv2 forms into official names, fusing split q/k/v projections and SwiGLU halves.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import numpy as np

from eomt_jax.conversion.errors import ConversionError, problem_report

# Prefix of the backbone's official names.
BB = "network.encoder.backbone."


# The DINOv3 forms: the original's zoo files (backbone named as transformers' DINOv3ViTModel under
# `network.encoder.backbone.`), Hugging Face EomtDinov3ForUniversalSegmentation, and DINOv3 backbones in Hugging Face
# hub or Meta (`facebookresearch/dinov3`) naming.
DINOV3_FORMATS = ("official_dinov3", "hf_eomt_dinov3", "hf_dinov3", "meta_dinov3")


def detect_format(keys, hf_config: dict[str, Any] | None = None) -> str:
    """The kind of checkpoint, from its keys (and the `model_type` of a Hugging Face config.json, when given)."""
    keys = set(keys)
    if any(k.startswith("network.") for k in keys):
        dinov3 = (BB + "patch_embed.patch_embeddings.weight" in keys or BB + "patch_embed.cls_token" in keys
                  or any(re.match(re.escape(BB) + r"blocks\.\d+\.attention\.", k) for k in keys))
        return "official_dinov3" if dinov3 else "official"
    stripped = {strip_hf_prefix(k) for k in keys}
    model_type = (hf_config or {}).get("model_type")
    if "query.weight" in stripped and any(k.startswith("embeddings.") for k in stripped):
        if model_type in ("eomt", "eomt_dinov3"):
            return {"eomt": "hf_eomt", "eomt_dinov3": "hf_eomt_dinov3"}[model_type]
        # EomtDinov3 has no position table, no `.projection.` level in the patch embedding and no key bias.
        rope_only = "embeddings.position_embeddings.weight" not in stripped and not any(
            re.match(r"layers\.\d+\.attention\.k_proj\.bias$", k) for k in stripped)
        return "hf_eomt_dinov3" if "embeddings.patch_embeddings.weight" in stripped or rope_only else "hf_eomt"
    if any(k.startswith("encoder.layer.") for k in stripped) and "embeddings.cls_token" in stripped:
        return "hf_dinov2"
    if "embeddings.cls_token" in stripped and (
        "embeddings.patch_embeddings.weight" in stripped or any(re.match(r"layer\.\d+\.", k) for k in stripped)
    ):
        return "hf_dinov3"
    if "storage_tokens" in keys or "rope_embed.periods" in keys or any(k.endswith(".qkv.bias_mask") for k in keys):
        return "meta_dinov3"
    if "cls_token" in keys and any(k.startswith("blocks.") for k in keys):
        return "timm_dinov2"
    raise ConversionError(
        "unrecognised checkpoint: expected official EoMT keys (network.*), Hugging Face EoMT or EoMT-DINOv3 keys "
        "(embeddings.*, layers.*, query.weight), a DINOv2 backbone (timm blocks.* or HF encoder.layer.*), or a "
        "DINOv3 backbone (HF embeddings.* + layer.*, or Meta storage_tokens + blocks.*); "
        f"first keys: {sorted(keys)[:8]}"
    )


def strip_hf_prefix(k: str) -> str:
    """A Hugging Face key without the model-class prefix some files carry (`model.`, `eomt.`, `eomt_dinov3.`)."""
    for p in ("model.", "eomt_dinov3.", "eomt."):
        if k.startswith(p):
            return k[len(p) :]
    return k


# Hugging Face EoMT heads -> official names; the same for EomtForUniversalSegmentation and
# EomtDinov3ForUniversalSegmentation.
HF_HEAD_RENAMES: list[tuple[str, str]] = [
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

# Hugging Face EomtForUniversalSegmentation -> official names. Entries are (pattern, replacement); keys that need
# tensor surgery (split q/k/v projections, gated MLP halves) are handled in hf_eomt_to_official.
_HF_RENAMES: list[tuple[str, str]] = [
    (r"^embeddings\.cls_token$", BB + "cls_token"),
    (r"^embeddings\.register_tokens$", BB + "reg_token"),
    (r"^embeddings\.position_embeddings\.weight$", BB + "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", BB + r"patch_embed.proj.\1"),
    (r"^layers\.(\d+)\.(norm1|norm2)\.(weight|bias)$", BB + r"blocks.\1.\2.\3"),
    (r"^layers\.(\d+)\.attention\.out_proj\.(weight|bias)$", BB + r"blocks.\1.attn.proj.\2"),
    (r"^layers\.(\d+)\.layer_scale1\.lambda1$", BB + r"blocks.\1.ls1.gamma"),
    (r"^layers\.(\d+)\.layer_scale2\.lambda1$", BB + r"blocks.\1.ls2.gamma"),
    (r"^layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", BB + r"blocks.\1.mlp.\2.\3"),
    (r"^layers\.(\d+)\.mlp\.weights_in\.(weight|bias)$", BB + r"blocks.\1.mlp.fc1.\2"),
    (r"^layers\.(\d+)\.mlp\.weights_out\.(weight|bias)$", BB + r"blocks.\1.mlp.fc2.\2"),
    (r"^layers\.(\d+)\.mlp\.down_proj\.(weight|bias)$", BB + r"blocks.\1.mlp.fc2.\2"),
    (r"^layernorm\.(weight|bias)$", BB + r"norm.\1"),
    *HF_HEAD_RENAMES,
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


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    """`np.concatenate(parts, axis=0)`. Parts that all broadcast one and the same value (zero strides: a state dict
    of shapes only, e.g. from a meta-device model, to check a key map at real size) stay a broadcast view of the
    result's shape instead of being written out in full."""
    first = parts[0]
    if (first.ndim and first.size and all(isinstance(p, np.ndarray) and p.ndim == first.ndim and p.size
                                          and p.dtype == first.dtype and p.shape[1:] == first.shape[1:]
                                          and not any(p.strides) for p in parts)):
        value = first.reshape(-1)[0]
        if all(p.reshape(-1)[0] == value for p in parts):  # one element stands for all
            return np.broadcast_to(value, (sum(p.shape[0] for p in parts), *first.shape[1:]))
    return np.concatenate(parts, axis=0)


def hf_eomt_to_official(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sd = {strip_hf_prefix(k): v for k, v in sd.items()}
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
            order, target = ("q", "k", "v"), f"{BB}blocks.{block}.attn.qkv.{leaf}"
            prefix = f"layers.{block}.attention."
        else:
            # Packed SwiGLU: the first half of fc1 is the SiLU gate, the second half the value.
            order, target = ("gate", "up"), f"{BB}blocks.{block}.mlp.fc1.{leaf}"
            prefix = f"layers.{block}.mlp."
        absent = [p for p in order if p not in parts]
        if absent:
            missing += [f"{prefix}{p}_proj.{leaf}" for p in absent]
            continue
        out[target] = _concatenate([parts[p] for p in order])
    if unknown or missing:
        raise ConversionError(problem_report(unknown=unknown, missing=missing, shapes=[]))
    if BB + "pos_embed" in out:
        out[BB + "pos_embed"] = out[BB + "pos_embed"][None]
    return out


# DINOv2 backbone-only checkpoints -> official names (under network.encoder.backbone.)
_TIMM_DINO_RENAMES: list[tuple[str, str]] = [
    (r"^(cls_token|reg_token|pos_embed)$", BB + r"\1"),
    (r"^patch_embed\.proj\.(weight|bias)$", BB + r"patch_embed.proj.\1"),
    (r"^blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)$", BB + r"blocks.\1.\2.\3"),
    (r"^blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$", BB + r"blocks.\1.attn.\2.\3"),
    (r"^blocks\.(\d+)\.(ls1|ls2)\.gamma$", BB + r"blocks.\1.\2.gamma"),
    (r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", BB + r"blocks.\1.mlp.\2.\3"),
    (r"^norm\.(weight|bias)$", BB + r"norm.\1"),
]
_TIMM_DINO_IGNORED = re.compile(r"^(mask_token|head\..*|fc_norm\..*)$")

_HF_DINO_RENAMES: list[tuple[str, str]] = [
    (r"^embeddings\.cls_token$", BB + "cls_token"),
    (r"^embeddings\.register_tokens$", BB + "reg_token"),
    (r"^embeddings\.position_embeddings$", BB + "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", BB + r"patch_embed.proj.\1"),
    (r"^encoder\.layer\.(\d+)\.(norm1|norm2)\.(weight|bias)$", BB + r"blocks.\1.\2.\3"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$", BB + r"blocks.\1.attn.proj.\2"),
    (r"^encoder\.layer\.(\d+)\.attention\.o_proj\.(weight|bias)$", BB + r"blocks.\1.attn.proj.\2"),
    (r"^encoder\.layer\.(\d+)\.layer_scale1\.lambda1$", BB + r"blocks.\1.ls1.gamma"),
    (r"^encoder\.layer\.(\d+)\.layer_scale2\.lambda1$", BB + r"blocks.\1.ls2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", BB + r"blocks.\1.mlp.\2.\3"),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.(weight|bias)$", BB + r"blocks.\1.mlp.fc1.\2"),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.(weight|bias)$", BB + r"blocks.\1.mlp.fc2.\2"),
    (r"^layernorm\.(weight|bias)$", BB + r"norm.\1"),
]
_HF_DINO_IGNORED = re.compile(r"^(embeddings\.mask_token|embeddings\.position_ids|pooler\..*)$")


def dinov2_to_official(sd: dict[str, np.ndarray], fmt: str) -> dict[str, np.ndarray]:
    """Backbone-only DINOv2 (timm or HF names) -> official backbone keys, still at its native patch/grid size."""
    unknown: list[str] = []
    if fmt == "timm_dinov2":
        sd = {k: v for k, v in sd.items() if not _TIMM_DINO_IGNORED.match(k)}
        out, _ = _apply_renames(sd, _TIMM_DINO_RENAMES, lambda *a: False, unknown)
    else:
        sd = {strip_hf_prefix(k): v for k, v in sd.items()}
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
            out[f"{BB}blocks.{block}.attn.qkv.{leaf}"] = np.concatenate(
                [parts["query"], parts["key"], parts["value"]], axis=0
            )
        if missing:
            raise ConversionError(problem_report(unknown=unknown, missing=missing, shapes=[]))
        # HF keeps the cls position in the table; timm folds it into the cls token. Fold it here too.
        pos = out.get(BB + "pos_embed")
        if pos is not None and is_square(pos.shape[1] - 1) and not is_square(pos.shape[1]):
            out[BB + "cls_token"] = out[BB + "cls_token"] + pos[:, :1]
            out[BB + "pos_embed"] = pos[:, 1:]
    if unknown:
        raise ConversionError(problem_report(unknown=unknown, missing=[], shapes=[]))
    return out


def is_square(n: int) -> bool:
    r = int(round(math.sqrt(n)))
    return r * r == n


# ----------------------------------------------------------------------------------------------------------------
# Official names back to the source's own names, for error messages
# ----------------------------------------------------------------------------------------------------------------


def invert_rename(pattern: str, template: str, name: str) -> str | None:
    """The key that the rename rule (`pattern` over source keys, `template` with \\N group references) turns into
    `name`, or None when the rule cannot produce `name`. Patterns hold plain, unnested groups."""
    literal = re.split(r"\\(\d)", template)  # literal, group number, literal, ...
    regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<g{part}>.+?)" for i, part in enumerate(literal))
    m = re.fullmatch(regex, name)
    if m is None:
        return None
    key, group, i = [], 0, 0
    body = pattern.removeprefix("^").removesuffix("$")
    while i < len(body):
        if body[i] == "\\":
            key.append(body[i + 1])
            i += 2
        elif body[i] == "(":
            group += 1
            key.append(m.group(f"g{group}") if f"g{group}" in m.groupdict() else "")
            i = body.index(")", i) + 1
        else:
            key.append(body[i])
            i += 1
    candidate = "".join(key)
    ok = re.fullmatch(body, candidate) and re.sub(f"^{body}$", template, candidate) == name
    return candidate if ok else None


def source_names(fmt: str) -> Callable[[str], str]:
    """official name -> the name the `fmt` checkpoint gives it (the official name itself for official files).
    For the DINOv2 forms; the DINOv3 renamings (`conversion.dinov3`) return their own such function."""
    renames = {"hf_eomt": _HF_RENAMES, "timm_dinov2": _TIMM_DINO_RENAMES, "hf_dinov2": _HF_DINO_RENAMES}.get(fmt)
    fused = {"hf_eomt": r"layers.\1.attention.{q,k,v}_proj.\2",
             "hf_dinov2": r"encoder.layer.\1.attention.attention.{query,key,value}.\2"}.get(fmt)

    def name(official: str) -> str:
        if renames is None:
            return official
        m = re.fullmatch(re.escape(BB) + r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", official)
        if m and fused:  # stored as three projections
            return m.expand(fused)
        for pattern, template in renames:
            key = invert_rename(pattern, template, official)
            if key is not None:
                return key
        return official

    return name
