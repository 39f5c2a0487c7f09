"""DINOv3 sources renamed into the official EoMT names, and the model zoo's delta files merged with their base.

Every DINOv3 form is renamed in two steps:

1. into the names of the original's DINOv3 checkpoints (`models/vit.py` of the original relabels transformers'
   `DINOv3ViTModel`: `network.encoder.backbone.patch_embed.{cls_token, register_tokens, patch_embeddings.*}`,
   `...backbone.blocks.N.{norm1, attention.{q,k,v,o}_proj, layer_scale1.lambda1, norm2, mlp.{gate,up,down}_proj,
   layer_scale2.lambda1}`, `...backbone.norm`; heads as for DINOv2). Hugging Face EomtDinov3, hub backbones
   (`embeddings.*`, `layer.N.*` or `model.layer.N.*`, `norm.*`) and Meta backbones (`facebookresearch/dinov3`:
   `cls_token`, `storage_tokens`, `patch_embed.proj`, `blocks.N.attn.qkv` fused with a masked key bias,
   `ls1.gamma`, `mlp.fc1/fc2` or `mlp.w1/w2/w3`) get there by renaming; the zoo's delta files are merged with
   their base in these names (`merge_delta`);
2. into the official names that every other source ends in (`formats.BB`: `cls_token`, `reg_token`,
   `patch_embed.proj`, fused `attn.qkv` with rows [q; k; v], `attn.proj`, `ls1.gamma`, `mlp.fc1`/`fc2`), so that
   `flax_layout` maps them with its one table. DINOv3 has no key bias: the k third of the fused bias is zero (the
   network masks it too). A gated MLP packs [gate; up] into fc1, the layout of the network's `SwiGLUPacked`.

Each step returns a function that names a key of its output as its input names it, so that every problem is
reported in the source's own naming.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from eomt_jax.conversion.errors import ConversionError
from eomt_jax.conversion.formats import BB, HF_HEAD_RENAMES, invert_rename, strip_hf_prefix
from eomt_jax.models.eomt import IMAGENET_MEAN, IMAGENET_STD

Namer = Callable[[str], str]
_V3 = re.escape(BB)

# The EoMT DINOv3 model zoo (`model_zoo/dinov3.md` of the original): delta repository -> (backbone size, image
# size). The image size cannot be read off DINOv3 weights, so a zoo name in the source's path supplies it.
ZOO = {
    "coco_panoptic_eomt_small_640_dinov3": ("S", 640),
    "coco_panoptic_eomt_base_640_dinov3": ("B", 640),
    "coco_panoptic_eomt_large_640_dinov3": ("L", 640),
    "coco_panoptic_eomt_large_1280_dinov3": ("L", 1280),
    "ade_semantic_eomt_large_512_dinov3": ("L", 512),
    "ade20k_semantic_eomt_large_512_dinov3": ("L", 512),
    "coco_instance_eomt_large_640_dinov3": ("L", 640),
    "coco_instance_eomt_large_1280_dinov3": ("L", 1280),
}
# The gated backbones the zoo's deltas were fine-tuned from, by width.
BASE_MODELS = {
    384: ("S", "facebook/dinov3-vits16-pretrain-lvd1689m", "dinov3_vits16_pretrain_lvd1689m-*.pth"),
    768: ("B", "facebook/dinov3-vitb16-pretrain-lvd1689m", "dinov3_vitb16_pretrain_lvd1689m-*.pth"),
    1024: ("L", "facebook/dinov3-vitl16-pretrain-lvd1689m", "dinov3_vitl16_pretrain_lvd1689m-*.pth"),
}


def zoo_name(path: str | os.PathLike) -> str | None:
    """The zoo model named anywhere in `path` (a folder such as `coco_panoptic_eomt_large_1280_dinov3`, or a hub
    cache path `models--tue-mps--<name>/...`), or None."""
    text = str(Path(path).absolute())
    found = [name for name in ZOO if name in text]
    return max(found, key=len) if found else None


def zoo_image_size(path: str | os.PathLike) -> int | None:
    name = zoo_name(path)
    return ZOO[name][1] if name else None


# ----------------------------------------------------------------------------------------------------------------
# Step 1: each source's names -> the original's DINOv3 names
# ----------------------------------------------------------------------------------------------------------------

_EMBEDDINGS = (r"^embeddings\.(cls_token|register_tokens|patch_embeddings\.weight|patch_embeddings\.bias)$",
               BB + r"patch_embed.\1")

# Hugging Face EomtDinov3ForUniversalSegmentation (the inverse of `DELTA_KEY_REPLACEMENTS` in transformers'
# `convert_eomt_dinov3_to_hf.py`). Block leaves keep their names; step 2 checks them.
_HF_EOMT: list[tuple[str, str]] = [
    _EMBEDDINGS,
    (r"^layers\.(\d+)\.([\w.]+)$", BB + r"blocks.\1.\2"),
    (r"^layernorm\.(weight|bias)$", BB + r"norm.\1"),
    *HF_HEAD_RENAMES,
]

# Hugging Face hub backbone (`DINOv3ViTModel`; transformers 5 names its blocks `model.layer.N` in memory).
_HUB: list[tuple[str, str]] = [
    _EMBEDDINGS,
    (r"^layer\.(\d+)\.([\w.]+)$", BB + r"blocks.\1.\2"),
    (r"^norm\.(weight|bias)$", BB + r"norm.\1"),
]
_HUB_IGNORED = re.compile(r"^embeddings\.mask_token$")

# Meta's `facebookresearch/dinov3` backbone. The fused qkv is split before renaming (`_split_meta_qkv`).
_META: list[tuple[str, str]] = [
    (r"^cls_token$", BB + "patch_embed.cls_token"),
    (r"^storage_tokens$", BB + "patch_embed.register_tokens"),
    (r"^patch_embed\.proj\.(weight|bias)$", BB + r"patch_embed.patch_embeddings.\1"),
    (r"^blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)$", BB + r"blocks.\1.\2.\3"),
    (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", BB + r"blocks.\1.attention.o_proj.\2"),
    (r"^blocks\.(\d+)\.ls1\.gamma$", BB + r"blocks.\1.layer_scale1.lambda1"),
    (r"^blocks\.(\d+)\.ls2\.gamma$", BB + r"blocks.\1.layer_scale2.lambda1"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$", BB + r"blocks.\1.mlp.up_proj.\2"),
    (r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$", BB + r"blocks.\1.mlp.down_proj.\2"),
    # SwiGLU: w1 is the SiLU branch (gate), w2 the value, w3 the output (`dinov3/layers/ffn_layers.py`).
    (r"^blocks\.(\d+)\.mlp\.w1\.(weight|bias)$", BB + r"blocks.\1.mlp.gate_proj.\2"),
    (r"^blocks\.(\d+)\.mlp\.w2\.(weight|bias)$", BB + r"blocks.\1.mlp.up_proj.\2"),
    (r"^blocks\.(\d+)\.mlp\.w3\.(weight|bias)$", BB + r"blocks.\1.mlp.down_proj.\2"),
    (r"^norm\.(weight|bias)$", BB + r"norm.\1"),
]
# Naming only: the three projections split off a fused Meta qkv.
_META_QKV = [(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", BB + rf"blocks.\1.attention.{p}_proj.\2") for p in "qkv"]
# The mask token (training only), the bfloat16-rounded RoPE periods (the network computes exact float32 ones, as the
# transformers port EoMT was fine-tuned with), the key-bias mask, and the local-crop cls norm (training only).
_META_IGNORED = re.compile(r"^(mask_token|rope_embed\.periods|blocks\.\d+\.attn\.qkv\.bias_mask|local_cls_norm\..*)$")


def _rename(sd, rules, ignored: re.Pattern | None = None, naming_only=()) -> tuple[dict[str, np.ndarray], Namer]:
    """Rename by the first matching rule. A key no rule matches is kept as it is, so that the next step reports it
    as unknown under the name the source gives it."""
    out: dict[str, np.ndarray] = {}
    used: list[tuple[str, str]] = []
    for key, value in sd.items():
        if ignored is not None and ignored.match(key):
            continue
        for rule in rules:
            if re.match(rule[0], key):
                out[re.sub(rule[0], rule[1], key)] = value
                if rule not in used:
                    used.append(rule)
                break
        else:
            out[key] = value
    # Several rules may produce one name (Meta's fc1 and w2 both give up_proj): prefer those the source used.
    order = used + [r for r in [*rules, *naming_only] if r not in used]

    def name(new: str) -> str:
        for pattern, template in order:
            old = invert_rename(pattern, template, new)
            if old is not None:
                return old
        return new

    return out, name


def hf_eomt_to_dinov3(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Namer]:
    """Hugging Face EomtDinov3ForUniversalSegmentation -> the original's DINOv3 names."""
    sd = {strip_hf_prefix(k): v for k, v in sd.items()}
    return _rename(sd, _HF_EOMT, re.compile(r"^embeddings\.mask_token$"))


def backbone_to_dinov3(sd: dict[str, np.ndarray], fmt: str) -> tuple[dict[str, np.ndarray], Namer]:
    """A DINOv3 backbone ("hf_dinov3" or "meta_dinov3") -> the original's DINOv3 backbone names."""
    if fmt == "meta_dinov3":
        return _rename(_split_meta_qkv(sd), _META, _META_IGNORED, _META_QKV)
    prefixed = any(k.startswith("model.layer.") for k in sd)
    out, name = _rename({strip_hf_prefix(k): v for k, v in sd.items()}, _HUB, _HUB_IGNORED)
    if not prefixed:
        return out, name
    return out, lambda new: "model." + name(new) if name(new).startswith("layer.") else name(new)


def _split_meta_qkv(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Meta's fused qkv -> q/k/v projections. The k third of the bias is dropped: Meta multiplies it by a zero
    `bias_mask` (`LinearKMaskedBias` in `dinov3/layers/attention.py`), so whatever it holds never acts."""
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if m is None or value.shape[0] % 3:
            out[key] = value
            continue
        for p, part in zip("qkv", np.split(value, 3, axis=0)):
            if not (p == "k" and m.group(2) == "bias"):
                out[BB + f"blocks.{m.group(1)}.attention.{p}_proj.{m.group(2)}"] = part
    return out


# ----------------------------------------------------------------------------------------------------------------
# The zoo's delta files
# ----------------------------------------------------------------------------------------------------------------


def base_hint(sd: dict[str, np.ndarray], src: str | os.PathLike) -> str:
    """Which gated backbone a delta file needs, by its width (or by the zoo name in its path)."""
    cls = sd.get(BB + "patch_embed.cls_token")
    width = cls.shape[-1] if cls is not None else None
    if width not in BASE_MODELS and zoo_name(src):
        width = {size: w for w, (size, _, _) in BASE_MODELS.items()}[ZOO[zoo_name(src)][0]]
    if width in BASE_MODELS:
        _, hub, pth = BASE_MODELS[width]
        return f"{hub} (its Hugging Face directory or model.safetensors, or Meta's {pth})"
    return " or ".join(hub for _, hub, _ in BASE_MODELS.values()) + ", whichever matches the delta's width"


def missing_base_message(sd: dict[str, np.ndarray], src: str | os.PathLike) -> str:
    return (
        f"{src}: an EoMT-DINOv3 checkpoint in the original's naming (the model zoo's "
        f"tue-mps/<name>_dinov3 pytorch_model.bin, e.g. {', '.join(list(ZOO)[:4])}, ...) holds the fine-tuned "
        "backbone as a difference from the gated DINOv3 weights it started from; pass those with --base: "
        + base_hint(sd, src)
    )


def _width_depth(sd: dict[str, np.ndarray]) -> tuple[int | None, int]:
    cls = sd.get(BB + "patch_embed.cls_token")
    blocks = [int(m.group(1)) for k in sd if (m := re.match(_V3 + r"blocks\.(\d+)\.", k))]
    return (cls.shape[-1] if cls is not None else None), (1 + max(blocks) if blocks else 0)


def merge_delta(
    delta: dict[str, np.ndarray], base: dict[str, np.ndarray], base_name: Namer, *,
    src: str | os.PathLike, base_path: str | os.PathLike,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """A zoo delta file (the original's DINOv3 names) + its base backbone (renamed by `backbone_to_dinov3`) ->
    the full checkpoint in the original's DINOv3 names, and the problems found (each key named as its file names
    it), to be reported with the rest of the conversion's. Where the base lacks a tensor or disagrees in shape, the
    delta's tensor stands in, so that the remaining checks still run.

    As the original's loader does (`training/lightning_module.py`, `delta_weights`): backbone tensors are base +
    delta in float32; the heads (`q`, `class_head`, `mask_head`, `upscale`) were fine-tuned from zero, so their
    stored values are absolute. The stored `attn_mask_probs` are a difference from the initial ones:
    the per-block probabilities become 1 + stored, clipped to [0, 1] (evaluation runs without masked attention,
    so they only matter for training-time validation). The stored pixel statistics are dropped: the network
    applies the ImageNet constants itself.
    """
    (dw, dd), (bw, bd) = _width_depth(delta), _width_depth(base)
    if None not in (dw, bw) and (dw, dd) != (bw, bd):  # (a lacking cls token is for the key check to report)
        raise ConversionError(
            f"--base {base_path} is a DINOv3 backbone of width {bw} with {bd} blocks, but the delta {src} was "
            f"fine-tuned from one of width {dw} with {dd} blocks: {base_hint(delta, src)}"
        )
    merged = {k: v for k, v in delta.items() if not k.startswith(BB)}
    problems, lacking = [], {}
    for key in sorted(k for k in delta if k.startswith(BB)):
        if key not in base:
            lacking.setdefault(base_name(key), []).append(key)
            merged[key] = delta[key]
        elif base[key].shape != delta[key].shape:
            problems.append(f"{key}: shape {tuple(delta[key].shape)} in the delta, but the base's "
                            f"{base_name(key)} gives {tuple(base[key].shape)}")
            merged[key] = delta[key]
        else:
            merged[key] = base[key].astype(np.float32) + delta[key].astype(np.float32)
    problems += [f"the base lacks {name} (the delta has {_brace(keys)})" for name, keys in lacking.items()]
    # A backbone tensor of the base that the delta lacks stays absent: the key check names it as missing.
    probs = merged.get("network.attn_mask_probs")
    if probs is not None:
        merged["network.attn_mask_probs"] = np.clip(1.0 + probs, 0.0, 1.0).astype(np.float32)
    for stat, const in (("pixel_mean", IMAGENET_MEAN), ("pixel_std", IMAGENET_STD)):
        v = merged.pop(f"network.encoder.{stat}", None)
        if v is not None and not (np.allclose(v, 0, atol=1e-6) or np.allclose(v.reshape(-1), const, atol=1e-6)):
            warnings.warn(f"{src}: network.encoder.{stat} holds {v.reshape(-1).tolist()}, neither a zero difference "
                          f"nor the ImageNet statistics {list(const)} that the network applies; ignored", stacklevel=2)
    return merged, problems


# ----------------------------------------------------------------------------------------------------------------
# Step 2: the original's DINOv3 names -> the official names of `flax_layout`
# ----------------------------------------------------------------------------------------------------------------

_TO_OFFICIAL: list[tuple[str, str]] = [
    (rf"^{_V3}patch_embed\.cls_token$", BB + "cls_token"),
    (rf"^{_V3}patch_embed\.register_tokens$", BB + "reg_token"),
    (rf"^{_V3}patch_embed\.patch_embeddings\.(weight|bias)$", BB + r"patch_embed.proj.\1"),
    (rf"^{_V3}blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)$", BB + r"blocks.\1.\2.\3"),
    (rf"^{_V3}blocks\.(\d+)\.attention\.o_proj\.(weight|bias)$", BB + r"blocks.\1.attn.proj.\2"),
    (rf"^{_V3}blocks\.(\d+)\.layer_scale1\.lambda1$", BB + r"blocks.\1.ls1.gamma"),
    (rf"^{_V3}blocks\.(\d+)\.layer_scale2\.lambda1$", BB + r"blocks.\1.ls2.gamma"),
    (rf"^{_V3}blocks\.(\d+)\.mlp\.down_proj\.(weight|bias)$", BB + r"blocks.\1.mlp.fc2.\2"),
    (rf"^{_V3}norm\.(weight|bias)$", BB + r"norm.\1"),
]
_QKV = re.compile(_V3 + r"blocks\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)")
_GLU = re.compile(_V3 + r"blocks\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)")


def dinov3_to_official(sd: dict[str, np.ndarray], source_name: Namer = lambda k: k
                       ) -> tuple[dict[str, np.ndarray], Namer, list[str]]:
    """The original's DINOv3 names -> official names (`flax_layout`).

    Returns the renamed tensors, a function naming an official key as the source does (`source_name` names the
    original's DINOv3 names), and the source's names of the missing parts of fused tensors (a q, k or v projection,
    a gate or up half); such a tensor is completed with zeros so that the key check goes on and reports
    everything at once. Keys outside the backbone, and backbone keys that are not DINOv3's, pass unchanged (the
    key check reports those).
    """
    gated = any((m := _GLU.fullmatch(k)) and m.group(2) == "gate" for k in sd)
    out, groups = {}, {}
    for key, value in sd.items():
        m = _QKV.fullmatch(key) or _GLU.fullmatch(key)
        # A key bias would be rotated with the keys and so change the attention; DINOv3 has none (and the network
        # masks it): a stored one is reported as unexpected.
        if m and not (m.re is _QKV and m.group(2) == "k" and m.group(3) == "bias"):
            groups.setdefault((m.re is _QKV, m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, template in _TO_OFFICIAL:
            if re.match(pattern, key):
                out[re.sub(pattern, template, key)] = value
                break
        else:
            out[key] = value
    missing = []
    for (attn, block, leaf), parts in sorted(groups.items()):
        order = _fused_parts(attn, leaf, gated)
        for p in order:
            if p not in parts:
                missing.append(source_name(_part_name(attn, block, p, leaf)))
                parts[p] = np.zeros_like(next(iter(parts.values())))
        if attn and leaf == "bias":
            parts["k"] = np.zeros_like(parts["q"])
            order = ("q", "k", "v")
        target = f"{BB}blocks.{block}.attn.qkv.{leaf}" if attn else f"{BB}blocks.{block}.mlp.fc1.{leaf}"
        out[target] = np.concatenate([parts[p] for p in order], axis=0)

    def name(official: str) -> str:
        m = re.fullmatch(_V3 + r"blocks\.(\d+)\.(attn\.qkv|mlp\.fc1)\.(weight|bias)", official)
        if m:
            attn = m.group(2) == "attn.qkv"
            parts = _fused_parts(attn, m.group(3), gated)
            return _brace([source_name(_part_name(attn, m.group(1), p, m.group(3))) for p in parts])
        for pattern, template in _TO_OFFICIAL:
            key = invert_rename(pattern, template, official)
            if key is not None:
                return source_name(key)
        return source_name(official)

    return out, name, missing


def _fused_parts(attn: bool, leaf: str, gated: bool) -> tuple[str, ...]:
    if attn:
        return ("q", "v") if leaf == "bias" else ("q", "k", "v")
    return ("gate", "up") if gated else ("up",)


def _part_name(attn: bool, block: str, part: str, leaf: str) -> str:
    return BB + f"blocks.{block}." + (f"attention.{part}_proj.{leaf}" if attn else f"mlp.{part}_proj.{leaf}")


def _brace(names: list[str]) -> str:
    """['a.q_proj.w', 'a.k_proj.w'] -> 'a.{q,k}_proj.w'; one name when they coincide (a fused source tensor)."""
    unique = list(dict.fromkeys(names))
    if len(unique) == 1:
        return unique[0]
    prefix = os.path.commonprefix(unique)
    suffix = os.path.commonprefix([n[len(prefix):][::-1] for n in unique])[::-1]
    middles = [n[len(prefix): len(n) - len(suffix)] for n in unique]
    return f"{prefix}{{{','.join(middles)}}}{suffix}"
