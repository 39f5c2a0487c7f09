"""In-loop metrics against the official tools: panopticapi's pq_compute, pycocotools, and a direct confusion
matrix; undefined metrics."""

from __future__ import annotations

import json

import numpy as np
import panopticapi.evaluation as panopticapi_eval
import pytest
from panopticapi.evaluation import pq_compute
from PIL import Image

from eomt_jax.evaluation.metrics import MeanIoU, PanopticQuality

C, STUFF = 6, [4, 5]


def _random_panoptic(rng, h=40, w=48):
    """A random segmentation: things as rectangles over a stuff background, some void and crowd regions."""
    seg = np.zeros((h, w), np.int64)  # 0 = void
    info = []
    for sid, cls in ((1, 4), (2, 5)):
        seg[(np.arange(h)[:, None] * (sid) + np.arange(w)[None]) % 7 < 3 + sid] = sid
        info.append((sid, cls, 0))
    for sid in range(3, 3 + rng.integers(2, 6)):
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        seg[y : y + rng.integers(5, 15), x : x + rng.integers(5, 15)] = sid
        info.append((sid, int(rng.integers(0, 4)), int(rng.uniform() < 0.2)))
    seg[rng.integers(0, h), :] = 0  # a void line
    present = set(np.unique(seg)) - {0}
    return seg, [i for i in info if i[0] in present]


def _perturb(rng, seg, info):
    pred = seg.copy()
    pred[rng.uniform(size=seg.shape) < 0.08] = 0
    pred = np.roll(pred, rng.integers(-2, 3), axis=1)
    pinfo = []
    for sid, cls, _ in info:
        if rng.uniform() < 0.15:
            pred[pred == sid] = 0  # missed segment
            continue
        pinfo.append((sid, cls if rng.uniform() > 0.2 else int(rng.integers(0, C)), 0))
    pinfo = [p for p in pinfo if (pred == p[0]).any()]
    return pred, pinfo


def _write(folder, name, seg):
    rgb = np.stack([seg % 256, seg // 256 % 256, seg // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / name)


def test_panoptic_quality_equals_panopticapi(tmp_path, monkeypatch):
    # pq_compute forks a worker pool, which can deadlock a process that already runs JAX's threads; its
    # single-core routine is the same per-image computation.
    monkeypatch.setattr(panopticapi_eval, "pq_compute_multi_core",
                        lambda matched, gt, pred, cats: panopticapi_eval.pq_compute_single_core(0, matched, gt, pred, cats))
    rng = np.random.default_rng(0)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    cats = [{"id": k + 1, "name": str(k), "isthing": int(k not in STUFF)} for k in range(C)]
    gt_json = {"images": [], "annotations": [], "categories": cats}
    pred_json = {"annotations": []}
    metric = PanopticQuality(C, STUFF)
    for i in range(6):
        seg, info = _random_panoptic(rng)
        pred, pinfo = _perturb(rng, seg, info)
        name = f"{i:04d}.png"
        _write(gt_dir, name, seg)
        _write(pred_dir, name, pred)
        gt_json["images"].append({"id": i, "file_name": name.replace("png", "jpg"), "height": 40, "width": 48})
        gt_json["annotations"].append({"image_id": i, "file_name": name, "segments_info": [
            {"id": s, "category_id": c + 1, "iscrowd": k, "area": int((seg == s).sum()), "bbox": [0, 0, 1, 1]}
            for s, c, k in info]})
        pred_json["annotations"].append({"image_id": i, "file_name": name, "segments_info": [
            {"id": s, "category_id": c + 1} for s, c, _ in pinfo]})
        record = {"masks": np.stack([seg == s for s, _, _ in info]), "labels": np.array([c for _, c, _ in info]),
                  "is_crowd": np.array([k for _, _, k in info], bool)}
        cls_of = {s: c for s, c, _ in pinfo}
        ours = np.stack([np.vectorize(lambda s: cls_of.get(s, C))(pred), np.where(pred > 0, pred, -1)], -1)
        metric.update(ours, record)
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "pred.json").write_text(json.dumps(pred_json))
    ref = pq_compute(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), str(gt_dir), str(pred_dir))
    cli = _run_cli(["panoptic", "--gt-json", str(tmp_path / "gt.json"), "--gt-dir", str(gt_dir),
                    "--pred-json", str(tmp_path / "pred.json"), "--pred-dir", str(pred_dir)])
    got = metric.compute()
    for name, key in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
        for m in ("pq", "sq", "rq"):
            np.testing.assert_allclose(got[m.upper() + key], 100 * ref[name][m], atol=1e-6)
            np.testing.assert_allclose(cli[m.upper() + key], 100 * ref[name][m], atol=1e-6)
    assert ref["All"]["n"] >= 5  # the generated data exercises most classes


def _run_cli(argv):
    import contextlib
    import io

    from eomt_jax.evaluate import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_evaluate_semantic_cli_and_errors(tmp_path, capsys):
    rng = np.random.default_rng(2)
    (tmp_path / "gt").mkdir(), (tmp_path / "pred").mkdir()
    conf = np.zeros((5, 5), np.int64)
    for i in range(3):
        target = rng.integers(0, 5, (20, 30))
        target[:3] = 255
        pred = np.where(rng.uniform(size=target.shape) < 0.6, target % 5, rng.integers(0, 5, target.shape))
        Image.fromarray(target.astype(np.uint8)).save(tmp_path / "gt" / f"im{i}.png")
        Image.fromarray(pred.astype(np.uint8)).save(tmp_path / "pred" / f"im{i}.png")
        keep = target != 255
        np.add.at(conf, (target[keep], pred[keep]), 1)
    d = np.diag(conf)
    expected = 100 * np.mean(d / (conf.sum(0) + conf.sum(1) - d))
    per_class = tmp_path / "per_class.json"
    got = _run_cli(["semantic", "--gt-dir", str(tmp_path / "gt"), "--pred-dir", str(tmp_path / "pred"),
                    "--num-classes", "5", "--per-class", str(per_class)])
    np.testing.assert_allclose(got["mIoU"], expected, rtol=1e-12)
    assert len(json.loads(per_class.read_text())) == 5
    (tmp_path / "pred" / "im1.png").unlink()
    from eomt_jax.evaluate import main

    assert main(["semantic", "--gt-dir", str(tmp_path / "gt"), "--pred-dir", str(tmp_path / "pred"),
                 "--num-classes", "5"]) == 1
    assert "no prediction for 1 ground-truth file" in capsys.readouterr().err


def test_evaluate_instance_cli_equals_cocoeval(tmp_path):
    import contextlib
    import io

    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(3)
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    results = []
    for i in range(4):
        gt["images"].append({"id": i, "height": 40, "width": 50})
        for j in range(3):
            m = np.zeros((40, 50), np.uint8)
            y, x = rng.integers(0, 25, 2)
            m[y : y + 12, x : x + 14] = 1
            rle = mask_util.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            cat = int(rng.integers(1, 3))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": cat,
                                      "segmentation": rle, "area": float(m.sum()) + 5, "iscrowd": 0,
                                      "bbox": [float(x), float(y), 14.0, 12.0]})
            shifted = np.roll(m, int(rng.integers(-3, 4)), axis=1)
            prle = mask_util.encode(np.asfortranarray(shifted))
            prle["counts"] = prle["counts"].decode()
            results.append({"image_id": i, "category_id": cat, "segmentation": prle, "score": float(rng.uniform())})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(results))
    got = _run_cli(["instance", "--gt-json", str(tmp_path / "gt.json"), "--pred-json", str(tmp_path / "pred.json")])
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco, coco.loadRes(str(tmp_path / "pred.json")), iouType="segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    np.testing.assert_allclose([got[k] for k in ("AP", "AP50", "AP75")], 100 * ev.stats[:3], atol=1e-9)
    assert 0 < got["AP"] < 100


def test_mean_iou_from_a_direct_confusion_matrix():
    rng = np.random.default_rng(1)
    metric = MeanIoU(4)
    conf = np.zeros((4, 4), np.int64)
    for _ in range(3):
        target = rng.integers(0, 4, (10, 12))
        target[0] = 255
        pred = np.where(rng.uniform(size=target.shape) < 0.7, target, rng.integers(0, 4, target.shape)) % 4
        labels = [k for k in range(4) if (target == k).any()]
        metric.update(pred, {"masks": np.stack([target == k for k in labels]), "labels": np.array(labels)})
        for t, p in zip(target.ravel(), pred.ravel()):
            if t != 255:
                conf[t, p] += 1
    iou = [conf[k, k] / (conf[k].sum() + conf[:, k].sum() - conf[k, k]) for k in range(4)]
    np.testing.assert_allclose(metric.compute()["mIoU"], 100 * np.mean(iou), rtol=1e-12)


def test_undefined_metrics_are_none_not_zero(tmp_path):
    """pycocotools' -1 (nothing to score against) is undefined, not a score of 0: on data with only small objects
    AP over medium and large objects is None in the in-loop metric and null in the CLI's JSON, an absent class
    has no per-class AP, PQ of things is None without thing classes; predicting nothing still scores 0 where
    there is ground truth."""
    from pycocotools import mask as mask_util

    from eomt_jax.evaluation.metrics import InstanceAP

    mask = np.zeros((64, 64), bool)
    mask[10:20, 30:40] = True  # area 100 < 32²: a small object
    record = {"image": np.zeros((64, 64, 3), np.uint8), "masks": mask[None], "labels": np.array([0]),
              "is_crowd": np.array([False])}
    perfect = {"masks": mask[None], "labels": np.array([0]), "scores": np.array([0.9])}
    nothing = {"masks": np.zeros((0, 64, 64), bool), "labels": np.zeros(0, int), "scores": np.zeros(0)}
    for pred, value in ((perfect, 100.0), (nothing, 0.0)):
        metric = InstanceAP(num_classes=3)
        metric.update(pred, record)
        got = metric.compute()
        assert got["APm"] is None and got["APl"] is None, got
        assert got["AP"] == pytest.approx(value) and got["APs"] == pytest.approx(value), got

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    gt = {"images": [{"id": 1, "height": 64, "width": 64}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle, "area": 100.0,
                           "iscrowd": 0, "bbox": [30.0, 10.0, 10.0, 10.0]}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps([{"image_id": 1, "category_id": 1, "segmentation": rle,
                                                      "score": 0.9}]))
    per_class = tmp_path / "per_class.json"
    got = _run_cli(["instance", "--gt-json", str(tmp_path / "gt.json"), "--pred-json", str(tmp_path / "pred.json"),
                    "--per-class", str(per_class)])
    assert got["APm"] is None and got["APl"] is None and got["AP"] == pytest.approx(100.0)
    assert json.loads(per_class.read_text()) == {"a": pytest.approx(100.0), "b": None}

    stuff_only = PanopticQuality(2, stuff_classes=[0, 1])
    stuff_only.update(np.stack([np.zeros((8, 8), int), np.zeros((8, 8), int)], -1),
                      {"masks": np.ones((1, 8, 8), bool), "labels": np.array([0]), "is_crowd": np.array([False])})
    result = stuff_only.compute()
    assert result["PQ_things"] is None and result["PQ_stuff"] == pytest.approx(100.0)


def test_pq_over_all_classes_counts_absent_classes_as_zero():
    """`PQ` averages over the classes present (panopticapi); `PQ_all_classes` over every class (the original's
    in-loop metric), so with one of four classes present and perfectly predicted they are 100 and 25."""
    metric = PanopticQuality(4, stuff_classes=[3])
    seg = np.zeros((8, 8), int)
    metric.update(np.stack([seg, seg], -1),
                  {"masks": np.ones((1, 8, 8), bool), "labels": np.array([0]), "is_crowd": np.array([False])})
    got = metric.compute()
    assert got["PQ"] == pytest.approx(100.0) and got["PQ_all_classes"] == pytest.approx(25.0)
