"""Evaluation of a network on a dataset's validation split: PQ (panoptic), AP (instance) or mIoU (semantic).

`run(config, workdir)` is `--mode=eval`: it evaluates the workdir's latest training checkpoint, or the converted
checkpoint `config.init_from`. `evaluate(...)` is the loop itself, also called by training (`train_and_eval`).

Every process predicts its slice of the images (`[process_index::process_count]`); the per-image statistics are
gathered and the metrics computed on process 0, which also writes `eval_metrics.json` (or
`eval_metrics_<step>.json` during training) and overlay pictures of the first images into the workdir. A metric
that is undefined on the evaluated images (AP of large objects when there are none) is JSON null, printed "n/a".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from eomt_jax import checkpoints, config_lib, pretrained
from eomt_jax import data as data_lib
from eomt_jax.distributed import allgather_objects
from eomt_jax.evaluation.metrics import make_metric
from eomt_jax.inference.forward import make_forward
from eomt_jax.inference.formats import PredictionWriter
from eomt_jax.inference.overlays import overlay
from eomt_jax.inference.pipeline import predict
from eomt_jax.models.eomt import Buffer, EoMT

log = logging.getLogger("eomt_jax")


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """`--mode=eval`: the workdir's latest checkpoint (just the network, whatever the optimizer was), else the
    converted checkpoint `config.init_from`; either way with its stored buffers (the masked-attention
    probabilities, which `config.eval.masked_attn=True` uses)."""
    config = config_lib.resolve(config, Path(workdir).absolute(), training=False)
    workdir = config_lib.prepare_workdir(config, workdir)
    root = data_lib.dataset_root(config.data, workdir)
    cfg = config_lib.model_config(config)
    model = EoMT(cfg, rngs=nnx.Rngs(config.seed))
    graphdef, params, buffers = nnx.split(model, nnx.Param, Buffer)
    latest = checkpoints.latest_step(workdir / "checkpoints")
    if latest is not None:
        params, buffers = checkpoints.restore_network(workdir / "checkpoints", latest, params, buffers)
        log.info("evaluating the checkpoint of step %d in %s", latest, workdir)
    elif config.init_from:
        params, buffers = pretrained.load_into(params, buffers, config.init_from, cfg)
        log.info("evaluating %s", config.init_from)
    else:
        raise ValueError(f"--mode=eval needs a checkpoint: {workdir} holds none, and --config.init_from is empty")
    return evaluate(config, nnx.merge(graphdef, params, buffers), root, workdir, step=latest)


def evaluate(config: ml_collections.ConfigDict, model, root, workdir, step: int | None = None) -> dict[str, Any]:
    """Metrics of `model` on the validation split under `root`; `step` names the output files during training."""
    workdir = Path(workdir)
    source = data_lib.source_from_config(config.data, root, "val")
    task = config.task
    size = int(config.data.image_size)
    masked = bool(config.eval.masked_attn)
    num_outputs = model.config.num_blocks + 1 if masked else 1
    batch = int(config.eval.batch_size)
    forward = make_forward(model, batch, masked)
    indices = list(range(len(source)))
    if config.eval.max_images:
        indices = indices[: config.eval.max_images]
    mine = indices[jax.process_index() :: jax.process_count()]
    metrics = [make_metric(task, source) for _ in range(num_outputs)]
    suffix = f"_{step}" if step is not None else ""
    overlays = workdir / f"overlays{suffix}"
    num_overlays = int(config.eval.get("num_overlays", 8)) if jax.process_index() == 0 else 0
    saver = _prediction_writer(workdir / f"predictions{suffix}", task, source) if config.eval.save_predictions \
        else None
    bar = tqdm(total=len(mine), desc="eval", disable=jax.process_index() != 0, dynamic_ncols=True)
    for start in range(0, len(mine), batch):
        records = [source[i] for i in mine[start : start + batch]]
        outs = predict(task, forward, [r["image"] for r in records], size, stuff_classes=source.stuff_classes,
                       score_threshold=config.eval.mask_thresh, overlap_threshold=config.eval.overlap_thresh,
                       top_k=config.eval.top_k_instances, all_outputs=True)
        for metric, per_image in zip(metrics, outs):
            for record, pred in zip(records, per_image):
                metric.update(pred, record)
        for k, (record, pred) in enumerate(zip(records, outs[-1])):
            if saver is not None:
                stem = record["image_id"]
                saver.add(stem, pred, image_id=int(stem) if stem.isdigit() else stem)
            if start + k < num_overlays:
                overlays.mkdir(parents=True, exist_ok=True)
                picture = overlay(task, record["image"], pred, source.class_names)
                Image.fromarray(np.concatenate([record["image"], picture], axis=1)).save(
                    overlays / f"{record['image_id']}.png")
        bar.update(len(records))
    bar.close()
    if saver is not None:
        saver.close()
    results: dict[str, Any] = {}
    names = [f"_block_{j - (num_outputs - 1)}" for j in range(num_outputs - 1)] + [""]
    for name, metric in zip(names, metrics):
        values = metric.compute_global() if jax.process_count() > 1 else metric.compute()
        results.update({f"{k}{name}": None if v is None else float(v) for k, v in values.items()})
    if jax.process_index() == 0:
        (workdir / f"eval_metrics{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
        final = {k: v for k, v in results.items() if "_block_" not in k}
        log.info("evaluation on %d images: %s", len(indices),
                 "  ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in final.items()))
    return results


def _prediction_writer(folder: Path, task: str, source) -> PredictionWriter:
    """The files `eomt_jax.evaluate` scores. COCO image ids are the numeric file stems and category ids the
    dataset's own, as in the official annotation files; every process's entries are gathered on process 0."""
    return PredictionWriter(
        folder, task, source.class_names, source.stuff_classes, category_id=source.category_id,
        gather=allgather_objects if jax.process_count() > 1 else None, write_json=jax.process_index() == 0)
