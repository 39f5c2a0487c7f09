"""The named data sources: `load_source(name, root, split)`, or `source_from_config(config.data, root, split)`.

    source = load_source("coco_panoptic", "/data/coco", "val")
    source = load_source("semantic_folder", "/data/fields", "train", train_images="photos", train_masks="masks",
                         val_fraction=0.1)
"""

from __future__ import annotations

import os
from typing import Callable

from eomt_jax.data.sources import (ADE20K, COCOInstance, COCOPanoptic, Cityscapes, SemanticFolder, Source,
                                   coco_format)


def _tfds(root, split, **kwargs):
    from eomt_jax.data.tfds_source import TFDSSource  # optional extra: imported only when asked for

    return TFDSSource(root or None, split, **kwargs)


SOURCES: dict[str, Callable[..., Source]] = {
    "coco_panoptic": COCOPanoptic,
    "coco_instance": COCOInstance,
    "ade20k_panoptic": lambda root, split, **kw: ADE20K(root, split, panoptic=True, **kw),
    "ade20k_semantic": lambda root, split, **kw: ADE20K(root, split, panoptic=False, **kw),
    "cityscapes_semantic": Cityscapes,
    "coco_format": coco_format,
    "shapes": coco_format,  # the generated demo dataset (`python -m eomt_jax.data.synthetic --kind shapes`)
    "semantic_folder": SemanticFolder,  # a folder of images and a folder of label PNGs (a user's dataset)
    "tfds": _tfds,  # root = TFDS data_dir; builder="cityscapes/semantic_segmentation" or "scene_parse150"
}


def load_source(name: str, root: str | os.PathLike | None, split: str, **kwargs) -> Source:
    """The data source `name` (one of `SOURCES`) for `split` ("train" or "val") of the dataset under `root`."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[name](os.fspath(root) if root is not None else None, split, **kwargs)


# The keys of a config's `data` section that each source takes, as keyword arguments of the same names, with the
# values that mean "not set" (the source's own default then applies).
_USER_FILES = ("train_images", "train_masks", "val_images", "val_masks", "val_fraction")
SOURCE_OPTIONS: dict[str, tuple[str, ...]] = {
    "coco_format": _USER_FILES + ("train_json", "val_json"),
    "semantic_folder": _USER_FILES + ("ignore_value", "ignore_zero", "class_names_file"),
}
_UNSET = {"ignore_value": 255}


def source_from_config(data, root: str | os.PathLike | None, split: str) -> Source:
    """The source of a config's `data` section for `split`: `data.name` with the options it takes
    (`SOURCE_OPTIONS`) that are set. An option set for a source that does not take it is an error, so that a
    user's file names are never silently ignored."""
    def is_set(key):
        return key in data and data[key] not in ("", 0, False, None, _UNSET.get(key))

    takes = SOURCE_OPTIONS.get(data.name, ())
    ignored = [k for k in dict.fromkeys(k for o in SOURCE_OPTIONS.values() for k in o) if is_set(k) and k not in takes]
    if ignored:
        raise ValueError(f"config.data.{ignored[0]} is set, but the {data.name!r} source takes no such option (it is "
                         f"for {' and '.join(n for n, o in SOURCE_OPTIONS.items() if ignored[0] in o)})")
    return load_source(data.name, root, split, **{k: data[k] for k in takes if is_set(k)})
