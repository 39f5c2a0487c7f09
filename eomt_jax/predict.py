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
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from eomt_jax import pretrained
from eomt_jax.atomic import atomic_directory
from eomt_jax.data.classes import dataset_classes
from eomt_jax.inference.formats import PredictionWriter
from eomt_jax.inference.forward import make_forward
from eomt_jax.inference.overlays import overlay
from eomt_jax.inference.pipeline import predict
from eomt_jax.models.eomt import PRECISIONS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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
    p.add_argument("--dtype", choices=sorted(PRECISIONS),
                   help="precision policy (default: the checkpoint's, float32); mixed_bfloat16 computes as the "
                        "original's autocast; bfloat16 runs fastest on accelerators and on CPUs with bf16 matrix units "
                        "(AMX), at bf16 accuracy")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        return _main(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}")
        return 1


def _main(args) -> int:
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
        _run(model, args, files, names, stuff, tmp)
    print(f"wrote predictions for {len(files)} image(s) to {out}")
    return 0


def _run(model, args, files, names, stuff, out: Path) -> None:
    forward = make_forward(model, args.batch_size, masked_attn=False)
    writer = PredictionWriter(out, args.task, names, stuff)
    for start in tqdm(range(0, len(files), args.batch_size), desc="predict", unit="batch"):
        chunk = files[start : start + args.batch_size]
        images = [load_image(f) for f in chunk]
        preds = predict(args.task, forward, images, model.config.image_size, stuff_classes=stuff)
        for path, image, pred in zip(chunk, images, preds):
            writer.add(path.stem, pred)
            Image.fromarray(overlay(args.task, image, pred, names)).save(out / f"{path.stem}_overlay.png")
    writer.close()


if __name__ == "__main__":
    raise SystemExit(main())
