"""Training: the sharded step, compile counts, checkpoints and exact resume, evaluation during and after
training, fine-tuning from a converted checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from eomt_jax import config_lib, evaluation, pretrained, train
from eomt_jax.mesh import batch_sharding, make_mesh, state_shardings
from eomt_jax.models.eomt import EoMT
from eomt_jax.train_step import make_train_step, split_model
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


def _run(config, workdir):
    train.run(config, workdir, "train")
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _four_step_config(data: Path):
    """coco_panoptic_large's smoke run for 4 steps, masked attention annealed over steps 0 to 4, a checkpoint at
    the end only, validation with masked attention at steps 2 and 4."""
    config = runlocal_config("coco_panoptic_large")
    config.total_steps = 4
    config.log_every_steps = 1
    config.checkpoint_every_steps = 100
    config.eval_every_steps = 2
    config.eval.masked_attn = True  # as during training: the network as it is at that step
    config.anneal.starts, config.anneal.ends = (0,), (4,)
    config.data.root = str(data)
    return config


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """One uninterrupted 4-step train_and_eval run: (config, workdir, metrics rows, (step, attn_mask_probs) of
    each validation), for the resume, masked-validation and rescoring tests."""
    tmp = tmp_path_factory.mktemp("four_steps")
    config = _four_step_config(tmp / "data")
    seen = []
    evaluate = train.evaluate

    def recorded(config, model, root, workdir, step=None):
        seen.append((step, np.asarray(model.attn_mask_probs[...])))
        return evaluate(config, model, root, workdir, step=step)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "evaluate", recorded)
        train.run(config, tmp / "w", "train_and_eval")
    rows = [json.loads(line) for line in (tmp / "w" / "metrics.jsonl").read_text().splitlines()]
    return config, tmp / "w", rows, seen


def test_interrupted_and_resumed_run_is_bit_exact(four_steps, tmp_path):
    """Stopped after 2 steps (max_steps_per_run) and resumed, a run logs the uninterrupted run's losses exactly
    (validation in between, as in the uninterrupted run, must not change training either)."""
    config, _, rows, _ = four_steps
    straight = [m for m in rows if "train/loss" in m]
    assert [m["step"] for m in straight] == [1, 2, 3, 4]
    config = config.copy_and_resolve_references()
    config.max_steps_per_run = 2
    first = _run(config, tmp_path / "b")
    assert [m["step"] for m in first] == [1, 2]
    config.max_steps_per_run = 0
    resumed = _run(config, tmp_path / "b")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a["train/loss"] == b["train/loss"], (a["step"], a["train/loss"], b["train/loss"])
    assert (tmp_path / "b" / "config.json").exists()


def test_eval_mode_on_a_converted_checkpoint(tmp_path):
    """--mode=eval end to end: a converted (random) PyTorch checkpoint on the generated COCO panoptic zips."""
    from eomt_jax.conversion.cli import main as convert_main
    from tests.models import oracle

    model = oracle.build(hidden_size=64, depth=2, heads=2, num_blocks=1, queries=8, labels=133)
    assert convert_main(["--src", str(oracle.save_hf(model, tmp_path / "hf")), "--dst", str(tmp_path / "ckpt")]) == 0
    config = runlocal_config("coco_panoptic_large")
    config.model.mlp_hidden = 256  # the oracle's MLP ratio is 4
    config.init_from = str(tmp_path / "ckpt")
    results = evaluation.run(config, tmp_path / "w")
    saved = json.loads((tmp_path / "w" / "eval_metrics.json").read_text())
    assert saved == results and {"PQ", "SQ", "RQ", "PQ_things", "PQ_stuff"} <= set(saved)
    from eomt_jax.data import load_source

    num_val = len(load_source("coco_panoptic", tmp_path / "w" / "data", "val"))
    assert len(list((tmp_path / "w" / "overlays").glob("*.png"))) == min(num_val, config.eval.max_images)


def test_eval_from_a_converted_checkpoint_keeps_its_masked_attention_probabilities(tmp_path, monkeypatch):
    """The stored buffers come with the parameters: `--mode=eval --config.init_from=...` evaluates the network
    with the checkpoint's attn_mask_probs (used with eval.masked_attn=True), not a fresh all-ones buffer."""
    from eomt_jax.conversion.cli import main as convert_main
    from eomt_jax.evaluation import loop
    from tests.models import oracle

    model = oracle.build(hidden_size=64, depth=2, heads=2, num_blocks=1, queries=8, labels=133)
    model.attn_mask_probs.fill_(0.25)
    assert convert_main(["--src", str(oracle.save_hf(model, tmp_path / "hf")), "--dst", str(tmp_path / "ckpt")]) == 0
    config = runlocal_config("coco_panoptic_large")
    config.model.mlp_hidden = 256  # the oracle's MLP ratio is 4
    config.init_from = str(tmp_path / "ckpt")
    monkeypatch.setattr(loop, "evaluate", lambda config, model, root, workdir, step=None: model)
    evaluated = loop.run(config, tmp_path / "w")
    np.testing.assert_array_equal(np.asarray(evaluated.attn_mask_probs[...]), [0.25])


def test_fine_tune_on_other_classes_keeps_the_backbone_and_skips_the_class_head(tmp_path):
    """The original's recipe: a COCO (133-class) model fine-tuned on ADE20K panoptic (150 classes)."""
    from eomt_jax.conversion.cli import main as convert_main
    from eomt_jax.tree import flatten_paths
    from tests.models import oracle

    model = oracle.build(hidden_size=64, depth=2, heads=2, num_blocks=1, queries=8, labels=133)
    assert convert_main(["--src", str(oracle.save_hf(model, tmp_path / "hf")), "--dst", str(tmp_path / "ckpt")]) == 0
    config = runlocal_config("ade20k_panoptic_large")
    config.model.mlp_hidden = 256  # the oracle's MLP ratio is 4
    config.init_from = str(tmp_path / "ckpt")
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
    result = train.run(config, tmp_path / "w", "train")
    assert result["step"] == config.total_steps


def test_saved_eval_predictions_rescore_to_the_same_pq(four_steps, tmp_path):
    """--mode=eval with save_predictions: `eomt_jax.evaluate` on the written files gives the loop's PQ."""
    import shutil
    import zipfile

    from eomt_jax.evaluation.scoring import score_panoptic

    config, trained, _, _ = four_steps
    shutil.copytree(trained, tmp_path / "w")  # the 4-step run's checkpoint; its data stays where it is
    config = config.copy_and_resolve_references()
    config.eval.masked_attn = False  # --mode=eval's default
    config.eval.max_images = 0
    config.eval.save_predictions = True
    config.eval.mask_thresh = 0.0  # keep every query of the barely trained model, so the files hold segments
    results = evaluation.run(config, tmp_path / "w")
    with zipfile.ZipFile(Path(config.data.root) / "panoptic_annotations_trainval2017.zip") as z:
        z.extract("annotations/panoptic_val2017.json", tmp_path)
        z.extract("annotations/panoptic_val2017.zip", tmp_path)
    preds = tmp_path / "w" / f"predictions_{config.total_steps}"
    rescored, per_class = score_panoptic(str(tmp_path / "annotations" / "panoptic_val2017.json"),
                                    str(tmp_path / "annotations" / "panoptic_val2017.zip"),
                                    str(preds / "panoptic.json"), str(preds / "panoptic"))
    for k in ("PQ", "SQ", "RQ", "PQ_things", "PQ_stuff"):
        assert abs(rescored[k] - results[k]) < 1e-9, k
    assert sum(c["fp"] + c["tp"] for c in per_class.values()) > 0


@pytest.mark.parametrize("name,keys", [("ade20k_semantic_large", {"mIoU", "pixel_accuracy"}),
                                       ("coco_instance_large", {"AP", "AP50", "AP75", "APs", "APm", "APl"})])
def test_train_and_eval_for_the_other_tasks(name, keys, tmp_path):
    """Semantic and instance training with validation (panoptic: the tests above; a DINOv3 backbone:
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


def test_masked_validation_sees_the_network_as_it_is_at_that_step(four_steps):
    """eval.masked_attn=True validates as the original does during training: masked attention with the annealed
    probabilities of that step (here 0.5 ** 0.9 after two of four annealing steps, 0 at the end), not a fresh
    all-ones buffer."""
    config, workdir, rows, seen = four_steps
    assert [step for step, _ in seen] == [2, 4]
    np.testing.assert_allclose(seen[0][1], [0.5**0.9], rtol=1e-6)
    np.testing.assert_array_equal(seen[1][1], [0.0])
    evaluated = [m["step"] for m in rows if "eval/PQ" in m]
    assert evaluated == [2, 4] and (workdir / "eval_metrics_2.json").exists()
