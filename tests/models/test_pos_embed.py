"""Position-embedding resampling (timm's antialiased bicubic), and a network run at another resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eomt_jax.models import EoMTConfig, init_model, resample_pos_embed


@pytest.mark.parametrize("old,new", [((37, 37), (40, 40)), ((40, 40), (32, 24)), ((6, 5), (4, 7))])
def test_pos_embed_resampling_matches_torch_bicubic(old, new):
    """timm resamples DINOv2 position tables with antialiased bicubic interpolation (half-pixel centres)."""
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(1, old[0] * old[1], 8)).astype(np.float32)
    ours = np.asarray(resample_pos_embed(pos, old, new))
    grid = torch.from_numpy(pos.reshape(1, *old, 8)).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=new, mode="bicubic", antialias=True, align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], 8).numpy()
    # float32 accumulation-order noise only.
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)


def test_network_runs_at_another_resolution_through_resampling():
    cfg = EoMTConfig(embed_dim=32, depth=2, num_heads=2, image_size=32, num_queries=3, num_classes=2,
                     num_blocks=1, mlp_hidden=64)
    net = init_model(cfg)
    masks, classes = net(np.zeros((1, 48, 64, 3), np.float32), masked_attn=False)
    assert masks[0].shape == (1, 3, 12, 16) and classes[0].shape == (1, 3, 3)
