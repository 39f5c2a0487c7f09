"""`python -m eomt_jax.predict`: run a converted checkpoint on your own images.

    python -m eomt_jax.predict --checkpoint checkpoints/coco_panoptic_eomt_large_640 \\
        --input photos/ street.jpg --output predictions/ [--task panoptic] [--dataset coco_panoptic] \\
        [--gt-json FILE] [--batch-size 4] [--dtype bfloat16] [--overwrite]

The loop over `eomt_jax.Segmenter`: the task defaults to the checkpoint's, compiled programs are cached on disk.

For every image: `<stem>_overlay.png` (panoptic colours with class names, instance outlines with scores, or a
semantic palette) and the standard prediction files:
  panoptic  `panoptic/<stem>.png` (COCO panoptic RGB ids) + `panoptic.json` (COCO panoptic images/annotations)
  instance  `instances.json` (COCO results with RLE masks)
  semantic  `semantic/<stem>.png` (single-channel class indices)
and `images.json`, the COCO "images" list (id, file_name, height, width) of the images predicted.
Class names come from the checkpoint's metadata, else from `--dataset`, else they are numbered.

Ids, so that `python -m eomt_jax.evaluate` can score the files against an annotation file:
  image ids     with `--gt-json` those of its "images" entries with the same file name (else the same stem; an
                image it does not list fails); else, when every file stem is a number (COCO's `000000039769.jpg`),
                that number (39769); else 1, 2, ... in input order. images.json records which is which.
  category ids  with `--gt-json` those of its categories (sorted by id, one per class); else the dataset's own
                for COCO checkpoints (`--dataset`, else the one stored at conversion); else the class index + 1.

Images are read as `eomt_jax.inference.images.load_image` reads them (EXIF orientation applied, 16-bit and float
images scaled to 8 bits). Each image is predicted and written on its own: an image that cannot be read or predicted is
reported (`error: FILE: reason`) and skipped, and the others are still written. The JSON files are written at the
end, also when some images failed or the run is interrupted. Every file is written under a temporary name and
renamed into place. The exit status is 0 when every image was written and 1 otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from eomt_jax.data import classes
from eomt_jax.inference.formats import TASKS, PredictionWriter, plus_one, save_png
from eomt_jax.inference.images import first_line, load_image
from eomt_jax.jsonio import read_json
from eomt_jax.models.eomt import PRECISIONS
from eomt_jax.segmenter import Segmentation, Segmenter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Category ids of the datasets whose annotation files use ids of their own (as the data sources write them).
DATASET_CATEGORY_IDS = {"coco_panoptic": classes.COCO_PANOPTIC_IDS, "coco_instance": classes.COCO_THING_IDS}


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


# ----------------------------------------------------------------------------------------------------- ids


def _gt_categories(gt: dict, gt_json: str, num_classes: int) -> Callable[[int], int]:
    try:
        ids = sorted(int(c["id"]) for c in gt["categories"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{gt_json}: every 'categories' entry needs an integer 'id'") from None
    if len(ids) != num_classes:
        raise ValueError(f"{gt_json}: {len(ids)} categories, but the checkpoint predicts {num_classes} classes")
    return lambda label: ids[label]


def category_ids(gt: dict | None, gt_json: str | None, dataset: str | None, num_classes: int):
    """class index -> category id: from the annotation file, else the dataset's own, else index + 1."""
    if gt is not None:
        return _gt_categories(gt, gt_json, num_classes)
    if dataset in DATASET_CATEGORY_IDS and len(DATASET_CATEGORY_IDS[dataset]) == num_classes:
        ids = DATASET_CATEGORY_IDS[dataset]
        return lambda label: int(ids[label])
    return plus_one


def image_ids(files: list[Path], gt: dict | None, gt_json: str | None) -> tuple[dict[Path, int], dict[Path, str], str]:
    """(id per file, reason per file without one, how the ids were chosen); see the module docstring."""
    if gt is not None:
        by_name, by_stem = {}, {}
        try:
            for entry in gt["images"]:
                name = Path(str(entry["file_name"])).name
                by_name[name] = by_stem[Path(name).stem] = int(entry["id"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{gt_json}: every 'images' entry needs an integer 'id' and a 'file_name'") from None
        ids, missing = {}, {}
        for f in files:
            found = by_name.get(f.name, by_stem.get(f.stem))
            if found is None:
                missing[f] = f"no entry with file name {f.name} in the 'images' of {gt_json}"
            else:
                ids[f] = found
        return ids, missing, f"image ids from {gt_json}"
    numbers = [int(f.stem) if f.stem.isdigit() else None for f in files]
    if None not in numbers and len(set(numbers)) == len(numbers):
        return dict(zip(files, numbers)), {}, "image ids from the file names"
    return ({f: k + 1 for k, f in enumerate(files)}, {},
            "image ids 1..N in input order (the file names are not all distinct numbers); see images.json")


# ------------------------------------------------------------------------------------------------ the CLI


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eomt_jax.predict", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="converted checkpoint directory")
    p.add_argument("--task", choices=TASKS, help="default: the task stored with the checkpoint")
    p.add_argument("--input", required=True, nargs="+", help="image files and/or folders")
    p.add_argument("--output", required=True,
                   help="output folder (created; an existing one only with --overwrite)")
    p.add_argument("--dataset", choices=sorted(classes.DATASETS),
                   help="name the classes (and COCO category ids) after this dataset instead of the checkpoint's")
    p.add_argument("--gt-json", help="COCO annotation file whose image and category ids the predictions use "
                                     "(images matched by file name)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--dtype", choices=sorted(PRECISIONS),
                   help="precision policy (default: the checkpoint's, float32); mixed_bfloat16 computes as the "
                        "original's autocast; bfloat16 runs fastest on accelerators and on CPUs with bf16 matrix units "
                        "(AMX), at bf16 accuracy")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing output folder, replacing files of the same names")
    args = p.parse_args(argv)
    try:
        return _main(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}")
        return 1


def _main(args) -> int:
    files = find_images(args.input)
    out = Path(args.output)
    if out.exists() and not (args.overwrite and out.is_dir()):
        raise FileExistsError(f"{out} already exists; pass --overwrite to write into it" if out.is_dir()
                              else f"{out} exists and is not a folder")
    gt = read_json(args.gt_json, ("images", "categories")) if args.gt_json else None
    # Fewer images than --batch-size: a smaller batch, not padding that would be computed for nothing.
    batch_size = min(args.batch_size, len(files))
    seg = Segmenter(args.checkpoint, task=args.task, dataset=args.dataset, dtype=args.dtype, batch_size=batch_size)
    task, names = seg.task, seg.class_names
    category_id = category_ids(gt, args.gt_json, seg.dataset, len(names))
    ids, failures, how = image_ids(files, gt, args.gt_json)
    if task != "semantic":
        print(how)
    for f, reason in failures.items():
        print(f"error: {f}: {reason}")

    writer = PredictionWriter(out, task, names, seg.stuff_classes, category_id=category_id)
    todo = [f for f in files if f not in failures]
    try:
        with tqdm(total=len(todo), desc="predict", unit="image") as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                for path, result in _predict_batch(seg, batch):
                    bar.update(1)
                    if not isinstance(result, str):
                        result = _write(out, writer, path, ids[path], result)
                    if result is not None:
                        failures[path] = result
                        tqdm.write(f"error: {path}: {result}")
    finally:
        writer.close()  # the images written so far, even when interrupted
    done = len(files) - len(failures)
    if failures:
        named = ", ".join(f.name for f in list(failures)[:5]) + (", ..." if len(failures) > 5 else "")
        print(f"wrote predictions for {done} of {len(files)} image(s) to {out}; {len(failures)} failed ({named})")
        return 1
    print(f"wrote predictions for {done} image(s) to {out}")
    return 0


def _write(out: Path, writer: PredictionWriter, path: Path, image_id: int, result: Segmentation) -> str | None:
    """The image's overlay and prediction files; the reason when they cannot be written."""
    try:
        save_png(out / f"{path.stem}_overlay.png", result.overlay())
        writer.add(path.stem, result.prediction, image_id=image_id, file_name=path.name)
    except Exception as e:  # noqa: BLE001 - a file that cannot be written fails this image only
        return f"cannot write the outputs ({first_line(e)})"
    return None


def _predict_batch(seg: Segmenter, paths: list[Path]) -> Iterator[tuple[Path, str | Segmentation]]:
    """(path, result) per image of `paths`, or (path, reason) for an image that failed. A batch that fails is
    retried image by image, so one impossible image does not take the others with it."""
    loaded = []
    for path in paths:
        try:
            loaded.append((path, load_image(path)))
        except ValueError as e:
            yield path, str(e)
    if not loaded:
        return
    try:
        results = seg.predict_arrays([image for _, image in loaded])
    except Exception as e:  # noqa: BLE001 - isolated below
        if len(loaded) == 1:
            yield loaded[0][0], f"cannot predict ({first_line(e)})"
            return
    else:
        yield from zip([path for path, _ in loaded], results)
        return
    for path, image in loaded:
        try:
            yield path, seg.predict_arrays([image])[0]
        except Exception as e:  # noqa: BLE001 - this image fails, the others go on
            yield path, f"cannot predict ({first_line(e)})"


if __name__ == "__main__":
    raise SystemExit(main())
