import pickle
import zipfile

import numpy as np
import pytest

from eomt_jax.data import classes, load_source, synthetic
from eomt_jax.data.sources import _index_order

SOURCE_KINDS = [
    ("coco_panoptic", "coco_panoptic"),
    ("coco_instance", "coco_instance"),
    ("ade20k_semantic", "ade20k"),
    ("ade20k_panoptic", "ade20k"),
    ("cityscapes_semantic", "cityscapes"),
    ("coco_format", "shapes"),
    ("semantic_folder", "shapes_semantic"),
]


def assert_records_equal(source, expected):
    assert len(source) == len(expected)
    for i, want in enumerate(expected):
        got = source[i]
        assert got["image_id"] == want["image_id"]
        for key in ("image", "masks", "labels", "is_crowd"):
            assert got[key].dtype == want[key].dtype, key
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{want['image_id']} {key}")
        assert got["masks"].shape[1:] == got["image"].shape[:2]
        assert got["image"].shape[2] == 3


@pytest.mark.parametrize("name,kind", SOURCE_KINDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_source_matches_generated_ground_truth(generated, name, kind, split):
    root, truth = generated[kind]
    source = load_source(name, root, split)
    assert_records_equal(source, truth[name][split])
    # The generators include segments the readers must drop or keep; make sure the data exercises them.
    if split == "train" and name in ("coco_panoptic", "coco_instance"):
        assert any(r["is_crowd"].any() for r in truth[name][split])


def test_readers_skip_what_the_original_skips(generated):
    # The generators write some images the readers must skip (no JSON entry, no annotation PNG,
    # single-valued annotation, empty panoptic target): fewer records than images written.
    for name, kind, written in [("coco_panoptic", "coco_panoptic", 10), ("coco_instance", "coco_instance", 10),
                                ("ade20k_semantic", "ade20k", 10), ("cityscapes_semantic", "cityscapes", 10)]:
        assert len(load_source(name, generated[kind][0], "train")) < written, name
    ade = generated["ade20k"][0]
    assert len(load_source("ade20k_panoptic", ade, "train")) < len(load_source("ade20k_semantic", ade, "train"))


def test_class_lists():
    coco = classes
    assert coco.COCO_PANOPTIC_ID_TO_LABEL[1] == 0 and coco.COCO_PANOPTIC_ID_TO_LABEL[92] == 80
    assert coco.COCO_PANOPTIC_ID_TO_LABEL[200] == 132 and coco.COCO_PANOPTIC_NAMES[132] == "rug-merged"
    assert coco.COCO_INSTANCE_ID_TO_LABEL[90] == 79 and coco.COCO_THING_NAMES[79] == "toothbrush"
    assert coco.CITYSCAPES_ID_TO_LABEL[33] == 18 and coco.CITYSCAPES_NAMES[18] == "bicycle"
    assert coco.ADE20K_NAMES[149] == "flag"


def test_source_metadata(generated):
    coco = load_source("coco_panoptic", generated["coco_panoptic"][0], "val")
    assert coco.num_classes == 133 and coco.stuff_classes == list(range(80, 133))
    ade = load_source("ade20k_panoptic", generated["ade20k"][0], "val")
    assert ade.num_classes == 150 and len(ade.stuff_classes) == 50
    assert load_source("coco_instance", generated["coco_instance"][0], "val").stuff_classes == []
    shapes = load_source("coco_format", generated["shapes"][0], "val")
    assert shapes.class_names == ["circle", "square", "triangle", "grass", "water", "sand"]
    assert shapes.stuff_classes == [3, 4, 5]


def test_index_order_is_by_first_number_then_path():
    members = ["val2017/000000000010.jpg", "val2017/000000000002.jpg", "a/b5.jpg", "c9/x1.jpg"]
    assert sorted(members, key=_index_order) == ["a/b5.jpg", "c9/x1.jpg", "val2017/000000000002.jpg",
                                                 "val2017/000000000010.jpg"]


@pytest.mark.parametrize("nested_compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_nested_panoptic_zip_stored_or_compressed(tmp_path, nested_compression):
    truth = synthetic.write_coco_panoptic(str(tmp_path), num_train=3, num_val=3, size=32, seed=1,
                                          nested_compression=nested_compression)
    assert_records_equal(load_source("coco_panoptic", tmp_path, "val"), truth["coco_panoptic"]["val"])


def test_user_coco_layouts(tmp_path):
    panoptic = synthetic.write_coco_panoptic(str(tmp_path / "pan"), num_train=4, num_val=3, size=32, seed=2,
                                             layout="folder")
    source = load_source("coco_format", tmp_path / "pan", "train")
    assert_records_equal(source, panoptic["coco_format"]["train"])
    assert source.num_classes == 133 and source.stuff_classes == list(range(80, 133))
    instance = synthetic.write_coco_instance(str(tmp_path / "ins"), num_train=4, num_val=3, size=32, seed=2,
                                             layout="zip")
    source = load_source("coco_format", tmp_path / "ins", "val")
    assert_records_equal(source, instance["coco_format"]["val"])
    assert source.num_classes == 80 and source.stuff_classes == []


def test_source_pickles_without_open_handles(generated):
    root, truth = generated["coco_panoptic"]
    source = load_source("coco_panoptic", root, "train")
    source[0]  # opens the zip handles
    copy = pickle.loads(pickle.dumps(source))
    assert_records_equal(copy, truth["coco_panoptic"]["train"])


def test_shapes_dataset_is_varied(generated):
    _, truth = generated["shapes"]
    records = truth["coco_format"]["train"]
    things = [int((r["labels"] < 3).sum()) for r in records]
    stuff = [int((r["labels"] >= 3).sum()) for r in records]
    assert min(things) >= 1 and max(things) >= 3
    assert set(stuff) <= {1, 2, 3} and len(set(stuff)) > 1
    assert set(np.concatenate([r["labels"] for r in records]).tolist()) == set(range(6))
    # At most one thing of each shape per image.
    assert all(np.bincount(r["labels"][r["labels"] < 3], minlength=3).max() <= 1 for r in records)
    # Things are flat colours around their class's hue: each class's mean colour is nearest to its own
    # class's average, and the colour still varies from thing to thing.
    colours = {label: np.array([r["image"][m].mean(0) for r in records
                                for m, l in zip(r["masks"], r["labels"]) if l == label]) for label in range(3)}
    centres = np.stack([colours[label].mean(0) for label in range(3)])
    for label in range(3):
        nearest = np.linalg.norm(colours[label][:, None] - centres[None], axis=-1).argmin(1)
        assert (nearest == label).all()
        assert np.ptp(colours[label], axis=0).max() > 20
    # Panoptic: masks are disjoint.
    assert all(r["masks"].sum(0).max() == 1 for r in records)
