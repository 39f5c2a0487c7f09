"""`python -m eomt_jax.predict` on a folder of images with a tiny converted checkpoint."""

import json

import numpy as np
import pytest
from PIL import Image

from eomt_jax.conversion.cli import main as convert_main
from eomt_jax.predict import main as predict_main
from tests.models import oracle


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    model = oracle.build(hidden_size=64, depth=2, heads=2, num_blocks=1, queries=8, labels=19)
    assert convert_main(["--src", str(oracle.save_hf(model, tmp / "hf")), "--dst", str(tmp / "ckpt"),
                         "--dataset", "cityscapes_semantic"]) == 0
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(48, 80), (70, 40), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    return tmp / "ckpt", images


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_predict_writes_one_overlay_and_prediction_per_image(checkpoint, tmp_path, task):
    ckpt, images = checkpoint
    out = tmp_path / "out"
    assert predict_main(["--checkpoint", str(ckpt), "--task", task, "--input", str(images), "--output", str(out),
                         "--batch-size", "2"]) == 0
    stems = sorted(p.stem for p in images.iterdir())
    assert sorted(p.name for p in out.glob("*_overlay.png")) == [f"{s}_overlay.png" for s in stems]
    for s in stems:
        overlay = np.asarray(Image.open(out / f"{s}_overlay.png"))
        assert overlay.shape[:2] == np.asarray(Image.open(images / f"{s}.png")).shape[:2]
    if task == "panoptic":
        ann = json.loads((out / "panoptic.json").read_text())
        assert sorted(a["image_id"] for a in ann["annotations"]) == stems
        assert ann["categories"][0]["name"] == "road"  # names stored at conversion with --dataset
        assert sorted(p.stem for p in (out / "panoptic").iterdir()) == stems
    elif task == "instance":
        results = json.loads((out / "instances.json").read_text())
        assert {r["image_id"] for r in results} == set(stems)
    else:
        for s in stems:
            labels = np.asarray(Image.open(out / "semantic" / f"{s}.png"))
            assert labels.max() < 19


def test_predict_in_bfloat16_agrees_with_float32(checkpoint, tmp_path):
    ckpt, images = checkpoint
    labels = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert predict_main(["--checkpoint", str(ckpt), "--task", "semantic", "--input", str(images), "--output",
                             str(out), "--dtype", dtype]) == 0
        pngs = sorted((out / "semantic").iterdir())
        labels[dtype] = np.concatenate([np.asarray(Image.open(p)).ravel() for p in pngs])
    # Same network at bf16 precision: only pixels whose two best classes nearly tie may change.
    agree = (labels["float32"] == labels["bfloat16"]).mean()
    print(f"bf16 / float32 label agreement {agree:.4f}")
    assert agree > 0.95


def test_predict_errors(checkpoint, tmp_path, capsys):
    ckpt, images = checkpoint
    assert predict_main(["--checkpoint", str(ckpt), "--task", "panoptic", "--input", str(tmp_path / "none"),
                         "--output", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().out
    (tmp_path / "taken").mkdir()
    assert predict_main(["--checkpoint", str(ckpt), "--task", "panoptic", "--input", str(images),
                         "--output", str(tmp_path / "taken")]) == 1
    assert "already exists" in capsys.readouterr().out
