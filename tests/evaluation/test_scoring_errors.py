"""`python -m eomt_jax.evaluate` on inputs that cannot be scored: one `error:` line naming the file and what was
expected, exit status 1, never a traceback or a score of nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from eomt_jax.evaluate import main


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


@pytest.fixture
def instance_files(tmp_path):
    """A two-image COCO annotation file and results that score: (gt path, results path, results)."""
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]}
    results = []
    for i, image_id in enumerate((39769, 139)):
        m = np.zeros((20, 30), bool)
        m[5:15, 3 + i : 20 + i] = True
        gt["images"].append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": 20, "width": 30})
        gt["annotations"].append({"id": i + 1, "image_id": image_id, "category_id": 7, "segmentation": _rle(m),
                                  "area": float(m.sum()), "iscrowd": 0, "bbox": [3.0, 5.0, 17.0, 10.0]})
        results.append({"image_id": image_id, "category_id": 7, "segmentation": _rle(m), "score": 0.9})
    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "pred" / "instances.json"
    pred_path.parent.mkdir()
    gt_path.write_text(json.dumps(gt))
    pred_path.write_text(json.dumps(results))
    return gt_path, pred_path, results


def _error(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured
    return captured.err.strip()


def test_the_fixture_scores(instance_files, capsys):
    gt, pred, _ = instance_files
    assert main(["instance", "--gt-json", str(gt), "--pred-json", str(pred)]) == 0
    assert json.loads(capsys.readouterr().out)["AP"] == pytest.approx(100.0)


def test_instance_result_problems(instance_files, capsys):
    gt, pred, results = instance_files
    argv = ["instance", "--gt-json", gt, "--pred-json", pred]

    pred.write_text(json.dumps([dict(r, image_id=f"{r['image_id']:012d}") for r in results]))  # file stems
    assert _error(capsys, argv) == (
        f"error: {pred}: results for 2 image id(s) that {gt} does not have, e.g. '000000000139', '000000039769' "
        f"(its ids are e.g. 139, 39769); predict with --gt-json {gt} to use its ids")

    pred.write_text(json.dumps([{k: v for k, v in r.items() if k != "score"} for r in results]))
    assert _error(capsys, argv) == (f"error: {pred}: result 0 has no 'score' (each result needs ['image_id', "
                                    "'category_id', 'segmentation', 'score'])")

    pred.write_text(json.dumps([dict(results[0], category_id=3)]))
    assert "category id(s) 3 are not among the categories of" in _error(capsys, argv)

    pred.write_text(json.dumps([dict(results[0], score="high")]))
    assert f"{pred}: result 0 has score 'high', expected a finite number" in _error(capsys, argv)

    small = dict(results[1], segmentation=_rle(np.ones((10, 30), bool)))
    pred.write_text(json.dumps([results[0], small]))
    assert f"{pred}: result 1 (image 139) has a mask of size [10, 30], the image is [20, 30] in {gt}" in _error(
        capsys, argv)

    pred.write_text(json.dumps({"annotations": results}))
    assert f"{pred}: expected a COCO results list, got a JSON dict" in _error(capsys, argv)

    pred.write_text(json.dumps(results)[:-40])  # truncated
    assert _error(capsys, argv).startswith(f"error: {pred}: not valid JSON")


def test_ids_of_other_images_are_caught_by_the_image_listing(instance_files, capsys):
    # Ids numbered 1, 2 in input order would score the wrong images if the annotation file used 1, 2 as well.
    gt, pred, results = instance_files
    (pred.parent / "images.json").write_text(json.dumps([
        {"id": 39769, "file_name": "000000000139.jpg"}, {"id": 139, "file_name": "000000039769.jpg"}]))
    assert _error(capsys, ["instance", "--gt-json", gt, "--pred-json", pred]) == (
        f"error: {pred.parent / 'images.json'}: image id 39769 is 000000000139.jpg, but 000000039769 in {gt}: the "
        f"ids refer to other images; predict with --gt-json {gt} to use its ids")
    (pred.parent / "images.json").write_text(json.dumps([
        {"id": 39769, "file_name": "000000039769.png"}, {"id": 139, "file_name": "000000000139.jpg"}]))
    assert main(["instance", "--gt-json", str(gt), "--pred-json", str(pred)]) == 0  # same stems


def test_an_empty_ground_truth_is_an_error_not_a_score(instance_files, tmp_path, capsys):
    gt, pred, _ = instance_files
    data = json.loads(gt.read_text())
    gt.write_text(json.dumps(dict(data, annotations=[])))
    assert _error(capsys, ["instance", "--gt-json", gt, "--pred-json", pred]) == (
        f"error: {gt}: no annotations: there is nothing to score against")

    (tmp_path / "gt").mkdir(), (tmp_path / "sem").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "sem" / "a.png")
    assert _error(capsys, ["semantic", "--gt-dir", tmp_path / "gt", "--pred-dir", tmp_path / "sem",
                           "--num-classes", "3"]) == (
        f"error: {tmp_path / 'gt'}: no ground-truth PNG files: there is nothing to score against")

    pan = tmp_path / "pan.json"
    pan.write_text(json.dumps({"annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    pred_json = tmp_path / "panoptic.json"
    pred_json.write_text(json.dumps({"annotations": []}))
    assert _error(capsys, ["panoptic", "--gt-json", pan, "--gt-dir", tmp_path / "gt", "--pred-json", pred_json,
                           "--pred-dir", tmp_path / "sem"]) == (
        f"error: {pan}: no annotations: there is nothing to score against")


def test_panoptic_prediction_problems(tmp_path, capsys):
    (tmp_path / "gt").mkdir(), (tmp_path / "pred").mkdir()
    ids = np.zeros((6, 8, 3), np.uint8)
    ids[:3, :, 0] = 1
    Image.fromarray(ids).save(tmp_path / "gt" / "000000000001.png")
    Image.fromarray(ids).save(tmp_path / "pred" / "000000000001.png")
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"categories": [{"id": 5, "name": "a", "isthing": 1}], "annotations": [
        {"image_id": 1, "file_name": "000000000001.png", "segments_info": [{"id": 1, "category_id": 5}]}]}))
    pred = tmp_path / "panoptic.json"
    argv = ["panoptic", "--gt-json", gt, "--gt-dir", tmp_path / "gt", "--pred-json", pred, "--pred-dir",
            tmp_path / "pred"]
    entry = {"image_id": 1, "file_name": "000000000001.png", "segments_info": [{"id": 1, "category_id": 5}]}

    pred.write_text(json.dumps({"annotations": [entry]}))
    assert main([str(a) for a in argv]) == 0
    assert json.loads(capsys.readouterr().out)["PQ"] == pytest.approx(100.0)

    pred.write_text(json.dumps({"annotations": [{k: v for k, v in entry.items() if k != "segments_info"}]}))
    assert _error(capsys, argv) == (f"error: {pred}: annotation 0 has no 'segments_info' (each annotation needs "
                                    "['image_id', 'file_name', 'segments_info'])")

    pred.write_text(json.dumps({"annotations": [dict(entry, segments_info=[{"id": 1}])]}))
    assert f"{pred}: annotation of 000000000001.png, segment 0 has no 'category_id'" in _error(capsys, argv)

    stray = dict(entry, image_id=2, file_name="000000000002.png")
    pred.write_text(json.dumps({"annotations": [entry, stray]}))
    assert _error(capsys, argv) == (f"error: {pred}: 1 prediction(s) match no image of {gt} by image id or file "
                                    "name, e.g. image ids 2")

    pred.write_text(json.dumps([entry]))
    assert _error(capsys, argv) == (f"error: {pred}: expected a JSON object with the keys ['annotations'], got a "
                                    "JSON list")

    (tmp_path / "pred" / "000000000001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    pred.write_text(json.dumps({"annotations": [entry]}))
    assert _error(capsys, argv).startswith(f"error: {tmp_path / 'pred'}/000000000001.png: cannot decode PNG")
