"""Small generated datasets in the exact official file layouts, for tests and for training on a laptop.

    python -m eomt_jax.data.synthetic --kind KIND --out DIR [--num-train N] [--num-val N] [--size S] [--seed S]

KIND is one of
  * `coco_panoptic`, `coco_instance`, `ade20k`, `cityscapes`: random images and annotations written with the
    official zip names and members (crowd segments, unlabeled pixels, instance PNGs, ids outside the class
    maps, images that the readers must skip), read with `load_source("coco_panoptic", DIR, "train")` etc.;
  * `shapes`: a learnable panoptic dataset in the COCO panoptic layout, read with
    `load_source("shapes", DIR, split)` (the same reader as "coco_format": classes come from the JSON);
  * `shapes_semantic`: the same kind of images as a semantic folder (`images/{split}/`, label PNGs in
    `labels/{split}/` with a 1-pixel border of 255 = unlabelled, names in `class_names.txt`), read with
    `load_source("semantic_folder", DIR, split)`.
    Each image shows 2-3 textured stuff regions (grass, water, sand) and 1-3 things (circle, square,
    triangle; at most one of each) of random size and position that may occlude each other, each thing a flat
    colour jittered around its class's hue (red circles, purple squares, yellow triangles). It is sized so
    that a small EoMT learns it from scratch in minutes on a laptop CPU at 128 px: segmenting the instances,
    their occlusions and the wavy stuff borders, and ranking each segment's class with a confident score.

Every writer returns the ground truth it drew: `{source name: {split: [record, ...]}}` with records in the
order the sources index them, so tests can compare source output with what was written.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import warnings
import zipfile
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

from eomt_jax.data import classes

GroundTruth = dict[str, dict[str, list[dict[str, Any]]]]
_COCO_SPLITS = {"train": "train2017", "val": "val2017"}


# ------------------------------------------------------------------------------------------- helpers


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _jpeg(image: np.ndarray) -> tuple[bytes, np.ndarray]:
    """JPEG bytes and the pixels a decoder will read back (JPEG is lossy)."""
    data = _encode(image, "JPEG", quality=90)
    return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    # Blocky colour noise, upsampled: compresses and decodes quickly while not being flat.
    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def _random_regions(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """An int map with values 0..n: region k painted as a random rectangle or ellipse over earlier ones.

    0 stays where nothing was painted (unlabeled pixels); a region may end up fully hidden.
    """
    canvas = Image.new("I", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for k in range(1, n + 1):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(w // 4, w), y0 + rng.integers(h // 4, h)
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=k)
    return np.asarray(canvas).astype(np.int32)


def _sizes(rng: np.random.Generator, size: int) -> tuple[int, int]:
    return int(rng.integers(size // 2, size + 1)), int(rng.integers(size // 2, size + 1))


def _record(image, masks, labels, crowd, image_id) -> dict[str, Any]:
    h, w = image.shape[:2]
    return {"image": image, "masks": np.asarray(masks, bool).reshape(-1, h, w),
            "labels": np.asarray(labels, np.int32).reshape(-1), "is_crowd": np.asarray(crowd, bool).reshape(-1),
            "image_id": image_id}


def _zip(path: str, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _zip_bytes(members: dict[str, bytes], compression: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _id_to_rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def _coco_categories(names, ids, stuff_ids=()) -> list[dict]:
    return [{"id": int(i), "name": n, "supercategory": "x", "isthing": int(i not in stuff_ids)}
            for i, n in zip(ids, names)]


# ------------------------------------------------------------------------------------------- COCO panoptic


def _write_coco_panoptic_layout(out: str, splits: dict[str, list[dict]], categories: list[dict], *,
                                layout: str, nested_compression: int) -> None:
    """Write drawn panoptic samples in the official COCO layout (`layout="official"`) or as a user's folder
    layout (`layout="folder"`: `{split}.json`, `{split}/`, `panoptic_{split}/`).

    Each sample: `jpeg` (encoded image), `file_stem`, `ids` (int segment-id map), `segments_info`, and
    `in_json` (False = leave the image out of the JSON).
    """
    annotation_members = {}
    for split, samples in splits.items():
        folder = _COCO_SPLITS[split] if layout == "official" else split
        images, pngs, json_images, json_anns = {}, {}, [], []
        for k, s in enumerate(samples):
            images[f"{folder}/{s['file_stem']}.jpg"] = s["jpeg"]
            if not s["in_json"]:
                continue
            h, w = s["ids"].shape
            json_images.append({"id": 1000 + k, "file_name": f"{s['file_stem']}.jpg", "height": h, "width": w})
            json_anns.append({"image_id": 1000 + k, "file_name": f"{s['file_stem']}.png",
                              "segments_info": s["segments_info"]})
            pngs[f"panoptic_{folder}/{s['file_stem']}.png"] = _encode(_id_to_rgb(s["ids"]), "PNG")
        data = json.dumps({"images": json_images, "annotations": json_anns, "categories": categories}).encode()
        if layout == "official":
            _zip(os.path.join(out, f"{folder}.zip"), images, zipfile.ZIP_STORED)
            annotation_members[f"annotations/panoptic_{folder}.json"] = data
            annotation_members[f"annotations/panoptic_{folder}.zip"] = _zip_bytes(pngs, zipfile.ZIP_DEFLATED)
        else:
            for name, blob in {**images, **pngs, f"{split}.json": data}.items():
                os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
                with open(os.path.join(out, name), "wb") as f:
                    f.write(blob)
    if layout == "official":
        path = os.path.join(out, "panoptic_annotations_trainval2017.zip")
        os.makedirs(out, exist_ok=True)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, blob in annotation_members.items():
                compression = nested_compression if name.endswith(".zip") else zipfile.ZIP_DEFLATED
                zf.writestr(zipfile.ZipInfo(name, (2017, 1, 1, 0, 0, 0)), blob, compress_type=compression)


def _panoptic_sample(rng, k: int, size: int, category_ids, id_to_label, max_segments: int = 6,
                     shape: tuple[int, int] | None = None) -> tuple[dict, dict | None]:
    """A random panoptic image; returns (sample to write, expected record or None if the reader skips it)."""
    h, w = shape or _sizes(rng, size)
    jpeg, image = _jpeg(_random_image(rng, h, w))
    stem = f"{k + 1:012d}"
    region = _random_regions(rng, h, w, int(rng.integers(2, max_segments + 1)))
    segment_ids = rng.choice(2**24 - 1, size=region.max() + 1, replace=False) + 1  # distinct, 24-bit RGB
    ids = np.where(region > 0, segment_ids[region], 0)
    # Categories outside the class map (12, 26, 201 are not COCO panoptic ids) must be ignored.
    pool = list(category_ids) + [12, 26, 201]
    segments_info = []
    for r in range(1, region.max() + 1):
        segments_info.append({"id": int(segment_ids[r]), "category_id": int(rng.choice(pool)),
                              "iscrowd": int(rng.random() < 0.2), "bbox": [0, 0, 1, 1], "area": 1})
    # A segment listed in the JSON but absent from the PNG yields no mask.
    segments_info.append({"id": 2**24 + 5, "category_id": int(category_ids[0]), "iscrowd": 0})
    in_json = k % 5 != 3
    if k % 7 == 5:
        segments_info = []  # listed with no segment: skipped
    sample = {"jpeg": jpeg, "file_stem": stem, "ids": ids, "segments_info": segments_info, "in_json": in_json}
    if not in_json or not segments_info:
        return sample, None
    masks, labels, crowd = [], [], []
    for seg in sorted(segments_info, key=lambda s: s["id"]):
        mask = ids == seg["id"]
        if seg["category_id"] in id_to_label and mask.any():
            masks.append(mask)
            labels.append(id_to_label[seg["category_id"]])
            crowd.append(bool(seg["iscrowd"]))
    return sample, _record(image, masks, labels, crowd, stem)


def write_coco_panoptic(out: str, num_train: int = 8, num_val: int = 4, size: int = 64, seed: int = 0, *,
                        layout: str = "official", nested_compression: int = zipfile.ZIP_DEFLATED,
                        max_segments: int = 6, shape: tuple[int, int] | None = None) -> GroundTruth:
    """Random COCO panoptic data (133 COCO classes) in the official layout, or a user's folder layout.

    Images are `shape` (h, w), or of random sides in [size / 2, size] when it is None.
    """
    rng = np.random.default_rng(seed)
    categories = _coco_categories(classes.COCO_PANOPTIC_NAMES, classes.COCO_PANOPTIC_IDS, classes.COCO_STUFF_IDS)
    id_to_label = dict(classes.COCO_PANOPTIC_ID_TO_LABEL)
    splits, truth = {}, {}
    for split, n in (("train", num_train), ("val", num_val)):
        drawn = [_panoptic_sample(rng, k, size, classes.COCO_PANOPTIC_IDS, id_to_label, max_segments, shape)
                 for k in range(n)]
        splits[split] = [s for s, _ in drawn]
        truth[split] = [r for _, r in drawn if r is not None]
    _write_coco_panoptic_layout(out, splits, categories, layout=layout, nested_compression=nested_compression)
    return {"coco_panoptic" if layout == "official" else "coco_format": truth}


# ------------------------------------------------------------------------------------------- COCO instance


def _uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts: run lengths in column-major order, starting with a run of zeros."""
    flat = mask.T.ravel().astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [len(flat)]])
    counts = np.diff(bounds).tolist()
    return ([0] + counts) if flat[0] else counts


def write_coco_instance(out: str, num_train: int = 8, num_val: int = 4, size: int = 64, seed: int = 0, *,
                        layout: str = "official") -> GroundTruth:
    """Random COCO instance data: polygons, compressed RLEs and crowd uncompressed RLEs.

    `layout="zip"` writes a user's layout instead: `{split}.json` and the images in `{split}.zip`.
    """
    rng = np.random.default_rng(seed)
    categories = _coco_categories(classes.COCO_THING_NAMES, classes.COCO_THING_IDS)
    id_to_label = dict(classes.COCO_INSTANCE_ID_TO_LABEL)
    truth, ann_members = {}, {}
    ann_id = 1
    for split, n in (("train", num_train), ("val", num_val)):
        folder = _COCO_SPLITS[split] if layout == "official" else split
        images, json_images, json_anns, records = {}, [], [], []
        for k in range(n):
            h, w = _sizes(rng, size)
            jpeg, image = _jpeg(_random_image(rng, h, w))
            stem = f"{k + 1:012d}"
            images[f"{folder}/{stem}.jpg"] = jpeg
            json_images.append({"id": 1 + k, "file_name": f"{stem}.jpg", "height": h, "width": w})
            if k % 4 == 2:
                continue  # an image without annotations is skipped
            masks, labels, crowd = [], [], []
            for _ in range(int(rng.integers(1, 5))):
                kind = rng.choice(["polygon", "rle", "crowd"], p=[0.5, 0.3, 0.2])
                category = int(rng.choice(list(classes.COCO_THING_IDS) + [12]))  # 12 is not a COCO id
                x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
                x1, y1 = int(rng.integers(x0 + 2, w)), int(rng.integers(y0 + 2, h))
                if kind == "polygon":
                    # Two polygons (a triangle and a quad) merged into one mask.
                    segmentation = [[x0, y0, x1, y0, x0, y1], [x0 + 1.5, y1 - 1.0, x1, y1, x1, y0 + 1.0, x0, y1]]
                    # Ground truth from pycocotools, the reference rasteriser of COCO polygons.
                    rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, h, w))
                    with warnings.catch_warnings():  # pycocotools 2.0.x warns about numpy 2's copy keyword
                        warnings.simplefilter("ignore", DeprecationWarning)
                        mask = coco_mask.decode(rle)
                else:
                    mask = np.zeros((h, w), np.uint8)
                    mask[y0:y1, x0:x1] = 1
                    mask[y0:y1:3, x0:x1:2] = 0  # ragged, not a box
                    if kind == "rle":
                        rle = coco_mask.encode(np.asfortranarray(mask))
                        segmentation = {"size": [h, w], "counts": rle["counts"].decode()}
                    else:
                        segmentation = {"size": [h, w], "counts": _uncompressed_rle(mask)}
                json_anns.append({"id": ann_id, "image_id": 1 + k, "category_id": category,
                                  "iscrowd": int(kind == "crowd"), "segmentation": segmentation,
                                  "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum())})
                ann_id += 1
                if category in id_to_label:
                    masks.append(mask.astype(bool))
                    labels.append(id_to_label[category])
                    crowd.append(kind == "crowd")
            records.append(_record(image, masks, labels, crowd, stem))
        truth[split] = records
        data = json.dumps({"images": json_images, "annotations": json_anns, "categories": categories}).encode()
        _zip(os.path.join(out, f"{folder}.zip"), images, zipfile.ZIP_STORED)
        if layout == "official":
            ann_members[f"annotations/instances_{folder}.json"] = data
        else:
            with open(os.path.join(out, f"{split}.json"), "wb") as f:
                f.write(data)
    if layout == "official":
        _zip(os.path.join(out, "annotations_trainval2017.zip"), ann_members)
    return {"coco_instance" if layout == "official" else "coco_format": truth}


# ------------------------------------------------------------------------------------------- ADE20K


def write_ade20k(out: str, num_train: int = 8, num_val: int = 4, size: int = 64, seed: int = 0) -> GroundTruth:
    """Random ADE20K data: `ADEChallengeData2016.zip` and `annotations_instance.zip` (stored, as the README's
    repacking of the instance tar produces)."""
    rng = np.random.default_rng(seed)
    stuff = list(classes.ADE20K_PANOPTIC_STUFF)
    main, instance_members = {}, {}
    truth: GroundTruth = {"ade20k_semantic": {}, "ade20k_panoptic": {}}
    for split, n in (("train", num_train), ("val", num_val)):
        folder, prefix = {"train": ("training", "ADE_train"), "val": ("validation", "ADE_val")}[split]
        semantic, panoptic = [], []
        for k in range(n):
            h, w = _sizes(rng, size)
            jpeg, image = _jpeg(_random_image(rng, h, w))
            stem = f"{prefix}_{k + 1:08d}"
            main[f"ADEChallengeData2016/images/{folder}/{stem}.jpg"] = jpeg
            region = _random_regions(rng, h, w, int(rng.integers(3, 7)))
            # Value per region: stuff classes (value = label + 1), thing regions get instance ids, 151+ is
            # outside the 150 classes and ignored.
            n_regions = region.max() + 1
            region_value = np.zeros(n_regions, np.int32)
            inst_category = np.zeros(n_regions, np.int32)
            for r in range(1, n_regions):
                roll = rng.random()
                if roll < 0.45:
                    region_value[r] = rng.choice(stuff) + 1
                elif roll < 0.9:
                    inst_category[r] = rng.integers(1, 101)
                    region_value[r] = classes.ADE20K_INSTANCE_TO_LABEL[inst_category[r] - 1] + 1
                else:
                    region_value[r] = 151 + rng.integers(0, 50)
            if k % 6 == 4:  # only things, constant (empty) instance PNG: panoptic skips it
                region_value[1:] = [classes.ADE20K_INSTANCE_TO_LABEL[3] + 1] * (n_regions - 1)
                inst_category[:] = 0
            target = region_value[region].astype(np.uint8)
            if k % 6 == 5:
                target[:] = 7  # a single value: skipped by both
            instance = np.zeros((h, w, 3), np.uint8)
            instance[..., 0] = inst_category[region]
            instance[..., 1] = np.where(inst_category[region] > 0, region, 0)
            has_target = k % 6 != 3  # no annotation PNG: skipped
            if has_target:
                main[f"ADEChallengeData2016/annotations/{folder}/{stem}.png"] = _encode(target, "PNG")
            instance_members[f"annotations_instance/{folder}/{stem}.png"] = _encode(instance, "PNG")
            if not has_target or target.min() == target.max():
                continue
            values = [v for v in np.unique(target) if 1 <= v <= 150]
            semantic.append(_record(image, [target == v for v in values], [v - 1 for v in values],
                                    [False] * len(values), stem))
            stuff_values = [v for v in values if v - 1 in stuff]
            masks = [target == v for v in stuff_values]
            labels = [v - 1 for v in stuff_values]
            for i in np.unique(instance[..., 1]):
                if i > 0:
                    masks.append(instance[..., 1] == i)
                    labels.append(classes.ADE20K_INSTANCE_TO_LABEL[inst_category[i] - 1])
            if labels:
                panoptic.append(_record(image, masks, labels, [False] * len(labels), stem))
        truth["ade20k_semantic"][split] = semantic
        truth["ade20k_panoptic"][split] = panoptic
    _zip(os.path.join(out, "ADEChallengeData2016.zip"), main)
    _zip(os.path.join(out, "annotations_instance.zip"), instance_members, zipfile.ZIP_STORED)
    return truth


# ------------------------------------------------------------------------------------------- Cityscapes


def write_cityscapes(out: str, num_train: int = 8, num_val: int = 4, size: int = 64,
                     seed: int = 0) -> GroundTruth:
    """Random Cityscapes data: `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` (2:1 images)."""
    rng = np.random.default_rng(seed)
    images, targets = {}, {}
    truth: GroundTruth = {"cityscapes_semantic": {}}
    for split, n in (("train", num_train), ("val", num_val)):
        records = []
        for k in range(n):
            city = ["aachen", "bremen"][k % 2]
            name = f"{city}_{k:06d}_000019"
            h = int(rng.integers(size // 4, size // 2 + 1))
            w = 2 * h
            image = _random_image(rng, h, w)
            images[f"leftImg8bit/{split}/{city}/{name}_leftImg8bit.png"] = _encode(image, "PNG")
            region = _random_regions(rng, h, w, int(rng.integers(2, 6)))
            # labelIds 0-33; 0-6, 9, 10, 14-16, 18, 29, 30 are ignored in evaluation.
            value = rng.integers(0, 34, region.max() + 1).astype(np.uint8)
            target = value[region]
            if k % 5 == 4:
                target[:] = 26  # a single value: skipped
            base = f"gtFine/{split}/{city}/{name}_gtFine"
            targets[f"{base}_color.png"] = _encode(np.zeros((h, w, 3), np.uint8), "PNG")
            if k % 5 == 3:
                continue  # no labelIds PNG: skipped
            targets[f"{base}_labelIds.png"] = _encode(target, "PNG")
            if target.min() == target.max():
                continue
            ids = [v for v in np.unique(target) if int(v) in classes.CITYSCAPES_ID_TO_LABEL]
            records.append(_record(image, [target == v for v in ids],
                                   [classes.CITYSCAPES_ID_TO_LABEL[int(v)] for v in ids], [False] * len(ids),
                                   f"{name}_leftImg8bit"))
        # The reader orders by member path, i.e. by city, then name.
        truth["cityscapes_semantic"][split] = sorted(records, key=lambda r: r["image_id"])
    _zip(os.path.join(out, "leftImg8bit_trainvaltest.zip"), images, zipfile.ZIP_STORED)
    _zip(os.path.join(out, "gtFine_trainvaltest.zip"), targets)
    return truth


# ------------------------------------------------------------------------------------------- shapes

SHAPES_THINGS = ("circle", "square", "triangle")
SHAPES_STUFF = ("grass", "water", "sand")
# Stuff textures: a base colour and a pattern, each jittered per image.
# Things: flat colours around one hue per class (red circles, purple squares, yellow triangles).
_THING_COLOURS = ((205, 45, 45), (140, 60, 200), (230, 205, 40))
_STUFF_STYLE = {"grass": ((60, 140, 50), "noise"), "water": ((50, 90, 170), "stripes"),
                "sand": ((200, 180, 120), "dots")}


def _stuff_texture(rng, name: str, h: int, w: int) -> np.ndarray:
    base, pattern = _STUFF_STYLE[name]
    colour = np.clip(np.asarray(base) + rng.integers(-30, 31, 3), 0, 255).astype(np.float32)
    yy, xx = np.mgrid[:h, :w]
    if pattern == "noise":
        tex = rng.normal(0, 25, (h, w))
    elif pattern == "stripes":
        period = rng.uniform(5, 9)
        tex = 30 * np.sin(2 * np.pi * (yy + 0.3 * xx) / period)
    else:
        tex = 40 * (((yy // 4) + (xx // 4)) % 2) - 20
    return np.clip(colour + tex[..., None], 0, 255)


def _shapes_sample(rng, k: int, size: int) -> tuple[dict, dict]:
    h = w = size
    # Stuff: 2-3 horizontal bands with a wavy border, each of a distinct stuff class.
    stuff_names = list(rng.permutation(SHAPES_STUFF)[: int(rng.integers(2, 4))])
    borders = np.sort(rng.uniform(0.2, 0.8, len(stuff_names) - 1)) * h
    xx = np.arange(w)
    band = np.zeros((h, w), np.int32)
    for b, y in enumerate(borders):
        wave = y + rng.uniform(2, 8) * np.sin(xx / rng.uniform(6, 20) + rng.uniform(0, 6))
        band += np.arange(h)[:, None] >= wave[None, :]
    image = np.zeros((h, w, 3), np.float32)
    for b, name in enumerate(stuff_names):
        image = np.where((band == b)[..., None], _stuff_texture(rng, name, h, w), image)

    # Things: 1-3 shapes of distinct kinds drawn in order (later ones occlude earlier ones).
    owner = Image.new("I", (w, h), 0)
    draw = ImageDraw.Draw(owner)
    things = []
    kinds = rng.permutation(3)[: int(rng.integers(1, 4))]
    for t, kind in enumerate(kinds.tolist(), start=1):
        r = rng.uniform(0.12, 0.25) * size
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=t)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=t)
        else:
            angle = rng.uniform(0, 2 * np.pi)
            pts = [(cx + r * 1.2 * np.cos(angle + a), cy + r * 1.2 * np.sin(angle + a))
                   for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
            draw.polygon(pts, fill=t)
        # A flat colour from the class's hue family, jittered per thing.
        things.append((t, kind, np.clip(np.asarray(_THING_COLOURS[kind]) + rng.integers(-40, 41, 3), 0, 255)))
    owner = np.asarray(owner).astype(np.int32)
    for t, kind, colour in things:
        shade = colour + rng.normal(0, 6, (h, w, 3))
        image = np.where((owner == t)[..., None], shade, image)
    image = np.clip(image, 0, 255).astype(np.uint8)

    # Panoptic ids: things 1.., stuff 100 + band; category ids 1-3 things, 4-6 stuff.
    ids = np.where(owner > 0, owner, 100 + band)
    segments, masks, labels = [], [], []
    for t, kind, _ in things:
        if (owner == t).any():
            segments.append({"id": t, "category_id": kind + 1, "iscrowd": 0})
    for b, name in enumerate(stuff_names):
        if (ids == 100 + b).any():
            segments.append({"id": 100 + b, "category_id": 4 + SHAPES_STUFF.index(name), "iscrowd": 0})
    jpeg, decoded = _jpeg(image)
    stem = f"{k + 1:012d}"
    for seg in sorted(segments, key=lambda s: s["id"]):
        masks.append(ids == seg["id"])
        labels.append(seg["category_id"] - 1)
    sample = {"jpeg": jpeg, "file_stem": stem, "ids": ids, "segments_info": segments, "in_json": True}
    return sample, _record(decoded, masks, labels, [False] * len(labels), stem)


def write_shapes(out: str, num_train: int = 512, num_val: int = 64, size: int = 128, seed: int = 0) -> GroundTruth:
    """The learnable `shapes` panoptic dataset (3 thing + 3 stuff classes) in the COCO panoptic layout."""
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape", "isthing": 1}
                  for i, n in enumerate(SHAPES_THINGS)]
    categories += [{"id": i + 4, "name": n, "supercategory": "stuff", "isthing": 0}
                   for i, n in enumerate(SHAPES_STUFF)]
    splits, truth = {}, {}
    for split, n in (("train", num_train), ("val", num_val)):
        drawn = [_shapes_sample(rng, k, size) for k in range(n)]
        splits[split] = [s for s, _ in drawn]
        truth[split] = [r for _, r in drawn]
    _write_coco_panoptic_layout(out, splits, categories, layout="official", nested_compression=zipfile.ZIP_STORED)
    return {"coco_format": truth}


def write_shapes_semantic(out: str, num_train: int = 512, num_val: int = 64, size: int = 128,
                          seed: int = 0) -> GroundTruth:
    """The `shapes` images (3 thing + 3 stuff classes) as a semantic folder: one single-channel label PNG per image
    (class index; the outermost pixels 255, unlabelled) and the class names, one per line."""
    rng = np.random.default_rng(seed)
    names = SHAPES_THINGS + SHAPES_STUFF
    truth = {}
    for split, n in (("train", num_train), ("val", num_val)):
        truth[split] = []
        for k in range(n):
            sample, record = _shapes_sample(rng, k, size)
            label = np.full(record["image"].shape[:2], 255, np.uint8)
            for mask, cls in zip(record["masks"], record["labels"]):
                label[mask] = cls
            label[[0, -1]], label[:, [0, -1]] = 255, 255
            present = [c for c in range(len(names)) if (label == c).any()]
            for folder, blob in (("images", sample["jpeg"]), ("labels", _encode(label, "PNG"))):
                path = os.path.join(out, folder, split, f"{sample['file_stem']}.{'jpg' if folder == 'images' else 'png'}")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(blob)
            truth[split].append(_record(record["image"], [label == c for c in present], present,
                                        [False] * len(present), sample["file_stem"]))
    with open(os.path.join(out, "class_names.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    return {"semantic_folder": truth}


WRITERS = {
    "coco_panoptic": write_coco_panoptic,
    "coco_instance": write_coco_instance,
    "ade20k": write_ade20k,
    "cityscapes": write_cityscapes,
    "shapes": write_shapes,
    "shapes_semantic": write_shapes_semantic,
}


def generate(kind: str, out: str | os.PathLike, **kwargs) -> GroundTruth:
    """Write the generated dataset `kind` (one of `WRITERS`) into `out`; keyword arguments go to its writer
    (`num_train`, `num_val`, `size`, `seed`). Returns the ground truth drawn."""
    if kind not in WRITERS:
        raise ValueError(f"unknown generated dataset {kind!r}; choose one of {sorted(WRITERS)}")
    return WRITERS[kind](os.fspath(out), **kwargs)


def random_train_batch(data, num_classes: int, sharding, seed: int = 0) -> dict[str, Any]:
    """One global training batch with the shapes of a config's `data` section (`eomt_jax.data.TRAIN_KEYS`), as
    global arrays, for timing a train step without reading data: random images, one to eight random rectangles
    per image in its first target slots, the other slots padding. Each process makes its own rows; the masks
    are drawn on the devices, already sharded."""
    import jax
    import jax.numpy as jnp

    rows = data.batch_size // jax.process_count()
    s, m = data.image_size, data.max_instances
    rng = np.random.default_rng([seed, jax.process_index()])
    valid = np.arange(m)[None] < rng.integers(1, min(m, 8) + 1, (rows, 1))
    lo = rng.integers(0, s // 2, (rows, m, 2))
    hi = lo + rng.integers(max(s // 16, 1), s // 2 + 1, (rows, m, 2))
    host = {
        "image": rng.integers(0, 256, (rows, s, s, 3), dtype=np.uint8),
        "labels": rng.integers(0, num_classes, (rows, m)).astype(np.int32),
        "valid": valid,
        "is_crowd": np.zeros((rows, m), bool),
        "boxes": np.concatenate([lo, hi], axis=-1).astype(np.int32),
    }
    batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}

    def rectangles(boxes, valid):
        y, x = jnp.arange(s)[:, None], jnp.arange(s)[None, :]
        b = boxes[..., None, None]
        return (y >= b[:, :, 0]) & (y < b[:, :, 2]) & (x >= b[:, :, 1]) & (x < b[:, :, 3]) & valid[..., None, None]

    batch["masks"] = jax.jit(rectangles, out_shardings=sharding)(batch.pop("boxes"), batch["valid"])
    return batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", required=True, choices=sorted(WRITERS))
    parser.add_argument("--out", required=True, help="folder to write the zips into")
    parser.add_argument("--num-train", type=int, default=None, help="train images (default: 512 shapes, 8 others)")
    parser.add_argument("--num-val", type=int, default=None, help="val images (default: 64 shapes, 4 others)")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default: 128 shapes, 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shapes = args.kind.startswith("shapes")
    num_train = args.num_train if args.num_train is not None else (512 if shapes else 8)
    num_val = args.num_val if args.num_val is not None else (64 if shapes else 4)
    size = args.size if args.size is not None else (128 if shapes else 64)
    truth = generate(args.kind, args.out, num_train=num_train, num_val=num_val, size=size, seed=args.seed)
    for name, splits in truth.items():
        name = "shapes" if args.kind == "shapes" else name  # an alias of coco_format with demo training defaults
        counts = ", ".join(f"{split}: {len(records)} images" for split, records in splits.items())
        print(f"wrote {args.kind} to {args.out}; load_source({name!r}, {args.out!r}, split) -> {counts}")


if __name__ == "__main__":
    main()
