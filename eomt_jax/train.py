"""The training loop, readable top to bottom: mesh -> data -> model & optimizer -> restore -> step -> loop.

Entry point: `run(config, workdir, mode)` with mode "train" or "train_and_eval" (evaluating every
`config.eval_every_steps`), called by `python -m eomt_jax.main`. The step itself and its set-up are in
`eomt_jax.train_step`, evaluation in `eomt_jax.evaluation`, the compile report in `eomt_jax.compile_report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from tqdm import tqdm

from eomt_jax import config_lib, distributed, pretrained, train_step
from eomt_jax import data as data_lib
from eomt_jax import mesh as mesh_lib
from eomt_jax.checkpoints import DAMAGED, Checkpointer, DataPosition, IncompatibleCheckpoint
from eomt_jax.compile_report import compile_and_report
from eomt_jax.evaluation import evaluate
from eomt_jax.metric_writer import MetricWriter
from eomt_jax.models.eomt import EoMTConfig
from eomt_jax.preemption import StopSignals
from eomt_jax.workdir_lock import WorkdirBusy, WorkdirLock

log = logging.getLogger("eomt_jax")

MODES = ("train", "train_and_eval")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why in one line."""


class NonFiniteLoss(TrainingError):
    pass


class TrainingInterrupted(Exception):
    """The run stopped on a signal after saving its step; `exit_code` is the shell's code for that signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run(config: ml_collections.ConfigDict, workdir: str | Path, mode: str = "train") -> dict[str, Any]:
    """Train (resuming from the workdir's latest checkpoint), evaluating periodically with mode="train_and_eval".

    Holds the workdir's lock (`workdir_lock`) for the whole run; stops cleanly on SIGTERM/SIGINT (`preemption`),
    raising `TrainingInterrupted` after saving.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    config_lib.validate(config)
    with _lock(Path(workdir).absolute()):
        return _train(config, workdir, mode)


def _train(config: ml_collections.ConfigDict, workdir: str | Path, mode: str) -> dict[str, Any]:
    # The classes, the length and the schedule of this run (from the data when the config leaves them to it).
    config = config_lib.resolve(config, Path(workdir).absolute())
    workdir = config_lib.prepare_workdir(config, workdir)

    # -- Mesh ----------------------------------------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.log_processes(mesh)

    # -- Data, model & optimizer, restore or initialise ----------------------------------------------------------
    root = data_lib.dataset_root(config.data, workdir)
    cfg = config_lib.model_config(config, platform=mesh.devices.flat[0].platform)
    setup = train_step.setup(config, cfg, mesh)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
    start, state = _restore_latest(ckpt, setup)
    if start is not None:
        log.info("resuming from %s step %d", ckpt.directory, start)
    else:
        state = setup.new_state(config.seed)
        if config.init_from:
            log.info("initialising from %s", config.init_from)
            params, buffers = pretrained.load_into(state["params"], state["buffers"], config.init_from, cfg,
                                                   config.load_class_head)
            state["params"] = jax.device_put(params, setup.state_sharding["params"])
            state["buffers"] = jax.device_put(buffers, setup.state_sharding["buffers"])
            state["opt"] = setup.init_optimizer(state["params"])
    position, train_iter = _training_stream(config, cfg, root, ckpt, start, setup.batch_sharding)
    start = start or 0

    # -- Update step ---------------------------------------------------------------------------------------------
    step_fn = setup.jit_step()
    activations = setup.saved_activation_bytes()
    params_norm = jax.jit(optax.tree.norm)

    # -- Loop ----------------------------------------------------------------------------------------------------
    writer = MetricWriter(workdir, config, resume_step=start)
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
    saved = start
    results: dict[str, Any] = {}

    def save(step: int) -> None:
        """Checkpoint `step`, unless a loss since the last log or the parameters are not finite."""
        nonlocal last_good, saved
        losses = jax.device_get([m["train/loss"] for _, m in pending])
        norm = float(params_norm(state["params"]))
        if not (all(math.isfinite(float(v)) for v in losses) and math.isfinite(norm)):
            raise NonFiniteLoss(
                f"non-finite loss or parameters at step {step} (parameter norm {norm}): not saved; last finite "
                "checkpoint: " + (f"{ckpt.directory}/{last_good}" if last_good is not None else "none"))
        try:
            ckpt.save(step, state, train_iter.grain_iterator, position)
        except Exception as e:  # noqa: BLE001 - e.g. a full disk; the cause in one line instead of a library trace
            raise TrainingError(f"saving checkpoint {ckpt.directory}/{step} failed: {one_line(e)}") from e
        last_good = saved = step

    try:
        with StopSignals() as stop:
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
                                f"non-finite loss ({float(m['train/loss'])}) at step {s}; last finite checkpoint: "
                                + (f"{ckpt.directory}/{last_good}" if last_good is not None else "none")
                            )
                    s, m = host[-1]
                    m = dict(m, **{"train/steps_per_second": len(host) / max(time.perf_counter() - t0, 1e-9)})
                    t0 = time.perf_counter()
                    writer.write(s, m)
                    bar.set_postfix(loss=f"{float(m['train/loss']):.3f}")
                if step % config.checkpoint_every_steps == 0 or step == stop_at:
                    save(step)
                if stop.should_stop(step):
                    if saved != step:
                        save(step)
                    ckpt.wait()
                    message = (f"stopped by {stop.name} after step {step}; saved {ckpt.directory}/{step}: rerun the "
                               "same command to resume")
                    log.warning(message)
                    raise TrainingInterrupted(message, stop.exit_code)
                if mode == "train_and_eval" and (step % config.eval_every_steps == 0 or step == total):
                    model = nnx.merge(setup.graphdef, state["params"], state["buffers"])
                    results = evaluate(config, model, root, workdir, step=step)
                    writer.write(step, {f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))})
    finally:
        propagating = sys.exc_info()[1]  # an error already on its way out of the loop
        bar.close()
        writer.close()
        train_iter.close()
        try:
            ckpt.close()  # waits for the last save, whose errors surface here
        except Exception as e:  # noqa: BLE001
            if propagating is None:
                raise TrainingError(f"writing the last checkpoint to {ckpt.directory} failed: {one_line(e)}") from e
            log.error("writing the last checkpoint to %s failed: %s", ckpt.directory, one_line(e))
    if step == total and step > start:
        _write_model(workdir, config, nnx.merge(setup.graphdef, state["params"], state["buffers"]), step)
    return {"step": step, **results}


MODEL_DIR = "model"


def _write_model(workdir: Path, config: ml_collections.ConfigDict, model, step: int) -> None:
    """<workdir>/model: the trained network as a converted checkpoint (`eomt_jax.pretrained`) that carries the
    data's class names, for `python -m eomt_jax.predict --checkpoint <workdir>/model` and `--config.init_from`.
    Written by single-process runs (a multi-process run's parameters are not all addressable by one process)."""
    if jax.process_count() > 1:
        log.warning("the trained network is in %s/checkpoints/%d; %s/%s is written by single-process runs only",
                    workdir, step, workdir, MODEL_DIR)
        return
    metadata = {"source": f"{workdir}/checkpoints/{step}", "source_format": "eomt_jax training run", "step": step,
                "task": config.task, "dataset": config.data.name, "class_names": list(config.data.class_names),
                "stuff_classes": list(config.data.stuff_classes)}
    out = pretrained.write_network(workdir / MODEL_DIR, model, metadata=metadata, overwrite=True)
    log.info("wrote the trained network with its %d class names to %s (python -m eomt_jax.predict --checkpoint %s)",
             len(config.data.class_names), out, out)


@contextlib.contextmanager
def _lock(workdir: Path):
    """The workdir's run lock, held by process 0; every process learns whether it got it."""
    lock = WorkdirLock(workdir)
    refusal = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirBusy as e:
            refusal = str(e)
    if jax.process_count() > 1:
        refusal = distributed.allgather_objects(refusal)[0]
    if refusal is not None:
        raise WorkdirBusy(refusal)
    try:
        yield lock
    finally:
        lock.release()


def _restore_latest(ckpt: Checkpointer, setup: train_step.TrainSetup) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that restores and holds finite parameters, or (None, None) when
    there is none. A damaged checkpoint is reported and set aside (`Checkpointer.set_aside`), and the one before it
    tried; a checkpoint that does not fit the config is an error (the earlier ones would not fit either)."""
    params_norm = jax.jit(optax.tree.norm)
    failures = []
    for step in reversed(ckpt.all_steps()):
        try:
            with _quiet_failure():
                state = ckpt.restore(step, setup.abstract_state)
            problem = None if math.isfinite(float(params_norm(state["params"]))) else "non-finite parameters"
        except IncompatibleCheckpoint:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of one checkpoint means: try the previous one
            problem = one_line(e)
        if problem is None:
            if failures:
                log.warning("resuming from step %d, the newest checkpoint that restores", step)
            return step, state
        aside = ckpt.set_aside(step)
        log.warning("checkpoint %s/%d cannot be restored (%s); moved it to %s and trying the one before it",
                    ckpt.directory, step, problem, aside)
        failures.append(f"step {step}: {problem}")
    if failures:
        raise TrainingError(f"no checkpoint in {ckpt.directory} can be restored ({'; '.join(failures)}); the damaged "
                            f"ones are in {ckpt.directory.parent / DAMAGED}: start a new --workdir or delete them")
    return None, None


@contextlib.contextmanager
def _quiet_failure(settle_seconds: float = 2.0):
    """Silence stderr while a checkpoint is read. When a read fails, the checkpointing library's reader threads
    print "Event loop is closed" tracebacks for a moment as they shut down; they say nothing about the cause, which
    the caller reports in one line instead."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None  # where the threads' tracebacks are reported
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                yield
            except Exception:
                time.sleep(settle_seconds)
                raise
    finally:
        sys.unraisablehook = hook


def one_line(error: BaseException) -> str:
    """The innermost cause of an exception chain as one line, e.g. "FileNotFoundError: .../manifest.ocdbt"."""
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    # Asynchronous writers and readers often end a chain with a secondary error of their own shut-down (e.g.
    # "Event loop is closed"); the first error that names a file says more.
    named = [x for x in chain if "/" in str(x)]
    root = named[-1] if named else chain[-1]
    text = str(root).strip().splitlines()
    text = text[0].split(" [tensorstore_spec=")[0] if text else ""
    return f"{type(root).__name__}: {text}"[:500]


def _training_stream(config, cfg: EoMTConfig, root: Path, ckpt: Checkpointer, start: int | None, batch_sharding):
    """The training batches, positioned where checkpoint `start` (None: a fresh run) left them.

    Returns (data position to save with checkpoints, iterator). A checkpoint of this topology restores its Grain
    states exactly; one written by another number of processes or workers, or whose Grain states do not restore,
    restarts the stream at its global position.
    """
    source = data_lib.source_from_config(config.data, root, "train")
    if source.num_classes != cfg.num_classes:
        raise ValueError(
            f"the {config.data.name} training split has {source.num_classes} classes but config.model.num_classes "
            f"is {cfg.num_classes}"
        )
    settings = data_lib.TrainSettings.from_config(config.data, config.seed)
    position = DataPosition(offset=0, offset_step=0, batch_size=config.data.batch_size,
                            process_count=jax.process_count(), num_workers=config.data.num_workers)
    saved = None
    if start is not None:
        try:
            saved = ckpt.data_position(start)
        except Exception as e:  # noqa: BLE001 - without it the stream starts from the beginning (warned below)
            log.warning("the data position of %s/%d does not restore (%s)", ckpt.directory, start, one_line(e))
    if saved is not None and saved.batch_size != position.batch_size:
        raise ValueError(
            f"{ckpt.directory}/{start} was trained with data.batch_size {saved.batch_size}, the config says "
            f"{position.batch_size}: resuming would change the schedule"
        )
    restarted = dataclasses.replace(position, offset=saved.samples_at(start), offset_step=start) if saved else None

    def stream(position):
        return data_lib.TrainIterator(data_lib.train_dataset(source, settings, start=position.offset), batch_sharding)

    if saved is not None and saved.same_topology(position):
        train_iter = stream(saved)
        try:
            ckpt.restore_data(start, train_iter.grain_iterator)
            return saved, train_iter
        except Exception as e:  # noqa: BLE001 - the global position is a complete fallback
            train_iter.close()
            log.warning("the data iterator state of %s/%d does not restore (%s): the training stream restarts at "
                        "global sample %d", ckpt.directory, start, one_line(e), restarted.offset)
            return restarted, stream(restarted)
    if saved is not None:
        log.info(
            "checkpoint written by %d process(es) x %d data worker(s), resumed by %d x %d: the training stream "
            "restarts at global sample %d", saved.process_count, saved.num_workers, position.process_count,
            position.num_workers, restarted.offset,
        )
        return restarted, stream(restarted)
    if start is not None:  # a checkpoint without a data position: the stream starts at the beginning
        log.warning("%s/%d holds no data position: the training stream starts from its beginning", ckpt.directory,
                    start)
    return position, stream(position)
