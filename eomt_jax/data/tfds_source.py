"""Optional source for datasets already prepared with TensorFlow Datasets (array_record format).

    source = load_source("tfds", "~/tensorflow_datasets", "train", builder="cityscapes/semantic_segmentation")

Reading goes through `tfds.data_source` and needs only `tensorflow-datasets` (no TensorFlow); preparing the
catalog datasets does need TensorFlow. Records are the same dicts as the zip sources produce. Supported
builders:

  * `cityscapes/semantic_segmentation`: identical targets to `cityscapes_semantic` (the builder keeps the
    gtFine labelIds map); `image_id` is the builder's id (`<city>_<seq>_<frame>`).
  * `scene_parse150`: the builder stores only ADE20K's *instance* PNGs, so records hold the thing instances
    (ADE20K labels 0-149 of the 100 thing classes) and no stuff; `image_id` is the example's index.

`coco/2017_panoptic` is not supported: its builder cannot even be constructed without TensorFlow.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eomt_jax.data import classes
from eomt_jax.data.archives import DataError
from eomt_jax.data.sources import Record, Source, check_split, ade20k_instances, cityscapes_targets, make_record

_SPLITS = {"train": "train", "val": "validation"}


def _cityscapes(example: dict[str, Any], index: int) -> Record:
    image = np.asarray(example["image_left"])
    masks, labels = cityscapes_targets(np.asarray(example["segmentation_label"])[..., 0])
    image_id = example["image_id"]
    image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
    return make_record(image, masks, labels, [False] * len(labels), image_id)


def _scene_parse150(example: dict[str, Any], index: int) -> Record:
    image = np.asarray(example["image"])
    masks, labels = ade20k_instances(np.asarray(example["annotation"]))
    return make_record(image, masks, labels, [False] * len(labels), f"{index:08d}")


_BUILDERS = {
    "cityscapes/semantic_segmentation": (_cityscapes, list(classes.CITYSCAPES_NAMES), []),
    "scene_parse150": (_scene_parse150, list(classes.ADE20K_NAMES), list(classes.ADE20K_PANOPTIC_STUFF)),
}


class TFDSSource(Source):
    """A prepared TFDS dataset read with `tfds.data_source`; see the module docstring for the builders."""

    def __init__(self, data_dir: str | None, split: str, *, builder: str):
        check_split(split)
        if builder not in _BUILDERS:
            raise ValueError(f"unsupported TFDS builder {builder!r}; choose one of {sorted(_BUILDERS)}")
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError("the tfds source needs tensorflow-datasets: pip install 'eomt-jax[tfds]'") from e
        try:
            self._data = tfds.data_source(builder, split=_SPLITS[split], data_dir=data_dir)
        except Exception as e:  # TFDS raises assorted errors for a missing or unprepared dataset
            raise DataError(f"TFDS dataset {builder!r} ({_SPLITS[split]}) in {data_dir or 'the default data_dir'}"
                            f" could not be opened ({e})") from e
        self._parse, self.class_names, self.stuff_classes = _BUILDERS[builder]
        self._builder = builder
        super().__init__(list(range(len(self._data))), f"TFDS dataset {builder!r} ({_SPLITS[split]})")

    def _load(self, index: int) -> Record:
        try:
            return self._parse(self._data[index], index)
        except ValueError as e:
            raise DataError(f"TFDS dataset {self._builder!r}, example {index}: {e}") from e
