"""Training: the sharded step and its compile count, training with validation for the semantic and instance
tasks. (Exact resume and validation during panoptic training: tests/test_resume.py; training and evaluation from
converted checkpoints: tests/test_fine_tune.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from eomt_jax import config_lib, train
from eomt_jax.mesh import batch_sharding, make_mesh, state_shardings
from eomt_jax.train_step import make_train_step
from tests.tiny import random_batch, runlocal_config, tiny_setup


def _tiny_setup(seed=0):
    config = runlocal_config()
    config.model.num_classes = 5
    config.total_steps = 6
    config.anneal.starts, config.anneal.ends = (0,), (2,)
    graphdef, tx, _, state, step_cfg = tiny_setup(config, seed)
    return config, config_lib.model_config(config), graphdef, tx, state, step_cfg


def _batch(seed, b=8, s=64, m=8, classes=5):
    return random_batch(seed, b, s, m, classes)


def test_sharded_step_equals_single_device_and_compiles_once():
    config, cfg, graphdef, tx, state, step_cfg = _tiny_setup()
    batches = [_batch(i) for i in range(3)]

    def run(mesh, devices_state):
        step = make_train_step(graphdef, tx, step_cfg, mesh=mesh)
        sh = state_shardings(jax.eval_shape(lambda: devices_state), mesh, min_size=1024)
        bsh = batch_sharding(mesh)
        fn = jax.jit(step, in_shardings=(sh, {k: bsh for k in batches[0]}),
                     out_shardings=(sh, NamedSharding(mesh, P())))
        s = jax.device_put(devices_state, sh)
        losses = []
        for b in batches:
            s, metrics = fn(s, b)
            losses.append(float(metrics["train/loss"]))
        return losses, fn, metrics

    one, _, _ = run(make_mesh([("data", 1)], jax.devices()[:1]), state)
    eight, fn, metrics = run(make_mesh([("data", 2), ("fsdp", 4)]), state)
    # Same global batch, same arithmetic up to the order of cross-device reductions.
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    assert fn._cache_size() == 1  # annealing crossed phases (probs 1 -> 0) without recompiling
    assert float(metrics["train/attn_mask_prob_0"]) < 1.0


@pytest.mark.parametrize("name,keys", [("ade20k_semantic_large", {"mIoU", "pixel_accuracy"}),
                                       ("coco_instance_large", {"AP", "AP50", "AP75", "APs", "APm", "APl"})])
def test_train_and_eval_for_the_other_tasks(name, keys, tmp_path):
    """Semantic and instance training with validation (panoptic: tests/test_resume.py; a DINOv3 backbone:
    tests/test_dinov3_training.py)."""
    config = runlocal_config(name)
    config.total_steps = 1
    config.eval_every_steps = 1
    config.eval.masked_attn = True  # as during training: one metric per prediction point
    result = train.run(config, tmp_path, "train_and_eval")
    assert keys <= set(result) and {f"{k}_block_-1" for k in keys} <= set(result)
    # The generated 64-pixel images hold no large object (area > 96²): AP over large objects is undefined.
    undefined = {"APl"} & keys
    assert all(result[k] is None for k in undefined)
    assert result["AP" if "AP" in keys else "mIoU"] is not None
    assert all(result[k] is None or 0.0 <= result[k] <= 100.0 for k in keys)
    assert (tmp_path / "eval_metrics_1.json").exists() and list((tmp_path / "overlays_1").glob("*.png"))
