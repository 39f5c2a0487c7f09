"""Training a DINOv3 EoMT from a converted DINOv3 backbone, with a DINOv3 zoo config's recipe, and validating it
during training."""

import json

import numpy as np
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from eomt_jax import config_lib, pretrained, train
from eomt_jax.conversion.cli import main as convert_main
from tests.tiny import REPO

CONFIG = str(REPO / "configs" / "dinov3_coco_panoptic_large.py") + ":runlocal"


def test_train_from_a_converted_dinov3_backbone(tmp_path):
    config = config_lib.load_config_file(CONFIG)
    m = config.model
    assert (m.backbone, config.optim.lr, config.optim.llrd_l2_enabled) == ("dinov3", 2e-4, False)
    torch.manual_seed(0)
    backbone = DINOv3ViTModel(DINOv3ViTConfig(
        hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
        intermediate_size=m.mlp_hidden, num_register_tokens=m.num_registers, patch_size=16, image_size=64,
        layer_norm_eps=1e-5)).eval()
    backbone.save_pretrained(str(tmp_path / "dinov3"))  # as the hub holds it
    assert convert_main(["--src", str(tmp_path / "dinov3"), "--dst", str(tmp_path / "init"),
                         "--config", CONFIG]) == 0
    converted = pretrained.load(str(tmp_path / "init"))
    assert converted.config.backbone == "dinov3" and not hasattr(converted.backbone, "pos_embed")
    np.testing.assert_allclose(np.asarray(converted.backbone.cls_token[...]),
                               backbone.embeddings.cls_token.detach().numpy(), rtol=0, atol=0)

    config.init_from = str(tmp_path / "init")
    config.eval.masked_attn = True  # validation as during training: one result per prediction point
    # The on-device matcher: a train step JAX's compilation cache keeps (the default matcher's host callback makes
    # every compilation new); what is loaded, trained and validated does not depend on the matcher.
    config.loss.matcher = "optax"
    result = train.run(config, tmp_path / "w", "train_and_eval")
    assert result["step"] == config.total_steps == config.eval_every_steps
    assert result["PQ"] is not None and 0.0 <= result["PQ"] <= 100.0 and "PQ_block_-1" in result
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == config.total_steps and all(np.isfinite(losses))
    assert list((tmp_path / "w" / f"overlays_{config.total_steps}").glob("*.png"))
