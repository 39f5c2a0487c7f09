"""`python -m eomt_jax.predict` on folders of images with tiny converted checkpoints: outputs, ids that
`evaluate` accepts, image modes and orientation, and images that cannot be read or predicted."""

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from eomt_jax import predict as predict_module
from eomt_jax import segmenter as segmenter_module
from eomt_jax.inference import images as images_module
from eomt_jax.conversion.cli import main as convert_main
from eomt_jax.data import classes, synthetic
from eomt_jax.evaluate import main as evaluate_main
from eomt_jax.evaluation.metrics import AP_KEYS
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


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """An 80-class checkpoint converted for COCO instance and generated COCO data: (checkpoint, image folder,
    annotation file); the images are named as COCO's (000000000001.jpg has image id 1)."""
    tmp = tmp_path_factory.mktemp("coco")
    model = oracle.build(hidden_size=64, depth=2, heads=2, num_blocks=1, queries=8, labels=80)
    assert convert_main(["--src", str(oracle.save_hf(model, tmp / "hf")), "--dst", str(tmp / "ckpt"),
                         "--dataset", "coco_instance"]) == 0
    synthetic.write_coco_instance(str(tmp / "data"), num_train=0, num_val=4, size=48, seed=1, layout="zip")
    with zipfile.ZipFile(tmp / "data" / "val.zip") as z:
        z.extractall(tmp / "images")
    return tmp / "ckpt", tmp / "images" / "val", tmp / "data" / "val.json"


def _args(ckpt, task, inputs, out, *extra):
    return ["--checkpoint", str(ckpt), "--task", task, "--input", *map(str, inputs), "--output", str(out), *extra]


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_predict_writes_one_overlay_and_prediction_per_image(checkpoint, tmp_path, task):
    ckpt, images = checkpoint
    out = tmp_path / "out"
    assert predict_main(_args(ckpt, task, [images], out, "--batch-size", "2")) == 0
    stems = sorted(p.stem for p in images.iterdir())
    assert sorted(p.name for p in out.glob("*_overlay.png")) == [f"{s}_overlay.png" for s in stems]
    for s in stems:
        overlay = np.asarray(Image.open(out / f"{s}_overlay.png"))
        assert overlay.shape[:2] == np.asarray(Image.open(images / f"{s}.png")).shape[:2]
    # File names that are not COCO numbers: the images are numbered in input order, images.json says which is which.
    listing = json.loads((out / "images.json").read_text())
    assert [(im["id"], im["file_name"]) for im in listing] == [(k + 1, f"{s}.png") for k, s in enumerate(stems)]
    assert [(im["height"], im["width"]) for im in listing] == [(48, 80), (70, 40), (64, 64)]
    if task == "panoptic":
        ann = json.loads((out / "panoptic.json").read_text())
        assert sorted(a["image_id"] for a in ann["annotations"]) == [1, 2, 3]
        assert ann["images"] == listing
        assert ann["categories"][0]["name"] == "road"  # names stored at conversion with --dataset
        assert sorted(p.stem for p in (out / "panoptic").iterdir()) == stems
    elif task == "instance":
        results = json.loads((out / "instances.json").read_text())
        assert {r["image_id"] for r in results} == {1, 2, 3}
    else:
        for s in stems:
            labels = np.asarray(Image.open(out / "semantic" / f"{s}.png"))
            assert labels.max() < 19


def test_predict_in_bfloat16_agrees_with_float32(checkpoint, tmp_path):
    ckpt, images = checkpoint
    labels = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert predict_main(_args(ckpt, "semantic", [images], out, "--dtype", dtype)) == 0
        pngs = sorted((out / "semantic").iterdir())
        labels[dtype] = np.concatenate([np.asarray(Image.open(p)).ravel() for p in pngs])
    # Same network at bf16 precision: only pixels whose two best classes nearly tie may change.
    agree = (labels["float32"] == labels["bfloat16"]).mean()
    print(f"bf16 / float32 label agreement {agree:.4f}")
    assert agree > 0.95


def test_predict_errors(checkpoint, tmp_path, capsys):
    ckpt, images = checkpoint
    assert predict_main(_args(ckpt, "panoptic", [tmp_path / "none"], tmp_path / "o")) == 1
    assert "does not exist" in capsys.readouterr().out
    (tmp_path / "taken").mkdir()
    assert predict_main(_args(ckpt, "panoptic", [images], tmp_path / "taken")) == 1
    assert "already exists" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["-1", "0", "two"])
def test_bad_batch_size_is_a_usage_error(checkpoint, tmp_path, capsys, value):
    ckpt, images = checkpoint
    with pytest.raises(SystemExit) as exit_info:
        predict_main(_args(ckpt, "panoptic", [images], tmp_path / "o", "--batch-size", value))
    assert exit_info.value.code == 2
    assert "--batch-size: expected a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- images that fail or are odd


def test_a_truncated_jpeg_is_reported_and_the_others_are_written(checkpoint, tmp_path, capsys):
    ckpt, images = checkpoint
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b", "d", "e"):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")
    data = (folder / "a.jpg").read_bytes()
    (folder / "c.jpg").write_bytes(data[: len(data) // 2])  # sorted third: between two batches' worth of images
    out = tmp_path / "out"
    assert predict_main(_args(ckpt, "panoptic", [folder], out, "--batch-size", "2")) == 1
    printed = capsys.readouterr().out
    assert f"error: {folder / 'c.jpg'}: cannot read image (image file is truncated" in printed
    assert f"wrote predictions for 4 of 5 image(s) to {out}; 1 failed (c.jpg)" in printed
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == ["a.png", "b.png", "d.png", "e.png"]
    assert sorted(p.name for p in out.glob("*_overlay.png")) == [f"{s}_overlay.png" for s in "abde"]
    ann = json.loads((out / "panoptic.json").read_text())  # written although an image failed
    assert sorted(a["file_name"] for a in ann["annotations"]) == ["a.png", "b.png", "d.png", "e.png"]
    assert not list(out.glob(".*"))  # no temporary files left behind


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_extreme_sizes_are_predicted(checkpoint, tmp_path, task):
    ckpt, _ = checkpoint
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(2)
    shapes = {"dot": (1, 1), "strip": (2, 3000), "pole": (3000, 2), "good": (40, 56)}
    for name, hw in shapes.items():
        Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    out = tmp_path / "out"
    assert predict_main(_args(ckpt, task, [folder], out, "--batch-size", "2")) == 0
    for name, hw in shapes.items():
        assert np.asarray(Image.open(out / f"{name}_overlay.png")).shape == (*hw, 3)
        if task != "instance":
            assert np.asarray(Image.open(out / task / f"{name}.png")).shape[:2] == hw
    if task == "instance":
        results = json.loads((out / "instances.json").read_text())
        sizes = {r["image_id"]: r["segmentation"]["size"] for r in results}
        listing = {im["file_name"]: im["id"] for im in json.loads((out / "images.json").read_text())}
        assert {name: sizes[listing[f"{name}.png"]] for name in shapes} == {n: list(hw) for n, hw in shapes.items()}


def test_a_failing_prediction_spares_the_rest_of_its_batch(checkpoint, tmp_path, monkeypatch, capsys):
    ckpt, images = checkpoint
    real = segmenter_module.predict

    def runs_out_of_memory_on_the_tall_image(task, forward, batch, *args, **kwargs):
        if any(image.shape[:2] == (70, 40) for image in batch):
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 20 GB\n(details)")
        return real(task, forward, batch, *args, **kwargs)

    monkeypatch.setattr(segmenter_module, "predict", runs_out_of_memory_on_the_tall_image)
    out = tmp_path / "out"
    assert predict_main(_args(ckpt, "semantic", [images], out, "--batch-size", "3")) == 1
    printed = capsys.readouterr().out
    assert (f"error: {images / 'img1.png'}: cannot predict (RuntimeError: RESOURCE_EXHAUSTED: Out of memory while "
            "trying to allocate 20 GB)\n") in printed
    assert "2 of 3 image(s)" in printed
    assert sorted(p.name for p in (out / "semantic").iterdir()) == ["img0.png", "img2.png"]


def test_finished_images_survive_an_interruption(checkpoint, tmp_path, monkeypatch):
    ckpt, images = checkpoint
    real, calls = segmenter_module.predict, []

    def interrupted_at_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(segmenter_module, "predict", interrupted_at_the_second_batch)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        predict_main(_args(ckpt, "panoptic", [images], out, "--batch-size", "1"))
    assert [p.name for p in (out / "panoptic").iterdir()] == ["img0.png"]
    ann = json.loads((out / "panoptic.json").read_text())
    assert [a["file_name"] for a in ann["annotations"]] == ["img0.png"]


def test_exif_orientation_is_applied(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    folder = tmp_path / "in"
    folder.mkdir()
    stored = np.zeros((40, 64, 3), np.uint8)
    stored[:, :32] = (255, 0, 0)  # red left half as stored; a phone held upright shows it on top
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise for display
    Image.fromarray(stored).save(folder / "phone.jpg", exif=exif, quality=95)
    image = images_module.load_image(folder / "phone.jpg")
    assert image.shape == (64, 40, 3)
    assert image[:28, :, 0].mean() > 200 and image[36:, :, 0].mean() < 50  # red on top
    out = tmp_path / "out"
    assert predict_main(_args(ckpt, "semantic", [folder], out)) == 0
    assert np.asarray(Image.open(out / "semantic" / "phone.png")).shape == (64, 40)
    overlay = np.asarray(Image.open(out / "phone_overlay.png"))
    assert overlay.shape == (64, 40, 3)
    assert overlay[:28, :, 0].mean() > overlay[36:, :, 0].mean() + 50


def test_16_bit_png_is_scaled_not_clipped(checkpoint, tmp_path, monkeypatch):
    ckpt, _ = checkpoint
    folder = tmp_path / "in"
    folder.mkdir()
    values = (np.arange(48 * 64, dtype=np.int64) * 65535 // (48 * 64 - 1)).astype(np.uint16).reshape(48, 64)
    Image.fromarray(values).save(folder / "depth.png")
    assert Image.open(folder / "depth.png").mode == "I;16"
    real, fed = segmenter_module.predict, []

    def spy(task, forward, images, *args, **kwargs):
        fed.extend(images)
        return real(task, forward, images, *args, **kwargs)

    monkeypatch.setattr(segmenter_module, "predict", spy)
    assert predict_main(_args(ckpt, "panoptic", [folder], tmp_path / "out")) == 0
    (image,) = fed
    assert image.dtype == np.uint8 and image.shape == (48, 64, 3)
    np.testing.assert_array_equal(image[..., 0], np.round(values / 257.0).astype(np.uint8))
    assert (image == 255).mean() < 0.01  # clipping made 99.8 % of these pixels white


@pytest.mark.parametrize("mode", ["I", "F", "LA", "P", "CMYK", "RGBA", "L", "1"])
def test_other_modes_become_rgb_with_their_scale(mode):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (6, 7)).astype(np.uint8)
    if mode == "I":
        im, want = Image.fromarray(gray.astype(np.int32) * 257, "I"), gray  # 16-bit values held as 32-bit ints
    elif mode == "F":
        im, want = Image.fromarray(gray.astype(np.float32) / 255, "F"), gray  # floats in [0, 1]
    elif mode == "1":
        im = Image.fromarray(gray > 127)
        want = np.where(gray > 127, 255, 0)
    else:
        im, want = Image.fromarray(gray, "L").convert(mode), gray
    assert im.mode == mode
    out = images_module.to_rgb8(im)
    assert out.dtype == np.uint8 and out.shape == (6, 7, 3)
    # CMYK -> RGB and the palette round trip may be off by one level; the others are exact.
    np.testing.assert_allclose(out.astype(int), np.repeat(want[..., None], 3, -1), atol=1 if mode == "CMYK" else 0)


def test_float_images_outside_a_known_range_are_refused(tmp_path, capsys):
    Image.fromarray(np.full((4, 4), 7e5, np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"cannot read image \(float pixels in \[700000.0, 700000.0\]"):
        images_module.load_image(tmp_path / "f.tif")


# ----------------------------------------------------------------------------------- predict -> evaluate


def test_predict_then_evaluate_instance(coco, tmp_path, capsys):
    ckpt, images, gt_json = coco
    out = tmp_path / "out"
    assert predict_main(_args(ckpt, "instance", [images], out)) == 0
    assert "image ids from the file names" in capsys.readouterr().out
    results = json.loads((out / "instances.json").read_text())
    assert {r["image_id"] for r in results} == {1, 2, 3, 4}  # 000000000001.jpg -> 1, as the annotation file has it
    assert {r["category_id"] for r in results} <= set(classes.COCO_THING_IDS)  # COCO's ids, not class + 1
    assert max(r["category_id"] for r in results) > 80
    assert evaluate_main(["instance", "--gt-json", str(gt_json), "--pred-json", str(out / "instances.json")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) == set(AP_KEYS) and isinstance(metrics["AP"], float)


def test_gt_json_gives_the_ids(coco, tmp_path, capsys):
    ckpt, images, gt_json = coco
    gt = json.loads(gt_json.read_text())
    for im in gt["images"]:
        im["id"] += 100
    for ann in gt["annotations"]:
        ann["image_id"] += 100
    renumbered = tmp_path / "renumbered.json"
    renumbered.write_text(json.dumps(gt))
    folder = tmp_path / "in"
    folder.mkdir()
    for p in images.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "holiday.jpg").write_bytes((images / "000000000001.jpg").read_bytes())

    out = tmp_path / "out"
    assert predict_main(_args(ckpt, "instance", [folder], out, "--gt-json", str(renumbered))) == 1
    printed = capsys.readouterr().out
    assert (f"error: {folder / 'holiday.jpg'}: no entry with file name holiday.jpg in the 'images' of {renumbered}"
            in printed)
    assert {r["image_id"] for r in json.loads((out / "instances.json").read_text())} == {101, 102, 103, 104}
    assert evaluate_main(["instance", "--gt-json", str(renumbered), "--pred-json", str(out / "instances.json")]) == 0

    # Ids from the file names do not match the renumbered annotations: evaluate says so instead of asserting.
    plain = tmp_path / "plain"
    assert predict_main(_args(ckpt, "instance", [images], plain)) == 0
    capsys.readouterr()
    assert evaluate_main(["instance", "--gt-json", str(renumbered), "--pred-json", str(plain / "instances.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {plain / 'instances.json'}: results for 4 image id(s) that {renumbered} does not "
                          "have, e.g. 1, 2, 3, ...") and err.count("\n") == 1


def test_category_ids_follow_the_annotation_file_then_the_dataset():
    gt = {"categories": [{"id": 1000 + 3 * k, "name": str(k)} for k in reversed(range(80))]}
    assert predict_module.category_ids(gt, "gt.json", "coco_instance", 80)(2) == 1006
    with pytest.raises(ValueError, match="gt.json: 80 categories, but the checkpoint predicts 19 classes"):
        predict_module.category_ids(gt, "gt.json", None, 19)
    assert predict_module.category_ids(None, None, "coco_instance", 80)(11) == 13  # COCO skips id 12
    assert predict_module.category_ids(None, None, "cityscapes_semantic", 19)(11) == 12
