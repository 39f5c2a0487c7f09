"""Training on a user's own data with `configs/custom.py`: COCO-format panoptic and instance data and a semantic
folder in layouts of their own (tests/data/user_layouts.py), a schedule relative to the run's length whose
annealing ends before the last step, the data's class names in the trained network and in `predict`'s output; zoo
configs rescaled to another length; the start-up errors of a run that cannot be scheduled."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from eomt_jax import annealing, config_lib, evaluation, predict, pretrained, train
from eomt_jax.config_lib import ConfigError, load_config_file
from tests.data.user_layouts import write_user_layouts

REPO = Path(__file__).resolve().parents[1]
CUSTOM = str(REPO / "configs" / "custom.py")
SHAPES = ["circle", "square", "triangle", "grass", "water", "sand"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return write_user_layouts(tmp_path_factory.mktemp("user"), num_train=8, num_val=4, size=64)


def _config(task: str, layout, **changes):
    """`custom.py:task=...,runlocal` (tiny model, 6 steps at batch 8) reading the user's layout instead of
    generated data: the classes come from the data again."""
    config = load_config_file(f"{CUSTOM}:task={task},runlocal")
    config.data.update(dict(layout.options, generate="", root=str(layout.root)))
    config.model.num_classes = 0
    # The on-device matcher: a step without host callbacks is kept in the compilation cache, and the three layouts
    # (6 classes each) share one train step.
    config.loss.matcher = "optax"
    for key, value in changes.items():
        node, *path = key.split(".")
        (config[node] if path else config)[path[0] if path else node] = value
    return config


def _mask_probs(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/attn_mask_prob_0"] for r in rows if "train/attn_mask_prob_0" in r}


def _assert_annealed_before_the_last_step(workdir: Path, total: int) -> None:
    """metrics.jsonl row `s` holds the probability the batch of step s - 1 ran with: 1 for the first batch, 0 for the
    last one, and 0 reached before it."""
    probs = _mask_probs(workdir)
    assert sorted(probs) == list(range(1, total + 1))
    assert probs[1] == 1.0 and probs[total] == 0.0
    assert min(s for s, p in probs.items() if p == 0.0) < total


@pytest.mark.slow
def test_panoptic_user_layout_trains_evaluates_and_predicts_its_class_names(layouts, tmp_path):
    layout = layouts["panoptic"]
    workdir = tmp_path / "w"
    result = train.run(_config("panoptic", layout), workdir, "train_and_eval")
    assert result["step"] == 6 and result["PQ"] is not None
    _assert_annealed_before_the_last_step(workdir, 6)
    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["data"]["class_names"] == SHAPES and recorded["data"]["stuff_classes"] == [3, 4, 5]
    assert recorded["model"]["num_classes"] == 6 and recorded["total_steps"] == 6
    assert list((workdir / "overlays_6").glob("img_*.png"))

    # The trained network travels with its classes: <workdir>/model is a converted checkpoint that predict reads.
    meta = pretrained.read_metadata(workdir / "model")
    assert (meta["class_names"], meta["stuff_classes"], meta["task"]) == (SHAPES, [3, 4, 5], "panoptic")
    out = tmp_path / "pred"
    images = sorted((layout.root / "photos" / "train").iterdir())[:2]
    assert predict.main(["--checkpoint", str(workdir / "model"), "--task", "panoptic", "--input",
                         *map(str, images), "--output", str(out)]) == 0
    categories = json.loads((out / "panoptic.json").read_text())["categories"]
    assert [c["name"] for c in categories] == SHAPES
    assert [c["isthing"] for c in categories] == [1, 1, 1, 0, 0, 0]
    assert (out / "img_0_overlay.png").exists()

    # --mode=eval on the workdir: the classes come from the data again, the latest checkpoint is scored.
    again = evaluation.run(_config("panoptic", layout), workdir)
    assert again["PQ"] == pytest.approx(result["PQ"])


@pytest.mark.slow
def test_instance_user_layout_trains_for_epochs(layouts, tmp_path, caplog):
    """epochs=6 over 8 training images at batch 8: 6 steps."""
    caplog.set_level(logging.INFO, logger="eomt_jax")
    workdir = tmp_path / "w"
    result = train.run(_config("instance", layouts["instance"], total_steps=0, epochs=6), workdir, "train")
    assert result["step"] == 6
    assert "total_steps 6 = 6 epochs x 1 steps (8 training images // batch 8)" in caplog.text
    _assert_annealed_before_the_last_step(workdir, 6)
    assert pretrained.read_metadata(workdir / "model")["class_names"] == SHAPES


@pytest.mark.slow
def test_semantic_folder_trains_and_evaluates(layouts, tmp_path):
    workdir = tmp_path / "w"
    result = train.run(_config("semantic", layouts["semantic"]), workdir, "train_and_eval")
    assert result["step"] == 6 and result["mIoU"] is not None
    _assert_annealed_before_the_last_step(workdir, 6)
    meta = pretrained.read_metadata(workdir / "model")
    assert meta["class_names"] == SHAPES and meta["stuff_classes"] == list(range(6))


def test_zoo_config_with_total_steps_overridden_rescales_its_milestones(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="eomt_jax")
    config = load_config_file(str(REPO / "configs" / "coco_panoptic_large.py"))
    as_published = config_lib.resolve(config, tmp_path)  # no data needed: the zoo's classes are known
    assert tuple(as_published.anneal.ends) == (29564, 44346, 59128, 73910) and "rescaled" not in caplog.text

    config.total_steps = 5000
    run = config_lib.resolve(config, tmp_path)
    scale = 5000 / 88692
    assert tuple(run.anneal.starts) == tuple(round(s * scale) for s in (14782, 29564, 44346, 59128))
    assert tuple(run.anneal.ends) == tuple(round(s * scale) for s in (29564, 44346, 59128, 73910))
    assert tuple(run.optim.warmup_steps) == (28, 56)
    assert (run.eval_every_steps, run.checkpoint_every_steps) == (round(7391 * scale), round(2000 * scale))
    assert max(run.anneal.ends) < 5000 - 1
    assert ("total_steps 5000 instead of the 88692 this config's schedule was written for: annealing milestones, "
            "warm-up, evaluation and checkpoint intervals rescaled by 0.05637") in caplog.text
    assert run.schedule.reference_steps == 5000 and config_lib.resolve(run, tmp_path).anneal.ends == run.anneal.ends
    assert tuple(config.anneal.ends) == (29564, 44346, 59128, 73910)  # the config itself is left as it was


def test_annealing_that_cannot_finish_is_an_error_at_start_up(layouts, tmp_path):
    config = load_config_file(str(REPO / "configs" / "coco_panoptic_large.py"))
    config.total_steps = 5000
    config.schedule.reference_steps = 0  # the published milestones, not rescaled
    with pytest.raises(ConfigError, match=r"masked attention would still be on at the last step of this 5000-step "
                                          r"run: block\(s\) \[0, 1, 2, 3\] anneal until step\(s\) \[29564, 44346, "
                                          r"59128, 73910\] \(from config.anneal.ends\), after the last step 4999"):
        config_lib.resolve(config, tmp_path)
    config.anneal.allow_unfinished = True
    assert config_lib.resolve(config, tmp_path).anneal.ends == (29564, 44346, 59128, 73910)

    # A fraction that ends with the run: refused before anything is built or trained.
    config = _config("panoptic", layouts["panoptic"], **{"schedule.anneal_ends": (1.0,)})
    with pytest.raises(ConfigError, match=r"block\(s\) \[0\] anneal until step\(s\) \[6\] \(from "
                                          r"config.schedule.anneal_ends \(1.0,\)\), after the last step 5.*"
                                          r"--config.anneal.allow_unfinished=True"):
        train.run(config, tmp_path / "w", "train")
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_the_run_length_is_total_steps_or_epochs(layouts, tmp_path):
    layout = layouts["panoptic"]
    config = _config("panoptic", layout, total_steps=0, epochs=0)
    with pytest.raises(ConfigError, match=r"config.total_steps and config.epochs are both 0: give the run's length, "
                                          r"e.g. --config.epochs=E or --config.total_steps=N \(the coco_format "
                                          r"training split in .* has 8 images: 1 steps per epoch"):
        config_lib.resolve(config, tmp_path)
    config = _config("panoptic", layout, epochs=3)
    with pytest.raises(ConfigError, match=r"config.total_steps \(6\) and config.epochs \(3\) both give the run's "
                                          r"length; set the other to 0"):
        config_lib.resolve(config, tmp_path)
    config = _config("panoptic", layout, total_steps=0, epochs=30)
    run = config_lib.resolve(config, tmp_path)
    assert run.total_steps == 30 and tuple(run.anneal.starts) == (5,) and tuple(run.anneal.ends) == (10,)
    assert run.eval_every_steps == run.checkpoint_every_steps == 30


def test_custom_defaults_are_the_original_proportions():
    large = load_config_file(f"{CUSTOM}:task=panoptic,size=L")
    config_lib.validate(large)
    assert large.schedule.anneal_starts == pytest.approx((1 / 6, 2 / 6, 3 / 6, 4 / 6))
    assert large.schedule.anneal_ends == pytest.approx((2 / 6, 3 / 6, 4 / 6, 5 / 6))
    # the same steps as the published COCO panoptic schedule, at its length
    assert tuple(large.anneal.starts) == (14782, 29564, 44346, 59128)
    assert large.schedule.warmup == pytest.approx((500 / 88692, 1000 / 88692))
    assert large.schedule.eval_every == pytest.approx(1 / 12)
    assert (large.total_steps, large.epochs, large.model.num_classes, large.data.name) == (0, 0, 0, "coco_format")
    small = load_config_file(f"{CUSTOM}:task=instance,size=S")
    assert small.schedule.anneal_starts == pytest.approx((2 / 12, 5 / 12, 8 / 12))
    assert small.schedule.anneal_ends == pytest.approx((4 / 12, 7 / 12, 10 / 12))
    assert small.schedule.eval_every == pytest.approx(2 / 12)  # the COCO instance config validates every 2 epochs
    giant = load_config_file(f"{CUSTOM}:task=semantic,size=g")
    steps = annealing.steps_from_fractions(giant.schedule.anneal_starts, giant.schedule.anneal_ends, 88692)
    coco_giant = ((14782, 25869, 36955, 48042, 59128), (29564, 40651, 51737, 62824, 73910))
    assert np.abs(np.subtract(steps, coco_giant)).max() <= 1  # the published steps round 3.5 and 8.5 epochs up
    assert (giant.data.name, giant.data.image_size, giant.model.num_queries) == ("semantic_folder", 512, 100)
    v3 = load_config_file(f"{CUSTOM}:task=panoptic,size=L,backbone=dinov3")
    assert (v3.model.backbone, v3.optim.lr, v3.optim.llrd_l2_enabled) == ("dinov3", 2e-4, False)
    assert annealing.steps_from_fractions(v3.schedule.anneal_starts, v3.schedule.anneal_ends, 88692) == (
        (0, 29564, 44346, 59128), (3000, 44346, 59128, 73910))  # configs/dinov3_coco_panoptic_large.py
    for arg in ("task=semantic,size=B,backbone=dinov3", "task=instance,size=L+,backbone=dinov3", "res=1024"):
        config_lib.validate(load_config_file(f"{CUSTOM}:{arg}"))
    with pytest.raises(ValueError, match="task must be one of"):
        load_config_file(f"{CUSTOM}:task=depth")
