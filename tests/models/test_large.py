"""EoMT-L at 640x640 (the published COCO architecture, random weights) through both checkpoint formats."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from flax import nnx

from eomt_jax import pretrained
from eomt_jax.conversion.cli import main as convert_main
from eomt_jax.tree import flatten_paths
from tests.models import oracle


@pytest.mark.slow
def test_eomt_large_640_end_to_end(tmp_path):
    model = oracle.build(
        hidden_size=1024, depth=24, heads=16, num_blocks=4, queries=200, labels=133, registers=4, image_hw=(640, 640),
        perturb_matrices=False,
    )
    images = np.random.default_rng(0).uniform(0, 1, (1, 640, 640, 3)).astype(np.float32)
    ref_masks, ref_classes = oracle.run(model, images, probs=0.0, capture=False)
    oracle.save_hf(model, tmp_path / "hf")
    oracle.save_official(model, tmp_path / "pytorch_model.bin")
    del model
    gc.collect()
    converted = []
    for src in (tmp_path / "hf", tmp_path / "pytorch_model.bin"):
        dst = tmp_path / f"out_{src.stem}"
        assert convert_main(["--src", str(src), "--dst", str(dst)]) == 0
        converted.append(dst)
    net = pretrained.load(converted[0])
    assert net.config.num_heads == 16 and net.config.num_blocks == 4 and net.config.image_size == (640, 640)
    # Both formats give the same network, bit for bit, so one forward pass checks both.
    other = pretrained.load(converted[1])
    assert other.config == net.config
    ours, theirs = flatten_paths(nnx.state(net, nnx.Param)), flatten_paths(nnx.state(other, nnx.Param))
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(theirs[key]), err_msg=key)
    del other, theirs
    gc.collect()
    masks, classes = nnx.jit(lambda net, images: net(images))(net, images)  # one program: faster than op by op
    assert masks[0].shape == (1, 200, 160, 160) and classes[0].shape == (1, 200, 134)
    # Same tolerance as the tiny parity tests; the logits must not be trivially small for that to mean much.
    assert np.abs(ref_masks[-1]).max() > 1.0
    np.testing.assert_allclose(np.asarray(masks[0]), ref_masks[-1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(classes[0]), ref_classes[-1], atol=1e-4, rtol=0)
