"""What converted weights are for: the task and the class names stored beside them (`eomt_config.json`), so that
`eomt_jax.Segmenter` and `python -m eomt_jax.predict` pick the task and name classes by themselves.

Given explicitly (`--task`, `--dataset`) or read off a model-zoo name in the source's path or hub id
(`coco_panoptic_eomt_large_640`, `ade_semantic_eomt_large_512_dinov3`, ...: dataset and task lead the name).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from eomt_jax.conversion.errors import ConversionError
from eomt_jax.data.classes import dataset_classes
from eomt_jax.inference.formats import TASKS
# The original's model-zoo names start with the dataset setting ("ade" is the DINOv3 zoo's spelling of ade20k).
_ZOO = re.compile(r"(?<![a-z0-9])(coco_panoptic|coco_instance|ade20k_panoptic|ade20k_semantic|ade_semantic|"
                  r"cityscapes_semantic)_eomt_")


def zoo_dataset(path: str | os.PathLike) -> str | None:
    """The dataset setting of a model-zoo name anywhere in `path` (e.g. "coco_panoptic"), else None."""
    found = _ZOO.findall(str(path).replace(os.sep, "/"))
    if not found:
        return None
    return found[-1].replace("ade_", "ade20k_")


def task_metadata(src: str | os.PathLike, num_classes: int, *, task: str | None = None,
                  dataset: str | None = None) -> dict[str, Any]:
    """{"task", "dataset", "class_names", "stuff_classes"} as far as they are known: from `task` and `dataset`
    when given (a dataset whose class count differs from the weights' is an error), else from a zoo name in
    `src` (used only when its class count fits). The task defaults to the dataset setting's."""
    if task is not None and task not in TASKS:
        raise ConversionError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    meta: dict[str, Any] = {}
    if dataset is not None:
        names, stuff = dataset_classes(dataset)
        if len(names) != num_classes:
            raise ConversionError(f"--dataset {dataset} has {len(names)} classes, the weights {num_classes}")
    else:
        dataset = zoo_dataset(Path(src).absolute() if Path(src).exists() else src)
        if dataset is not None:
            names, stuff = dataset_classes(dataset)
            if len(names) != num_classes:
                dataset = None  # a zoo-like name on other weights: claim nothing
    if dataset is not None:
        meta.update(dataset=dataset, class_names=names, stuff_classes=stuff)
    task = task or (dataset.rsplit("_", 1)[1] if dataset else None)
    if task is not None:
        meta["task"] = task
    return meta
