"""`python -m eomt_jax.predict`: run a converted checkpoint on your own images.

    python -m eomt_jax.predict --checkpoint checkpoints/coco_panoptic_eomt_large_640 --task panoptic \\
        --input photos/ street.jpg --output predictions/ [--dataset coco_panoptic] [--batch-size 4] [--dtype bfloat16]

For every image: `<stem>_overlay.png` (panoptic colours with class names, instance outlines with scores, or a
semantic palette) and the standard prediction files:
  panoptic  `panoptic/<stem>.png` (COCO panoptic RGB ids) + `panoptic.json` (COCO panoptic annotations)
  instance  `instances.json` (COCO results with RLE masks; category ids are the class index + 1)
  semantic  `semantic/<stem>.png` (single-channel class indices)
Class names come from the checkpoint's metadata, else from `--dataset`, else they are numbered.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from eomt_jax import pretrained, visualize
from eomt_jax.atomic import atomic_directory
from eomt_jax.eval_loop import make_forward
from eomt_jax.inference import predict

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def dataset_classes(name: str) -> tuple[list[str], list[int]]:
    from eomt_jax.data import classes

    table = {
        "coco_panoptic": (classes.COCO_PANOPTIC_NAMES, classes.COCO_PANOPTIC_STUFF),
        "coco_instance": (classes.COCO_THING_NAMES, ()),
        "ade20k_panoptic": (classes.ADE20K_NAMES, classes.ADE20K_PANOPTIC_STUFF),
        "ade20k_semantic": (classes.ADE20K_NAMES, tuple(range(150))),
        "cityscapes_semantic": (classes.CITYSCAPES_NAMES, tuple(range(19))),
    }
    if name not in table:
        raise ValueError(f"--dataset must be one of {sorted(table)}, got {name!r}")
    names, stuff = table[name]
    return list(names), list(stuff)


def find_images(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(inputs)}")
    stems = [f.stem for f in files]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"several input images share the file stem(s) {dup}; outputs are named by stem")
    return files


def load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eomt_jax.predict", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="converted checkpoint directory")
    p.add_argument("--task", required=True, choices=["panoptic", "instance", "semantic"])
    p.add_argument("--input", required=True, nargs="+", help="image files and/or folders")
    p.add_argument("--output", required=True, help="output folder (created; must not exist unless --overwrite)")
    p.add_argument("--dataset", help="class names of this dataset when the checkpoint carries none")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (default: the checkpoint's, float32); bfloat16 runs faster on accelerators and "
                        "on CPUs with bf16 matrix units (AMX), at bf16 accuracy")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        return _main(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}")
        return 1


def _main(args) -> int:
    from tqdm import tqdm

    model = pretrained.load(args.checkpoint, dtype=args.dtype)
    meta = pretrained.read_metadata(args.checkpoint)
    c = model.config.num_classes
    if args.dataset:
        names, stuff = dataset_classes(args.dataset)
    elif "class_names" in meta:
        names, stuff = list(meta["class_names"]), list(meta.get("stuff_classes", []))
    else:
        names, stuff = [f"class {k}" for k in range(c)], []
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for a checkpoint with {c} classes")
    files = find_images(args.input)
    out = Path(args.output)
    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        _run(model, args, files, names, stuff, tmp, tqdm)
    print(f"wrote predictions for {len(files)} image(s) to {out}")
    return 0


def _plus_one(label: int) -> int:
    return label + 1


def write_panoptic_png(folder: Path, stem: str, pred: np.ndarray, image_id, category_id=_plus_one) -> dict:
    """COCO panoptic PNG of an (H, W, 2) prediction; returns its annotation (category ids: `category_id(label)`,
    class index + 1 by default)."""
    ids = np.where(pred[..., 1] >= 0, pred[..., 1] + 1, 0)  # COCO: 0 = unlabeled
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / f"{stem}.png")
    segments = []
    for sid in np.unique(ids[ids > 0]):
        region = ids == sid
        cat = int(np.bincount(pred[..., 0][region]).argmax())
        segments.append({"id": int(sid), "category_id": category_id(cat), "area": int(region.sum()), "iscrowd": 0})
    return {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments}


def coco_results(pred: dict, image_id, category_id=_plus_one) -> list[dict]:
    """COCO results entries (RLE masks) of an instance prediction."""
    from pycocotools import mask as mask_util

    out = []
    for m, label, score in zip(pred["masks"], pred["labels"], pred["scores"]):
        rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"image_id": image_id, "category_id": category_id(int(label)), "segmentation": rle,
                    "score": float(score)})
    return out


def _run(model, args, files, names, stuff, out: Path, tqdm) -> None:
    size = model.config.image_size
    forward = make_forward(model, args.batch_size, masked_attn=False)
    panoptic_json, instances = [], []
    for sub in {"panoptic": ["panoptic"], "semantic": ["semantic"]}.get(args.task, []):
        (out / sub).mkdir()
    for start in tqdm(range(0, len(files), args.batch_size), desc="predict", unit="batch"):
        chunk = files[start : start + args.batch_size]
        images = [load_image(f) for f in chunk]
        if args.task == "panoptic":
            preds = predict.predict_panoptic(forward, images, size, stuff_classes=stuff)
        elif args.task == "instance":
            preds = predict.predict_instance(forward, images, size)
        else:
            preds = predict.predict_semantic(forward, images, size)
        for path, image, pred in zip(chunk, images, preds):
            stem = path.stem
            if args.task == "panoptic":
                picture = visualize.panoptic_overlay(image, pred, names)
                panoptic_json.append(write_panoptic_png(out / "panoptic", stem, pred, image_id=stem))
            elif args.task == "instance":
                picture = visualize.instance_overlay(image, pred["masks"], pred["labels"], pred["scores"], names)
                instances += coco_results(pred, image_id=stem)
            else:
                picture = visualize.semantic_overlay(image, pred, len(names))
                Image.fromarray(pred.astype(np.uint8 if len(names) <= 256 else np.uint16)).save(
                    out / "semantic" / f"{stem}.png")
            Image.fromarray(picture).save(out / f"{stem}_overlay.png")
    categories = [{"id": k + 1, "name": n, "isthing": int(k not in stuff)} for k, n in enumerate(names)]
    if args.task == "panoptic":
        (out / "panoptic.json").write_text(json.dumps({"annotations": panoptic_json, "categories": categories}))
    elif args.task == "instance":
        (out / "instances.json").write_text(json.dumps(instances))


if __name__ == "__main__":
    raise SystemExit(main())
