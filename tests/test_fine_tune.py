"""Training and evaluation from converted (PyTorch) checkpoints: --mode=eval, its stored buffers, fine-tuning on
other classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from eomt_jax import config_lib, evaluation, pretrained, train
from eomt_jax.models.eomt import EoMT
from eomt_jax.train_step import split_model
from tests.tiny import runlocal_config


def _from_converted(tmp_path, config_name: str, attn_mask_probs: float | None = None):
    """A tiny run of `config_name` starting from a converted random 133-class PyTorch EoMT."""
    from eomt_jax.conversion.cli import main as convert_main
    from tests.models import oracle

    model = oracle.build(hidden_size=64, depth=2, heads=2, num_blocks=1, queries=8, labels=133)
    if attn_mask_probs is not None:
        model.attn_mask_probs.fill_(attn_mask_probs)
    assert convert_main(["--src", str(oracle.save_hf(model, tmp_path / "hf")), "--dst", str(tmp_path / "ckpt")]) == 0
    config = runlocal_config(config_name)
    config.model.mlp_hidden = 256  # the oracle's MLP ratio is 4
    config.init_from = str(tmp_path / "ckpt")
    return config


def test_eval_mode_on_a_converted_checkpoint(tmp_path):
    """--mode=eval end to end: a converted (random) PyTorch checkpoint on the generated COCO panoptic zips."""
    config = _from_converted(tmp_path, "coco_panoptic_large")
    results = evaluation.run(config, tmp_path / "w")
    saved = json.loads((tmp_path / "w" / "eval_metrics.json").read_text())
    assert saved == results and {"PQ", "SQ", "RQ", "PQ_things", "PQ_stuff"} <= set(saved)
    from eomt_jax.data import load_source

    num_val = len(load_source("coco_panoptic", tmp_path / "w" / "data", "val"))
    assert len(list((tmp_path / "w" / "overlays").glob("*.png"))) == min(num_val, config.eval.max_images)


def test_eval_from_a_converted_checkpoint_keeps_its_masked_attention_probabilities(tmp_path, monkeypatch):
    """The stored buffers come with the parameters: `--mode=eval --config.init_from=...` evaluates the network
    with the checkpoint's attn_mask_probs (used with eval.masked_attn=True), not a fresh all-ones buffer."""
    from eomt_jax.evaluation import loop

    config = _from_converted(tmp_path, "coco_panoptic_large", attn_mask_probs=0.25)
    monkeypatch.setattr(loop, "evaluate", lambda config, model, root, workdir, step=None: model)
    evaluated = loop.run(config, tmp_path / "w")
    np.testing.assert_array_equal(np.asarray(evaluated.attn_mask_probs[...]), [0.25])


def test_fine_tune_on_other_classes_keeps_the_backbone_and_skips_the_class_head(tmp_path):
    """The original's recipe: a COCO (133-class) model fine-tuned on ADE20K panoptic (150 classes)."""
    from eomt_jax.tree import flatten_paths

    config = _from_converted(tmp_path, "ade20k_panoptic_large")
    with pytest.raises(ValueError, match="load_class_head=False"):
        train.run(config, tmp_path / "refused", "train")

    cfg = config_lib.model_config(config)
    _, fresh, fresh_buffers = split_model(EoMT(cfg, rngs=nnx.Rngs(0)))
    merged, _ = pretrained.load_into(fresh, fresh_buffers, str(tmp_path / "ckpt"), cfg, load_class_head=False)
    merged = flatten_paths(merged)
    _, source, _ = split_model(pretrained.load(str(tmp_path / "ckpt")))
    source, fresh = flatten_paths(source), flatten_paths(fresh)
    for key, value in merged.items():
        expected = fresh[key] if key.startswith("class_head/") else source[key]
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=key)
    assert merged["class_head/kernel"].shape[-1] == 151

    config.load_class_head = False
    # The on-device matcher: a train step JAX's compilation cache keeps (the default matcher's host callback makes
    # every compilation new); what is loaded and trained does not depend on the matcher.
    config.loss.matcher = "optax"
    result = train.run(config, tmp_path / "w", "train")
    assert result["step"] == config.total_steps
