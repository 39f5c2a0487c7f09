"""The PyTorch EoMT of `transformers`, built from small random configs, as the parity oracle.

Also writes the model in the two published formats: a Hugging Face directory and the original's flat
`network.*` state dict (produced here by the inverse of the official -> Hugging Face key mapping).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from transformers import EomtConfig, EomtForUniversalSegmentation


def build(
    *,
    hidden_size=64,
    depth=4,
    heads=2,
    num_blocks=2,
    queries=10,
    labels=5,
    registers=4,
    patch=16,
    image_hw=(64, 64),
    swiglu=False,
    seed=0,
    perturb_matrices=True,
) -> EomtForUniversalSegmentation:
    """A random-weight oracle. Non-square inputs are supported by resizing its position table and grid."""
    torch.manual_seed(seed)
    up = max(1, int(np.floor(np.log2(patch))) - 2)
    cfg = EomtConfig(
        hidden_size=hidden_size,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_blocks=num_blocks,
        num_queries=queries,
        image_size=image_hw[0],
        patch_size=patch,
        num_register_tokens=registers,
        num_labels=labels,
        num_upscale_blocks=up,
        use_swiglu_ffn=swiglu,
        layerscale_value=1.0,
        train_num_points=64,
    )
    model = EomtForUniversalSegmentation(cfg)
    grid = (image_hw[0] // patch, image_hw[1] // patch)
    if grid[0] != grid[1]:
        n = grid[0] * grid[1]
        model.grid_size = grid
        model.embeddings.position_embeddings = torch.nn.Embedding(n, hidden_size)
        model.embeddings.position_ids = torch.arange(n)[None]
    with torch.no_grad():
        # Perturb parameters so that no term (LayerScale, norms, biases) sits at a trivial init value. At real
        # widths, perturbing the matrices too would blow the residual stream up by orders of magnitude per block,
        # so large models keep the initialiser's matrices (std 0.02) and only get their vectors perturbed.
        for p in model.parameters():
            if perturb_matrices or p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def run(model, images_nhwc: np.ndarray, probs: float, capture: bool = True):
    """Forward with every masked-attention probability set to `probs`; returns lists of (mask, class) logits.

    The oracle takes ImageNet-normalised NCHW input (its processor normalises); our network takes [0, 1] NHWC.
    With probs == 0 the oracle is run in training mode, which is numerically identical here (no dropout, no
    drop-path) but still computes the intermediate predictions, so those can be compared too.
    """
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    x = torch.from_numpy(((images_nhwc - mean) / std).transpose(0, 3, 1, 2).copy())
    model.attn_mask_probs.fill_(probs)
    model.train(probs == 0.0)
    preds = []
    orig = model.predict

    def predict(h):
        out = orig(h)
        preds.append(out)
        return out

    if capture:
        model.predict = predict
    try:
        with torch.no_grad():
            out = model(pixel_values=x)
    finally:
        model.predict = orig
        model.eval()
    if not capture:
        preds = [(out.masks_queries_logits, out.class_queries_logits)]
    return [m.numpy() for m, _ in preds], [c.numpy() for _, c in preds]


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


# Hugging Face -> official names (the inverse of the original's conversion script's table).
_TO_OFFICIAL = [
    (r"^embeddings\.cls_token$", "network.encoder.backbone.cls_token"),
    (r"^embeddings\.register_tokens$", "network.encoder.backbone.reg_token"),
    (r"^embeddings\.position_embeddings\.weight$", "network.encoder.backbone.pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.(\w+)$", r"network.encoder.backbone.patch_embed.proj.\1"),
    (r"^layers\.(\d+)\.(norm1|norm2)\.(\w+)$", r"network.encoder.backbone.blocks.\1.\2.\3"),
    (r"^layers\.(\d+)\.attention\.out_proj\.(\w+)$", r"network.encoder.backbone.blocks.\1.attn.proj.\2"),
    (r"^layers\.(\d+)\.layer_scale1\.lambda1$", r"network.encoder.backbone.blocks.\1.ls1.gamma"),
    (r"^layers\.(\d+)\.layer_scale2\.lambda1$", r"network.encoder.backbone.blocks.\1.ls2.gamma"),
    (r"^layers\.(\d+)\.mlp\.(fc1|fc2)\.(\w+)$", r"network.encoder.backbone.blocks.\1.mlp.\2.\3"),
    (r"^layers\.(\d+)\.mlp\.down_proj\.(\w+)$", r"network.encoder.backbone.blocks.\1.mlp.fc2.\2"),
    (r"^layernorm\.(\w+)$", r"network.encoder.backbone.norm.\1"),
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


def official_state_dict(model) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.match(r"^layers\.(\d+)\.attention\.(q|k|v)_proj\.(\w+)$", k)
        if m:
            fused.setdefault(("attn.qkv", m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        m = re.match(r"^layers\.(\d+)\.mlp\.(gate|up)_proj\.(\w+)$", k)
        if m:
            fused.setdefault(("mlp.fc1", m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        for pat, rep in _TO_OFFICIAL:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            raise KeyError(f"oracle key {k} has no official name")
    for (name, block, leaf), parts in fused.items():
        order = ("q", "k", "v") if name == "attn.qkv" else ("gate", "up")
        out[f"network.encoder.backbone.blocks.{block}.{name}.{leaf}"] = torch.cat([parts[p] for p in order], 0)
    out["network.encoder.backbone.pos_embed"] = out["network.encoder.backbone.pos_embed"][None]
    out["network.encoder.pixel_mean"] = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    out["network.encoder.pixel_std"] = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    return out


def save_official(model, path: Path) -> Path:
    torch.save(official_state_dict(model), str(path))
    return path
