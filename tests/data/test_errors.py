"""Bad input must raise one DataError naming the file (and member) and what was expected."""

import io
import json
import shutil
import zipfile

import pytest

from eomt_jax.data import DataError, load_source, synthetic


def rewrite_zip(path, drop=(), replace=None):
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n not in drop}
    members.update(replace or {})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


@pytest.fixture
def coco(tmp_path):
    synthetic.write_coco_panoptic(str(tmp_path), num_train=2, num_val=3, size=32, seed=0)
    return tmp_path


def test_missing_zip(tmp_path):
    with pytest.raises(DataError, match=r"panoptic_annotations_trainval2017\.zip: file not found"):
        load_source("coco_panoptic", tmp_path, "train")
    with pytest.raises(DataError, match=r"ADEChallengeData2016\.zip: file not found"):
        load_source("ade20k_semantic", tmp_path, "val")
    with pytest.raises(DataError, match=r"val\.json: file not found"):
        load_source("coco_format", tmp_path, "val")


def test_truncated_zip_is_reported_at_start_up(coco):
    path = coco / "val2017.zip"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"val2017\.zip: not a readable zip file .*truncated or corrupt"):
        load_source("coco_panoptic", coco, "val")


def test_missing_json_member(coco):
    rewrite_zip(coco / "panoptic_annotations_trainval2017.zip", drop=["annotations/panoptic_val2017.json"])
    with pytest.raises(DataError, match=r"trainval2017\.zip: member 'annotations/panoptic_val2017\.json' not found"):
        load_source("coco_panoptic", coco, "val")


def test_missing_png_in_nested_zip_is_reported_when_read(coco):
    outer = coco / "panoptic_annotations_trainval2017.zip"
    with zipfile.ZipFile(outer) as zf:
        nested = zf.read("annotations/panoptic_val2017.zip")
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(nested)) as src, zipfile.ZipFile(buf, "w") as dst:
        names = src.namelist()
        for name in names[1:]:
            dst.writestr(name, src.read(name))
    rewrite_zip(outer, replace={"annotations/panoptic_val2017.zip": buf.getvalue()})
    source = load_source("coco_panoptic", coco, "val")  # the index comes from the JSON: still complete
    with pytest.raises(DataError, match=rf"panoptic_val2017\.zip: member '{names[0]}' not found"):
        source[0]


def test_corrupt_image_is_reported_when_read(coco):
    with zipfile.ZipFile(coco / "val2017.zip") as zf:
        first = sorted(zf.namelist())[0]
    rewrite_zip(coco / "val2017.zip", replace={first: b"not a jpeg"})
    source = load_source("coco_panoptic", coco, "val")
    with pytest.raises(DataError, match=rf"val2017\.zip: member '{first}' is not a readable image"):
        source[0]


def test_corrupt_member_data_is_reported_when_read(tmp_path):
    synthetic.write_ade20k(str(tmp_path), num_train=2, num_val=2, size=32, seed=0)
    path = tmp_path / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("ADEChallengeData2016/images/validation/ADE_val_00000001.jpg")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 10
    data = bytearray(path.read_bytes())
    data[start:start + 20] = bytes(20)  # damage the compressed bytes; the central directory stays valid
    path.write_bytes(bytes(data))
    source = load_source("ade20k_semantic", tmp_path, "val", check_empty_targets=False)
    with pytest.raises(DataError, match=r"ADEChallengeData2016\.zip: member '.*ADE_val_00000001\.jpg' is "
                                        r"(corrupt|not a readable image)"):
        source[0]


def test_json_that_matches_no_image(coco):
    ann = coco / "panoptic_annotations_trainval2017.zip"
    with zipfile.ZipFile(ann) as zf:
        data = json.loads(zf.read("annotations/panoptic_val2017.json"))
    for image in data["images"]:
        image["file_name"] = "other_" + image["file_name"]
    rewrite_zip(ann, replace={"annotations/panoptic_val2017.json": json.dumps(data)})
    with pytest.raises(DataError, match=r"val2017\.zip with .*panoptic_val2017\.json: no usable image"):
        load_source("coco_panoptic", coco, "val")


def test_invalid_and_malformed_json(coco):
    ann = coco / "panoptic_annotations_trainval2017.zip"
    original = ann.read_bytes()
    rewrite_zip(ann, replace={"annotations/panoptic_val2017.json": "{not json"})
    with pytest.raises(DataError, match=r"member 'annotations/panoptic_val2017\.json' is not valid JSON"):
        load_source("coco_panoptic", coco, "val")
    ann.write_bytes(original)
    rewrite_zip(ann, replace={"annotations/panoptic_val2017.json": json.dumps({"images": []})})
    with pytest.raises(DataError, match=r"panoptic_val2017\.json: not a COCO panoptic annotation file.*'annotations'"):
        load_source("coco_panoptic", coco, "val")


def test_instance_json_size_that_does_not_match_the_image(tmp_path):
    synthetic.write_coco_instance(str(tmp_path), num_train=2, num_val=2, size=32, seed=0)
    ann = tmp_path / "annotations_trainval2017.zip"
    with zipfile.ZipFile(ann) as zf:
        data = json.loads(zf.read("annotations/instances_val2017.json"))
    data["images"][0]["height"] += 3
    rewrite_zip(ann, replace={"annotations/instances_val2017.json": json.dumps(data)})
    source = load_source("coco_instance", tmp_path, "val")
    with pytest.raises(DataError, match=r"'val2017/000000000001\.jpg' is \d+x\d+ but .*instances_val2017\.json says"):
        source[0]


def test_missing_cityscapes_targets_zip(tmp_path):
    synthetic.write_cityscapes(str(tmp_path), num_train=2, num_val=2, size=32, seed=0)
    shutil.move(tmp_path / "gtFine_trainvaltest.zip", tmp_path / "elsewhere.zip")
    with pytest.raises(DataError, match=r"gtFine_trainvaltest\.zip: file not found"):
        load_source("cityscapes_semantic", tmp_path, "train")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        load_source("coco", tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_source("coco_panoptic", tmp_path, "test")


def _with_damaged_images(root, tmp_path, count):
    """A copy of a generated COCO panoptic folder whose first `count` training images are cut short."""
    import shutil
    import zipfile

    out = tmp_path / "damaged"
    shutil.copytree(root, out)
    src = zipfile.ZipFile(root / "train2017.zip")
    members = [m for m in src.namelist() if m.endswith(".jpg")]
    damaged = sorted(members)[:count]
    with zipfile.ZipFile(out / "train2017.zip", "w") as dst:
        for m in src.namelist():
            data = src.read(m)
            dst.writestr(m, data[: len(data) // 3] if m in damaged else data)
    return out, damaged


def test_unreadable_training_images_are_skipped_and_named(generated, tmp_path, caplog):
    import logging

    from eomt_jax.data import TrainSettings, load_source, train_dataset

    root, _ = generated["coco_panoptic"]
    damaged_root, damaged = _with_damaged_images(root, tmp_path, 1)
    source = load_source("coco_panoptic", damaged_root, "train")
    settings = TrainSettings.for_dataset("coco_panoptic", image_size=32, batch_size=2, max_instances=8,
                                         max_unreadable_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="eomt_jax"):
        batches = [b for _, b in zip(range(len(source)), iter(train_dataset(source, settings)))]
    assert len(batches) == len(source)  # two epochs, none lost
    warnings = [r.getMessage() for r in caplog.records if "unreadable training sample" in r.getMessage()]
    assert len(warnings) == 1 and damaged[0] in warnings[0]  # named once, though read every epoch

    too_many, _ = _with_damaged_images(root, tmp_path / "more", 3)
    source = load_source("coco_panoptic", too_many, "train")
    with pytest.raises(DataError, match=f"2 of {len(source)} training samples are unreadable, more than "
                                        "data.max_unreadable_fraction=0.2"):
        list(zip(range(len(source)), iter(train_dataset(source, settings))))
