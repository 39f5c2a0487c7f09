"""Random-access data sources that read the official dataset zips in place (nothing is unpacked or converted).

Every source is a Grain-compatible random-access source (`len(source)`, `source[i]`) whose records are dicts:

    image     uint8 (H, W, 3)   the image at its original resolution
    masks     bool  (N, H, W)   one mask per segment
    labels    int32 (N,)        contiguous class ids (see `classes.py`)
    is_crowd  bool  (N,)
    image_id  str               the image file's stem

and which also exposes `class_names`, `stuff_classes` and `num_classes`. Index order, skipped images and
class maps follow the original EoMT data modules, so image `i` is the same image in both implementations.
Use `load_source(name, root, split)`; `SOURCES` lists the names.
"""

from __future__ import annotations

import abc

import concurrent.futures
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from eomt_jax.data import classes
from eomt_jax.data.archives import (DataError, FileReader, FolderReader, Reader, ZipReader, decode_image,
                                    decode_png)
from eomt_jax.data.transforms import resize_nearest

Record = dict[str, Any]
_SPLITS = ("train", "val")


def _index_order(member: str) -> tuple[int, str]:
    # The original sorts by the first integer in the path, then the path. Every official path starts with
    # a folder holding a number (train2017, ADEChallengeData2016, leftImg8bit), so this is path order.
    number = re.search(r"\d+", member)
    return (int(number.group()) if number else -1, member)


def _stem(member: str) -> str:
    return os.path.splitext(os.path.basename(member))[0]


def check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


def _read_json(reader: Reader, member: str) -> Any:
    try:
        return json.loads(reader.read(member))
    except json.JSONDecodeError as e:
        raise DataError(f"{reader.where}: member {member!r} is not valid JSON ({e})") from e


def make_record(image, masks: list[np.ndarray], labels: list[int], is_crowd: list[bool], image_id: str) -> Record:
    """A record dict with the documented dtypes and shapes (also for an image without any segment)."""
    h, w = image.shape[:2]
    return {
        "image": image,
        "masks": np.stack(masks).astype(bool) if masks else np.zeros((0, h, w), bool),
        "labels": np.asarray(labels, np.int32).reshape(-1),
        "is_crowd": np.asarray(is_crowd, bool).reshape(-1),
        "image_id": image_id,
    }


def _read_target(reader: Reader, member: str, image: np.ndarray) -> np.ndarray:
    target = decode_png(reader, member)
    if target.shape[:2] != image.shape[:2]:
        # The original resizes a target of another size to the image with nearest-neighbour sampling.
        target = resize_nearest(target, image.shape[:2])
    return target


def _image_members(reader: Reader, folder: str, suffix: str) -> list[str]:
    return sorted((n for n in reader.names() if n.startswith(folder) and n.endswith(suffix)), key=_index_order)


def _parallel_filter(keep: Callable[[Any], bool], items: Sequence[Any]) -> list[Any]:
    # Index building decodes every target PNG once; PIL releases the GIL while decoding, so threads help.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool:
        flags = list(pool.map(keep, items))
    return [item for item, k in zip(items, flags) if k]


def hold_out(entries: list[Any], split: str, fraction: float, where: str, seed: int = 0) -> list[Any]:
    """The `split` part of a fixed, seeded division of one split's entries: `fraction` of them (at least one) are
    "val", the others "train". The division depends only on the number of entries and `seed`, so every run and
    every process sees the same two parts."""
    if not 0 < fraction < 1:
        raise DataError(f"{where}: the val fraction must lie in (0, 1), got {fraction}")
    n = len(entries)
    n_val = max(1, int(fraction * n + 0.5))
    if n_val >= n:
        raise DataError(f"{where}: {n} image(s) cannot be divided into train and val with a val fraction of "
                        f"{fraction}; give a separate val split")
    val = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return [e for i, e in enumerate(entries) if (i in val) == (split == "val")]


class Source(abc.ABC):
    """Base of every source: a list of index entries and a loader turning one entry into a record."""

    class_names: list[str]
    stuff_classes: list[int]

    def __init__(self, entries: list[Any], description: str):
        if not entries:
            raise DataError(f"{description}: no usable image found; expected images with annotations of the "
                            "same split (are the image and annotation files from the same dataset and split?)")
        self._entries = entries

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> Record:
        return self._load(self._entries[index])

    @abc.abstractmethod
    def _load(self, entry: Any) -> Record:
        """One index entry -> a record."""

    def category_id(self, label: int) -> int:
        """The dataset's own category id of a contiguous label, as its annotation files write it (COCO's ids;
        label + 1 for datasets without ids of their own)."""
        to_label = getattr(self, "_id_to_label", None)
        if not to_label:
            return label + 1
        if getattr(self, "_label_to_id", None) is None:
            self._label_to_id = {lab: cat for cat, lab in to_label.items()}
        return int(self._label_to_id.get(label, label + 1))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes)"


def _categories_from_json(categories: list[dict], where: str) -> tuple[dict[int, int], list[str], list[int]]:
    """A user's COCO categories -> (id -> contiguous label, names, stuff labels); labels follow sorted ids."""
    try:
        ordered = sorted(categories, key=lambda c: c["id"])
        id_to_label = {c["id"]: i for i, c in enumerate(ordered)}
        names = [str(c.get("name", c["id"])) for c in ordered]
        stuff = [i for i, c in enumerate(ordered) if c.get("isthing", 1) == 0]
    except (KeyError, TypeError) as e:
        raise DataError(f"{where}: 'categories' entries need an integer 'id' ({e!r})") from e
    if not ordered:
        raise DataError(f"{where}: 'categories' is empty")
    return id_to_label, names, stuff


# --------------------------------------------------------------------------------------------- COCO panoptic


class COCOPanoptic(Source):
    """COCO panoptic (133 classes) from `{split}2017.zip` and `panoptic_annotations_trainval2017.zip`.

    The per-image segment PNGs are read from the zip nested inside the annotations zip. An image is skipped
    when the JSON has no segment for it. With `classes_from_json` the class list comes from the JSON's
    categories (a user's dataset in the COCO layout, e.g. the generated `shapes` dataset).

    `images`, `pngs` and `annotations` name a user's files instead (see `coco_format`); then every annotated
    image must have its PNG, of its own size. `val_fraction` > 0 reads the train files and keeps the `split`
    part of their fixed division (`hold_out`).
    """

    def __init__(self, root: str | os.PathLike, split: str, *, classes_from_json: bool = False,
                 images: Reader | None = None, pngs: Reader | None = None,
                 annotations: tuple[Reader, str] | None = None, val_fraction: float = 0.0):
        check_split(split)
        files = "train" if val_fraction else split
        self._user_layout = annotations is not None
        if annotations is None:
            ann_zip = ZipReader(os.path.join(root, "panoptic_annotations_trainval2017.zip"))
            annotations = (ann_zip, f"annotations/panoptic_{files}2017.json")
            pngs = ZipReader(ann_zip.path, nested=f"annotations/panoptic_{files}2017.zip")
            images = ZipReader(os.path.join(root, f"{files}2017.zip"))
            image_folder, self._png_folder = f"{files}2017/", f"panoptic_{files}2017/"
        else:  # a user's folder layout (see `coco_format`): members are found by file name anywhere
            image_folder, self._png_folder = "", None
        self._images, self._pngs = images, pngs
        reader, member = annotations
        data = _read_json(reader, member)
        where = f"{reader.where}: {member}"
        try:
            if classes_from_json:
                self._id_to_label, self.class_names, self.stuff_classes = _categories_from_json(
                    data["categories"], where)
            else:
                self._id_to_label = classes.COCO_PANOPTIC_ID_TO_LABEL
                self.class_names, self.stuff_classes = list(classes.COCO_PANOPTIC_NAMES), list(
                    classes.COCO_PANOPTIC_STUFF)
            file_names = {img["id"]: img["file_name"] for img in data["images"]}
            segments = {}
            for ann in data["annotations"]:
                segs = tuple((s["id"], s["category_id"], bool(s.get("iscrowd", 0))) for s in ann["segments_info"])
                segments[_stem(file_names[ann["image_id"]])] = (_stem(ann["file_name"]), segs)
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: not a COCO panoptic annotation file (missing or malformed {e})") from e

        if self._png_folder is None:
            self._png_members = {_stem(n): n for n in pngs.names() if n.endswith(".png")}
        entries = []
        for m in _image_members(images, image_folder, ".jpg" if image_folder else ""):
            stem = _stem(m)
            if stem in segments and segments[stem][1]:
                entries.append((m, *segments[stem]))
        if self._user_layout:
            _check_user_files(images, [e[0] for e in entries], segments, where)
            missing = sorted(f"{png}.png" for _, png, _ in entries if png not in self._png_members)
            if missing:
                raise DataError(f"{pngs.where}: {len(missing)} segment PNG(s) named in {where} are missing (e.g. "
                                f"{', '.join(missing[:5])}); every annotated image needs its PNG")
        if val_fraction:
            entries = hold_out(entries, split, val_fraction, f"{images.where} with {where}")
        super().__init__(entries, f"{images.where} with {where}")

    def _png_member(self, png_stem: str) -> str:
        if self._png_folder is not None:
            return f"{self._png_folder}{png_stem}.png"
        if png_stem not in self._png_members:
            raise DataError(f"{self._pngs.where}: no PNG named {png_stem}.png for the JSON's segments")
        return self._png_members[png_stem]

    def _load(self, entry) -> Record:
        image_member, png_stem, segments = entry
        image = decode_image(self._images, image_member)
        png_member = self._png_member(png_stem)
        if self._user_layout:
            png = decode_png(self._pngs, png_member)
            _check_same_size(self._images, image_member, image, self._pngs, png_member, png)
        else:
            png = _read_target(self._pngs, png_member, image)
        if png.ndim != 3:
            raise DataError(f"{self._pngs.where}: {png_member!r} must be an RGB panoptic PNG, got shape {png.shape}")
        png = png.astype(np.int32)
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        masks, labels, crowd = [], [], []
        for seg_id, category, is_crowd in sorted(segments):
            label = self._id_to_label.get(category)
            if label is None:
                continue
            mask = ids == seg_id
            if mask.any():
                masks.append(mask)
                labels.append(label)
                crowd.append(is_crowd)
        return make_record(image, masks, labels, crowd, _stem(image_member))


# --------------------------------------------------------------------------------------------- COCO instance


class COCOInstance(Source):
    """COCO instance segmentation (80 classes) from `{split}2017.zip` and `annotations_trainval2017.zip`.

    Masks are decoded from the JSON's polygons / RLEs. Images without annotations are skipped; crowd
    annotations are kept (training drops them). `images` and `annotations` name a user's files instead (see
    `coco_format`); `val_fraction` as for `COCOPanoptic`.
    """

    def __init__(self, root: str | os.PathLike, split: str, *, classes_from_json: bool = False,
                 images: Reader | None = None, annotations: tuple[Reader, str] | None = None,
                 val_fraction: float = 0.0):
        check_split(split)
        files = "train" if val_fraction else split
        user_layout = annotations is not None
        image_folder = ""
        if annotations is None:
            annotations = (ZipReader(os.path.join(root, "annotations_trainval2017.zip")),
                           f"annotations/instances_{files}2017.json")
            images, image_folder = ZipReader(os.path.join(root, f"{files}2017.zip")), f"{files}2017/"
        self._images = images
        reader, member = annotations
        self._where = where = f"{reader.where}: {member}"
        data = _read_json(reader, member)
        try:
            if classes_from_json:
                self._id_to_label, self.class_names, self.stuff_classes = _categories_from_json(
                    data["categories"], where)
            else:
                self._id_to_label = classes.COCO_INSTANCE_ID_TO_LABEL
                self.class_names, self.stuff_classes = list(classes.COCO_THING_NAMES), []
            image_info = {img["id"]: img for img in data["images"]}
            per_image: dict[str, list] = {}
            for ann in data["annotations"]:
                img = image_info[ann["image_id"]]
                per_image.setdefault(_stem(img["file_name"]), [img["height"], img["width"], []])[2].append(
                    (ann["category_id"], int(ann.get("iscrowd", 0)), ann["segmentation"]))
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: not a COCO instance annotation file (missing or malformed {e})") from e
        entries = []
        for m in _image_members(images, image_folder, ".jpg" if image_folder else ""):
            stem = _stem(m)
            if stem in per_image:
                h, w, anns = per_image[stem]
                # Kept as compact JSON text: the train JSON as Python objects would take gigabytes in every
                # worker process.
                entries.append((m, h, w, json.dumps(anns, separators=(",", ":"))))
        if user_layout:
            _check_user_files(images, [e[0] for e in entries], per_image, where)
        if val_fraction:
            entries = hold_out(entries, split, val_fraction, f"{images.where} with {where}")
        super().__init__(entries, f"{images.where} with {where}")

    def _load(self, entry) -> Record:
        image_member, h, w, anns = entry
        image = decode_image(self._images, image_member)
        if image.shape[:2] != (h, w):
            raise DataError(f"{self._images.where}: {image_member!r} is {image.shape[1]}x{image.shape[0]} but "
                            f"{self._where} says {w}x{h}")
        masks, labels, crowd = [], [], []
        for category, is_crowd, segmentation in json.loads(anns):
            label = self._id_to_label.get(category)
            if label is None:
                continue
            try:
                if isinstance(segmentation, list):  # polygons: one RLE per polygon, merged
                    rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, h, w))
                elif isinstance(segmentation["counts"], list):  # uncompressed RLE (crowd annotations)
                    rle = coco_mask.frPyObjects(segmentation, h, w)
                else:
                    rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
                with warnings.catch_warnings():  # pycocotools 2.0.x warns about numpy 2's copy keyword
                    warnings.simplefilter("ignore", DeprecationWarning)
                    mask = coco_mask.decode([rle])[..., 0]
            except Exception as e:  # pycocotools raises bare Exceptions / TypeErrors on bad input
                raise DataError(f"{self._where}: bad segmentation for {image_member!r} ({e!r})") from e
            masks.append(mask.astype(bool))
            labels.append(label)
            crowd.append(bool(is_crowd))
        return make_record(image, masks, labels, crowd, _stem(image_member))


# --------------------------------------------------------------------------------------------- ADE20K


def _ade_semantic(target: np.ndarray, keep: Callable[[int], bool] | None = None):
    if target.ndim != 2:
        raise ValueError(f"expected a single-channel annotation PNG, got shape {target.shape}")
    present = np.flatnonzero(np.bincount(target.ravel(), minlength=151)[1:151]) + 1
    values = [int(v) for v in present if keep is None or keep(int(v) - 1)]
    return [target == v for v in values], [v - 1 for v in values]


_ADE_STUFF = frozenset(classes.ADE20K_PANOPTIC_STUFF)


def ade20k_instances(inst: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """Thing masks and labels of an ADE20K instance PNG (red = category 1-100, green = instance id)."""
    if inst.ndim != 3:
        raise ValueError(f"expected an RGB instance PNG, got shape {inst.shape}")
    category, instance_id = inst[..., 0], inst[..., 1]
    masks, labels = [], []
    for i in np.flatnonzero(np.bincount(instance_id.ravel(), minlength=256)[1:]) + 1:
        mask = instance_id == i
        cats = np.unique(category[mask])
        if len(cats) != 1:
            raise ValueError(f"instance {i} spans categories {cats.tolist()} (expected one red value per green id)")
        # Deviation: categories outside 1-100 (0 = unlabeled) are skipped instead of crashing/wrapping.
        if 1 <= cats[0] <= 100:
            masks.append(mask)
            labels.append(classes.ADE20K_INSTANCE_TO_LABEL[cats[0] - 1])
    return masks, labels


class ADE20K(Source):
    """ADE20K (150 classes) from `ADEChallengeData2016.zip`; `panoptic=True` adds `annotations_instance.zip`.

    Semantic: one mask per class present in the annotation PNG (0 = unlabeled). Panoptic: stuff classes from
    the annotation PNG, then one mask per instance of the instance PNG (red = category 1-100, green =
    instance id). Images whose annotation is missing or a single value are skipped (`check_empty_targets`).
    """

    def __init__(self, root: str | os.PathLike, split: str, *, panoptic: bool, check_empty_targets: bool = True):
        check_split(split)
        folder = {"train": "training", "val": "validation"}[split]
        self._zip = ZipReader(os.path.join(root, "ADEChallengeData2016.zip"))
        self._instances = ZipReader(os.path.join(root, "annotations_instance.zip")) if panoptic else None
        self._panoptic = panoptic
        self.class_names = list(classes.ADE20K_NAMES)
        self.stuff_classes = list(classes.ADE20K_PANOPTIC_STUFF) if panoptic else []
        entries = []
        for m in _image_members(self._zip, f"ADEChallengeData2016/images/{folder}/", ".jpg"):
            stem = _stem(m)
            target = f"ADEChallengeData2016/annotations/{folder}/{stem}.png"
            instance = f"annotations_instance/{folder}/{stem}.png" if panoptic else None
            if target in self._zip and (instance is None or instance in self._instances):
                entries.append((m, target, instance))
        if check_empty_targets:
            entries = _parallel_filter(self._has_targets, entries)
        super().__init__(entries, f"{self._zip.where} ({folder})")

    def _has_targets(self, entry) -> bool:
        _, target, instance = entry
        png = decode_png(self._zip, target)
        if png.min() == png.max():
            return False
        if instance is not None:
            inst = decode_png(self._instances, instance)
            if all(inst[..., c].min() == inst[..., c].max() for c in range(inst.shape[-1])):
                # A constant instance PNG: keep the image only if its stuff classes yield any label.
                return bool(_ade_semantic(png, _ADE_STUFF.__contains__)[1])
        return True

    def _load(self, entry) -> Record:
        image_member, target_member, instance_member = entry
        image = decode_image(self._zip, image_member)
        target = _read_target(self._zip, target_member, image)
        try:
            masks, labels = _ade_semantic(target, _ADE_STUFF.__contains__ if self._panoptic else None)
        except ValueError as e:
            raise DataError(f"{self._zip.where}: {target_member!r}: {e}") from e
        if instance_member is not None:
            inst = _read_target(self._instances, instance_member, image)
            try:
                inst_masks, inst_labels = ade20k_instances(inst)
            except ValueError as e:
                raise DataError(f"{self._instances.where}: {instance_member!r}: {e}") from e
            masks += inst_masks
            labels += inst_labels
        return make_record(image, masks, labels, [False] * len(labels), _stem(image_member))


# --------------------------------------------------------------------------------------------- Cityscapes


def cityscapes_targets(target: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """One mask per evaluated class in a gtFine labelIds map (H, W), in labelId order."""
    masks, labels = [], []
    for label_id in np.flatnonzero(np.bincount(target.ravel(), minlength=256)):
        if int(label_id) in classes.CITYSCAPES_ID_TO_LABEL:
            masks.append(target == label_id)
            labels.append(classes.CITYSCAPES_ID_TO_LABEL[int(label_id)])
    return masks, labels


class Cityscapes(Source):
    """Cityscapes semantic (19 classes) from `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip`."""

    def __init__(self, root: str | os.PathLike, split: str, *, check_empty_targets: bool = True):
        check_split(split)
        self._images = ZipReader(os.path.join(root, "leftImg8bit_trainvaltest.zip"))
        self._targets = ZipReader(os.path.join(root, "gtFine_trainvaltest.zip"))
        self.class_names, self.stuff_classes = list(classes.CITYSCAPES_NAMES), []
        entries = []
        for m in _image_members(self._images, f"leftImg8bit/{split}/", "_leftImg8bit.png"):
            target = "gtFine/" + m[len("leftImg8bit/"):-len("_leftImg8bit.png")] + "_gtFine_labelIds.png"
            if target in self._targets:
                entries.append((m, target))
        if check_empty_targets:
            entries = _parallel_filter(self._has_targets, entries)
        super().__init__(entries, f"{self._images.where} ({split})")

    def _has_targets(self, entry) -> bool:
        png = decode_png(self._targets, entry[1])
        return png.min() != png.max()

    def _load(self, entry) -> Record:
        image_member, target_member = entry
        image = decode_image(self._images, image_member)
        target = _read_target(self._targets, target_member, image)
        if target.ndim != 2:
            raise DataError(f"{self._targets.where}: {target_member!r} must be a single-channel labelIds PNG")
        masks, labels = cityscapes_targets(target)
        return make_record(image, masks, labels, [False] * len(labels), _stem(image_member))


# --------------------------------------------------------------------------------------------- user datasets

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_log = logging.getLogger("eomt_jax")


def _zip_or_folder(root: str, name: str) -> Reader:
    if os.path.isfile(os.path.join(root, name + ".zip")):
        return ZipReader(os.path.join(root, name + ".zip"))
    if os.path.isdir(os.path.join(root, name)):
        return FolderReader(os.path.join(root, name))
    raise DataError(f"{root}: expected a folder {name}/ or a zip {name}.zip")


def _user_reader(root: str, path: str, what: str) -> Reader:
    """The folder or zip a user named (relative to `root`, or absolute)."""
    full = os.path.join(root, path)
    if os.path.isdir(full):
        return FolderReader(full)
    if os.path.isfile(full):
        return ZipReader(full)
    raise DataError(f"{full}: not found (expected {what}: a folder or a .zip)")


def _check_user_files(images: Reader, found: list[str], annotated, where: str) -> None:
    """Warn about images that a user's JSON annotates but that the image folder or zip does not hold."""
    missing = sorted(set(annotated) - {_stem(m) for m in found})
    if missing and found:
        _log.warning("%s annotates %d image(s) that %s does not hold (e.g. %s); they are left out", where,
                     len(missing), images.where, ", ".join(missing[:5]))


def _check_same_size(images: Reader, image_member: str, image: np.ndarray, targets: Reader, target_member: str,
                     target: np.ndarray) -> None:
    if target.shape[:2] != image.shape[:2]:
        raise DataError(f"{targets.where}: {target_member!r} is {target.shape[1]}x{target.shape[0]} but its image "
                        f"{images.where}: {image_member!r} is {image.shape[1]}x{image.shape[0]}; a mask must have "
                        "its image's size")


def _split_files(given: dict[str, tuple[str, ...]], split: str, val_fraction: float, where: str,
                 names: tuple[str, ...]) -> str:
    """Which split's files a user's layout reads for `split` (train's when the val split is a fraction of it)."""
    check_split(split)
    if val_fraction and any(given["val"]):
        raise DataError(f"{where}: the val split is given twice, as files ({', '.join(n for n, v in zip(names, given['val']) if v)}) "
                        f"and as val_fraction={val_fraction}; give one")
    return "train" if val_fraction else split


def coco_format(root: str | os.PathLike, split: str, *, train_images: str = "", train_json: str = "",
                train_masks: str = "", val_images: str = "", val_json: str = "", val_masks: str = "",
                val_fraction: float = 0.0) -> Source:
    """A user's dataset with COCO annotations, panoptic or instance (told apart by the JSON); the class list comes
    from the JSON's `categories`, and panoptic categories with `isthing: 0` are the stuff classes.

    Each split's files, any names, relative to `root` or absolute:
      * `{split}_json`: the split's COCO panoptic or instance JSON;
      * `{split}_images`: a folder or zip holding its images (matched to the JSON's `file_name` by stem,
        anywhere inside);
      * `{split}_masks`: panoptic only, a folder or zip holding the segment PNGs the JSON names.
    Without a JSON for a split, `root` holds either the official COCO file names (`{split}2017.zip` with
    `panoptic_annotations_trainval2017.zip` or `annotations_trainval2017.zip`, as written by
    `python -m eomt_jax.data.synthetic --kind shapes`), or `{split}.json`, the images in `{split}/` or
    `{split}.zip`, and for panoptic the PNGs in `panoptic_{split}/` or `panoptic_{split}.zip`.
    `val_fraction` > 0 gives no val files: the val split is that fraction of the train split (`hold_out`).

    A user's own layout is checked: every annotated image needs its PNG, of the same size, and a val split.
    """
    root = os.fspath(root)
    given = {"train": (train_images, train_json, train_masks), "val": (val_images, val_json, val_masks)}
    files = _split_files(given, split, val_fraction, root, ("val_images", "val_json", "val_masks"))
    if split == "train" and train_json and not (val_json or val_fraction):
        raise DataError(f"{root}: no val split: give val_json (with val_images, and val_masks for panoptic) or a "
                        "val_fraction of the train split")
    images_path, json_path, masks_path = given[files]
    if not json_path:
        if images_path or masks_path:
            raise DataError(f"{root}: {files}_images / {files}_masks are given without {files}_json")
        if os.path.isfile(os.path.join(root, "panoptic_annotations_trainval2017.zip")):
            return COCOPanoptic(root, split, classes_from_json=True, val_fraction=val_fraction)
        if os.path.isfile(os.path.join(root, "annotations_trainval2017.zip")):
            return COCOInstance(root, split, classes_from_json=True, val_fraction=val_fraction)
        json_path = os.path.join(root, f"{files}.json")
        if not os.path.isfile(json_path):
            raise DataError(f"{json_path}: file not found (expected a COCO panoptic or instance JSON, or the official "
                            f"COCO zips in this folder, or {files}_json naming the JSON)")
        images = _zip_or_folder(root, files)
        masks = (lambda: _zip_or_folder(root, f"panoptic_{files}"))
    else:
        images = _user_reader(root, images_path, f"the {files} images ({files}_images)") if images_path else None
        if images is None:
            raise DataError(f"{os.path.join(root, json_path)}: {files}_images is empty; give the folder or zip of "
                            "the images this JSON annotates")
        masks = (lambda: _user_reader(root, masks_path, f"the {files} panoptic PNGs ({files}_masks)")
                 if masks_path else None)
    annotations = FileReader(os.path.join(root, json_path))
    member = annotations.names()[0]
    data = _read_json(annotations, member)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise DataError(f"{annotations.where}: {member}: expected a COCO JSON with an 'annotations' list")
    if anns and isinstance(anns[0], dict) and "segments_info" in anns[0]:
        pngs = masks()
        if pngs is None:
            raise DataError(f"{annotations.where}: {member} is a COCO panoptic JSON; {files}_masks must name the "
                            "folder or zip of its segment PNGs")
        return COCOPanoptic(root, split, classes_from_json=True, images=images, pngs=pngs,
                            annotations=(annotations, member), val_fraction=val_fraction)
    return COCOInstance(root, split, classes_from_json=True, images=images, annotations=(annotations, member),
                        val_fraction=val_fraction)


# --------------------------------------------------------------------------------------------- semantic folders

_class_counts: dict[tuple, int] = {}


def read_class_names(path: str) -> list[str]:
    """Class names from a text file, one per line in class order (blank lines are skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise DataError(f"{path}: cannot read the class names ({e}); expected a text file, one name per line") from e
    if not names:
        raise DataError(f"{path}: no class names; expected a text file, one name per line")
    return names


class SemanticFolder(Source):
    """Semantic segmentation from a folder (or zip) of images and a folder (or zip) of label PNGs, paired by file
    stem (`photo_001.jpg` with `photo_001.png`, in any sub-folders).

    A label PNG is single-channel (greyscale, 16-bit or palette: the stored values are the class indices). Pixels
    of `ignore_value` (255 by default) are not trained on or scored. With `ignore_zero` (the ADE20K convention)
    0 also marks unlabelled pixels and value v is class v - 1; without it 0 is class 0 (e.g. a background class).
    The class names come from `class_names_file` (one per line, class 0 first), else the classes are numbered up to
    the largest class in the training labels. Every class is a stuff class (one segment per class and image).

    Each split's files are `{split}_images` and `{split}_masks`, relative to `root` or absolute, by default
    `images/{split}` and `labels/{split}`; `val_fraction` > 0 takes the val split from the train split instead
    (`hold_out`). An image without a label PNG is an error when the index is built; a label PNG of another size
    than its image, or with values beyond the class list, is an error naming the file when it is read.
    """

    def __init__(self, root: str | os.PathLike, split: str, *, train_images: str = "", train_masks: str = "",
                 val_images: str = "", val_masks: str = "", val_fraction: float = 0.0, ignore_value: int = 255,
                 ignore_zero: bool = False, class_names_file: str = ""):
        root = os.fspath(root)
        given = {"train": (train_images, train_masks), "val": (val_images, val_masks)}
        files = _split_files(given, split, val_fraction, root, ("val_images", "val_masks"))
        given = {s: (images or f"images/{s}", masks or f"labels/{s}") for s, (images, masks) in given.items()}
        if not val_fraction and not all(os.path.exists(os.path.join(root, p)) for p in given["val"]):
            raise DataError(f"{root}: no val split: {' and '.join(given['val'])} not found; give val_images and "
                            "val_masks, or a val_fraction of the train split")
        self._ignore_value, self._ignore_zero = int(ignore_value), bool(ignore_zero)
        self._images, self._masks, entries = self._pairs(root, *given[files], files)
        if class_names_file:
            self._names_from = os.path.join(root, class_names_file)
            self.class_names = read_class_names(self._names_from)
        else:
            train = self._pairs(root, *given["train"], "train") if files != "train" else (
                self._images, self._masks, entries)
            self._names_from = f"the training labels in {train[1].where}"
            self.class_names = [f"class {k}" for k in range(self._count_classes(train[1], train[2]))]
        self.stuff_classes = list(range(len(self.class_names)))
        if val_fraction:
            entries = hold_out(entries, split, val_fraction, f"{self._images.where} with {self._masks.where}")
        super().__init__(entries, f"{self._images.where} with {self._masks.where}")

    @staticmethod
    def _pairs(root: str, images_path: str, masks_path: str, split: str) -> tuple[Reader, Reader, list]:
        images = _user_reader(root, images_path, f"the {split} images ({split}_images)")
        masks = _user_reader(root, masks_path, f"the {split} label PNGs ({split}_masks)")
        by_stem: dict[str, list[str]] = {}
        for name in images.names():
            if name.lower().endswith(IMAGE_SUFFIXES):
                by_stem.setdefault(_stem(name), []).append(name)
        labels: dict[str, list[str]] = {}
        for name in masks.names():
            if name.lower().endswith(".png"):
                labels.setdefault(_stem(name), []).append(name)
        for reader, found in ((images, by_stem), (masks, labels)):
            twice = sorted(stem for stem, names in found.items() if len(names) > 1)
            if twice:
                raise DataError(f"{reader.where}: several files share the stem(s) {twice[:5]}; images and labels "
                                "are paired by file stem")
        unlabelled = sorted(set(by_stem) - set(labels))
        if unlabelled:
            raise DataError(f"{masks.where}: no label PNG for {len(unlabelled)} image(s) of {images.where} (e.g. "
                            f"{', '.join(by_stem[s][0] for s in unlabelled[:5])}); each image needs a PNG of the "
                            "same file stem")
        stems = sorted(by_stem, key=lambda s: _index_order(by_stem[s][0]))
        return images, masks, [(by_stem[s][0], labels[s][0]) for s in stems]

    def _classes_of(self, label: np.ndarray) -> np.ndarray:
        """(H, W) class index per pixel, -1 where ignored."""
        label = label.astype(np.int64)
        ignored = label == self._ignore_value
        if self._ignore_zero:
            ignored |= label == 0
            label = label - 1
        return np.where(ignored, -1, label)

    @staticmethod
    def _read_label(masks: Reader, member: str) -> np.ndarray:
        label = decode_png(masks, member)
        if label.ndim != 2:
            raise DataError(f"{masks.where}: {member!r} has shape {label.shape}; a label PNG must be single-channel "
                            "(greyscale or palette) holding class indices")
        return label

    def _count_classes(self, masks: Reader, entries: list) -> int:
        """1 + the largest class in the labels of `entries` (each PNG decoded once per process and layout)."""
        key = (masks.where, len(entries), self._ignore_value, self._ignore_zero)
        if key not in _class_counts:

            def largest(entry) -> int:
                return int(self._classes_of(self._read_label(masks, entry[1])).max())

            with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool:
                top = max(pool.map(largest, entries), default=-1)
            if top < 0:
                raise DataError(f"{masks.where}: every label pixel is ignored (ignore_value={self._ignore_value}, "
                                f"ignore_zero={self._ignore_zero}); no class to train")
            _class_counts[key] = top + 1
        return _class_counts[key]

    def _load(self, entry) -> Record:
        image_member, label_member = entry
        image = decode_image(self._images, image_member)
        label = self._read_label(self._masks, label_member)
        _check_same_size(self._images, image_member, image, self._masks, label_member, label)
        cls = self._classes_of(label)
        beyond = np.unique(cls[cls >= self.num_classes])
        if beyond.size:
            offset = 1 if self._ignore_zero else 0
            raise DataError(f"{self._masks.where}: {label_member!r} holds the value(s) "
                            f"{(beyond + offset).tolist()[:10]}, beyond the {self.num_classes} classes of "
                            f"{self._names_from} (values {offset}-{self.num_classes - 1 + offset}, "
                            f"{'0 and ' if self._ignore_zero else ''}{self._ignore_value} ignored)")
        present = np.flatnonzero(np.bincount(cls[cls >= 0].ravel(), minlength=self.num_classes))
        masks = [cls == c for c in present]
        return make_record(image, masks, [int(c) for c in present], [False] * len(masks), _stem(image_member))
