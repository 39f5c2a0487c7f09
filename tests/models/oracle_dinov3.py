"""The PyTorch EoMT-DINOv3 of `transformers` (`EomtDinov3ForUniversalSegmentation`), built from small random
configs, as the parity oracle.

Also writes the model in the published forms: a Hugging Face directory, the original's flat `network.*` state dict
(the inverse of the official -> Hugging Face key table of transformers' `convert_eomt_dinov3_to_hf.py`), and the
model zoo's delta form: a random "pretrained" backbone, saved as the Hugging Face hub or Meta `facebookresearch/dinov3`
release spells it, and the file of differences from it that the original's training writes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import (
    DINOv3ViTConfig,
    DINOv3ViTModel,
    EomtDinov3Config,
    EomtDinov3ForUniversalSegmentation,
)

from tests.models.oracle import run  # noqa: F401  (the same capture of every prediction point)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BB = "network.encoder.backbone."


def build(
    *,
    hidden_size=64,
    depth=4,
    heads=2,
    intermediate=128,
    num_blocks=2,
    queries=10,
    labels=5,
    registers=4,
    image_hw=(64, 64),
    gated=False,
    seed=0,
    perturb_matrices=True,
) -> EomtDinov3ForUniversalSegmentation:
    """A random-weight oracle, in eval mode, computing as the original's DINOv3 EoMT does.

    The backbone's LayerNorm eps is DINOv3's 1e-5 (the config class defaults to 1e-6). The training-time RoPE
    rescale is off, so that the train-mode run `run` uses at probability 0 computes exactly the eval-mode
    function. `gated`: a SwiGLU backbone (SiLU gate); its heads, which transformers builds with the backbone's
    activation, are switched back to the exact GELU of the original's heads. Non-square inputs set the grid the
    heads reshape to (transformers derives a square one from `image_size`).
    """
    torch.manual_seed(seed)
    cfg = EomtDinov3Config(
        hidden_size=hidden_size,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        num_blocks=num_blocks,
        num_queries=queries,
        image_size=image_hw[0],
        patch_size=16,
        num_register_tokens=registers,
        num_labels=labels,
        layer_norm_eps=1e-5,
        pos_embed_rescale=None,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        train_num_points=64,
    )
    model = EomtDinov3ForUniversalSegmentation(cfg)
    if gated:
        model.mask_head.activation = torch.nn.GELU()
        for block in model.upscale_block.block:
            block.activation = torch.nn.GELU()
    model.grid_size = (image_hw[0] // 16, image_hw[1] // 16)
    with torch.no_grad():
        # No term (LayerScale at 1, zero q/v biases and registers, unit norms) may sit at a trivial value. At real
        # widths perturbed matrices would blow the residual stream up, so large models only get their vectors
        # perturbed.
        for p in model.parameters():
            if perturb_matrices or p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


# Hugging Face -> the original's names (inverse of transformers' `DELTA_KEY_REPLACEMENTS`).
_TO_OFFICIAL = [
    (r"^embeddings\.(cls_token|register_tokens|patch_embeddings\.\w+)$", BB + r"patch_embed.\1"),
    (r"^layers\.(\d+)\.(.+)$", BB + r"blocks.\1.\2"),
    (r"^layernorm\.(\w+)$", BB + r"norm.\1"),
    (r"^query\.weight$", "network.q.weight"),
    (r"^class_predictor\.(\w+)$", r"network.class_head.\1"),
    (r"^mask_head\.fc1\.(\w+)$", r"network.mask_head.0.\1"),
    (r"^mask_head\.fc2\.(\w+)$", r"network.mask_head.2.\1"),
    (r"^mask_head\.fc3\.(\w+)$", r"network.mask_head.4.\1"),
    (r"^upscale_block\.block\.(\d+)\.(conv1|conv2)\.(\w+)$", r"network.upscale.\1.\2.\3"),
    (r"^upscale_block\.block\.(\d+)\.layernorm2d\.(\w+)$", r"network.upscale.\1.norm.\2"),
    (r"^attn_mask_probs$", "network.attn_mask_probs"),
    (r"^criterion\.empty_weight$", "criterion.empty_weight"),
]


def official_names(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for pat, rep in _TO_OFFICIAL:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            raise KeyError(f"oracle key {k} has no official name")
    return out


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """The original's absolute state dict of the oracle (its order: buffers, then backbone, then heads); the
    tensors are the model's own, not copies."""
    out = {
        "network.attn_mask_probs": model.attn_mask_probs.detach(),
        "network.encoder.pixel_mean": torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1),
        "network.encoder.pixel_std": torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1),
    }
    out.update(official_names({k: v.detach() for k, v in model.state_dict().items()}))
    return out


def pretrained_backbone(model, seed=1) -> dict[str, torch.Tensor]:
    """A random "pretrained" DINOv3 backbone of the oracle's shape, in the original's names: the oracle's backbone
    tensors moved by noise, so that the fine-tuned weights differ from it everywhere."""
    g = torch.Generator().manual_seed(seed)
    sd = official_state_dict(model)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in sd.items() if k.startswith(BB)}


def delta_state_dict(model, base: dict[str, torch.Tensor], probs: float = 0.0) -> dict[str, torch.Tensor]:
    """The zoo's delta form of the oracle against `base`: backbone tensors fine-tuned - pretrained, head tensors
    absolute (their start was zero), `attn_mask_probs` as a difference from the initial ones, pixel statistics
    a zero difference."""
    full = official_state_dict(model)
    out = {}
    for k, v in full.items():
        if k.startswith(BB):
            out[k] = v - base[k]
        elif k == "network.attn_mask_probs":
            out[k] = torch.full_like(v, probs) - 1.0
        elif k.startswith("network.encoder.pixel_"):
            out[k] = torch.zeros_like(v)
        else:
            out[k] = v
    return out


def hub_backbone(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base` as the Hugging Face hub files name DINOv3 (`embeddings.*` with a `mask_token`, `layer.N.*`,
    `norm.*`); transformers 5 names the blocks `model.layer.N` in memory."""
    sd = {}
    for k, v in base.items():
        k = k[len(BB):]
        k = re.sub(r"^patch_embed\.", "embeddings.", k)
        sd[re.sub(r"^blocks\.", "layer.", k)] = v
    cls = base[BB + "patch_embed.cls_token"]
    sd["embeddings.mask_token"] = torch.randn_like(cls)
    return sd


def save_hub_backbone(model, base: dict[str, torch.Tensor], path: Path) -> Path:
    """`base` saved by `DINOv3ViTModel.save_pretrained`, as on the hub (weights and config.json)."""
    c = model.config
    cfg = DINOv3ViTConfig(
        hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size, num_register_tokens=c.num_register_tokens, patch_size=16,
        image_size=c.image_size, layer_norm_eps=1e-5, use_gated_mlp=c.use_gated_mlp, hidden_act=c.hidden_act,
    )
    with torch.device("meta"):  # no random initialisation of weights that are replaced at once
        backbone = DINOv3ViTModel(cfg)
    sd = {re.sub(r"^layer\.", "model.layer.", k): v for k, v in hub_backbone(base).items()}
    backbone.load_state_dict(sd, strict=True, assign=True)
    backbone.save_pretrained(str(path))
    return path


def meta_backbone(model, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base` as Meta's `facebookresearch/dinov3` release names it: fused qkv whose bias has an arbitrary k third
    (multiplied by the zero third of `bias_mask` at run time), `storage_tokens`, `ls1.gamma`, `mlp.fc1/fc2` (SwiGLU:
    `w1` gate, `w2` value, `w3` output), a (1, D) mask token and the RoPE periods buffer."""
    c = model.config
    d = c.hidden_size
    sd = {
        "cls_token": base[BB + "patch_embed.cls_token"],
        "storage_tokens": base[BB + "patch_embed.register_tokens"],
        "mask_token": torch.randn_like(base[BB + "norm.weight"])[None],
        "patch_embed.proj.weight": base[BB + "patch_embed.patch_embeddings.weight"],
        "patch_embed.proj.bias": base[BB + "patch_embed.patch_embeddings.bias"],
        "norm.weight": base[BB + "norm.weight"],
        "norm.bias": base[BB + "norm.bias"],
        "rope_embed.periods": 100.0 ** torch.arange(0, 1, 4 / (d // c.num_attention_heads)).bfloat16().float(),
    }
    # Built from `base`'s tensors only, so that it works on the meta device too (shape-only zoo tests).
    mlp = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if c.use_gated_mlp else {
        "up_proj": "fc1", "down_proj": "fc2"}
    for i in range(c.num_hidden_layers):
        b = f"{BB}blocks.{i}."
        m = f"blocks.{i}."
        sd[m + "attn.qkv.weight"] = torch.cat([base[b + f"attention.{p}_proj.weight"] for p in "qkv"])
        q_bias = base[b + "attention.q_proj.bias"]
        sd[m + "attn.qkv.bias"] = torch.cat([q_bias, torch.randn_like(q_bias), base[b + "attention.v_proj.bias"]])
        sd[m + "attn.qkv.bias_mask"] = torch.cat([torch.ones_like(q_bias), torch.zeros_like(q_bias),
                                                  torch.ones_like(q_bias)])
        sd[m + "attn.proj.weight"] = base[b + "attention.o_proj.weight"]
        sd[m + "attn.proj.bias"] = base[b + "attention.o_proj.bias"]
        sd[m + "ls1.gamma"] = base[b + "layer_scale1.lambda1"]
        sd[m + "ls2.gamma"] = base[b + "layer_scale2.lambda1"]
        for n in ("norm1", "norm2"):
            for leaf in ("weight", "bias"):
                sd[m + f"{n}.{leaf}"] = base[b + f"{n}.{leaf}"]
        for hf, meta in mlp.items():
            for leaf in ("weight", "bias"):
                sd[m + f"mlp.{meta}.{leaf}"] = base[b + f"mlp.{hf}.{leaf}"]
    return sd


def save_delta(model, directory: Path, *, base_form: str = "hub", probs: float = 0.0, seed: int = 1
               ) -> tuple[Path, Path]:
    """Write the oracle as a zoo delta file `directory/pytorch_model.bin` and its base (`base_form` "hub": a
    Hugging Face directory `directory/base`; "meta": `directory/base.pth`); returns (delta, base)."""
    directory.mkdir(parents=True, exist_ok=True)
    base = pretrained_backbone(model, seed)
    delta = directory / "pytorch_model.bin"
    torch.save(delta_state_dict(model, base, probs), str(delta))
    if base_form == "hub":
        return delta, save_hub_backbone(model, base, directory / "base")
    path = directory / "base.pth"
    torch.save(meta_backbone(model, base), str(path))
    return delta, path
