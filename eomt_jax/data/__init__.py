"""Datasets for EoMT: zip-reading sources, training augmentation, the sharded Grain pipeline, generators.

    source = load_source("coco_panoptic", "/data/coco", "train")   # reads the official zips in place
    record = source[0]                                              # image, masks, labels, is_crowd, image_id

See `pipeline.py` for batches ready for a jitted step and `synthetic.py` for generated datasets.
"""

from eomt_jax.data.archives import DataError
from eomt_jax.data.pipeline import TRAIN_KEYS, TrainIterator, TrainSettings, make_global_batch, train_dataset
from eomt_jax.data.registry import SOURCES, load_source, source_from_config
from eomt_jax.data.root import dataset_root
from eomt_jax.data.sources import Source

__all__ = ["DataError", "SOURCES", "Source", "TRAIN_KEYS", "TrainIterator", "TrainSettings", "dataset_root",
           "load_source", "make_global_batch", "source_from_config", "train_dataset"]
