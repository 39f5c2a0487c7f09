"""A user's datasets with file names of their own, written from the generated `shapes` data, with the records a
source must read back.

    layouts = write_user_layouts(tmp / "user", num_train=8, num_val=4, size=64)
    layouts["panoptic"].root, layouts["panoptic"].options    # data.root and the data.* file options
    layouts["panoptic"].records["val"]                        # what the val split must read

* panoptic: `labels/pan-train.json` with the images in `photos/train/` and the PNGs in `segs_train.zip`; the val
  split in `labels/pan-val.json`, `photos/val.zip` and `segs/val/`; image files renamed `img_<k>.jpg`, PNGs
  `seg_<k>.png`, category ids 11-16.
* instance: the things of the same images as RLE annotations in `ins_train.json` / `ins_val.json`, the images in
  `imgs_tr.zip` / `imgs_va/`; category ids 21-26 (24-26, the stuff names, without annotations).
* semantic: the same images as `rgb/pic-<k>.png` with single-channel label PNGs `gt/pic-<k>.png` (class index,
  a 2-pixel border of 255 = unlabelled), class names in `names.txt`; train and val in one folder (the val split
  is a fraction).
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from eomt_jax.data import load_source, synthetic

THINGS = 3  # shapes: labels 0-2 are things (circle, square, triangle), 3-5 stuff (grass, water, sand)


@dataclasses.dataclass
class Layout:
    root: Path
    options: dict  # data.* keys of the config (data.name included)
    records: dict  # split -> expected records
    class_names: list


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_user_layouts(out: Path, num_train: int = 8, num_val: int = 4, size: int = 64, seed: int = 0
                       ) -> dict[str, Layout]:
    out = Path(out)
    generated = out / "generated"
    synthetic.write_shapes(str(generated), num_train=num_train, num_val=num_val, size=size, seed=seed)
    with zipfile.ZipFile(generated / "panoptic_annotations_trainval2017.zip") as zf:
        jsons = {s: json.loads(zf.read(f"annotations/panoptic_{s}2017.json")) for s in ("train", "val")}
        nested = {s: zipfile.ZipFile(io.BytesIO(zf.read(f"annotations/panoptic_{s}2017.zip"))) for s in ("train", "val")}
    jpegs = {}
    for split in ("train", "val"):
        with zipfile.ZipFile(generated / f"{split}2017.zip") as zf:
            jpegs[split] = {Path(n).stem: zf.read(n) for n in zf.namelist()}
    records = {s: [load_source("shapes", generated, s)[i] for i in range(len(jpegs[s]))] for s in ("train", "val")}
    names = [c["name"] for c in sorted(jsons["train"]["categories"], key=lambda c: c["id"])]

    # -- panoptic
    pan = out / "panoptic"
    for split in ("train", "val"):
        data = jsons[split]
        stems = {img["id"]: Path(img["file_name"]).stem for img in data["images"]}
        new = {stem: f"img_{k}" for k, stem in enumerate(sorted(stems.values()))}
        for img in data["images"]:
            img["file_name"] = f"{new[Path(img['file_name']).stem]}.jpg"
        pngs = {}
        for ann in data["annotations"]:
            stem = stems[ann["image_id"]]
            pngs[f"seg_{new[stem][4:]}.png"] = nested[split].read(f"panoptic_{split}2017/{stem}.png")
            ann["file_name"] = f"seg_{new[stem][4:]}.png"
            for seg in ann["segments_info"]:
                seg["category_id"] += 10
        for cat in data["categories"]:
            cat["id"] += 10
        _write(pan / "labels" / f"pan-{split}.json", json.dumps(data).encode())
        images = {f"{new[stem]}.jpg": jpeg for stem, jpeg in jpegs[split].items()}
        if split == "train":
            for name, blob in images.items():
                _write(pan / "photos" / "train" / name, blob)
            _zip(pan / "segs_train.zip", {f"inner/{n}": b for n, b in pngs.items()})
        else:
            _zip(pan / "photos" / "val.zip", images)
            for name, blob in pngs.items():
                _write(pan / "segs" / "val" / name, blob)
    panoptic = Layout(pan, dict(name="coco_format", train_json="labels/pan-train.json", train_images="photos/train",
                                train_masks="segs_train.zip", val_json="labels/pan-val.json",
                                val_images="photos/val.zip", val_masks="segs/val"),
                      {s: [dict(r, image_id=f"img_{k}") for k, r in enumerate(records[s])] for s in records}, names)

    # -- instance: the things only, as compressed RLEs
    ins = out / "instance"
    ins_records = {}
    for split in ("train", "val"):
        images, anns, expected = [], [], []
        for k, r in enumerate(records[split]):
            h, w = r["image"].shape[:2]
            images.append({"id": 500 + k, "file_name": f"shot{k}.jpg", "height": h, "width": w})
            keep = r["labels"] < THINGS
            for mask, label in zip(r["masks"][keep], r["labels"][keep]):
                rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
                anns.append({"id": len(anns) + 1, "image_id": 500 + k, "category_id": 21 + int(label), "iscrowd": 0,
                             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
            if keep.any():
                expected.append(dict(r, image_id=f"shot{k}", masks=r["masks"][keep], labels=r["labels"][keep],
                                     is_crowd=r["is_crowd"][keep]))
        cats = [{"id": 21 + k, "name": n} for k, n in enumerate(names)]
        _write(ins / f"ins_{split}.json", json.dumps({"images": images, "annotations": anns,
                                                       "categories": cats}).encode())
        blobs = {f"shot{k}.jpg": jpegs[split][Path(s).stem] for k, s in enumerate(sorted(jpegs[split]))}
        if split == "train":
            _zip(ins / "imgs_tr.zip", blobs)
        else:
            for name, blob in blobs.items():
                _write(ins / "imgs_va" / name, blob)
        ins_records[split] = expected
    instance = Layout(ins, dict(name="coco_format", train_json="ins_train.json", train_images="imgs_tr.zip",
                                val_json="ins_val.json", val_images="imgs_va"), ins_records, names)

    # -- semantic: one label PNG per image, class index per pixel, a border of 255
    sem = out / "semantic"
    sem_records = []
    for k, r in enumerate(records["train"] + records["val"]):
        label = np.full(r["image"].shape[:2], 255, np.uint8)
        for mask, cls in zip(r["masks"], r["labels"]):
            label[mask] = cls
        label[:2], label[-2:], label[:, :2], label[:, -2:] = 255, 255, 255, 255
        _write(sem / "rgb" / f"pic-{k:02d}.png", _png(r["image"]))
        _write(sem / "gt" / f"pic-{k:02d}.png", _png(label))
        present = [c for c in range(len(names)) if (label == c).any()]
        sem_records.append(dict(r, image_id=f"pic-{k:02d}", masks=np.stack([label == c for c in present]),
                                labels=np.asarray(present, np.int32), is_crowd=np.zeros(len(present), bool)))
    (sem / "names.txt").write_text("\n".join(names) + "\n")
    semantic = Layout(sem, dict(name="semantic_folder", train_images="rgb", train_masks="gt", val_fraction=0.25,
                                class_names_file="names.txt"), {"all": sem_records}, names)
    return {"panoptic": panoptic, "instance": instance, "semantic": semantic}


def source_options(layout: Layout) -> dict:
    """The layout's options as `load_source` keyword arguments."""
    return {k: v for k, v in layout.options.items() if k != "name"}

