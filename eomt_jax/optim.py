"""The optimizer: global-norm clipping, AdamW, layer-wise LR decay and the two-stage warmup + poly schedule.

Everything that decides how a parameter is trained is data in `config.optim` (see `default_config`): a list of
regex rules maps each parameter path ('backbone/blocks/3/attn/qkv/kernel', the NNX state path joined by '/') to

* a **group**, `"backbone"` or `"head"`, which picks the LR schedule (the backbone is frozen while the heads warm
  up, then warms up itself), and
* a **layer**, which picks the layer-wise decay multiplier `llrd ** (depth - 1 - layer)`: an int (the patch
  embedding, tokens and position embedding train like block 0), `"block"` (the index captured by the rule's
  `(?P<block>...)` group) or `None` (no decay: the final norm and the heads).

The first rule that matches the whole path wins; a parameter that no rule matches is an error. Upstream makes
every parameter its own torch param group; here all parameters share one Adam state and one step counter, and
each update is scaled by `peak_lr(path) * schedule[group](step)`, which is the same arithmetic (decoupled decay
`p <- p - lr * wd * p` folded into the update, as torch's AdamW does) with two schedule evaluations per step.

Typical use in the train step:

    tx = optim.build_optimizer(config.optim, params, total_steps=config.total_steps,
                               depth=model_config.depth, num_masked_blocks=model_config.num_blocks)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)   # params are required: weight decay reads them
    params = optax.apply_updates(params, updates)

`params` may be an `nnx.State` (e.g. from `nnx.split(model, nnx.Param, ...)`), a pure dict of arrays, or abstract
`jax.ShapeDtypeStruct`s; only the paths matter when building.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from eomt_jax.tree import path_str as path_to_str

GROUPS = ("backbone", "head")

# Parameter names of `eomt_jax.models.eomt.EoMT` (DINOv2 backbone). A backbone with other names (DINOv3) needs
# its own rules in its config; anything unmatched fails loudly instead of silently training at the wrong LR.
LR_RULES = (
    (r"backbone/blocks/(?P<block>\d+)/.+", "backbone", "block"),
    # Everything before block 0 trains at block 0's rate.
    (r"backbone/(patch_embed/.+|cls_token|reg_token|pos_embed)", "backbone", 0),
    # The final norm is shared by every prediction head and is never decayed.
    (r"backbone/norm/.+", "backbone", None),
    (r"(q|class_head|mask_head|upscale)/.+", "head", None),
)


def default_config() -> ml_collections.ConfigDict:
    """`config.optim` with the upstream defaults (AdamW, LLRD 0.8, warmup (500, 1000), poly 0.9, clip 0.01)."""
    return ml_collections.ConfigDict(
        dict(
            lr=1e-4,
            llrd=0.8,
            # False: the last K blocks (the ones that see the queries) train at the undecayed LR.
            llrd_l2_enabled=True,
            # Upstream quirk kept on purpose: lr_mult never multiplies any LR; a value other than 1 only switches
            # off the decay of the last K blocks, exactly like llrd_l2_enabled=False.
            lr_mult=1.0,
            weight_decay=0.05,  # on every parameter, norms and embeddings included (as upstream)
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            warmup_steps=(500, 1000),  # (heads warm up / backbone frozen, then backbone warms up)
            poly_power=0.9,
            clip_norm=0.01,  # global L2 norm over all gradients
            rules=LR_RULES,  # (path regex, group, layer); first full match wins
        )
    )


_KEYS = frozenset(default_config().keys())


# -- parameter paths -------------------------------------------------------------------------------------------------


def param_paths(params: Any) -> list[str]:
    """Every leaf path of `params` as a string, in tree order."""
    return [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


# -- per-parameter LR ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamLR:
    group: str  # "backbone" | "head": which schedule
    peak_lr: float  # lr * layer-decay multiplier: the LR this parameter reaches at the end of its warmup


def _check_config(config) -> None:
    keys = set(config.keys())
    unknown, missing = sorted(keys - _KEYS), sorted(_KEYS - keys)
    if unknown or missing:
        raise ValueError(
            f"bad optimizer config: unknown keys {unknown}, missing keys {missing}; expected exactly {sorted(_KEYS)}"
        )
    w = tuple(config.warmup_steps)
    if len(w) != 2 or any(int(x) != x or x < 0 for x in w):
        raise ValueError(f"optim.warmup_steps must be two non-negative ints (heads, backbone), got {w}")
    if config.clip_norm is not None and not config.clip_norm > 0:
        raise ValueError(f"optim.clip_norm must be positive (or None to disable clipping), got {config.clip_norm}")


def _compile_rules(rules) -> list[tuple[re.Pattern, str, Any]]:
    compiled = []
    for i, rule in enumerate(rules):
        if len(rule) != 3:
            raise ValueError(f"optim.rules[{i}] must be (path regex, group, layer), got {rule!r}")
        pattern, group, layer = rule
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"optim.rules[{i}]: bad regex {pattern!r}: {e}") from None
        if group not in GROUPS:
            raise ValueError(f"optim.rules[{i}] ({pattern!r}): group must be one of {GROUPS}, got {group!r}")
        if layer == "block":
            if "block" not in rx.groupindex:
                raise ValueError(f"optim.rules[{i}] ({pattern!r}): layer 'block' needs a (?P<block>...) group")
        elif not (layer is None or (isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0)):
            raise ValueError(
                f"optim.rules[{i}] ({pattern!r}): layer must be None, a block index or 'block', got {layer!r}"
            )
        compiled.append((rx, group, layer))
    return compiled


def layer_multiplier(config, layer: int | None, *, depth: int, num_masked_blocks: int) -> float:
    """LR multiplier of a parameter at `layer` (block index; None = undecayed) in a `depth`-block backbone."""
    if layer is None:
        return 1.0
    if not 0 <= layer < depth:
        raise ValueError(f"layer {layer} is outside the backbone's blocks 0..{depth - 1}")
    # Upstream's lr_mult check can only switch decay off for the query blocks; it never scales the LR.
    undecayed_tail = (not config.llrd_l2_enabled) or config.lr_mult != 1.0
    if undecayed_tail and layer >= depth - num_masked_blocks:
        return 1.0
    return float(config.llrd) ** (depth - 1 - layer)


def assign_param_lrs(config, params: Any, *, depth: int, num_masked_blocks: int) -> dict[str, ParamLR]:
    """{path: ParamLR} for every leaf of `params`, from `config.rules`.

    Raises ValueError naming every parameter that no rule matches (or whose block index is out of range).
    """
    _check_config(config)
    if not 1 <= num_masked_blocks <= depth:
        raise ValueError(f"num_masked_blocks must be in [1, depth={depth}], got {num_masked_blocks}")
    rules = _compile_rules(config.rules)
    table, errors = {}, []
    for path in param_paths(params):
        for rx, group, layer_spec in rules:
            m = rx.fullmatch(path)
            if m is None:
                continue
            layer = int(m.group("block")) if layer_spec == "block" else layer_spec
            try:
                mult = layer_multiplier(config, layer, depth=depth, num_masked_blocks=num_masked_blocks)
            except ValueError as e:
                errors.append(f"{path}: {e}")
                break
            table[path] = ParamLR(group, float(config.lr) * mult)
            break
        else:
            errors.append(f"{path}: matched by no rule in optim.rules")
    if errors:
        raise ValueError("cannot assign learning rates:\n  " + "\n  ".join(errors))
    return table


# -- schedules -------------------------------------------------------------------------------------------------------


def _poly(steps_done, steps_total: int, power: float):
    n = max(1, steps_total)
    # (n - done) / n rather than 1 - done / n: XLA may turn the division into a multiplication by a rounded
    # reciprocal, and only this form is exactly 0 at the last step. Clamped at 0: the schedule is defined up to
    # total_steps, and a negative base would give NaN under ** 0.9.
    return jnp.clip((n - steps_done) / n, 0.0, 1.0) ** power


def warmup_poly_schedules(
    *, warmup_steps: tuple[int, int], total_steps: int, power: float
) -> dict[str, optax.Schedule]:
    """{group: step -> factor in [0, 1]}, the fraction of a parameter's peak LR at optimizer step `step`.

    `step` counts optimizer updates already applied (0 for the first update) and may be traced: the schedule is
    jnp arithmetic, so a jitted train step compiles once for the whole run. With w1, w2 = warmup_steps and
    T = total_steps:

    * head: step / w1 while step < w1, then (1 - (step - w1) / max(1, T - w1)) ** power;
    * backbone: 0 while step < w1 (frozen; Adam moments still accumulate), (step - w1) / w2 while
      step < w1 + w2, then (1 - (step - w1 - w2) / max(1, T - w1 - w2)) ** power.

    Both reach 0 at step T and stay 0 after it.
    """
    w1, w2 = (int(w) for w in warmup_steps)
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def head(step):
        s = jnp.asarray(step, jnp.float32)
        return jnp.where(s < w1, s / max(w1, 1), _poly(s - w1, total_steps - w1, power))

    def backbone(step):
        s = jnp.asarray(step, jnp.float32)
        warm = (s - w1) / max(w2, 1)
        after = _poly(s - w1 - w2, total_steps - w1 - w2, power)
        return jnp.where(s < w1, 0.0, jnp.where(s < w1 + w2, warm, after))

    return {"head": head, "backbone": backbone}


@dataclasses.dataclass(frozen=True)
class LearningRates:
    """Peak LR and group of every parameter, plus the group schedules: the LR of any parameter at any step."""

    params: dict[str, ParamLR]
    schedules: dict[str, optax.Schedule]
    lr: float  # config.lr: the undecayed peak

    def at(self, step) -> dict[str, jax.Array]:
        """{path: LR used by the update at `step`} (step = updates applied before it; may be traced)."""
        factors = {g: s(step) for g, s in self.schedules.items()}
        return {p: info.peak_lr * factors[info.group] for p, info in self.params.items()}

    def groups_at(self, step) -> dict[str, jax.Array]:
        """{'lr/head': ..., 'lr/backbone': ...}: the undecayed LR of each group, for logging."""
        return {f"lr/{g}": self.lr * s(step) for g, s in self.schedules.items()}


def learning_rates(config, params: Any, *, total_steps: int, depth: int, num_masked_blocks: int) -> LearningRates:
    """The per-parameter LR plan that `build_optimizer` applies (same arguments)."""
    table = assign_param_lrs(config, params, depth=depth, num_masked_blocks=num_masked_blocks)
    schedules = warmup_poly_schedules(
        warmup_steps=tuple(config.warmup_steps), total_steps=total_steps, power=float(config.poly_power)
    )
    return LearningRates(table, schedules, float(config.lr))


# -- the optax chain -------------------------------------------------------------------------------------------------


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale all gradients by min(1, max_norm / (norm + 1e-6)), norm = global L2 norm (torch's clip_grad_norm_).

    The 1e-6 matches torch, whose clip factor upstream training used; optax's own version divides by the bare norm.
    """

    def update(updates, state, params=None):
        del params
        leaves = jax.tree_util.tree_leaves(updates)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))
        factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree_util.tree_map(lambda g: (g * factor).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class ScaleByParamLRState(NamedTuple):
    count: jax.Array  # int32: updates applied so far = the schedule step of the next update


def scale_by_param_lrs(plan: LearningRates) -> optax.GradientTransformation:
    """Multiply each update by -LR(path, step), the descent step of AdamW with per-parameter schedules."""

    def init(params):
        del params
        return ScaleByParamLRState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        factors = {g: s(state.count) for g, s in plan.schedules.items()}

        def scale(path, u):
            name = path_to_str(path)
            info = plan.params.get(name)
            if info is None:
                raise KeyError(f"parameter {name!r} was not in the tree the optimizer was built for")
            return (-info.peak_lr * factors[info.group]).astype(u.dtype) * u

        updates = jax.tree_util.tree_map_with_path(scale, updates)
        return updates, ScaleByParamLRState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def build_optimizer(
    config, params: Any, *, total_steps: int, depth: int, num_masked_blocks: int
) -> optax.GradientTransformation:
    """The training optimizer from `config.optim` (see `default_config`).

    Args:
      config: the `optim` section; unknown or missing keys are an error.
      params: the trainable parameters (or their abstract shapes); used only for their paths.
      total_steps: T, the step at which every LR reaches 0.
      depth: L, the number of backbone blocks (layer-wise decay is `llrd ** (L - 1 - layer)`).
      num_masked_blocks: K, the last blocks that see the queries (the model config's `num_blocks`).

    Returns clip → Adam moments → + weight_decay · param → × −LR(path, step). `update` needs `params`.
    """
    plan = learning_rates(config, params, total_steps=total_steps, depth=depth, num_masked_blocks=num_masked_blocks)
    parts = []
    if config.clip_norm is not None:
        parts.append(clip_by_global_norm(float(config.clip_norm)))
    parts += [
        optax.scale_by_adam(b1=float(config.b1), b2=float(config.b2), eps=float(config.eps)),
        optax.add_decayed_weights(float(config.weight_decay)),
        scale_by_param_lrs(plan),
    ]
    return optax.chain(*parts)
