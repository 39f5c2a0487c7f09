"""A user's datasets in layouts of their own: COCO panoptic / instance JSONs with any file names (`coco_format`) and
semantic folders of images and label PNGs (`semantic_folder`), read back exactly; each mistake in them is one
DataError naming the file and what was expected."""

from __future__ import annotations

import io
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from eomt_jax.data import DataError, load_source
from eomt_jax.data.registry import source_from_config
from eomt_jax.data.sources import hold_out
from tests.data.test_sources import assert_records_equal
from tests.data.user_layouts import source_options, write_user_layouts


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return write_user_layouts(tmp_path_factory.mktemp("user"), num_train=6, num_val=3, size=48, seed=5)


def _copy(layout, tmp_path):
    root = tmp_path / layout.root.name
    shutil.copytree(layout.root, root)
    return root


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["panoptic", "instance"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_json_with_any_file_names(layouts, kind, split):
    layout = layouts[kind]
    source = load_source("coco_format", layout.root, split, **source_options(layout))
    assert_records_equal(source, layout.records[split])
    assert source.class_names == layout.class_names
    assert source.stuff_classes == ([3, 4, 5] if kind == "panoptic" else [])
    # the category ids of the user's JSON (11-16, 21-23) map to contiguous labels and back
    assert [source.category_id(k) for k in range(source.num_classes)] == [
        (11 if kind == "panoptic" else 21) + k for k in range(source.num_classes)]


def test_semantic_folder_with_a_val_fraction(layouts):
    layout = layouts["semantic"]
    train, val = (load_source("semantic_folder", layout.root, s, **source_options(layout)) for s in ("train", "val"))
    want = {r["image_id"]: r for r in layout.records["all"]}
    ids = [[s[i]["image_id"] for i in range(len(s))] for s in (train, val)]
    assert len(ids[1]) == round(0.25 * len(want)) and set(ids[0]) | set(ids[1]) == set(want)
    assert not set(ids[0]) & set(ids[1])
    for source, names in zip((train, val), ids):
        assert_records_equal(source, [want[n] for n in names])  # the 255 border is in no mask
    assert train.class_names == layout.class_names and train.stuff_classes == list(range(6))
    # the division is fixed: the same on every call, from the number of images only
    again = load_source("semantic_folder", layout.root, "val", **source_options(layout))
    assert [again[i]["image_id"] for i in range(len(again))] == ids[1]
    assert hold_out(list(range(12)), "val", 0.25, "x") == hold_out(list(range(12)), "val", 0.25, "y")


def test_semantic_folder_with_a_val_folder_ade20k_labels_and_numbered_classes(layouts, tmp_path):
    """0 = unlabelled, value v = class v - 1 (ADE20K); no names file: classes numbered up to the largest training
    class; the val split in folders of its own (zip and folder)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for k in range(n):
            label = rng.integers(0, 5, (20, 24))  # values 0-4: unlabelled + classes 0-3
            label[0, 0], label[1, 1] = 4, 255
            (tmp_path / f"{split}_lab").mkdir(exist_ok=True)
            (tmp_path / f"{split}_lab" / f"{split}{k}.png").write_bytes(_png(label))
            (tmp_path / f"{split}_img").mkdir(exist_ok=True)
            (tmp_path / f"{split}_img" / f"{split}{k}.jpg").write_bytes(
                _jpeg(rng.integers(0, 255, (20, 24, 3))))
    with zipfile.ZipFile(tmp_path / "val_img.zip", "w") as zf:
        for f in sorted((tmp_path / "val_img").iterdir()):
            zf.write(f, f"deep/{f.name}")
    options = dict(train_images="train_img", train_masks="train_lab", val_images="val_img.zip",
                   val_masks="val_lab", ignore_zero=True)
    val = load_source("semantic_folder", tmp_path, "val", **options)
    assert val.class_names == ["class 0", "class 1", "class 2", "class 3"] and len(val) == 2
    label = np.asarray(Image.open(tmp_path / "val_lab" / "val0.png"))
    record = val[0]
    assert record["image_id"] == "val0" and record["image"].shape == (20, 24, 3)
    for mask, cls in zip(record["masks"], record["labels"]):
        np.testing.assert_array_equal(mask, label == cls + 1)
    assert not record["masks"].any(0)[label == 0].any() and not record["masks"].any(0)[1, 1]


def _jpeg(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_source_from_config_passes_the_file_options_and_refuses_foreign_ones(layouts):
    import ml_collections

    layout = layouts["instance"]
    data = ml_collections.ConfigDict(dict(layout.options, train_masks="", val_masks="", val_fraction=0.0,
                                          ignore_value=255, ignore_zero=False, class_names_file=""))
    assert len(source_from_config(data, layout.root, "val")) == len(layout.records["val"])
    data.class_names_file = "names.txt"
    with pytest.raises(ValueError, match="config.data.class_names_file is set, but the 'coco_format' source takes "
                                         "no such option"):
        source_from_config(data, layout.root, "val")


# -- mistakes ------------------------------------------------------------------------------------------------------


def test_semantic_image_without_a_label(layouts, tmp_path):
    root = _copy(layouts["semantic"], tmp_path)
    (root / "gt" / "pic-03.png").unlink()
    with pytest.raises(DataError, match=r"gt: no label PNG for 1 image\(s\) of .*rgb \(e\.g\. pic-03\.png\); each "
                                        "image needs a PNG of the same file stem"):
        load_source("semantic_folder", root, "train", **source_options(layouts["semantic"]))


def test_semantic_label_of_another_size(layouts, tmp_path):
    root = _copy(layouts["semantic"], tmp_path)
    (root / "gt" / "pic-00.png").write_bytes(_png(np.zeros((10, 12))))
    source = load_source("semantic_folder", root, "train", **source_options(layouts["semantic"]))
    index = [source._entries[i][1] for i in range(len(source))].index("pic-00.png")
    with pytest.raises(DataError, match=r"gt: 'pic-00\.png' is 12x10 but its image .*rgb: 'pic-00\.png' is 48x48; "
                                        "a mask must have its image's size"):
        source[index]


def test_semantic_label_values_beyond_the_class_list(layouts, tmp_path):
    root = _copy(layouts["semantic"], tmp_path)
    (root / "names.txt").write_text("a\nb\nc\n")  # the labels hold classes 0-5
    source = load_source("semantic_folder", root, "train", **source_options(layouts["semantic"]))
    with pytest.raises(DataError, match=r"gt: 'pic-\d+\.png' holds the value\(s\) \[[345, ]+\], beyond the 3 classes "
                                        r"of .*names\.txt \(values 0-2, 255 ignored\)"):
        [source[i] for i in range(len(source))]


def test_semantic_rgb_label_and_missing_val_split(layouts, tmp_path):
    root = _copy(layouts["semantic"], tmp_path)
    options = source_options(layouts["semantic"])
    with pytest.raises(DataError, match="no val split: images/val and labels/val not found; give val_images and "
                                        "val_masks, or a val_fraction"):
        load_source("semantic_folder", root, "train", **dict(options, val_fraction=0.0))
    with pytest.raises(DataError, match=r"the val split is given twice, as files \(val_images\) and as "
                                        r"val_fraction=0\.25; give one"):
        load_source("semantic_folder", root, "train", **dict(options, val_images="rgb"))
    (root / "gt" / "pic-01.png").write_bytes(_png(np.zeros((48, 48, 3))))
    with pytest.raises(DataError, match=r"'pic-01\.png' has shape \(48, 48, 3\); a label PNG must be single-channel"):
        load_source("semantic_folder", root, "train", **{k: v for k, v in options.items() if k != "class_names_file"})
    with pytest.raises(DataError, match=r"nowhere: not found \(expected the train label PNGs \(train_masks\): a "
                                        r"folder or a \.zip\)"):
        load_source("semantic_folder", root, "train", **dict(options, train_masks="nowhere"))


def test_coco_panoptic_png_missing_or_of_another_size(layouts, tmp_path):
    root = _copy(layouts["panoptic"], tmp_path)
    options = source_options(layouts["panoptic"])
    pngs = sorted((root / "segs" / "val").iterdir())
    blob = pngs[0].read_bytes()
    pngs[0].write_bytes(_png(np.zeros((8, 8, 3))))
    source = load_source("coco_format", root, "val", **options)
    with pytest.raises(DataError, match=r"segs/val: 'seg_0\.png' is 8x8 but its image .*val\.zip: 'img_0\.jpg' is "
                                        r"\d+x\d+; a mask must have its image's size"):
        source[0]
    pngs[0].write_bytes(blob)
    pngs[1].unlink()
    with pytest.raises(DataError, match=r"segs/val: 1 segment PNG\(s\) named in .*pan-val\.json are missing \(e\.g\. "
                                        r"seg_1\.png\); every annotated image needs its PNG"):
        load_source("coco_format", root, "val", **options)
    with pytest.raises(DataError, match=r"pan-val\.json is a COCO panoptic JSON; val_masks must name the folder or "
                                        "zip of its segment PNGs"):
        load_source("coco_format", root, "val", **dict(options, val_masks=""))
    with pytest.raises(DataError, match="no val split: give val_json"):
        load_source("coco_format", root, "train", **dict(options, val_json="", val_images="", val_masks=""))


def test_coco_instance_val_fraction(layouts):
    layout = layouts["instance"]
    options = dict(source_options(layout), val_json="", val_images="", val_fraction=0.5)
    train, val = (load_source("coco_format", layout.root, s, **options) for s in ("train", "val"))
    assert len(train) + len(val) == len(layout.records["train"]) and len(val) == len(layout.records["train"]) // 2
