"""The Flax EoMT with a DINOv3 backbone reproduces transformers' EomtDinov3 after conversion from a Hugging Face
directory and from the model zoo's delta form (delta file + base backbone in Hugging Face or Meta spelling).

Tolerance: 1e-4 max abs difference in float32 with "highest" matmul precision (set in conftest), as for DINOv2:
the implementations sum in different orders (fused vs split qkv, einsum vs conv), which leaves ~1e-6 relative
noise on logits of magnitude ~1-10; the delta form adds one float32 rounding of base + delta.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

from eomt_jax import pretrained
from eomt_jax.conversion.cli import main as convert_main
from eomt_jax.models.vit import rope_tables
from tests.models import oracle_dinov3

TOL = 1e-4

CASES = {
    # name: (oracle kwargs, spelling of the delta's base)
    "gelu_4reg": (dict(hidden_size=64, depth=4, heads=2, intermediate=128, num_blocks=2, queries=10, labels=5,
                       registers=4), "hub"),
    "swiglu_noreg_64x48": (dict(hidden_size=48, depth=3, heads=4, intermediate=96, num_blocks=3, queries=6,
                                labels=4, registers=0, gated=True, image_hw=(64, 48)), "meta"),
    "hd8_2reg_48x80": (dict(hidden_size=32, depth=5, heads=4, intermediate=64, num_blocks=1, queries=3, labels=2,
                            registers=2, image_hw=(48, 80)), "hub"),
}


@nnx.jit
def _forward(net, images, probs):
    return net(images, probs)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kw, base_form = CASES[request.param]
    model = oracle_dinov3.build(**kw)
    image_hw = kw.get("image_hw", (64, 64))
    images = np.random.default_rng(0).uniform(0, 1, (2, *image_hw, 3)).astype(np.float32)
    tmp = tmp_path_factory.mktemp(request.param)
    hf = oracle_dinov3.save_hf(model, tmp / "hf")
    delta, base = oracle_dinov3.save_delta(model, tmp / "zoo", base_form=base_form)
    dirs = {}
    for fmt, src in (("hf", ["--src", hf]), ("delta", ["--src", delta, "--base", base])):
        dirs[fmt] = tmp / f"out_{fmt}"
        args = [*src, "--dst", dirs[fmt], "--set", f"num_heads={kw['heads']}", "--set", f"image_size={image_hw}"]
        assert convert_main([str(a) for a in args]) == 0
    return model, images, dirs


@pytest.mark.parametrize("fmt", ["hf", "delta"])
def test_final_logits_without_masked_attention(case, fmt):
    model, images, dirs = case
    ref_masks, ref_classes = oracle_dinov3.run(model, images, probs=0.0, capture=False)
    net = pretrained.load(dirs[fmt])
    assert net.config.backbone == "dinov3"
    masks, classes = _forward(net, images, None)
    assert len(masks) == len(classes) == 1
    assert masks[0].shape == ref_masks[-1].shape
    np.testing.assert_allclose(np.asarray(masks[0]), ref_masks[-1], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(classes[0]), ref_classes[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("prob", [1.0, 0.0])
@pytest.mark.parametrize("fmt", ["hf", "delta"])
def test_every_prediction_with_masked_attention(case, fmt, prob):
    model, images, dirs = case
    ref_masks, ref_classes = oracle_dinov3.run(model, images, probs=prob)
    net = pretrained.load(dirs[fmt], masked_attn_enabled=True)
    k = net.config.num_blocks
    masks, classes = _forward(net, images, np.full((k,), prob, np.float32))
    assert len(masks) == len(ref_masks) == k + 1
    for j in range(k + 1):
        np.testing.assert_allclose(np.asarray(masks[j]), ref_masks[j], atol=TOL, rtol=0, err_msg=f"output {j}")
        np.testing.assert_allclose(np.asarray(classes[j]), ref_classes[j], atol=TOL, rtol=0, err_msg=f"output {j}")


def test_masking_changes_the_result(case):
    """Guard against a masked-attention path that silently does nothing: masking moves the final mask logits far
    beyond the tolerance (by 5% of their range at least; a disabled mask moves nothing), in both implementations.
    With K = 1 only the last block is masked, which moves the least."""
    model, images, dirs = case
    net = pretrained.load(dirs["delta"], masked_attn_enabled=True)
    k = net.config.num_blocks
    on, _ = _forward(net, images, np.ones((k,), np.float32))
    off, _ = _forward(net, images, np.zeros((k,), np.float32))
    ref_on, _ = oracle_dinov3.run(model, images, probs=1.0, capture=False)
    ref_off, _ = oracle_dinov3.run(model, images, probs=0.0, capture=False)
    for a, b in ((np.asarray(on[-1]), np.asarray(off[-1])), (ref_on[-1], ref_off[-1])):
        assert np.abs(a - b).max() > max(0.05 * np.abs(b).max(), 100 * TOL)


def test_stored_probabilities_are_used(case):
    """The Hugging Face file stores the probabilities themselves (ones here), the delta file their difference
    from one (here -1, so 0); the stored values reproduce the oracle run at them."""
    model, images, dirs = case
    for fmt, prob in (("hf", 1.0), ("delta", 0.0)):
        net = pretrained.load(dirs[fmt], masked_attn_enabled=True)
        stored = np.asarray(net.attn_mask_probs[...])
        np.testing.assert_array_equal(stored, prob)
        ref_masks, _ = oracle_dinov3.run(model, images, probs=prob, capture=False)
        masks, _ = _forward(net, images, stored)
        np.testing.assert_allclose(np.asarray(masks[-1]), ref_masks[-1], atol=TOL, rtol=0, err_msg=fmt)


def test_rope_tables_match_transformers(case, monkeypatch):
    """cos/sin of the rotary positions, at evaluation and with the training-time coordinate rescale (the factor
    transformers draws is recovered from its coordinate function and given to ours)."""
    from transformers.models.eomt_dinov3 import modeling_eomt_dinov3 as hf

    model, images, _ = case
    h, w = images.shape[1:3]
    grid, head_dim = (h // 16, w // 16), model.config.hidden_size // model.config.num_attention_heads
    pixels = torch.zeros(1, 3, h, w)
    with torch.no_grad():
        cos, sin = model.rope_embeddings(pixels)
    ours = rope_tables(grid, head_dim, 100.0)
    np.testing.assert_allclose(np.asarray(ours[0]), cos.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(ours[1]), sin.numpy(), atol=1e-6, rtol=0)

    scales = []
    augment = hf.augment_patches_center_coordinates

    def recording(coords, **kw):
        out = augment(coords, **kw)
        scales.append(float((out / coords).flatten()[0]))
        return out

    monkeypatch.setattr(hf, "augment_patches_center_coordinates", recording)
    monkeypatch.setattr(model.config, "pos_embed_rescale", 2.0)
    torch.manual_seed(3)
    model.rope_embeddings.train()
    try:
        with torch.no_grad():
            cos, sin = model.rope_embeddings(pixels)
    finally:
        model.rope_embeddings.eval()
    assert len(scales) == 1 and 0.5 <= scales[0] <= 2.0 and abs(scales[0] - 1) > 1e-3
    ours = rope_tables(grid, head_dim, 100.0, scales[0])
    np.testing.assert_allclose(np.asarray(ours[0]), cos.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(ours[1]), sin.numpy(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_eomt_large_640_through_the_delta_format(tmp_path):
    """EoMT-L DINOv3 at 640 (the COCO panoptic zoo architecture, random weights) from a delta file and a
    `save_pretrained` hub base, with nothing but the zoo folder name to give the image size. The network has no
    grid-bound parameter, so it is compared with the oracle on a small input (8 x 6 patches), masked attention on."""
    import gc

    from eomt_jax.models.eomt import preset

    model = oracle_dinov3.build(hidden_size=1024, depth=24, heads=16, intermediate=4096, num_blocks=4,
                                queries=200, labels=133, registers=4, image_hw=(128, 96), perturb_matrices=False)
    images = np.random.default_rng(0).uniform(0, 1, (1, 128, 96, 3)).astype(np.float32)
    ref_masks, ref_classes = oracle_dinov3.run(model, images, probs=1.0)
    delta, base = oracle_dinov3.save_delta(model, tmp_path / "coco_panoptic_eomt_large_640_dinov3")
    del model
    gc.collect()
    dst = tmp_path / "out"
    assert convert_main(["--src", str(delta), "--base", str(base), "--dst", str(dst)]) == 0
    net = pretrained.load(dst, masked_attn_enabled=True)
    assert net.config == preset("L", backbone="dinov3", num_classes=133, num_queries=200, image_size=640)
    masks, classes = _forward(net, images, np.ones((4,), np.float32))
    assert len(masks) == 5 and masks[-1].shape == (1, 200, 32, 24) and classes[-1].shape == (1, 200, 134)
    # The logits must not be trivially small for the tolerance to mean much.
    assert np.abs(ref_masks[-1]).max() > 1.0
    for j in range(5):
        np.testing.assert_allclose(np.asarray(masks[j]), ref_masks[j], atol=TOL, rtol=0, err_msg=f"output {j}")
        np.testing.assert_allclose(np.asarray(classes[j]), ref_classes[j], atol=TOL, rtol=0, err_msg=f"output {j}")
