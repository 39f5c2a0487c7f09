"""Model-zoo presets have the published architectures (parameter counts from the original checkpoints)."""

import pytest

from eomt_jax.__main__ import num_params
from eomt_jax.models import preset


@pytest.mark.parametrize(
    "size,count",
    [("S", 23_975_942), ("B", 93_663_110), ("L", 316_695_686), ("g", 1_163_622_022)],
)
def test_parameter_counts_match_the_published_checkpoints(size, count):
    # COCO panoptic at 640: 133 classes, 200 queries, 40x40 position grid.
    cfg = preset(size, num_classes=133, num_queries=200, image_size=640)
    assert num_params(cfg) == count


def test_preset_shapes():
    cfg = preset("g", num_classes=150, num_queries=100, image_size=(512, 1024))
    assert (cfg.num_heads, cfg.num_blocks, cfg.mlp_type, cfg.grid_size, cfg.num_upscale) == (
        24, 5, "swiglu", (32, 64), 2)
    with pytest.raises(ValueError, match="unknown EoMT size"):
        preset("XL", num_classes=1, num_queries=1, image_size=640)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        preset("S", num_classes=1, num_queries=1, image_size=650)


@pytest.mark.parametrize("size,count", [("S", 23_356_934), ("B", 92_425_094), ("L", 315_032_710)])
def test_dinov3_parameter_counts_match_the_published_checkpoints(size, count):
    # COCO panoptic at 640 (DINOv3 counts do not depend on the image size: no position table). The published
    # networks have no key bias at all; ours stores the fused qkv bias whose key third is held at zero, D per block.
    cfg = preset(size, backbone="dinov3", num_classes=133, num_queries=200, image_size=640)
    assert cfg.layer_norm_eps == 1e-5
    assert num_params(cfg) == count + cfg.depth * cfg.embed_dim
    assert num_params(cfg.replace(image_size=(1280, 1280))) == num_params(cfg)


def test_dinov3_preset_sizes():
    plus = preset("H+", backbone="dinov3", num_classes=1, num_queries=1, image_size=64)
    assert (plus.embed_dim, plus.depth, plus.num_heads, plus.mlp_type, plus.mlp_hidden) == (1280, 32, 20, "swiglu",
                                                                                             10240)
    with pytest.raises(ValueError, match="unknown EoMT size 'g' for the dinov3 backbone"):
        preset("g", backbone="dinov3", num_classes=1, num_queries=1, image_size=640)
    with pytest.raises(ValueError, match="head dim divisible by 4"):
        preset("S", backbone="dinov3", num_classes=1, num_queries=1, image_size=64, embed_dim=60, num_heads=6)
