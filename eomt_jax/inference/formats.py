"""Predictions in the standard files that `python -m eomt_jax.evaluate` (and the official tools) score.

  panoptic  `panoptic/<stem>.png` (COCO panoptic RGB ids) + `panoptic.json` (images, annotations, categories)
  instance  `instances.json` (COCO results with RLE masks)
  semantic  `semantic/<stem>.png` (single-channel class indices)
  every task `images.json`: the COCO "images" list of the predicted images (id, file_name, height, width)

Every file is written under a temporary name and renamed into place, so a file either is complete or does not
exist; the per-image PNGs are written as each image is added, the JSON files by `close()`. Category ids are
`category_id(label)`: the class index + 1 by default; COCO sources pass the dataset's own ids.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from eomt_jax.atomic import write_file

TASKS = ("panoptic", "instance", "semantic")


def plus_one(label: int) -> int:
    return label + 1


def save_png(path: Path, array: np.ndarray) -> None:
    """`array` as a PNG at `path`, written atomically."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    write_file(path, buf.getvalue())


def save_json(path: Path, data: Any) -> None:
    """`data` as JSON at `path`, written atomically."""
    write_file(path, json.dumps(data).encode())


def write_panoptic_png(folder: Path, stem: str, pred: np.ndarray, image_id, category_id=plus_one) -> dict:
    """COCO panoptic PNG of an (H, W, 2) prediction; returns its annotation entry."""
    ids = np.where(pred[..., 1] >= 0, pred[..., 1] + 1, 0)  # COCO: 0 = unlabeled
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    save_png(folder / f"{stem}.png", rgb)
    segments = []
    for sid in np.unique(ids[ids > 0]):
        region = ids == sid
        cat = int(np.bincount(pred[..., 0][region]).argmax())
        segments.append({"id": int(sid), "category_id": category_id(cat), "area": int(region.sum()), "iscrowd": 0})
    return {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments}


def coco_results(pred: dict, image_id, category_id=plus_one) -> list[dict]:
    """COCO results entries (RLE masks) of an instance prediction."""
    from pycocotools import mask as mask_util

    out = []
    for m, label, score in zip(pred["masks"], pred["labels"], pred["scores"]):
        rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"image_id": image_id, "category_id": category_id(int(label)), "segmentation": rle,
                    "score": float(score)})
    return out


def write_semantic_png(folder: Path, stem: str, pred: np.ndarray, num_classes: int) -> None:
    save_png(folder / f"{stem}.png", pred.astype(np.uint8 if num_classes <= 256 else np.uint16))


def _image_hw(task: str, pred) -> tuple[int, int]:
    shape = pred["masks"].shape[1:] if task == "instance" else pred.shape[:2]
    return int(shape[0]), int(shape[1])


class PredictionWriter:
    """Writes one task's prediction files into `folder`, image by image; `close()` writes the JSON files.

    `add(stem, pred, image_id, file_name)` names the image's files by `stem`; `image_id` (default: the stem)
    and `file_name` (default: the stem) are what the JSON files record. `gather`, when given, collects the JSON
    entries of every process (a multi-process evaluation): it receives this process's entries and returns
    everyone's; only a writer with `write_json=True` writes them.
    """

    def __init__(self, folder: Path, task: str, class_names: Sequence[str], stuff_classes: Sequence[int], *,
                 category_id: Callable[[int], int] = plus_one,
                 gather: Callable[[Any], list[Any]] | None = None, write_json: bool = True):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.folder, self.task = Path(folder), task
        self.class_names, self.stuff_classes = list(class_names), set(stuff_classes)
        self.category_id, self.gather, self.write_json = category_id, gather, write_json
        self.entries: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.folder.mkdir(parents=True, exist_ok=True)
        if task != "instance":
            (self.folder / task).mkdir(exist_ok=True)

    def add(self, stem: str, pred, image_id=None, file_name: str | None = None) -> None:
        image_id = stem if image_id is None else image_id
        if self.task == "panoptic":
            entries = [write_panoptic_png(self.folder / "panoptic", stem, pred, image_id, self.category_id)]
        elif self.task == "instance":
            entries = coco_results(pred, image_id, self.category_id)
        else:
            write_semantic_png(self.folder / "semantic", stem, pred, len(self.class_names))
            entries = []
        # Recorded only once the image's files exist: a failure above leaves no trace in the JSON files.
        self.entries += entries
        h, w = _image_hw(self.task, pred)
        self.images.append({"id": image_id, "file_name": file_name or stem, "height": h, "width": w})

    def close(self) -> None:
        entries, images = self.entries, self.images
        if self.gather is not None:
            parts = self.gather((entries, images))
            entries = [e for part in parts for e in part[0]]
            images = [im for part in parts for im in part[1]]
        if not self.write_json:
            return
        categories = [{"id": self.category_id(k), "name": n, "isthing": int(k not in self.stuff_classes)}
                      for k, n in enumerate(self.class_names)]
        if self.task == "panoptic":
            save_json(self.folder / "panoptic.json",
                       {"images": images, "annotations": entries, "categories": categories})
        elif self.task == "instance":
            save_json(self.folder / "instances.json", entries)
        save_json(self.folder / "images.json", images)
