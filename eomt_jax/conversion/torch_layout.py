"""Our parameters in the layout of the `transformers` EoMT (`EomtForUniversalSegmentation`): the converter's
key table read backwards, so that the PyTorch network can run with the same weights (benchmark comparisons).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from eomt_jax.models.eomt import EoMT
from eomt_jax.tree import flatten_paths


def to_hf_state_dict(model: EoMT) -> dict[str, Any]:
    """Our parameters in the transformers EoMT layout (GELU backbones)."""
    import torch

    _, params, _ = nnx.split(model, nnx.Param, ...)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_paths(params).items()}
    sd: dict[str, np.ndarray] = {
        "embeddings.cls_token": flat["backbone/cls_token"],
        "embeddings.position_embeddings.weight": flat["backbone/pos_embed"][0],
        "embeddings.patch_embeddings.projection.weight": flat["backbone/patch_embed/proj/kernel"].transpose(3, 2, 0, 1),
        "embeddings.patch_embeddings.projection.bias": flat["backbone/patch_embed/proj/bias"],
        "layernorm.weight": flat["backbone/norm/scale"],
        "layernorm.bias": flat["backbone/norm/bias"],
        "query.weight": flat["q/embedding"],
        "class_predictor.weight": flat["class_head/kernel"].T,
        "class_predictor.bias": flat["class_head/bias"],
    }
    if "backbone/reg_token" in flat:
        sd["embeddings.register_tokens"] = flat["backbone/reg_token"]
    for i in range(model.config.depth):
        b = f"backbone/blocks/{i}/"
        qkv_w, qkv_b = flat[b + "attn/qkv/kernel"].T, flat[b + "attn/qkv/bias"]
        for j, n in enumerate("qkv"):
            d = model.config.embed_dim
            sd[f"layers.{i}.attention.{n}_proj.weight"] = qkv_w[j * d : (j + 1) * d]
            sd[f"layers.{i}.attention.{n}_proj.bias"] = qkv_b[j * d : (j + 1) * d]
        sd[f"layers.{i}.attention.out_proj.weight"] = flat[b + "attn/proj/kernel"].T
        sd[f"layers.{i}.attention.out_proj.bias"] = flat[b + "attn/proj/bias"]
        for n in ("norm1", "norm2"):
            sd[f"layers.{i}.{n}.weight"] = flat[b + f"{n}/scale"]
            sd[f"layers.{i}.{n}.bias"] = flat[b + f"{n}/bias"]
        sd[f"layers.{i}.layer_scale1.lambda1"] = flat[b + "ls1/gamma"]
        sd[f"layers.{i}.layer_scale2.lambda1"] = flat[b + "ls2/gamma"]
        for n in ("fc1", "fc2"):
            sd[f"layers.{i}.mlp.{n}.weight"] = flat[b + f"mlp/{n}/kernel"].T
            sd[f"layers.{i}.mlp.{n}.bias"] = flat[b + f"mlp/{n}/bias"]
    for j in range(3):
        sd[f"mask_head.fc{j + 1}.weight"] = flat[f"mask_head/fc{j + 1}/kernel"].T
        sd[f"mask_head.fc{j + 1}.bias"] = flat[f"mask_head/fc{j + 1}/bias"]
    for j in range(model.config.num_upscale):
        u = f"upscale/{j}/"
        sd[f"upscale_block.block.{j}.conv1.weight"] = flat[u + "conv1/kernel"].transpose(2, 3, 0, 1)
        sd[f"upscale_block.block.{j}.conv1.bias"] = flat[u + "conv1/bias"]
        sd[f"upscale_block.block.{j}.conv2.weight"] = flat[u + "conv2/kernel"].transpose(3, 2, 0, 1)
        sd[f"upscale_block.block.{j}.layernorm2d.weight"] = flat[u + "norm/scale"]
        sd[f"upscale_block.block.{j}.layernorm2d.bias"] = flat[u + "norm/bias"]
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()}
