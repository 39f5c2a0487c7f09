"""Evaluation of a network on a dataset's validation split: PQ (panoptic), AP (instance) or mIoU (semantic).

Every process predicts its slice of the images (`[process_index::process_count]`); the per-image statistics are
gathered and the metrics computed on process 0, which also writes `eval_metrics.json` (or
`eval_metrics_<step>.json` during training) and overlay pictures of the first images into the workdir.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from eomt_jax import visualize
from eomt_jax.inference import predict

log = logging.getLogger("eomt_jax")


def make_forward(model, batch_size: int, masked_attn: bool):
    """A forward_fn for the predict functions: jitted, padding every call to a fixed batch (one compilation)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images):
        return nnx.merge(graphdef, state)(images, masked_attn=masked_attn)

    def forward(images: np.ndarray):
        n = images.shape[0]
        outs = ([], [])
        for start in range(0, n, batch_size):
            chunk = images[start : start + batch_size]
            pad = batch_size - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            masks, classes = run(state, jnp.asarray(chunk))
            outs[0].append([m[: batch_size - pad] for m in masks])
            outs[1].append([c[: batch_size - pad] for c in classes])
        merge = lambda parts: [jnp.concatenate(p, axis=0) for p in zip(*parts)]  # noqa: E731
        return merge(outs[0]), merge(outs[1])

    return forward


def evaluate(config: ml_collections.ConfigDict, model, root, mesh, workdir, step: int | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    from eomt_jax import data as data_lib
    from eomt_jax import eval_metrics

    workdir = Path(workdir)
    source = data_lib.load_source(config.data.name, root, "val")
    task = config.task
    size = int(config.data.image_size)
    masked = bool(config.eval.masked_attn)
    num_outputs = model.config.num_blocks + 1 if masked else 1
    forward = make_forward(model, int(config.eval.batch_size), masked)
    indices = list(range(len(source)))
    if config.eval.max_images:
        indices = indices[: config.eval.max_images]
    mine = indices[jax.process_index() :: jax.process_count()]
    metrics = [eval_metrics.make_metric(task, source) for _ in range(num_outputs)]
    overlays = workdir / (f"overlays_{step}" if step is not None else "overlays")
    num_overlays = int(config.eval.get("num_overlays", 8)) if jax.process_index() == 0 else 0
    batch = int(config.eval.batch_size)
    saver = _PredictionWriter(workdir / (f"predictions_{step}" if step is not None else "predictions"), task, source) \
        if config.eval.save_predictions else None
    bar = tqdm(total=len(mine), desc="eval", disable=jax.process_index() != 0, dynamic_ncols=True)
    for start in range(0, len(mine), batch):
        idx = mine[start : start + batch]
        records = [source[i] for i in idx]
        images = [r["image"] for r in records]
        if task == "panoptic":
            outs = predict.predict_panoptic(
                forward, images, size, stuff_classes=source.stuff_classes,
                score_threshold=config.eval.mask_thresh, overlap_threshold=config.eval.overlap_thresh,
                all_outputs=True,
            )
        elif task == "instance":
            outs = predict.predict_instance(forward, images, size, top_k=config.eval.top_k_instances, all_outputs=True)
        elif task == "semantic":
            outs = predict.predict_semantic(forward, images, size, all_outputs=True)
        else:
            raise ValueError(f"config.task must be panoptic, instance or semantic, got {task!r}")
        for metric, per_image in zip(metrics, outs):
            for record, pred in zip(records, per_image):
                metric.update(pred, record)
        for k, (record, pred) in enumerate(zip(records, outs[-1])):
            if saver is not None:
                saver.add(record, pred)
            if start + k < num_overlays:
                _save_overlay(overlays, task, record, pred, source)
        bar.update(len(idx))
    bar.close()
    if saver is not None:
        saver.close()
    results: dict[str, Any] = {}
    names = [f"_block_{j - (num_outputs - 1)}" for j in range(num_outputs - 1)] + [""]
    for name, metric in zip(names, metrics):
        values = metric.compute_global() if jax.process_count() > 1 else metric.compute()
        results.update({f"{k}{name}": float(v) for k, v in values.items()})
    if jax.process_index() == 0:
        out = workdir / (f"eval_metrics_{step}.json" if step is not None else "eval_metrics.json")
        out.write_text(json.dumps(results, indent=2) + "\n")
        log.info("evaluation on %d images: %s", len(indices), _table({k: v for k, v in results.items() if "_block_" not in k}))
    return results


def _table(values: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.2f}" for k, v in values.items())


def _save_overlay(folder: Path, task: str, record, pred, source) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    image = record["image"]
    if task == "panoptic":
        picture = visualize.panoptic_overlay(image, pred, source.class_names)
    elif task == "instance":
        picture = visualize.instance_overlay(image, pred["masks"], pred["labels"], pred["scores"], source.class_names)
    else:
        picture = visualize.semantic_overlay(image, pred, source.num_classes)
    Image.fromarray(np.concatenate([image, picture], axis=1)).save(folder / f"{record['image_id']}.png")


class _PredictionWriter:
    """COCO panoptic PNG + JSON, COCO results JSON, or semantic label PNGs: the files `eomt_jax.evaluate` scores.

    COCO image ids are the numeric file stems, as in the official annotation files."""

    def __init__(self, folder: Path, task: str, source):
        self.folder, self.task, self.source = folder, task, source
        self.entries: list[dict] = []
        # COCO sources map their category ids to contiguous labels; write the dataset's own ids back.
        to_id = {label: cat for cat, label in getattr(source, "_id_to_label", {}).items()}
        self.category_id = lambda label: int(to_id.get(label, label + 1))
        sub = {"panoptic": "panoptic", "semantic": "semantic"}.get(task)
        if sub:
            (folder / sub).mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, record, pred) -> None:
        from PIL import Image

        from eomt_jax import predict as predict_cli

        stem = record["image_id"]
        image_id = int(stem) if stem.isdigit() else stem
        if self.task == "panoptic":
            self.entries.append(predict_cli.write_panoptic_png(self.folder / "panoptic", stem, pred, image_id,
                                                                  self.category_id))
        elif self.task == "instance":
            self.entries += predict_cli.coco_results(pred, image_id, self.category_id)
        else:
            Image.fromarray(pred.astype(np.uint8)).save(self.folder / "semantic" / f"{stem}.png")

    def close(self) -> None:
        from eomt_jax.eval_metrics import _allgather_objects

        entries = self.entries
        if jax.process_count() > 1:
            entries = [e for part in _allgather_objects(entries) for e in part]
        if jax.process_index() != 0:
            return
        stuff = set(self.source.stuff_classes)
        categories = [{"id": self.category_id(k), "name": n, "isthing": int(k not in stuff)}
                      for k, n in enumerate(self.source.class_names)]
        if self.task == "panoptic":
            (self.folder / "panoptic.json").write_text(json.dumps({"annotations": entries, "categories": categories}))
        elif self.task == "instance":
            (self.folder / "instances.json").write_text(json.dumps(entries))
