"""The optional TFDS source, on tfds.testing.mock_data (no prepared dataset, no TensorFlow)."""

import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

from eomt_jax.data import classes, load_source


def test_cityscapes_from_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=2):
        raw = tfds.data_source("cityscapes/semantic_segmentation", split="validation")
        source = load_source("tfds", None, "val", builder="cityscapes/semantic_segmentation")
        assert len(source) == 2 and source.num_classes == 19
        for i in range(2):
            example, record = raw[i], source[i]
            target = example["segmentation_label"][..., 0]
            ids = [v for v in np.unique(target) if int(v) in classes.CITYSCAPES_ID_TO_LABEL]
            np.testing.assert_array_equal(record["image"], example["image_left"])
            assert record["labels"].tolist() == [classes.CITYSCAPES_ID_TO_LABEL[int(v)] for v in ids]
            np.testing.assert_array_equal(record["masks"], np.stack([target == v for v in ids]))
            assert not record["is_crowd"].any()
        pickle.loads(pickle.dumps(source))[0]  # Grain workers receive the source pickled


def test_scene_parse150_instances_from_tfds_mock_data():
    # Random mock annotations would give one instance id several categories, so provide real-looking ones.
    instance = np.zeros((6, 8, 3), np.uint8)
    instance[1:3, 1:4] = (5, 1, 0)  # category 5 -> label INSTANCE_TO_LABEL[4], instance 1
    instance[4:6, :] = (100, 7, 0)  # category 100, instance 7
    examples = [{"image": np.full((6, 8, 3), 9, np.uint8), "annotation": instance}]

    with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: examples):
        source = load_source("tfds", None, "train", builder="scene_parse150")
        record = source[0]
    assert record["labels"].tolist() == [classes.ADE20K_INSTANCE_TO_LABEL[4], classes.ADE20K_INSTANCE_TO_LABEL[99]]
    np.testing.assert_array_equal(record["masks"], np.stack([instance[..., 1] == 1, instance[..., 1] == 7]))
    assert record["image_id"] == "00000000" and source.num_classes == 150


def test_unsupported_builder():
    with pytest.raises(ValueError, match="unsupported TFDS builder 'coco/2017_panoptic'"):
        load_source("tfds", None, "train", builder="coco/2017_panoptic")
