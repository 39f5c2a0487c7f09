"""Scoring of predictions stored in the standard formats, for this model or any other (`python -m eomt_jax.evaluate`).

Panoptic: COCO panoptic PNG + JSON, PQ/SQ/RQ with the panopticapi rules. Instance: COCO results JSON, mask AP with
pycocotools `COCOeval(iouType="segm")`. Semantic: label PNGs, mIoU from a confusion matrix. Each function returns
(metrics in percent, per-class table); a figure with nothing to score against (no large objects, a class absent
from ground truth and predictions) is None, not 0. Folders may also be zip files.

Inputs are checked before scoring, each problem a ValueError naming the file and what was expected: JSON that is
truncated or lacks a field, an empty ground truth (nothing to score is an error, not a score of 0), predictions
for images or categories the ground truth does not have, masks of the wrong size.
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
from tqdm import tqdm

from eomt_jax.evaluation.metrics import MeanIoU, PanopticQuality, coco_mask_ap
from eomt_jax.jsonio import read_json


class _Files:
    """PNG files by name from a folder or a zip archive."""

    def __init__(self, path: str):
        self.path = Path(path)
        if self.path.is_dir():
            self._zip = None
            self.names = {p.name: p for p in self.path.rglob("*.png")}
        elif self.path.is_file() and zipfile.is_zipfile(self.path):
            self._zip = zipfile.ZipFile(self.path)
            self.names = {Path(n).name: n for n in self._zip.namelist() if n.endswith(".png")}
        else:
            raise FileNotFoundError(f"{self.path}: expected a folder or a zip of PNG files")

    def read(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise FileNotFoundError(f"{self.path}: no file {name}")
        try:
            if self._zip is None:
                with Image.open(self.names[name]) as im:
                    return np.asarray(im)
            with Image.open(io.BytesIO(self._zip.read(self.names[name]))) as im:
                return np.asarray(im)
        except OSError as e:
            raise ValueError(f"{self.path}/{name}: cannot decode PNG ({e})") from None


def _read_object(path: str, keys: tuple[str, ...]) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with the keys {list(keys)}, got a JSON {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{path}: missing the key(s) {missing}")
    for k in keys:
        if not isinstance(data[k], list):
            raise ValueError(f"{path}: '{k}' must be a list, got a JSON {type(data[k]).__name__}")
    return data


def _check_entries(entries: list, keys: tuple[str, ...], path: str, what: str) -> None:
    """Every entry a JSON object holding `keys`; else one error naming the first bad entry."""
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: {what} {i} is a JSON {type(entry).__name__}, expected an object with "
                             f"{list(keys)}")
        missing = [k for k in keys if k not in entry]
        if missing:
            raise ValueError(f"{path}: {what} {i} has no {', '.join(repr(k) for k in missing)} "
                             f"(each {what} needs {list(keys)})")


def _examples(values) -> str:
    values = sorted(values, key=lambda v: (0, v, "") if isinstance(v, int) else (1, 0, repr(v)))
    return ", ".join(repr(v) for v in values[:3]) + (", ..." if len(values) > 3 else "")


def _rgb_ids(png: np.ndarray, where: str) -> np.ndarray:
    if png.ndim != 3 or png.shape[2] < 3:
        raise ValueError(f"{where}: expected an RGB panoptic PNG, got shape {png.shape}")
    png = png[..., :3].astype(np.int64)
    return png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]


def score_panoptic(gt_json: str, gt_dir: str, pred_json: str, pred_dir: str):
    """PQ/SQ/RQ (all, things, stuff) of COCO panoptic predictions, with the panopticapi rules; and the per-class
    (tp, fp, fn, iou) table."""
    gt, pred = _read_object(gt_json, ("annotations", "categories")), _read_object(pred_json, ("annotations",))
    _check_entries(gt["categories"], ("id", "name"), gt_json, "category")
    _check_entries(gt["annotations"], ("image_id", "file_name", "segments_info"), gt_json, "annotation")
    _check_entries(pred["annotations"], ("image_id", "file_name", "segments_info"), pred_json, "annotation")
    for path, data in ((gt_json, gt), (pred_json, pred)):
        for ann in data["annotations"]:
            _check_entries(ann["segments_info"], ("id", "category_id"), path,
                           f"annotation of {ann['file_name']}, segment")
    if not gt["annotations"]:
        raise ValueError(f"{gt_json}: no annotations: there is nothing to score against")
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(cats)}
    metric = PanopticQuality(len(cats), [i for i, c in enumerate(cats) if not c.get("isthing", 1)])
    gt_files, pred_files = _Files(gt_dir), _Files(pred_dir)
    preds = {a["image_id"]: a for a in pred["annotations"]}
    by_file = {a["file_name"]: a for a in pred["annotations"]}
    known_ids, known_files = {a["image_id"] for a in gt["annotations"]}, {a["file_name"] for a in gt["annotations"]}
    stray = [a["image_id"] for a in pred["annotations"]
             if a["image_id"] not in known_ids and a["file_name"] not in known_files]
    if stray:
        raise ValueError(f"{pred_json}: {len(stray)} prediction(s) match no image of {gt_json} by image id or file "
                         f"name, e.g. image ids {_examples(stray)}")
    for ann in tqdm(gt["annotations"], desc="panoptic", disable=len(gt["annotations"]) < 50):
        # Matched by PNG name (the same image whatever ids the predictions use), else by image id.
        p = by_file.get(ann["file_name"]) or preds.get(ann["image_id"])
        if p is None:
            raise ValueError(f"{pred_json}: no prediction for image {ann['image_id']!r} ({ann['file_name']})")
        gt_ids = _rgb_ids(gt_files.read(ann["file_name"]), f"{gt_dir}/{ann['file_name']}")
        pred_ids = _rgb_ids(pred_files.read(p["file_name"]), f"{pred_dir}/{p['file_name']}")
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(f"{p['file_name']}: prediction {pred_ids.shape} and ground truth {gt_ids.shape} differ")
        segs = [s for s in ann["segments_info"] if s["category_id"] in label_of]
        record = {
            "masks": np.stack([gt_ids == s["id"] for s in segs]) if segs else np.zeros((0, *gt_ids.shape), bool),
            "labels": np.array([label_of[s["category_id"]] for s in segs], np.int64),
            "is_crowd": np.array([bool(s.get("iscrowd", 0)) for s in segs], bool),
        }
        cat = np.full(pred_ids.shape, len(cats), np.int64)
        seg = np.full(pred_ids.shape, -1, np.int64)
        known = set()
        for s in p["segments_info"]:
            if s["category_id"] not in label_of:
                raise ValueError(f"{pred_json}: image {p['image_id']!r} uses unknown category {s['category_id']}")
            region = pred_ids == s["id"]
            cat[region], seg[region] = label_of[s["category_id"]], s["id"]
            known.add(s["id"])
        stray = set(np.unique(pred_ids).tolist()) - known - {0}
        if stray:
            raise ValueError(f"{pred_dir}/{p['file_name']}: segment ids {sorted(stray)} are not in {pred_json}")
        metric.update(np.stack([cat, seg], -1), record)
    results = metric.compute()
    per_class = {}
    for i, c in enumerate(cats):
        tp, fp, fn, iou = metric.stats[i].tolist()
        # PQ of a class absent from ground truth and predictions is undefined (None), not 0.
        pq = 100.0 * iou / (tp + 0.5 * fp + 0.5 * fn) if tp + fp + fn else None
        per_class[c["name"]] = {"tp": tp, "fp": fp, "fn": fn, "iou": iou, "PQ": pq}
    return results, per_class


def _check_instance_inputs(gt: dict, results, gt_json: str, pred_json: str) -> None:
    """What pycocotools would otherwise assert on or crash over, as one error naming the file."""
    _check_entries(gt["images"], ("id", "height", "width"), gt_json, "image")
    _check_entries(gt["annotations"], ("id", "image_id", "category_id", "segmentation", "area"), gt_json, "annotation")
    _check_entries(gt["categories"], ("id", "name"), gt_json, "category")
    if not gt["images"] or not gt["annotations"]:
        raise ValueError(f"{gt_json}: no {'images' if not gt['images'] else 'annotations'}: there is nothing to "
                         "score against")
    if not isinstance(results, list):
        raise ValueError(f"{pred_json}: expected a COCO results list, got a JSON {type(results).__name__}")
    _check_entries(results, ("image_id", "category_id", "segmentation", "score"), pred_json, "result")
    for i, r in enumerate(results):
        for key in ("image_id", "category_id"):
            if not isinstance(r[key], (int, str)):
                raise ValueError(f"{pred_json}: result {i} has {key} {r[key]!r}, expected an integer")
    sizes = {im["id"]: [im["height"], im["width"]] for im in gt["images"]}
    unknown = {r["image_id"] for r in results if r["image_id"] not in sizes}
    if unknown:
        hint = (f"; predict with --gt-json {gt_json} to use its ids" if any(isinstance(i, str) for i in unknown)
                else "")
        raise ValueError(f"{pred_json}: results for {len(unknown)} image id(s) that {gt_json} does not have, e.g. "
                         f"{_examples(unknown)} (its ids are e.g. {_examples(list(sizes)[:3])}){hint}")
    cat_ids = {c["id"] for c in gt["categories"]}
    unknown = {r["category_id"] for r in results if r["category_id"] not in cat_ids}
    if unknown:
        raise ValueError(f"{pred_json}: category id(s) {_examples(unknown)} are not among the categories of {gt_json}")
    for i, r in enumerate(results):
        score, seg = r["score"], r["segmentation"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score):
            raise ValueError(f"{pred_json}: result {i} has score {score!r}, expected a finite number")
        if not isinstance(seg, dict) or not isinstance(seg.get("counts"), (str, list)):
            raise ValueError(f"{pred_json}: result {i}'s segmentation must be an RLE object with 'size' and 'counts'")
        if seg.get("size") != sizes[r["image_id"]]:
            raise ValueError(f"{pred_json}: result {i} (image {r['image_id']!r}) has a mask of size {seg.get('size')}, "
                             f"the image is {sizes[r['image_id']]} in {gt_json}")


def _check_image_names(gt: dict, gt_json: str, pred_json: str) -> None:
    """When the predictions come with `images.json` (as `predict` writes it), its file names must be those the
    annotation file gives the same ids: ids numbered by another rule would otherwise score the wrong images."""
    listing = Path(pred_json).parent / "images.json"
    if not listing.is_file():
        return
    images = read_json(listing)
    if not isinstance(images, list):
        raise ValueError(f"{listing}: expected the COCO 'images' list, got a JSON {type(images).__name__}")
    _check_entries(images, ("id", "file_name"), str(listing), "image")
    stems = {im["id"]: Path(str(im["file_name"])).stem for im in gt["images"] if "file_name" in im}
    for im in images:
        want = stems.get(im["id"])
        if want is not None and Path(str(im["file_name"])).stem != want:
            raise ValueError(f"{listing}: image id {im['id']!r} is {im['file_name']}, but {want} in {gt_json}: the "
                             f"ids refer to other images; predict with --gt-json {gt_json} to use its ids")


def score_instance(gt_json: str, pred_json: str):
    """Mask AP (AP, AP50, AP75, APs, APm, APl) of COCO results with pycocotools' COCOeval, areas from the
    annotation file (the official protocol); and the per-class AP."""
    gt = _read_object(gt_json, ("images", "annotations", "categories"))
    results = read_json(pred_json)
    _check_instance_inputs(gt, results, gt_json, pred_json)
    _check_image_names(gt, gt_json, pred_json)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(gt_json)
    metrics, per_id = coco_mask_ap(coco, results)
    return metrics, {coco.cats[cat_id]["name"]: ap for cat_id, ap in per_id.items()}


def score_semantic(gt_dir: str, pred_dir: str, num_classes: int, ignore_index: int = 255, label_offset: int = 0):
    """mIoU and pixel accuracy of single-channel label PNGs against ground-truth PNGs (matched by file stem);
    and the per-class IoU."""
    gt_files, pred_files = _Files(gt_dir), _Files(pred_dir)
    if not gt_files.names:
        raise ValueError(f"{gt_dir}: no ground-truth PNG files: there is nothing to score against")
    by_stem = {Path(n).stem: n for n in pred_files.names}
    missing = sorted(Path(n).stem for n in gt_files.names if Path(n).stem not in by_stem)
    if missing:
        raise ValueError(f"{pred_dir}: no prediction for {len(missing)} ground-truth file(s), e.g. {missing[:3]}")
    metric = MeanIoU(num_classes, ignore_index)
    for name in sorted(gt_files.names):
        target = gt_files.read(name).astype(np.int64)
        pred = pred_files.read(by_stem[Path(name).stem]).astype(np.int64)
        if target.ndim != 2 or pred.shape != target.shape:
            raise ValueError(f"{name}: expected single-channel PNGs of one size, got {target.shape} and {pred.shape}")
        target = np.where(target == ignore_index, ignore_index, target - label_offset)
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
        target[bad] = ignore_index  # labels outside the evaluated classes count as ignored
        if (pred < 0).any() or (pred >= num_classes).any():
            raise ValueError(f"{pred_dir}/{by_stem[Path(name).stem]}: predicted labels outside [0, {num_classes})")
        labels = [k for k in np.unique(target) if k != ignore_index]
        metric.update(pred, {"masks": [target == k for k in labels], "labels": labels})
    c = metric.confusion
    diag = np.diag(c).astype(np.float64)
    union = c.sum(0) + c.sum(1) - diag
    # A class absent from both the ground truth and the predictions has no IoU (None); the mean counts it as 0,
    # as the original's metric does.
    per_class = {str(k): (100.0 * diag[k] / union[k] if union[k] else None) for k in range(num_classes)}
    return metric.compute(), per_class
