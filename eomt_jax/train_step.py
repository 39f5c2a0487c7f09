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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from eomt_jax import annealing, losses
from eomt_jax.tree import path_str


@dataclasses.dataclass(frozen=True)
class StepConfig:
    num_classes: int
    anneal_starts: tuple[int, ...]
    anneal_ends: tuple[int, ...]
    anneal_power: float
    loss_kwargs: dict[str, Any]


def split_model(model: nnx.Module):
    from eomt_jax.models.eomt import Buffer

    graphdef, params, buffers = nnx.split(model, nnx.Param, Buffer)
    return graphdef, params, buffers


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg: StepConfig,
    *,
    lr_fn: Callable[[jax.Array], dict[str, jax.Array]] | None = None,
    mesh=None,
):
    """Build the (unjitted) step; the caller jits it with shardings and donation."""

    def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
        step = state["step"]
        probs = annealing.attn_mask_probs(step, cfg.anneal_starts, cfg.anneal_ends, cfg.anneal_power)
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        model_key, loss_key = jax.random.split(key)
        images = batch["image"].astype(jnp.float32) / 255.0
        targets = {k: batch[k] for k in ("masks", "labels", "valid")}

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state["buffers"])
            mask_logits, class_logits = model(images, probs, key=model_key, masked_attn=True)
            total, terms = losses.mask_classification_loss(
                mask_logits, class_logits, targets, loss_key, num_classes=cfg.num_classes, mesh=mesh,
                **cfg.loss_kwargs,
            )
            return total, terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
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
