"""The named data sources: `load_source(name, root, split)`.

    source = load_source("coco_panoptic", "/data/coco", "val")
"""

from __future__ import annotations

import os
from typing import Callable

from eomt_jax.data.sources import ADE20K, COCOInstance, COCOPanoptic, Cityscapes, Source, coco_format


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
    "tfds": _tfds,  # root = TFDS data_dir; builder="cityscapes/semantic_segmentation" or "scene_parse150"
}


def load_source(name: str, root: str | os.PathLike | None, split: str, **kwargs) -> Source:
    """The data source `name` (one of `SOURCES`) for `split` ("train" or "val") of the dataset under `root`."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[name](os.fspath(root) if root is not None else None, split, **kwargs)
