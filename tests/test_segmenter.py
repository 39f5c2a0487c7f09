"""`eomt_jax.Segmenter` on tiny converted checkpoints of each task: the fields of a result, the task and class
names stored at conversion, equality with `python -m eomt_jax.predict`'s files, batched calls, bad input, hub ids
converted once, and the persistent compilation cache serving a second process."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import eomt_jax
from eomt_jax import caches, segmenter
from eomt_jax.conversion.cli import main as convert_main
from eomt_jax.data import classes
from eomt_jax.predict import main as predict_main
from tests.models import oracle

# (dataset setting, classes, how the checkpoint learns its setting)
SETTINGS = {
    "panoptic": ("coco_panoptic", 133, "--dataset"),
    "instance": ("coco_instance", 80, "--dataset"),
    "semantic": ("cityscapes_semantic", 19, "zoo name"),
}


def _confident(model):
    """Sharpen the random heads: queries confident about real classes (a random class head spreads its probability
    over all classes, and no panoptic segment would pass the 0.8 score threshold) and masks with clear edges (the
    best-scoring query then keeps its whole mask and passes the 0.8 overlap threshold)."""
    with torch.no_grad():
        model.class_predictor.weight.mul_(40.0)
        model.class_predictor.bias[-1] = -30.0  # "no object"
        model.mask_head.fc3.weight.mul_(20.0)
        model.mask_head.fc3.bias.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("segmenter")
    out = {}
    for task, (dataset, labels, how) in SETTINGS.items():
        model = _confident(oracle.build(hidden_size=64, depth=2, heads=2, num_blocks=1, queries=8, labels=labels))
        if how == "zoo name":  # a folder named as the model zoo names its repositories
            src = oracle.save_hf(model, tmp / f"{dataset}_eomt_tiny_64")
            args = []
        else:
            src = oracle.save_hf(model, tmp / f"hf_{task}")
            args = ["--dataset", dataset]
        assert convert_main(["--src", str(src), "--dst", str(tmp / task), *args]) == 0
        out[task] = tmp / task
    rng = np.random.default_rng(0)
    images = tmp / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(48, 80), (70, 40), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    return out, images


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_a_result_has_every_field_with_the_checkpoints_names(checkpoints, task):
    ckpts, images = checkpoints
    dataset = SETTINGS[task][0]
    seg = eomt_jax.Segmenter(ckpts[task])
    assert seg.task == task and seg.dataset == dataset  # stored at conversion (--dataset or the zoo name)
    names, stuff = classes.dataset_classes(dataset)
    assert list(seg.class_names) == names
    result = seg(images / "img0.png")
    assert isinstance(result, eomt_jax.Segmentation) and result.task == task
    assert result.segmentation.dtype == np.int32 and result.segmentation.shape == (48, 80)
    assert result.image.dtype == np.uint8 and result.image.shape == (48, 80, 3)
    picture = result.overlay()
    assert picture.dtype == np.uint8 and picture.shape == (48, 80, 3)
    assert not np.array_equal(picture, result.image)  # something was drawn
    assert result.segments, "the sharpened head predicts segments"
    for s in result.segments:
        assert set(s) == {"id", "label_id", "label", "score", "area", "is_thing"}
        assert s["label"] == names[s["label_id"]] and s["area"] > 0
        assert s["is_thing"] == (s["label_id"] not in stuff)
    if task == "semantic":
        assert result.masks is None
        assert [s["id"] for s in result.segments] == sorted(np.unique(result.segmentation))
        assert sum(s["area"] for s in result.segments) == 48 * 80
        assert all(s["score"] is None for s in result.segments)
        return
    ids = [s["id"] for s in result.segments]
    assert ids == list(range(len(ids)))
    assert set(np.unique(result.segmentation)) <= set(ids) | {-1}
    assert all(0 < s["score"] <= 1 for s in result.segments)
    if task == "panoptic":
        assert result.masks is None
        for s in result.segments:
            assert s["area"] == (result.segmentation == s["id"]).sum()
            assert s["score"] > 0.8  # only queries above the panoptic threshold make segments
            assert (result.prediction[..., 0][result.segmentation == s["id"]] == s["label_id"]).all()
    else:
        assert result.masks.dtype == bool and result.masks.shape == (len(ids), 48, 80)
        assert [s["area"] for s in result.segments] == [int(m.sum()) for m in result.masks]
        scores = [s["score"] for s in result.segments]
        assert scores == sorted(scores, reverse=True) and min(scores) >= segmenter.INSTANCE_THRESHOLD
        covered = result.segmentation >= 0
        np.testing.assert_array_equal(covered, result.masks.any(0))
        best = np.argmax(result.masks, axis=0)  # the first (best-scoring) mask covering each pixel
        np.testing.assert_array_equal(result.segmentation[covered], best[covered])


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_the_cli_writes_what_the_api_returns(checkpoints, tmp_path, task):
    ckpts, images = checkpoints
    out = tmp_path / "out"
    assert predict_main(["--checkpoint", str(ckpts[task]), "--input", str(images), "--output", str(out)]) == 0
    seg = eomt_jax.Segmenter(ckpts[task])
    for path in sorted(images.iterdir()):
        result = seg(path)
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{path.stem}_overlay.png")), result.overlay())
        if task == "panoptic":
            rgb = np.asarray(Image.open(out / "panoptic" / f"{path.stem}.png")).astype(np.int64)
            np.testing.assert_array_equal(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2] - 1,
                                          result.segmentation)
        elif task == "semantic":
            np.testing.assert_array_equal(np.asarray(Image.open(out / "semantic" / f"{path.stem}.png")),
                                          result.segmentation)
    if task == "panoptic":
        ann = json.loads((out / "panoptic.json").read_text())["annotations"]
        areas = {a["file_name"]: sorted(s["area"] for s in a["segments_info"]) for a in ann}
        assert areas["img0.png"] == sorted(s["area"] for s in seg(images / "img0.png").segments)
    if task == "instance":
        from pycocotools import mask as mask_util

        results = json.loads((out / "instances.json").read_text())
        first = [r for r in results if r["image_id"] == 1]
        result = seg(images / "img0.png")
        kept = sorted((r for r in first if r["score"] >= segmenter.INSTANCE_THRESHOLD), key=lambda r: -r["score"])
        assert [round(r["score"], 5) for r in kept] == [round(s["score"], 5) for s in result.segments]
        for r, mask in zip(kept, result.masks):
            np.testing.assert_array_equal(mask_util.decode(r["segmentation"]).astype(bool), mask)


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_a_batched_call_equals_single_calls(checkpoints, task):
    ckpts, images = checkpoints
    paths = sorted(images.iterdir())
    batched = eomt_jax.Segmenter(ckpts[task], batch_size=2)(paths)
    single = eomt_jax.Segmenter(ckpts[task])
    assert len(batched) == len(paths)
    for path, together in zip(paths, batched):
        alone = single(Image.open(path))  # a PIL image works as well as its path
        np.testing.assert_array_equal(together.segmentation, alone.segmentation)
        assert together.segments == pytest.approx(alone.segments)
    same_size = np.stack([np.asarray(Image.open(paths[0]))] * 2)  # (N, H, W, 3) is a batch too
    for result in single(same_size):
        np.testing.assert_array_equal(result.segmentation, batched[0].segmentation)


def test_inputs_are_checked(checkpoints):
    ckpts, images = checkpoints
    seg = eomt_jax.Segmenter(ckpts["semantic"])
    image = np.asarray(Image.open(images / "img0.png"))
    rgba = np.concatenate([image, np.full((48, 80, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(seg(rgba).segmentation, seg(image).segmentation)  # alpha dropped
    with pytest.raises(ValueError, match=r"expected a uint8 array with values 0..255, got float32 \(floats in"):
        seg(image.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"expected an RGB array \(H, W, 3\).*got shape \(48, 80\) \(a grayscale"):
        seg(image[..., 0])
    with pytest.raises(ValueError, match=r"got shape \(48, 80, 2\)"):
        seg(image[..., :2])
    with pytest.raises(ValueError, match="no such image file"):
        seg(images / "missing.png")
    with pytest.raises(ValueError, match="expected an image path, a PIL image or a numpy array, got int"):
        seg(3)
    assert seg([]) == []


def test_the_task_and_names_can_be_chosen(checkpoints):
    ckpts, images = checkpoints
    seg = eomt_jax.Segmenter(ckpts["panoptic"], task="semantic", dtype="bfloat16")
    assert seg.task == "semantic" and seg.model.config.dtype == "bfloat16"
    result = seg(images / "img1.png")
    assert result.segmentation.shape == (70, 40) and result.segmentation.max() < 133
    with pytest.raises(ValueError, match="task must be one of panoptic, instance, semantic, got 'depth'"):
        eomt_jax.Segmenter(ckpts["panoptic"], task="depth")
    with pytest.raises(ValueError, match="dtype must be one of"):
        eomt_jax.Segmenter(ckpts["panoptic"], dtype="float16")
    with pytest.raises(ValueError, match="19 class names for a checkpoint with 133 classes"):
        eomt_jax.Segmenter(ckpts["panoptic"], dataset="cityscapes_semantic")


def test_unnamed_checkpoints_need_a_task(tmp_path):
    model = oracle.build(hidden_size=64, depth=2, heads=2, num_blocks=1, queries=8, labels=5)
    assert convert_main(["--src", str(oracle.save_hf(model, tmp_path / "hf")), "--dst", str(tmp_path / "c")]) == 0
    meta = json.loads((tmp_path / "c" / "eomt_config.json").read_text())
    assert "task" not in meta and "class_names" not in meta
    with pytest.raises(ValueError, match="does not say which task it was trained for; pass task="):
        eomt_jax.Segmenter(tmp_path / "c")
    seg = eomt_jax.Segmenter(tmp_path / "c", task="instance")
    assert seg.class_names == tuple(f"class {k}" for k in range(5))
    with pytest.raises(ValueError, match="is not a converted EoMT checkpoint directory"):
        eomt_jax.Segmenter(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        eomt_jax.Segmenter(tmp_path / "nothing" / "here")


def test_a_hub_id_is_converted_once(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("EOMT_JAX_CACHE", str(tmp_path / "cache"))
    model = _confident(oracle.build(hidden_size=64, depth=2, heads=2, num_blocks=1, queries=8, labels=80))
    # The hub's snapshot path carries the repository's name, which tells the converter the task and classes.
    snapshot = oracle.save_hf(model, tmp_path / "hub" / "models--someone--coco_instance_eomt_tiny_64" / "snapshots")
    fetched = []

    def fake_fetch(src):
        fetched.append(src)
        return str(snapshot)

    monkeypatch.setattr("eomt_jax.conversion.reading.resolve_src", fake_fetch)
    seg = eomt_jax.Segmenter("someone/coco_instance_eomt_tiny_64")
    assert fetched == ["someone/coco_instance_eomt_tiny_64"]
    assert seg.checkpoint == caches.hub_checkpoint("someone/coco_instance_eomt_tiny_64")
    assert seg.checkpoint.is_relative_to(tmp_path / "cache")
    assert seg.task == "instance" and seg.class_names[0] == "person"
    again = eomt_jax.Segmenter("someone/coco_instance_eomt_tiny_64")
    assert fetched == ["someone/coco_instance_eomt_tiny_64"] and again.checkpoint == seg.checkpoint  # cached

    def offline(src):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr("eomt_jax.conversion.reading.resolve_src", offline)
    with pytest.raises(ValueError, match=r"someone/other: cannot fetch it from the Hugging Face hub \(ConnectionError"):
        eomt_jax.Segmenter("someone/other")
    assert not caches.hub_checkpoint("someone/other").exists()


_RUN = textwrap.dedent("""
    import json, sys
    import jax
    counts = {}

    def count(event, *args, **kwargs):
        counts[event] = counts.get(event, 0) + 1

    jax.monitoring.register_event_listener(count)
    jax.monitoring.register_event_duration_secs_listener(count)
    import numpy as np
    from eomt_jax import Segmenter
    seg = Segmenter(sys.argv[1])
    result = seg(np.full((40, 56, 3), 90, np.uint8))
    print(json.dumps({"programs": counts.get("/jax/core/compile/backend_compile_duration", 0),
                      "hits": counts.get("/jax/compilation_cache/cache_hits", 0),
                      "cache": jax.config.jax_compilation_cache_dir}))
""")


def test_a_second_process_compiles_nothing(checkpoints, tmp_path):
    """The persistent compilation cache, on by default: every program of a second identical run is a cache hit."""
    ckpts, _ = checkpoints
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(EOMT_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    runs = []
    for switch in ("", "", "off"):
        done = subprocess.run([sys.executable, "-c", _RUN, str(ckpts["panoptic"])],
                              env={**env, caches.SWITCH: switch}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second, off = runs
    assert first["cache"] == str(tmp_path / "cache" / "xla")
    assert first["programs"] > 0 and first["hits"] == 0
    # Every program the second process needs (XLA compilations and cache reads both count as one) is read back.
    assert second["programs"] == first["programs"] and second["hits"] == second["programs"]
    assert off["cache"] is None and off["hits"] == 0  # EOMT_JAX_COMPILATION_CACHE=off


def test_the_startup_benchmark_times_a_first_and_a_second_run(tmp_path):
    from eomt_jax import benchmark

    report = benchmark.main(["--suite", "startup", "--tiny", "--image-size", "64", "--startup-sizes", "S",
                             "--out", str(tmp_path)])
    (row,) = report["rows"]
    assert row["model"] == "EoMT-S" and row["first_s"] > 0 and row["second_s"] > 0
    assert row["cached_programs"] >= 2  # the network and the post-processing at least
    assert (tmp_path / "predictions_S_second" / "panoptic.json").exists()
    assert "| EoMT-S | 64 | 64×48 |" in (tmp_path / "startup.md").read_text()
