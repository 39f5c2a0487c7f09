"""Patch-kernel resampling, and DINOv2 backbone checkpoints as training initialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eomt_jax import pretrained
from eomt_jax.conversion import resample_patch_kernel
from eomt_jax.conversion.cli import main as convert_main
from eomt_jax.models import resample_pos_embed


def test_patch_kernel_resize_is_the_pseudo_inverse_of_torch_bicubic():
    """FlexiViT resize: <x, w14> == <resize(x), w16> for resized patches, with torch's antialiased bicubic as R."""
    rng = np.random.default_rng(0)
    w14 = rng.normal(size=(4, 3, 14, 14)).astype(np.float32)
    w16 = resample_patch_kernel(w14, 16)
    basis = torch.eye(14 * 14).reshape(-1, 1, 14, 14)
    mat = F.interpolate(basis, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    mat = mat.reshape(14 * 14, 16 * 16).T.double().numpy()  # (256, 196): column k = resize of basis k
    ref = (w14.reshape(12, 196).astype(np.float64) @ np.linalg.pinv(mat)).reshape(4, 3, 16, 16)
    np.testing.assert_allclose(w16, ref, atol=1e-4, rtol=0)
    x = rng.normal(size=(14, 14))
    x16 = (mat @ x.reshape(-1)).reshape(16, 16)
    np.testing.assert_allclose(
        np.einsum("oihw,hw->oi", w14, x), np.einsum("oihw,hw->oi", w16, x16), atol=1e-3, rtol=0
    )


def _hf_dinov2(seed=0):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    cfg = Dinov2WithRegistersConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=256, patch_size=14,
        image_size=56, num_register_tokens=4, layerscale_value=1.0,
    )
    model = Dinov2WithRegistersModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("hub_names", [False, True])
def test_hf_dinov2_backbone_initialises_an_eomt(tmp_path, hub_names):
    """At the native patch size and grid the converted backbone computes the same tokens as the source model."""
    model = _hf_dinov2()
    sd = model.state_dict()
    if hub_names:  # the spelling of the published hub files
        sd = {
            k.replace("attention.q_proj", "attention.attention.query")
            .replace("attention.k_proj", "attention.attention.key")
            .replace("attention.v_proj", "attention.attention.value")
            .replace("attention.o_proj", "attention.output.dense"): v
            for k, v in sd.items()
        }
    torch.save(sd, tmp_path / "dino.bin")
    dst = tmp_path / "init"
    args = ["--src", tmp_path / "dino.bin", "--dst", dst, "--set", "num_heads=2", "--set", "num_classes=3",
            "--set", "num_queries=4", "--set", "num_blocks=1", "--set", "image_size=56", "--set", "patch_size=14"]
    assert convert_main([str(a) for a in args]) == 0
    net = pretrained.load(dst)
    assert net.config.num_classes == 3 and net.config.patch_size == 14
    images = np.random.default_rng(0).uniform(0, 1, (2, 56, 56, 3)).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = ((images - mean) / std).astype(np.float32)
    tokens = net.backbone.embed(x)
    for block in net.backbone.blocks:
        tokens = block(tokens)
    ours = np.asarray(net.backbone.norm(tokens))
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def _timm_checkpoint(tmp_path):
    """A timm-named DINOv2 (patch 14, 4x4 grid) converted to a patch-16 EoMT at 96 x 80."""
    model = _hf_dinov2(seed=1)
    sd = model.state_dict()
    timm = {
        "cls_token": sd["embeddings.cls_token"] + sd["embeddings.position_embeddings"][:, :1],
        "reg_token": sd["embeddings.register_tokens"],
        "pos_embed": sd["embeddings.position_embeddings"][:, 1:],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(3):
        p = f"encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            timm[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([sd[p + f"attention.{n}_proj.{leaf}"] for n in "qkv"])
            timm[f"blocks.{i}.attn.proj.{leaf}"] = sd[p + f"attention.o_proj.{leaf}"]
        for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            timm[f"blocks.{i}.{a}.weight"] = sd[p + f"{b}.weight"]
            timm[f"blocks.{i}.{a}.bias"] = sd[p + f"{b}.bias"]
        timm[f"blocks.{i}.ls1.gamma"] = sd[p + "layer_scale1.lambda1"]
        timm[f"blocks.{i}.ls2.gamma"] = sd[p + "layer_scale2.lambda1"]
    torch.save(timm, tmp_path / "timm.bin")
    dst = tmp_path / "init16"
    args = ["--src", tmp_path / "timm.bin", "--dst", dst, "--set", "num_heads=2", "--set", "num_classes=3",
            "--set", "num_queries=4", "--set", "num_blocks=2", "--set", "image_size=(96, 80)"]
    assert convert_main([str(a) for a in args]) == 0
    return timm, dst


def test_timm_style_backbone_is_resampled_to_patch16(tmp_path):
    """A timm-named DINOv2 (patch 14, 4x4 grid) becomes a patch-16 EoMT at the requested image size."""
    timm, dst = _timm_checkpoint(tmp_path)
    net = pretrained.load(dst)
    assert net.config.patch_size == 16 and net.config.image_size == (96, 80)
    assert net.backbone.pos_embed[...].shape == (1, 6 * 5, 64)
    np.testing.assert_allclose(
        np.asarray(net.backbone.pos_embed[...]),
        np.asarray(resample_pos_embed(timm["pos_embed"].numpy(), (4, 4), (6, 5))), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(net.backbone.patch_embed.proj.kernel[...]),
        resample_patch_kernel(timm["patch_embed.proj.weight"].numpy(), 16).transpose(2, 3, 1, 0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(net.backbone.blocks[2].ls2.gamma[...]), timm["blocks.2.ls2.gamma"].numpy())
    masks, classes = net(np.zeros((1, 96, 80, 3), np.float32))
    assert masks[-1].shape == (1, 4, 24, 20) and classes[-1].shape == (1, 4, 4)


def test_another_image_size_resamples_once_from_the_backbone_grid(tmp_path):
    """Initialising a run at another size from a backbone conversion resamples DINOv2's own grid once (4x4 -> 8x8,
    as timm does for a 1280 model from the 37x37 grid), not the converted one again (4x4 -> 6x5 -> 8x8)."""
    from flax import nnx

    from eomt_jax.models import EoMT
    from eomt_jax.train_step import split_model
    from eomt_jax.tree import flatten_paths

    timm, dst = _timm_checkpoint(tmp_path)
    config = pretrained.load(dst).config.replace(image_size=(128, 128))
    _, params, buffers = split_model(EoMT(config, rngs=nnx.Rngs(0)))
    params, _ = pretrained.load_into(params, buffers, dst, config)
    got = np.asarray(flatten_paths(params)["backbone/pos_embed"])
    once = np.asarray(resample_pos_embed(timm["pos_embed"].numpy(), (4, 4), (8, 8)))
    twice = np.asarray(resample_pos_embed(resample_pos_embed(timm["pos_embed"].numpy(), (4, 4), (6, 5)), (6, 5),
                                          (8, 8)))
    np.testing.assert_allclose(got, once, atol=1e-6)
    assert np.abs(got - twice).max() > 1e-3
