"""The training loop, readable top to bottom: mesh -> data -> model & optimizer -> restore -> step -> loop.

Entry point: `run(config, workdir, mode)` with mode "train" or "train_and_eval" (evaluating every
`config.eval_every_steps`), called by `python -m eomt_jax.main`. The step itself and its set-up are in
`eomt_jax.train_step`, evaluation in `eomt_jax.evaluation`, the compile report in `eomt_jax.compile_report`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx
from tqdm import tqdm

from eomt_jax import config_lib, pretrained, train_step
from eomt_jax import data as data_lib
from eomt_jax import mesh as mesh_lib
from eomt_jax.checkpoints import Checkpointer, DataPosition
from eomt_jax.compile_report import compile_and_report
from eomt_jax.evaluation import evaluate
from eomt_jax.metric_writer import MetricWriter
from eomt_jax.models.eomt import EoMTConfig

log = logging.getLogger("eomt_jax")

MODES = ("train", "train_and_eval")


class NonFiniteLoss(RuntimeError):
    pass


def run(config: ml_collections.ConfigDict, workdir: str | Path, mode: str = "train") -> dict[str, Any]:
    """Train (resuming from the workdir's latest checkpoint), evaluating periodically with mode="train_and_eval"."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    workdir = config_lib.prepare_workdir(config, workdir)

    # -- Mesh ----------------------------------------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.log_processes(mesh)

    # -- Data ----------------------------------------------------------------------------------------------------
    root = data_lib.dataset_root(config.data, workdir)
    cfg = config_lib.model_config(config, platform=mesh.devices.flat[0].platform)
    setup = train_step.setup(config, cfg, mesh)
    ckpt, start, position, restore_grain, train_iter = _training_stream(
        config, cfg, root, workdir, setup.batch_sharding)

    # -- Restore or initialise -----------------------------------------------------------------------------------
    if start is not None:
        log.info("resuming from %s step %d", ckpt.directory, start)
        state = ckpt.restore(start, setup.abstract_state, train_iter.grain_iterator if restore_grain else None)
    else:
        state = setup.new_state(config.seed)
        if config.init_from:
            log.info("initialising from %s", config.init_from)
            params, buffers = pretrained.load_into(state["params"], state["buffers"], config.init_from, cfg,
                                                   config.load_class_head)
            state["params"] = jax.device_put(params, setup.state_sharding["params"])
            state["buffers"] = jax.device_put(buffers, setup.state_sharding["buffers"])
            state["opt"] = setup.init_optimizer(state["params"])
        start = 0

    # -- Update step ---------------------------------------------------------------------------------------------
    step_fn = setup.jit_step()
    activations = setup.saved_activation_bytes()

    # -- Loop ----------------------------------------------------------------------------------------------------
    writer = MetricWriter(workdir, config)
    total = config.total_steps
    stop_at = total if not config.max_steps_per_run else min(total, start + config.max_steps_per_run)
    if start >= total:
        log.warning("%s already holds the final step %d of %d: nothing to train (--mode=eval evaluates it; use a new "
                    "--workdir to train again)", workdir, start, total)
    bar = tqdm(total=total, initial=start, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)
    pending: list[tuple[int, dict]] = []
    step = start
    t0 = time.perf_counter()
    last_good = start if ckpt.latest_step() is not None else None
    results: dict[str, Any] = {}
    try:
        while step < stop_at:
            batch = next(train_iter)
            if step == start:
                step_fn = compile_and_report(step_fn, state, batch, activations=activations)
            state, metrics = step_fn(state, batch)
            step += 1
            bar.update(1)
            pending.append((step, metrics))
            # The host only waits for the device here, at the log interval.
            if step % config.log_every_steps == 0 or step == stop_at:
                host = jax.device_get(pending)
                pending = []
                for s, m in host:
                    if not math.isfinite(float(m["train/loss"])):
                        raise NonFiniteLoss(
                            f"non-finite loss ({float(m['train/loss'])}) at step {s}; last good checkpoint: "
                            + (f"{ckpt.directory}/{last_good}" if last_good is not None else "none")
                        )
                s, m = host[-1]
                m = dict(m, **{"train/steps_per_second": len(host) / max(time.perf_counter() - t0, 1e-9)})
                t0 = time.perf_counter()
                writer.write(s, m)
                bar.set_postfix(loss=f"{float(m['train/loss']):.3f}")
            if step % config.checkpoint_every_steps == 0 or step == stop_at:
                ckpt.save(step, state, train_iter.grain_iterator, position)
                last_good = step
            if mode == "train_and_eval" and (step % config.eval_every_steps == 0 or step == total):
                model = nnx.merge(setup.graphdef, state["params"], state["buffers"])
                results = evaluate(config, model, root, workdir, step=step)
                writer.write(step, {f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))})
    finally:
        bar.close()
        ckpt.close()
        writer.close()
        train_iter.close()
    return {"step": step, **results}


def _training_stream(config, cfg: EoMTConfig, root: Path, workdir: Path, batch_sharding):
    """The training batches, positioned where the workdir's latest checkpoint (if any) left them.

    Returns (checkpointer, latest step or None, data position, whether to restore the Grain states, iterator).
    """
    source = data_lib.load_source(config.data.name, root, "train")
    if source.num_classes != cfg.num_classes:
        raise ValueError(
            f"the {config.data.name} training split has {source.num_classes} classes but config.model.num_classes "
            f"is {cfg.num_classes}"
        )
    settings = data_lib.TrainSettings.from_config(config.data, config.seed)
    # Where the stream starts: a checkpoint of this topology restores its Grain states exactly; one written by
    # another number of processes or workers restarts the stream at its global position.
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.get("keep_checkpoints", 3))
    start = ckpt.latest_step()
    position = DataPosition(offset=0, offset_step=0, batch_size=config.data.batch_size,
                            process_count=jax.process_count(), num_workers=config.data.num_workers)
    restore_grain = start is not None
    if start is not None:
        saved = ckpt.data_position(start)
        if saved is not None and not saved.same_topology(position):
            if saved.batch_size != position.batch_size:
                raise ValueError(
                    f"{ckpt.directory}/{start} was trained with data.batch_size {saved.batch_size}, the config says "
                    f"{position.batch_size}: resuming would change the schedule"
                )
            position = dataclasses.replace(position, offset=saved.samples_at(start), offset_step=start)
            restore_grain = False
            log.info(
                "checkpoint written by %d process(es) x %d data worker(s), resumed by %d x %d: the training stream "
                "restarts at global sample %d", saved.process_count, saved.num_workers, position.process_count,
                position.num_workers, position.offset,
            )
        elif saved is not None:
            position = saved
    train_iter = data_lib.TrainIterator(data_lib.train_dataset(source, settings, start=position.offset),
                                        batch_sharding)
    return ckpt, start, position, restore_grain, train_iter
