"""Segment photos with a converted EoMT checkpoint, in three lines:

    from eomt_jax import Segmenter
    seg = Segmenter("checkpoints/coco_panoptic_eomt_large_640")  # or a hub id: "tue-mps/coco_panoptic_eomt_large_640"
    result = seg("street.jpg")      # a path, a PIL image or a uint8 (H, W, 3) array; a list of them gives a list
    result.segmentation             # int32 (H, W)
    result.segments                 # [{"id", "label_id", "label", "score", "area", "is_thing"}, ...]
    result.overlay()                # uint8 (H, W, 3): the picture `python -m eomt_jax.predict` writes

The task (panoptic, instance or semantic) and the class names are those stored with the checkpoint (at conversion
from a model-zoo name or `--dataset`, or by a training run); both can be given instead. The network runs on the
padded S×S input (panoptic, instance) or S×S windows (semantic) exactly as the original evaluates, with masked
attention off; results are at each image's own resolution. Compiled programs are kept on disk
(`eomt_jax.caches`), so a second process with the same model and image sizes starts without compiling.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from eomt_jax import caches, pretrained
from eomt_jax.data.classes import dataset_classes
from eomt_jax.inference.formats import TASKS
from eomt_jax.inference.forward import make_forward
from eomt_jax.inference.images import as_rgb8
from eomt_jax.inference.overlays import overlay
from eomt_jax.inference.pipeline import predict
from eomt_jax.inference.postprocess import OVERLAP_THRESHOLD, SCORE_THRESHOLD, TOP_K
from eomt_jax.models.eomt import PRECISIONS

# Instances scoring below this are left out of a result (and of the overlay): the original ranks the top 100
# (query, class) pairs for mAP and thresholds nothing, which suits scoring but not a picture.
INSTANCE_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True, eq=False)
class Segmentation:
    """One image's result.

    segmentation  int32 (H, W). Panoptic and instance: the `id` of the segment covering the pixel, -1 where none
                  does (an instance pixel covered by several masks shows the best-scoring one). Semantic: the
                  class index of the pixel.
    segments      one dict per segment, in id order: `id`, `label_id` (class index), `label` (class name),
                  `score` (panoptic: the class probability of the segment's query; instance: class probability ×
                  mask score; semantic: None), `area` (pixels of `segmentation`; instance: of its whole mask),
                  `is_thing`.
    masks         instance: bool (n, H, W), the full mask of each segment (masks may overlap); else None.
    prediction    the pipeline's own output (`eomt_jax.inference.pipeline.predict`), which the prediction files
                  are written from.
    """

    task: str
    image: np.ndarray
    segmentation: np.ndarray
    segments: list[dict[str, Any]]
    masks: np.ndarray | None
    prediction: Any
    class_names: tuple[str, ...]

    def overlay(self) -> np.ndarray:
        """uint8 (H, W, 3): the image with the segments drawn and named (the CLI's `<stem>_overlay.png`)."""
        return overlay(self.task, self.image, self.prediction, self.class_names)

    def save_overlay(self, path: str | os.PathLike) -> None:
        Image.fromarray(self.overlay()).save(path)


class Segmenter:
    """A converted checkpoint, ready to segment images: `Segmenter(checkpoint)(images)` (see the module docstring).

    checkpoint         a converted checkpoint directory (`convert/torch_to_flax.py`, or a training run's
                       `<workdir>/model`), or a Hugging Face hub id (`owner/name`) of weights the converter reads:
                       fetched with `huggingface_hub` and converted once into `eomt_jax.caches.hub_checkpoint`;
                       `base` is the DINOv3 backbone a `*_dinov3` zoo delta needs.
    task               panoptic, instance or semantic (default: the checkpoint's).
    dataset            name the classes after this dataset setting (e.g. "coco_panoptic") instead of the
                       checkpoint's names; without names anywhere the classes are numbered.
    dtype              precision policy: "float32" (default), "bfloat16" (fastest on accelerators) or
                       "mixed_bfloat16" (the original's autocast).
    score_threshold, overlap_threshold   panoptic merging (the original's 0.8 and 0.8).
    top_k              instance: (query, class) pairs ranked (the original's 100); `instance_threshold` drops
                       those scoring below it from the results.
    batch_size         images per network call; a list of images runs in chunks of this many (one compilation).
    compilation_cache  keep compiled programs on disk (`eomt_jax.caches`); False leaves JAX's setting alone.
    """

    def __init__(self, checkpoint: str | os.PathLike, *, task: str | None = None, dataset: str | None = None,
                 dtype: str | None = None, attention: str | None = None,
                 score_threshold: float = SCORE_THRESHOLD, overlap_threshold: float = OVERLAP_THRESHOLD,
                 top_k: int = TOP_K, instance_threshold: float = INSTANCE_THRESHOLD, batch_size: int = 1,
                 base: str | os.PathLike | None = None, compilation_cache: bool = True):
        if compilation_cache:
            caches.enable_compilation_cache()
        if dtype is not None and dtype not in PRECISIONS:
            raise ValueError(f"dtype must be one of {sorted(PRECISIONS)}, got {dtype!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.checkpoint = resolve_checkpoint(checkpoint, base=base)
        meta = pretrained.read_metadata(self.checkpoint)
        self.task = task or meta.get("task")
        if self.task is None:
            raise ValueError(f"{self.checkpoint} does not say which task it was trained for; pass task= (predict: "
                             f"--task) one of {', '.join(TASKS)}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        self.model = pretrained.load(self.checkpoint, dtype=dtype, attention=attention)
        num_classes = self.model.config.num_classes
        if dataset is not None:
            names, stuff = dataset_classes(dataset)
        elif "class_names" in meta:
            names, stuff = list(meta["class_names"]), list(meta.get("stuff_classes", []))
        else:
            names, stuff = [f"class {k}" for k in range(num_classes)], []
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for a checkpoint with {num_classes} classes")
        self.class_names, self.stuff_classes = tuple(names), tuple(int(k) for k in stuff)
        self.dataset = dataset or meta.get("dataset")
        self.image_size = self.model.config.image_size
        self.score_threshold, self.overlap_threshold = score_threshold, overlap_threshold
        self.top_k, self.instance_threshold = top_k, instance_threshold
        self.batch_size = batch_size
        self._forward = make_forward(self.model, batch_size, masked_attn=False)

    def __repr__(self) -> str:
        return (f"Segmenter({str(self.checkpoint)!r}, task={self.task!r}, {len(self.class_names)} classes, "
                f"image_size={self.image_size}, dtype={self.model.config.dtype!r})")

    def __call__(self, images) -> Segmentation | list[Segmentation]:
        """One image (a path, a PIL image or a uint8 array) -> a `Segmentation`; a list or tuple of them, or a
        uint8 (N, H, W, 3) array -> a list, predicted together."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        single = not isinstance(images, (list, tuple))
        arrays = [as_rgb8(image) for image in ([images] if single else images)]
        if not arrays:
            return []
        results = self.predict_arrays(arrays)
        return results[0] if single else results

    def predict_arrays(self, images: Sequence[np.ndarray]) -> list[Segmentation]:
        """uint8 RGB (H, W, 3) arrays -> their `Segmentation`s, in one pass of the pipeline."""
        preds = predict(self.task, self._forward, list(images), self.image_size, stuff_classes=self.stuff_classes,
                        score_threshold=self.score_threshold, overlap_threshold=self.overlap_threshold,
                        top_k=self.top_k, with_scores=True)
        return [self._result(image, pred) for image, pred in zip(images, preds)]

    def _result(self, image: np.ndarray, pred) -> Segmentation:
        masks = None
        if self.task == "panoptic":
            pred, scores = pred
            segmentation, segments = _panoptic_segments(pred, scores, self.class_names, self.stuff_classes)
        elif self.task == "instance":
            segmentation, segments, masks = _instance_segments(pred, self.class_names, self.instance_threshold)
        else:
            segmentation, segments = _semantic_segments(pred, self.class_names, self.stuff_classes)
        return Segmentation(self.task, image, segmentation, segments, masks, pred, self.class_names)


def _segment(k, label, names, score, area, is_thing) -> dict[str, Any]:
    return {"id": int(k), "label_id": int(label), "label": names[int(label)],
            "score": None if score is None else float(score), "area": int(area), "is_thing": bool(is_thing)}


def _panoptic_segments(pred, scores, names, stuff):
    ids = pred[..., 1].astype(np.int32)
    assigned = ids >= 0
    # One pass over the pixels: every segment's area and (its pixels all carry its query's class) its class.
    present, first, areas = np.unique(ids[assigned], return_index=True, return_counts=True)
    labels = pred[..., 0][assigned][first]
    return ids, [_segment(k, label, names, scores[k], area, int(label) not in stuff)
                 for k, label, area in zip(present, labels, areas)]


def _instance_segments(pred, names, threshold):
    keep = [k for k in np.argsort(-pred["scores"], kind="stable") if pred["scores"][k] >= threshold]
    masks = pred["masks"][keep].astype(bool)
    # Each pixel shows the best-scoring mask covering it: the first one, as the masks are sorted by score.
    segmentation = (np.where(masks.any(0), masks.argmax(0), -1) if len(keep)
                    else np.full(pred["masks"].shape[1:], -1)).astype(np.int32)
    segments = [_segment(k, pred["labels"][q], names, pred["scores"][q], masks[k].sum(), True)
                for k, q in enumerate(keep)]
    return segmentation, segments, masks


def _semantic_segments(pred, names, stuff):
    segmentation = pred.astype(np.int32)
    labels, areas = np.unique(segmentation, return_counts=True)
    return segmentation, [_segment(c, c, names, None, a, c not in stuff)
                          for c, a in zip(labels, areas) if 0 <= c < len(names)]


def resolve_checkpoint(checkpoint: str | os.PathLike, *, base: str | os.PathLike | None = None) -> Path:
    """A converted checkpoint directory for `checkpoint`: the directory itself, or, for a Hugging Face hub id
    that is not a local path, its conversion in `caches.hub_checkpoint(id)` (made on first use)."""
    path = Path(checkpoint).expanduser()
    if (path / pretrained.CONFIG_FILE).is_file():
        return path
    if path.exists():
        raise ValueError(f"{path} is not a converted EoMT checkpoint directory (no {pretrained.CONFIG_FILE}); "
                         f"convert it first: python convert/torch_to_flax.py --src {path} --dst DIR")
    text = str(checkpoint)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint directory (nor a hub id of the form owner/name)")
    cached = caches.hub_checkpoint(text)
    if (cached / pretrained.CONFIG_FILE).is_file():
        return cached
    from eomt_jax.conversion import ConversionError, convert
    from eomt_jax.conversion.reading import resolve_src

    try:
        src = resolve_src(text)
        convert(src, cached, base=resolve_src(str(base)) if base is not None else None)
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 - hub errors (offline, unknown repo, gated) come in many types
        raise ValueError(f"{text}: cannot fetch it from the Hugging Face hub ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    return cached
