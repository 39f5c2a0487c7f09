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
