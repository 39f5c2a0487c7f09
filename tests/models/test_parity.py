"""The Flax EoMT reproduces the PyTorch EoMT after conversion from both published formats.

Tolerance: 1e-4 max abs difference in float32 with "highest" matmul precision (set in conftest). The two
implementations sum in different orders (fused vs split qkv, einsum vs conv), which leaves ~1e-6 relative noise on
logits of magnitude ~10-100.
"""

from __future__ import annotations

import numpy as np
import pytest

from eomt_jax import pretrained
from eomt_jax.conversion.cli import main as convert_main
from tests.models import oracle

TOL = 1e-4

CASES = {
    # name: oracle kwargs
    "base_like": dict(hidden_size=64, depth=4, heads=2, num_blocks=2, queries=10, labels=5, registers=4),
    "patch14_noreg": dict(
        hidden_size=48, depth=3, heads=3, num_blocks=1, queries=7, labels=3, registers=0, patch=14,
        image_hw=(56, 56),
    ),
    "swiglu_nonsquare": dict(
        hidden_size=64, depth=3, heads=4, num_blocks=3, queries=6, labels=4, registers=4, swiglu=True,
        image_hw=(64, 48),
    ),
}


def _convert(tmp_path, model, fmt: str, image_hw, heads) -> pretrained.EoMT:
    src = oracle.save_hf(model, tmp_path / "hf") if fmt == "hf" else oracle.save_official(model, tmp_path / "m.bin")
    dst = tmp_path / f"out_{fmt}"
    args = ["--src", str(src), "--dst", str(dst), "--set", f"num_heads={heads}"]
    if image_hw[0] != image_hw[1]:
        args += ["--set", f"image_size={tuple(image_hw)}"]
    assert convert_main(args) == 0
    return dst


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kw = dict(CASES[request.param])
    model = oracle.build(**kw)
    image_hw = kw.get("image_hw", (64, 64))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (2, *image_hw, 3)).astype(np.float32)
    tmp = tmp_path_factory.mktemp(request.param)
    dirs = {fmt: _convert(tmp, model, fmt, image_hw, kw["heads"]) for fmt in ("hf", "official")}
    return model, images, dirs


@pytest.mark.parametrize("fmt", ["hf", "official"])
def test_final_logits_without_masked_attention(case, fmt):
    model, images, dirs = case
    ref_masks, ref_classes = oracle.run(model, images, probs=0.0, capture=False)
    net = pretrained.load(dirs[fmt])
    masks, classes = net(images)
    assert len(masks) == len(classes) == 1
    assert masks[0].shape == ref_masks[-1].shape
    np.testing.assert_allclose(np.asarray(masks[0]), ref_masks[-1], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(classes[0]), ref_classes[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("prob", [1.0, 0.0])
@pytest.mark.parametrize("fmt", ["hf", "official"])
def test_every_prediction_with_masked_attention(case, fmt, prob):
    model, images, dirs = case
    ref_masks, ref_classes = oracle.run(model, images, probs=prob)
    net = pretrained.load(dirs[fmt], masked_attn_enabled=True)
    k = net.config.num_blocks
    masks, classes = net(images, np.full((k,), prob, np.float32))
    assert len(masks) == len(ref_masks) == k + 1
    for j in range(k + 1):
        np.testing.assert_allclose(np.asarray(masks[j]), ref_masks[j], atol=TOL, rtol=0, err_msg=f"output {j}")
        np.testing.assert_allclose(np.asarray(classes[j]), ref_classes[j], atol=TOL, rtol=0, err_msg=f"output {j}")


def test_masking_changes_the_result(case):
    """Guard against a masked-attention path that silently does nothing."""
    model, images, dirs = case
    net = pretrained.load(dirs["official"], masked_attn_enabled=True)
    k = net.config.num_blocks
    on, _ = net(images, np.ones((k,), np.float32))
    off, _ = net(images, np.zeros((k,), np.float32))
    assert np.abs(np.asarray(on[-1]) - np.asarray(off[-1])).max() > 1e-3


def test_stored_probabilities_are_used(case):
    model, images, dirs = case
    net = pretrained.load(dirs["hf"], masked_attn_enabled=True)
    # The oracle's buffer was ones when it was saved.
    np.testing.assert_array_equal(np.asarray(net.attn_mask_probs[...]), 1.0)
    ref_masks, _ = oracle.run(model, images, probs=1.0)
    masks, _ = net(images)
    np.testing.assert_allclose(np.asarray(masks[-1]), ref_masks[-1], atol=TOL, rtol=0)
