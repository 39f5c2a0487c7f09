"""The pure training step `(state, batch) -> (state, metrics)`: no I/O, no host round-trips.

State (a dict, saved as is in checkpoints):
  params   nnx.State of the network's parameters
  buffers  nnx.State of its non-trainable variables (the per-block masked-attention probabilities)
  opt      optax state
  step     int32 scalar: optimizer updates applied so far
  rng      uint32 key data of the run's base PRNG key

The masked-attention probabilities used for a batch are computed from `step` inside the step (so annealing never
recompiles) and written back to `buffers` afterwards, for the post-update step, so that a checkpoint holds the
values the next batch will use, as the original's module buffer does.

Gradient accumulation (`grad_accum_steps` = N > 1) runs the global batch as N microbatches in a `lax.scan`, sums
their gradients and applies one optimizer update: the same update as one step on the whole batch, up to float
rounding, with the activations of one microbatch in memory at a time. What makes it the same:

* the loss normalisers (matched-mask count, CE weight sum) are those of the global batch, computed once from its
  targets (`losses.batch_normalisers`), so microbatch losses, their loss terms and their gradients simply add up;
* every random draw (attention-mask disabling, loss points) derives from the image's position in the global batch
  (`image_index`), so an image gets the same draws in a microbatch as in the whole batch; a DINOv3 backbone's RoPE
  rescale is drawn once per update;
* the step counter, the learning rates and the masked-attention probabilities are evaluated once per update.

Microbatch j holds images j, j + N, j + 2N, ...: each device holds a contiguous block of the batch, so taking every
N-th image gives every microbatch B / (N * devices) images of each device, and splitting the batch moves no data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eomt_jax import annealing, losses, optim
from eomt_jax import mesh as mesh_lib
from eomt_jax.data import TRAIN_KEYS
from eomt_jax.models.eomt import Buffer, EoMT, EoMTConfig, check_remat, draw_rope_scale
from eomt_jax.tree import path_str


@dataclasses.dataclass(frozen=True)
class StepConfig:
    num_classes: int
    anneal_starts: tuple[int, ...]
    anneal_ends: tuple[int, ...]
    anneal_power: float
    loss_kwargs: dict[str, Any]
    grad_accum_steps: int = 1  # microbatches per optimizer update (config.grad_accum_steps)
    remat: str = "none"  # per-block rematerialisation (config.remat), a models.eomt.REMAT_POLICIES name

    def __post_init__(self):
        check_remat(self.remat)
        if not isinstance(self.grad_accum_steps, int) or self.grad_accum_steps < 1:
            raise ValueError(f"config.grad_accum_steps must be a positive integer, got {self.grad_accum_steps!r}")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> "StepConfig":
        """The step settings of an experiment config (its anneal, loss, grad_accum_steps and remat)."""
        return cls(
            num_classes=num_classes,
            anneal_starts=tuple(config.anneal.starts),
            anneal_ends=tuple(config.anneal.ends),
            anneal_power=config.anneal.power,
            loss_kwargs=dict(config.loss.to_dict()),
            grad_accum_steps=config.grad_accum_steps,
            remat=config.remat,
        )


def check_grad_accum(batch_size: int, grad_accum_steps: int, num_devices: int) -> None:
    """Raise ValueError unless the global batch splits into `grad_accum_steps` microbatches that span every device."""
    if batch_size % grad_accum_steps or (batch_size // grad_accum_steps) % num_devices:
        raise ValueError(
            f"config.grad_accum_steps={grad_accum_steps} must divide the global batch of {batch_size} "
            f"(config.data.batch_size) into microbatches whose size is a multiple of the {num_devices} devices"
        )


def split_model(model: nnx.Module):
    """(graphdef, parameters, buffers) of the network."""
    return nnx.split(model, nnx.Param, Buffer)


def _loss_fn(graphdef: nnx.GraphDef, cfg: StepConfig, state: dict[str, Any], mesh) -> Callable:
    """The step's loss as a function of (params, batch, image_index, normalisers) -> (total, terms), with the
    masked-attention probabilities and the random keys of `state["step"]`."""
    step = state["step"]
    probs = annealing.attn_mask_probs(step, cfg.anneal_starts, cfg.anneal_ends, cfg.anneal_power)
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    model_key, loss_key = jax.random.split(key)
    rope_key = jax.random.fold_in(key, 2)  # a stream of its own: the other two are unchanged for DINOv2 models

    def loss_fn(params, batch, image_index, normalisers):
        model = nnx.merge(graphdef, params, state["buffers"])
        images = batch["image"].astype(jnp.float32) / 255.0
        # DINOv3: one RoPE coordinate rescale per optimizer step, shared by its microbatches (1 for DINOv2).
        rope_scale = draw_rope_scale(model.config, rope_key)
        mask_logits, class_logits = model(
            images, probs, key=model_key, masked_attn=True, image_index=image_index, remat=cfg.remat,
            rope_scale=rope_scale,
        )
        targets = {k: batch[k] for k in ("masks", "labels", "valid")}
        return losses.mask_classification_loss(
            mask_logits, class_logits, targets, loss_key, num_classes=cfg.num_classes, mesh=mesh,
            image_index=image_index, **normalisers, **cfg.loss_kwargs,
        )

    return loss_fn


def saved_activation_bytes(graphdef: nnx.GraphDef, cfg: StepConfig, state: dict[str, Any], images: int,
                           batch: dict[str, Any]) -> int:
    """Bytes of the values the backward pass keeps for `images` images (one device's share of a microbatch).

    Counted from the program JAX builds (the residuals of `jax.vjp`), before any compiler: the same on every
    backend, and what `config.remat` changes. A compiler may still recompute or fuse some of them (the TPU
    compiler does), so this is the program's demand, not a device's peak. Values that are step inputs
    (parameters, the batch) are not counted. `state` and `batch` may be ShapeDtypeStructs; only the batch's
    per-image shapes are used.
    """
    local = {k: jax.ShapeDtypeStruct((images,) + tuple(batch[k].shape[1:]), batch[k].dtype)
             for k in ("image", "masks", "labels", "valid")}

    def loss(state, batch):
        return _loss_fn(graphdef, cfg, state, None)(state["params"], batch, jnp.arange(images), {})[0]

    def residuals(state, batch):
        _, backward = jax.vjp(loss, state, batch)
        return jax.tree.leaves(backward)  # the values the backward function closes over

    jaxpr = jax.make_jaxpr(residuals)(state, local).jaxpr
    inputs = {id(v) for v in jaxpr.invars}
    kept = {id(v): v.aval for v in jaxpr.outvars if hasattr(v, "aval") and id(v) not in inputs}  # each value once
    return sum(int(aval.size) * aval.dtype.itemsize for aval in kept.values())


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg: StepConfig,
    *,
    lr_fn: Callable[[jax.Array], dict[str, jax.Array]] | None = None,
    mesh=None,
):
    """Build the (unjitted) step; the caller jits it with shardings and donation."""
    n = cfg.grad_accum_steps
    batch_axes = None if mesh is None else tuple(mesh.axis_names)  # the batch is split over every mesh axis

    def constrain(x, *spec):
        return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))

    def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
        step = state["step"]
        probs = annealing.attn_mask_probs(step, cfg.anneal_starts, cfg.anneal_ends, cfg.anneal_power)
        batch = {k: batch[k] for k in ("image", "masks", "labels", "valid")}
        loss_fn = _loss_fn(graphdef, cfg, state, mesh)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        b = batch["image"].shape[0]
        if n == 1:
            # The batch is its own global batch: the loss computes its normalisers from it.
            (loss, terms), grads = grad_fn(state["params"], batch, jnp.arange(b), {})
        else:
            check_grad_accum(b, n, 1 if mesh is None else mesh.size)
            num_queries = nnx.merge(graphdef, state["params"], state["buffers"]).config.num_queries
            num_masks, class_weight_sum = losses.batch_normalisers(
                batch["valid"], num_queries, cfg.loss_kwargs.get("no_object_coefficient", 0.1)
            )
            normalisers = {"num_masks": num_masks, "class_weight_sum": class_weight_sum}

            def split(x):  # (B, ...) -> (N, B / N, ...), microbatch j = images j, j + N, ...
                x = constrain(x.reshape(b // n, n, *x.shape[1:]), batch_axes)
                return constrain(jnp.swapaxes(x, 0, 1), None, batch_axes)

            micro = jax.tree.map(split, batch)
            index = jnp.arange(b).reshape(b // n, n).T

            def accumulate(grad_sum, xs):
                mb, image_index = xs
                mb = jax.tree.map(lambda x: constrain(x, batch_axes), mb)
                (loss, terms), grads = grad_fn(state["params"], mb, image_index, normalisers)
                return jax.tree.map(jnp.add, grad_sum, grads), (loss, terms)

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            grads, (loss, terms) = jax.lax.scan(accumulate, zeros, (micro, index))
            # Every microbatch is normalised by the global batch's counts: the global values are the sums.
            loss, terms = loss.sum(), {k: v.sum() for k, v in terms.items()}
            terms["num_masks"] = num_masks
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_step = step + 1
        next_probs = annealing.attn_mask_probs(new_step, cfg.anneal_starts, cfg.anneal_ends, cfg.anneal_power)
        buffers = jax.tree_util.tree_map_with_path(
            lambda path, x: next_probs if path_str(path) == "attn_mask_probs" else x, state["buffers"]
        )
        metrics = {
            "train/loss": loss,
            **{f"train/{k}": v for k, v in terms.items()},
            "train/grad_norm": optax.tree.norm(grads),
            "train/param_norm": optax.tree.norm(params),
            "train/update_norm": optax.tree.norm(updates),
            **{f"train/attn_mask_prob_{j}": probs[j] for j in range(len(cfg.anneal_starts))},
        }
        if lr_fn is not None:
            metrics.update({f"train/{k}": v for k, v in lr_fn(step).items()})
        new_state = dict(state, params=params, opt=opt, step=new_step, buffers=buffers)
        return new_state, metrics

    return train_step


# ----------------------------------------------------------------------------------------------------------------
# Set-up: everything a run, the compile report and the benchmark need around the step, built the same way
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSetup:
    """The network's graph, the optimizer, the step settings and the state's abstract shapes and shardings on a
    mesh; nothing is materialised until `init_state` runs."""

    config: ml_collections.ConfigDict
    model_config: EoMTConfig
    mesh: Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    learning_rates: optim.LearningRates
    step_config: StepConfig
    abstract_state: dict[str, Any]  # ShapeDtypeStructs carrying the state's shardings
    state_sharding: dict[str, Any]

    @property
    def batch_sharding(self) -> NamedSharding:
        return mesh_lib.batch_sharding(self.mesh)

    def new_state(self, seed: int) -> dict[str, Any]:
        """The initial state (fresh network, optimizer state, step 0, the run's key), created already sharded:
        nothing is built whole on one host and then copied."""
        return jax.jit(self.init_state, static_argnums=0, out_shardings=self.state_sharding)(seed)

    def init_state(self, seed: int) -> dict[str, Any]:
        """The initial state, unsharded (`new_state` creates it on the mesh)."""
        model = EoMT(self.model_config, rngs=nnx.Rngs(seed))
        _, params, buffers = split_model(model)
        return {
            "params": params,
            "buffers": buffers,
            "opt": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed)),
        }

    def init_optimizer(self, params: nnx.State) -> Any:
        return jax.jit(self.tx.init, out_shardings=self.state_sharding["opt"])(params)

    def jit_step(self):
        """The train step, jitted with the state's and the batch's shardings; the state is donated."""
        step = make_train_step(self.graphdef, self.tx, self.step_config, lr_fn=self.learning_rates.groups_at,
                               mesh=self.mesh)
        return jax.jit(
            step,
            in_shardings=(self.state_sharding, {k: self.batch_sharding for k in TRAIN_KEYS}),
            out_shardings=(self.state_sharding, mesh_lib.replicated(self.mesh)),
            donate_argnums=(0,),
        )

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes, dtypes and shardings of one global training batch (see `eomt_jax.data.pipeline`)."""
        d = self.config.data
        b, m, s = d.batch_size, d.max_instances, d.image_size
        shapes = {
            "image": ((b, s, s, 3), jnp.uint8),
            "masks": ((b, m, s, s), jnp.bool_),
            "labels": ((b, m), jnp.int32),
            "valid": ((b, m), jnp.bool_),
            "is_crowd": ((b, m), jnp.bool_),
        }
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
                for k, (shape, dtype) in shapes.items()}

    def saved_activation_bytes(self) -> int:
        """What the backward pass keeps of one device's share of a microbatch (see `saved_activation_bytes`)."""
        images = self.config.data.batch_size // (self.config.grad_accum_steps * self.mesh.size)
        unsharded = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.abstract_state)
        return saved_activation_bytes(self.graphdef, self.step_config, unsharded, images, self.abstract_batch())


def setup(config: ml_collections.ConfigDict, model_config: EoMTConfig, mesh: Mesh) -> TrainSetup:
    """The `TrainSetup` of an experiment config on `mesh`. (Whether `grad_accum_steps` splits the batch over the
    mesh is checked when the step is traced.)"""
    step_config = StepConfig.from_config(config, model_config.num_classes)
    if config.data.batch_size % mesh.size:
        raise ValueError(f"data.batch_size {config.data.batch_size} is not divisible by the {mesh.size} devices")
    abstract_model = nnx.eval_shape(lambda: EoMT(model_config, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, _ = split_model(abstract_model)
    schedule = dict(total_steps=config.total_steps, depth=model_config.depth,
                    num_masked_blocks=model_config.num_blocks)
    tx = optim.build_optimizer(config.optim, abstract_params, **schedule)
    lrs = optim.learning_rates(config.optim, abstract_params, **schedule)
    partial = TrainSetup(config, model_config, mesh, graphdef, tx, lrs, step_config, {}, {})
    abstract = jax.eval_shape(lambda: partial.init_state(config.seed))
    sharding = mesh_lib.state_shardings(
        abstract, mesh, rules=tuple(tuple(r) for r in config.sharding.rules), min_size=config.sharding.min_size)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding)
    return dataclasses.replace(partial, abstract_state=abstract, state_sharding=sharding)
