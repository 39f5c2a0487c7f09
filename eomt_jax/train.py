"""The training loop, readable top to bottom: mesh -> data -> model & optimizer -> restore -> step -> loop.

Entry point: `run(config, workdir, mode)`, called by `python -m eomt_jax.main`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from eomt_jax import mesh as mesh_lib
from eomt_jax import optim
from eomt_jax.config_lib import model_config
from eomt_jax.checkpoints import Checkpointer, DataPosition, abstract_like
from eomt_jax.models.eomt import EoMT, EoMTConfig
from eomt_jax.train_step import StepConfig, check_grad_accum, make_train_step, saved_activation_bytes, split_model
from eomt_jax.tree import flatten_paths, set_from_flat

log = logging.getLogger("eomt_jax")


# ----------------------------------------------------------------------------------------------------- helpers


def data_root(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """The dataset folder; generated into `<workdir>/data` on first use when `config.data.generate` names a kind."""
    from eomt_jax.data import synthetic

    if not config.data.generate:
        if not config.data.root:
            raise ValueError("config.data.root is empty: set --config.data.root to the folder with the dataset zips")
        return Path(config.data.root)
    root = Path(config.data.root) if config.data.root else workdir / "data"
    marker = root / ".complete"
    if not marker.exists():
        if jax.process_index() == 0:
            log.info("generating the %s dataset into %s", config.data.generate, root)
            synthetic.generate(config.data.generate, root, **dict(config.data.generate_kwargs))
            marker.write_text("ok\n")
        _barrier("data generation")
    return root


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def overlay_pretrained(params: nnx.State, path: str, cfg: EoMTConfig, load_class_head: bool) -> nnx.State:
    """Replace `params` by the values of a converted checkpoint (EoMT, or DINOv2 backbone + fresh head).

    The position embedding is resampled when the checkpoint's grid differs; with `load_class_head=False` the class
    head keeps its fresh initialisation (fine-tuning on other classes).
    """
    from eomt_jax import pretrained
    from eomt_jax.models.vit import resample_pos_embed

    source = pretrained.load(path)
    src_cfg = source.config
    _, src_params, _ = split_model(source)
    flat = flatten_paths(src_params)
    own = flatten_paths(params)
    if not load_class_head:
        flat = {k: v for k, v in flat.items() if not k.startswith("class_head/")}
    if src_cfg.grid_size != cfg.grid_size and "backbone/pos_embed" in flat:
        flat["backbone/pos_embed"] = resample_pos_embed(flat["backbone/pos_embed"], src_cfg.grid_size, cfg.grid_size)
    problems = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in flat.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    unknown = sorted(set(flat) - set(own))
    if problems or unknown:
        raise ValueError(
            f"{path} does not fit the configured model:\n  " + "\n  ".join(problems + [f"unexpected {k}" for k in unknown])
            + ("\n(use --config.load_class_head=False to fine-tune on other classes)" if problems else "")
        )
    merged = {k: jnp.asarray(flat[k], own[k].dtype) if k in flat else own[k] for k in own}
    return set_from_flat(params, merged)


class MetricWriter:
    """metrics.jsonl always; TensorBoard and W&B when enabled. Only process 0 writes."""

    def __init__(self, workdir: Path, config: ml_collections.ConfigDict):
        self.active = jax.process_index() == 0
        self._jsonl = open(workdir / "metrics.jsonl", "a") if self.active else None
        self._tb = None
        self._wandb = None
        if self.active and config.log.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))
        if self.active and config.log.wandb:
            try:
                import wandb
            except ImportError:
                raise ImportError("config.log.wandb=True needs the wandb package (pip install wandb)") from None
            self._wandb = wandb.init(project=config.log.wandb_project, dir=str(workdir), config=config.to_dict())

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class NonFiniteLoss(RuntimeError):
    pass


def model_and_optimizer(config: ml_collections.ConfigDict, cfg: EoMTConfig, mesh):
    """The network's graph, the optimizer and its learning rates, and the training state's initialiser, abstract
    shapes and shardings; nothing is materialised.

    Returns (graphdef, tx, lrs, init_state, abstract_state, state_sharding), where `init_state(seed)` builds the
    state dict of `eomt_jax.train_step`. Used by `run` and by `python -m eomt_jax.benchmark --mode=train`.
    """
    abstract_model = nnx.eval_shape(lambda: EoMT(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, _ = split_model(abstract_model)
    tx = optim.build_optimizer(
        config.optim, abstract_params, total_steps=config.total_steps, depth=cfg.depth,
        num_masked_blocks=cfg.num_blocks,
    )
    lrs = optim.learning_rates(
        config.optim, abstract_params, total_steps=config.total_steps, depth=cfg.depth,
        num_masked_blocks=cfg.num_blocks,
    )

    def init_state(seed):
        model = EoMT(cfg, rngs=nnx.Rngs(seed))
        _, params, buffers = split_model(model)
        return {
            "params": params,
            "buffers": buffers,
            "opt": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed)),
        }

    # Parameters and optimizer state are created directly with their shardings (FSDP rules from the config);
    # nothing is built whole on one host and then copied.
    abstract_state = jax.eval_shape(lambda: init_state(config.seed))
    state_sharding = mesh_lib.state_shardings(
        abstract_state, mesh, rules=tuple(tuple(r) for r in config.sharding.rules), min_size=config.sharding.min_size
    )
    return graphdef, tx, lrs, init_state, abstract_state, state_sharding


# ----------------------------------------------------------------------------------------------------- the run


def run(config: ml_collections.ConfigDict, workdir: str | Path, mode: str = "train",
        target_topology: str | None = None) -> dict[str, Any]:
    """Train, evaluate or (mode="compile") only compile and report the train step; see `main.py`.

    `target_topology` (compile mode only): compile for that accelerator topology instead of the local devices
    (`mesh.topology_devices`), so that the report is the target compiler's own.
    """
    if target_topology and mode != "compile":
        raise ValueError(f"--target_topology only applies to --mode=compile, not --mode={mode}")
    devices = mesh_lib.topology_devices(target_topology) if target_topology else None
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    # -- Mesh ----------------------------------------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    replicated = mesh_lib.replicated(mesh)
    if target_topology:
        log.info("compiling for %s: %d %s devices, mesh %s", target_topology, mesh.size,
                 mesh.devices.flat[0].device_kind, mesh_lib.describe(mesh))
    else:
        log.info(
            "process %d/%d, %d local / %d global devices, mesh %s",
            jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
            mesh_lib.describe(mesh),
        )

    # -- Data ----------------------------------------------------------------------------------------------------
    from eomt_jax import data as data_lib

    root = None if mode == "compile" else data_root(config, workdir)
    cfg = model_config(config, platform=mesh.devices.flat[0].platform)

    if mode == "eval":
        from eomt_jax import eval_loop

        model = EoMT(cfg, rngs=nnx.Rngs(config.seed))
        graphdef, params, buffers = split_model(model)
        latest = Checkpointer(workdir / "checkpoints").latest_step() if (workdir / "checkpoints").exists() else None
        if latest is not None:
            # The run's own latest checkpoint: restore just the network, whatever the optimizer was.
            import orbax.checkpoint as ocp

            target = {"params": abstract_like(params), "buffers": abstract_like(buffers)}
            manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data", "data_position"))
            restored = manager.restore(
                latest, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=target, partial_restore=True)))["state"]
            params, buffers = restored["params"], restored["buffers"]
            log.info("evaluating the checkpoint of step %d in %s", latest, workdir)
        elif config.init_from:
            params = overlay_pretrained(params, config.init_from, cfg, load_class_head=True)
            log.info("evaluating %s", config.init_from)
        else:
            raise ValueError(
                f"--mode=eval needs a checkpoint: {workdir} holds none, and --config.init_from is empty"
            )
        return eval_loop.evaluate(config, nnx.merge(graphdef, params, buffers), root, mesh, workdir, step=latest)

    if mode == "compile":
        ckpt = start = train_iter = None
    else:
        ckpt, start, position, restore_grain, train_iter = _training_stream(
            config, cfg, root, mesh, workdir, batch_sharding)

    # -- Model & optimizer ---------------------------------------------------------------------------------------
    graphdef, tx, lrs, init_state, abstract_state, state_sharding = model_and_optimizer(config, cfg, mesh)

    # -- Restore or initialise -----------------------------------------------------------------------------------
    if mode == "compile":
        state = None  # nothing is materialised: the step is compiled for the abstract state
    elif start is not None:
        log.info("resuming from %s step %d", ckpt.directory, start)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sharding
        )
        state = ckpt.restore(start, target, train_iter.grain_iterator if restore_grain else None)
    else:
        state = jax.jit(init_state, static_argnums=0, out_shardings=state_sharding)(config.seed)
        if config.init_from:
            log.info("initialising from %s", config.init_from)
            params = overlay_pretrained(state["params"], config.init_from, cfg, config.load_class_head)
            state["params"] = jax.device_put(params, state_sharding["params"])
            state["opt"] = jax.jit(tx.init, out_shardings=state_sharding["opt"])(state["params"])
        start = 0

    # -- Update step ---------------------------------------------------------------------------------------------
    step_cfg = StepConfig(
        num_classes=cfg.num_classes,
        anneal_starts=tuple(config.anneal.starts),
        anneal_ends=tuple(config.anneal.ends),
        anneal_power=config.anneal.power,
        loss_kwargs=dict(config.loss.to_dict()),
        grad_accum_steps=config.grad_accum_steps,
        remat=config.remat,
    )
    check_grad_accum(config.data.batch_size, config.grad_accum_steps, mesh.size)
    train_step = make_train_step(graphdef, tx, step_cfg, lr_fn=lrs.groups_at, mesh=mesh)
    batch_spec = {k: batch_sharding for k in data_lib.TRAIN_KEYS}
    # What the backward pass keeps of one device's share of a microbatch, counted from the program itself.
    activations = saved_activation_bytes(
        graphdef, step_cfg, abstract_state, config.data.batch_size // (config.grad_accum_steps * mesh.size),
        abstract_batch(config, batch_sharding),
    )
    p_step = jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_spec),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )

    if mode == "compile":
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sharding
        )
        report: dict[str, Any] = {}
        compile_and_report(p_step, abstract, abstract_batch(config, batch_sharding), report, activations)
        if jax.process_index() == 0:
            (workdir / "compile_report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report

    # -- Loop ----------------------------------------------------------------------------------------------------
    writer = MetricWriter(workdir, config)
    total = config.total_steps
    stop_at = total if not config.max_steps_per_run else min(total, start + config.max_steps_per_run)
    if start >= total:
        log.warning("%s already holds the final step %d of %d: nothing to train (--mode=eval evaluates it; use a new "
                    "--workdir to train again)", workdir, start, total)
    from tqdm import tqdm

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
                p_step = compile_and_report(p_step, state, batch, activations=activations)
            state, metrics = p_step(state, batch)
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
                from eomt_jax import eval_loop

                model = nnx.merge(graphdef, state["params"], state["buffers"])
                results = eval_loop.evaluate(config, model, root, mesh, workdir, step=step)
                writer.write(step, {f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))})
    finally:
        bar.close()
        ckpt.close()
        writer.close()
        train_iter.close()
    return {"step": step, **results}


def _training_stream(config, cfg: EoMTConfig, root: Path, mesh, workdir: Path, batch_sharding):
    """The training batches, positioned where the workdir's latest checkpoint (if any) left them.

    Returns (checkpointer, latest step or None, data position, whether to restore the Grain states, iterator).
    """
    from eomt_jax import data as data_lib

    source = data_lib.load_source(config.data.name, root, "train")
    if source.num_classes != cfg.num_classes:
        raise ValueError(
            f"the {config.data.name} training split has {source.num_classes} classes but config.model.num_classes "
            f"is {cfg.num_classes}"
        )
    settings = data_lib.TrainSettings(
        image_size=config.data.image_size,
        batch_size=config.data.batch_size,
        max_instances=config.data.max_instances,
        seed=config.seed,
        scale_range=tuple(config.data.scale_range),
        color_jitter=config.data.color_jitter,
        num_workers=config.data.num_workers,
    )
    if config.data.batch_size % mesh.size:
        raise ValueError(f"data.batch_size {config.data.batch_size} is not divisible by the {mesh.size} devices")

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


def abstract_batch(config: ml_collections.ConfigDict, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of one global training batch (see `eomt_jax.data.pipeline`)."""
    b, m, s = config.data.batch_size, config.data.max_instances, config.data.image_size
    shapes = {
        "image": ((b, s, s, 3), jnp.uint8),
        "masks": ((b, m, s, s), jnp.bool_),
        "labels": ((b, m), jnp.int32),
        "valid": ((b, m), jnp.bool_),
        "is_crowd": ((b, m), jnp.bool_),
    }
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def compile_and_report(p_step, state, batch, report: dict[str, Any] | None = None,
                       activations: int | None = None):
    """Compile the step ahead of time, log its per-device memory and FLOPs, and return the executable.

    `state` and `batch` may be arrays or ShapeDtypeStructs with shardings. When `report` is a dict, the figures
    are stored in it too (bytes and FLOPs, per device, as XLA's compiler estimates them). `activations`: the bytes
    the backward pass keeps per device (`train_step.saved_activation_bytes`), reported with them.
    """
    devices = jax.tree.leaves(state)[0].sharding.device_set  # the state lives on the whole mesh
    figures: dict[str, Any] = {"devices": len(devices), "device_kind": next(iter(devices)).device_kind}
    if activations is not None:
        figures["saved_activations_bytes"] = activations
    t = time.perf_counter()
    try:
        compiled = p_step.lower(state, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        if report is None or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The compiler found the step larger than the device's memory: that is the report's answer.
        figures.update(fits=False, error=str(e).strip().splitlines()[0])
        log.error("the train step does not fit on %s: %s", figures["device_kind"], figures["error"])
        report.update(figures)
        return None
    seconds = time.perf_counter() - t
    figures.update(compile_seconds=seconds, fits=True)
    lines = [f"train step compiled in {seconds:.1f} s for {len(devices)} {figures['device_kind']} device(s)"]
    try:
        mem = compiled.memory_analysis()
    except Exception:  # not every backend reports memory
        mem = None
    if mem is not None:
        figures.update(
            arguments_bytes=mem.argument_size_in_bytes, temporaries_bytes=mem.temp_size_in_bytes,
            outputs_bytes=mem.output_size_in_bytes, aliased_bytes=mem.alias_size_in_bytes,
        )
        # Donated state buffers are reused for the new state: count them once.
        figures["total_bytes"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                                  - mem.alias_size_in_bytes)
        lines.append(
            f"per-device memory: arguments {_size(mem.argument_size_in_bytes)}, temporaries "
            f"{_size(mem.temp_size_in_bytes)}, outputs {_size(mem.output_size_in_bytes)} "
            f"(donated {_size(mem.alias_size_in_bytes)}), total {_size(figures['total_bytes'])}"
        )
    if activations is not None:
        lines.append(
            f"saved for the backward pass: {_size(activations)} per device (as the program is written; compilers "
            "may recompute or fuse some of it)"
        )
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    except Exception:
        cost = None
    if cost and "flops" in cost:
        figures["flops"] = float(cost["flops"])
        lines.append(f"FLOPs per step (XLA estimate, per device): {cost['flops'] / 1e9:.2f} GFLOP")
    for line in lines:
        log.info(line)
    if report is not None:
        report.update(figures)
    return compiled
