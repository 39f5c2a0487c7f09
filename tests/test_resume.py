"""A training run stopped and resumed, and validated during training: one uninterrupted 4-step run is the
reference of the exact-resume test and the run the validation and rescoring tests look at."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eomt_jax import evaluation, train
from tests.tiny import runlocal_config


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
