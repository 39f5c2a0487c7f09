"""Streaming metrics for in-loop evaluation: PQ (COCO panopticapi rules), mIoU and instance AP (pycocotools).

Each metric takes one image at a time: `update(prediction, record)` with the prediction from
`eomt_jax.inference.pipeline` and the dataset record (masks, labels, is_crowd at the original resolution), and
`compute()` returns percentages, None where a figure is undefined (PQ of things when no thing class occurs, AP
of large objects when there are none). In multi-process runs every process updates with its own images and
`compute_global()` gathers the per-image statistics from all processes first.

PQ follows `panopticapi.pq_compute`: ground-truth pixels covered by no segment are void; predicted pixels
assigned to no segment are void; crowd regions are ignored per category; a match needs IoU > 0.5 with the void
overlap removed from the union; averages run over the classes that occur in the ground truth or the predictions
(absent classes are left out, as panopticapi does). `PQ_all_classes` is the original's in-loop average over every
class, absent ones counting 0: the same on the full COCO and ADE20K validation sets, lower on subsets.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eomt_jax.distributed import allgather_objects, allgather_sum

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_mask_ap(coco, results: list[dict]) -> tuple[dict[str, float | None], dict[int, float | None]]:
    """COCO mask AP (`AP_KEYS`, in percent) of `results` against the pycocotools `COCO` object `coco`, and the
    AP per category id. A figure with no ground truth to score against (pycocotools' -1: no large objects, an
    absent class, an empty split) is None, not 0: it is undefined, not a score."""
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            detections = coco.loadRes(results)
        else:  # pycocotools cannot load an empty result list; an empty result set scores 0 where there is truth
            detections = COCO()
            detections.dataset = {"images": coco.dataset["images"], "categories": coco.dataset["categories"],
                                  "annotations": []}
            detections.createIndex()
        ev = COCOeval(coco, detections, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # (iou, recall, class, area, maxdets); -1 where there is no ground truth
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_class[cat_id] = 100.0 * float(p[p > -1].mean()) if (p > -1).any() else None
    return {k: 100.0 * float(v) if v >= 0 else None for k, v in zip(AP_KEYS, ev.stats[:6])}, per_class


class PanopticQuality:
    def __init__(self, num_classes: int, stuff_classes):
        self.num_classes = num_classes
        self.is_stuff = np.zeros(num_classes, bool)
        self.is_stuff[list(stuff_classes)] = True
        # Per class: tp, fp, fn, iou_sum.
        self.stats = np.zeros((num_classes, 4), np.float64)

    def update(self, pred: np.ndarray, record: dict) -> None:
        c = self.num_classes
        masks, labels, crowd = record["masks"], np.asarray(record["labels"]), np.asarray(record["is_crowd"], bool)
        h, w = pred.shape[:2]
        gt = np.zeros((h, w), np.int64)  # 0 = void
        for i in range(masks.shape[0]):
            gt[masks[i]] = i + 1
        cat, seg = pred[..., 0].astype(np.int64), pred[..., 1].astype(np.int64)
        assigned = (seg >= 0) & (cat < c)
        seg_ids, pred = np.unique(np.where(assigned, seg, -1), return_inverse=True)
        pred = pred.reshape(h, w)
        if seg_ids[0] != -1:  # no void pixel: keep index 0 for the (empty) void segment
            pred, seg_ids = pred + 1, np.concatenate([[-1], seg_ids])
        pred_cat = np.full(seg_ids.size, -1)
        pred_cat[pred[assigned]] = cat[assigned]
        n_gt, n_pred = masks.shape[0] + 1, seg_ids.size
        inter = np.bincount((gt * n_pred + pred).ravel(), minlength=n_gt * n_pred).reshape(n_gt, n_pred)
        gt_area, pred_area = inter.sum(1), inter.sum(0)
        gt_matched = np.zeros(n_gt, bool)
        pred_matched = np.zeros(n_pred, bool)
        for g, p in zip(*np.nonzero(inter[1:, 1:])):
            g, p = g + 1, p + 1
            if crowd[g - 1] or labels[g - 1] != pred_cat[p]:
                continue
            union = pred_area[p] + gt_area[g] - inter[g, p] - inter[0, p]
            iou = inter[g, p] / union
            if iou > 0.5:
                self.stats[labels[g - 1], 0] += 1
                self.stats[labels[g - 1], 3] += iou
                gt_matched[g] = pred_matched[p] = True
        crowd_of: dict[int, int] = {}
        for g in range(1, n_gt):
            if gt_matched[g]:
                continue
            if crowd[g - 1]:
                crowd_of[int(labels[g - 1])] = g
                continue
            self.stats[labels[g - 1], 2] += 1
        for p in range(1, n_pred):
            if pred_matched[p]:
                continue
            ignored = inter[0, p]
            k = int(pred_cat[p])
            if k in crowd_of:
                ignored += inter[crowd_of[k], p]
            if ignored / pred_area[p] > 0.5:
                continue
            self.stats[k, 1] += 1

    def _result(self, stats: np.ndarray) -> dict[str, float | None]:
        tp, fp, fn, iou = stats.T
        counted = (tp + fp + fn) > 0
        sq = np.where(tp > 0, iou / np.maximum(tp, 1), 0.0)
        rq = np.where(counted, tp / np.maximum(tp + 0.5 * fp + 0.5 * fn, 1e-12), 0.0)
        pq = sq * rq
        out = {}
        for name, sel in (("", counted), ("_things", counted & ~self.is_stuff), ("_stuff", counted & self.is_stuff)):
            n = sel.sum()
            for metric, v in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                out[metric + name] = 100.0 * float(v[sel].sum() / n) if n else None  # no class to average
        # The original's in-loop metric averages over every class, an absent one counting 0: equal to PQ when
        # every class occurs (full COCO / ADE20K val), lower on subsets and small datasets.
        out["PQ_all_classes"] = 100.0 * float(pq.sum() / self.num_classes)
        return out

    def compute(self) -> dict[str, float]:
        return self._result(self.stats)

    def compute_global(self) -> dict[str, float]:
        return self._result(allgather_sum(self.stats))


class MeanIoU:
    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred: np.ndarray, record: dict) -> None:
        target = np.full(pred.shape, self.ignore_index, np.int64)
        for mask, label in zip(record["masks"], record["labels"]):
            target[mask] = label
        keep = target != self.ignore_index
        c = self.num_classes
        self.confusion += np.bincount(target[keep] * c + pred[keep].astype(np.int64), minlength=c * c).reshape(c, c)

    def _result(self, confusion) -> dict[str, float]:
        diag = np.diag(confusion).astype(np.float64)
        union = confusion.sum(0) + confusion.sum(1) - diag
        iou = np.where(union > 0, diag / np.maximum(union, 1), 0.0)  # absent classes count 0, as upstream
        return {"mIoU": 100.0 * float(iou.mean()),
                "pixel_accuracy": 100.0 * float(diag.sum() / max(confusion.sum(), 1))}

    def compute(self) -> dict[str, float]:
        return self._result(self.confusion)

    def compute_global(self) -> dict[str, float]:
        return self._result(allgather_sum(self.confusion))


class InstanceAP:
    """COCO mask AP through pycocotools. Ground-truth areas are the mask pixel counts of the records (the official
    protocol reads them from the annotation file: use `python -m eomt_jax.evaluate instance` on saved predictions
    for the published numbers)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.images: list[dict] = []

    def update(self, pred: dict, record: dict) -> None:
        def rle(m):
            r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            r["counts"] = r["counts"].decode("ascii")
            return r

        gts = [dict(rle=rle(m), label=int(l), crowd=int(c), area=float(m.sum()))
               for m, l, c in zip(record["masks"], record["labels"], record["is_crowd"])]
        preds = [dict(rle=rle(m), label=int(l), score=float(s))
                 for m, l, s in zip(pred["masks"], pred["labels"], pred["scores"])]
        self.images.append(dict(size=record["image"].shape[:2], gts=gts, preds=preds))

    def _result(self, images) -> dict[str, float | None]:
        cats = [{"id": k + 1, "name": str(k)} for k in range(self.num_classes)]
        gt = {"images": [], "annotations": [], "categories": cats}
        results = []
        for i, im in enumerate(images):
            gt["images"].append({"id": i + 1, "height": int(im["size"][0]), "width": int(im["size"][1])})
            for a in im["gts"]:
                gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1,
                                          "category_id": a["label"] + 1, "segmentation": a["rle"], "area": a["area"],
                                          "iscrowd": a["crowd"], "bbox": [0, 0, 0, 0]})
            for p in im["preds"]:
                results.append({"image_id": i + 1, "category_id": p["label"] + 1, "segmentation": p["rle"],
                                "score": p["score"]})
        coco = COCO()
        coco.dataset = gt
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco_mask_ap(coco, results)[0]

    def compute(self) -> dict[str, float]:
        return self._result(self.images)

    def compute_global(self) -> dict[str, float]:
        return self._result([im for part in allgather_objects(self.images) for im in part])


def make_metric(task: str, source):
    if task == "panoptic":
        return PanopticQuality(source.num_classes, source.stuff_classes)
    if task == "semantic":
        return MeanIoU(source.num_classes)
    if task == "instance":
        return InstanceAP(source.num_classes)
    raise ValueError(f"task must be panoptic, instance or semantic, got {task!r}")
