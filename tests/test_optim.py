"""Optimizer, LR plan and masked-attention annealing against the formulas of the original's
`training/lightning_module.py` (optimizer, layer-wise decay, mask annealing) and
`training/two_stage_warmup_poly_schedule.py`.

The expected numbers are written out here from the spec (not from eomt_jax.optim), and the LR tests read the LR
back out of real optax updates, so a wrong rule, schedule, chain order or decay would fail them.
"""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from eomt_jax import annealing, optim

REPO = Path(__file__).resolve().parents[1]

DEPTH, K = 6, 2  # a small backbone: L = 6 blocks, the last 2 see the queries
W1, W2, T = 5, 10, 40
LR, LLRD, POWER = 1e-4, 0.8, 0.9


def tiny_params(depth=DEPTH, dim=2, seed=0):
    """A nested dict with the parameter names of eomt_jax.models.eomt.EoMT, every leaf tiny."""
    rng = np.random.default_rng(seed)

    def a(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    def dense(i, o):
        return {"kernel": a(i, o), "bias": a(o)}

    def norm():
        return {"scale": a(dim), "bias": a(dim)}

    block = lambda: {  # noqa: E731
        "norm1": norm(),
        "attn": {"qkv": dense(dim, 3 * dim), "proj": dense(dim, dim)},
        "ls1": {"gamma": a(dim)},
        "norm2": norm(),
        "mlp": {"fc1": dense(dim, 2 * dim), "fc2": dense(2 * dim, dim)},
        "ls2": {"gamma": a(dim)},
    }
    return {
        "backbone": {
            "patch_embed": {"proj": {"kernel": a(2, 2, 3, dim), "bias": a(dim)}},
            "cls_token": a(1, 1, dim),
            "reg_token": a(1, 2, dim),
            "pos_embed": a(1, 4, dim),
            "blocks": {i: block() for i in range(depth)},
            "norm": norm(),
        },
        "q": {"embedding": a(3, dim)},
        "class_head": dense(dim, 4),
        "mask_head": {"fc1": dense(dim, dim), "fc2": dense(dim, dim), "fc3": dense(dim, dim)},
        "upscale": {
            j: {"conv1": dense(dim, dim), "conv2": {"kernel": a(3, 3, 1, dim)}, "norm": norm()} for j in range(2)
        },
    }


def config(**overrides):
    c = optim.default_config()
    c.warmup_steps = (W1, W2)
    c.update(overrides)
    return c


# Representative parameters and their peak LR (the original's `training/lightning_module.py`, `configure_optimizers`), for llrd_l2_enabled True / False.
PEAKS = {
    "class_head/kernel": (LR, LR),
    "upscale/1/conv2/kernel": (LR, LR),
    "backbone/blocks/5/attn/qkv/kernel": (LR, LR),  # block L-1
    "backbone/blocks/4/ls1/gamma": (LR * LLRD, LR),  # a query block: undecayed when llrd_l2 is off
    "backbone/blocks/3/mlp/fc2/bias": (LR * LLRD**2, LR * LLRD**2),  # below the query blocks: always decayed
    "backbone/blocks/0/norm1/scale": (LR * LLRD**5, LR * LLRD**5),  # block 0
    "backbone/pos_embed": (LR * LLRD**5, LR * LLRD**5),  # embeddings train like block 0
    "backbone/patch_embed/proj/kernel": (LR * LLRD**5, LR * LLRD**5),
    "backbone/norm/scale": (LR, LR),  # final norm: never decayed
}
BACKBONE = {p for p in PEAKS if p.startswith("backbone/")}


def spec_factor(backbone: bool, step: int) -> float:
    """The original's `TwoStageWarmupPolySchedule` written out in plain Python."""
    if not backbone:
        return step / W1 if step < W1 else (1 - (step - W1) / max(1, T - W1)) ** POWER
    if step < W1:
        return 0.0
    if step < W1 + W2:
        return (step - W1) / W2
    return (1 - (step - W1 - W2) / max(1, T - W1 - W2)) ** POWER


def flat(tree):
    return {optim.path_to_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


KEY_STEPS = (0, W1 - 1, W1, W1 + W2 - 1, W1 + W2, 25, T - 1, T)


@pytest.mark.parametrize("l2", [True, False])
def test_learning_rates_match_spec_at_key_steps(l2):
    plan = optim.learning_rates(
        config(llrd_l2_enabled=l2), tiny_params(), total_steps=T, depth=DEPTH, num_masked_blocks=K
    )
    lrs_at = jax.jit(plan.at)  # one compilation instead of op-by-op dispatch per step
    for step in KEY_STEPS:
        got = lrs_at(step)
        for path, peaks in PEAKS.items():
            want = peaks[0 if l2 else 1] * spec_factor(path in BACKBONE, step)
            np.testing.assert_allclose(float(got[path]), want, rtol=1e-6, atol=1e-14, err_msg=f"{path} @ {step}")
    # The spec's landmarks, spelled out once: first step LR 0 everywhere; backbone still frozen at w1 - 1 and
    # exactly at w1 (its warmup starts from 0); both groups at their peak at w1 / w1 + w2; 0 at T.
    head, bb = "class_head/kernel", "backbone/blocks/5/attn/qkv/kernel"
    assert float(lrs_at(0)[head]) == 0.0 and float(lrs_at(0)[bb]) == 0.0
    assert float(lrs_at(W1 - 1)[bb]) == 0.0 and float(lrs_at(W1)[bb]) == 0.0
    np.testing.assert_allclose([float(lrs_at(W1)[head]), float(lrs_at(W1 + W2)[bb])], [LR, LR], rtol=1e-6)
    assert float(lrs_at(T)[head]) == 0.0 and float(lrs_at(T)[bb]) == 0.0
    groups = plan.groups_at(W1 + 2)
    np.testing.assert_allclose(
        [float(groups["lr/head"]), float(groups["lr/backbone"])],
        [LR * spec_factor(False, W1 + 2), LR * spec_factor(True, W1 + 2)],
        rtol=1e-6,
    )


@pytest.mark.parametrize("l2", [True, False])
def test_optax_chain_applies_the_spec_lrs(l2):
    """Run the real chain for steps 0..T on unit gradients (no decay) and read each step's LR off the updates.

    With a constant gradient g, Adam's bias-corrected moments are exactly g and g², so every update is
    -lr · g / (|g| + eps) with g the clipped gradient 0.01 / (‖1‖ + 1e-6).
    """
    params = tiny_params()
    tx = optim.build_optimizer(
        config(llrd_l2_enabled=l2, weight_decay=0.0), params, total_steps=T, depth=DEPTH, num_masked_blocks=K
    )
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    g = 0.01 / (math.sqrt(n) + 1e-6)
    per_unit = g / (g + 1e-8)

    @jax.jit
    def run(opt_state):
        def body(s, _):
            updates, s = tx.update(grads, s, params)
            return s, updates

        return jax.lax.scan(body, opt_state, None, length=T + 1)[1]

    updates = flat(run(tx.init(params)))
    for path, peaks in PEAKS.items():
        rows = updates[path].reshape(T + 1, -1)  # one row per step
        assert np.all(rows == rows[:, :1]), path  # every element of a leaf gets the same update
        got = rows[:, 0]
        want = [-peaks[0 if l2 else 1] * spec_factor(path in BACKBONE, s) * per_unit for s in range(T + 1)]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-13, err_msg=path)


def test_weight_decay_applies_to_every_parameter():
    """Zero gradients leave only the decoupled decay: update = -lr(path, step) · 0.05 · p for every leaf."""
    params = tiny_params(seed=1)
    cfg = config()
    assert cfg.weight_decay == 0.05
    tx = optim.build_optimizer(cfg, params, total_steps=T, depth=DEPTH, num_masked_blocks=K)
    plan = optim.learning_rates(cfg, params, total_steps=T, depth=DEPTH, num_masked_blocks=K)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    update = jax.jit(lambda s: tx.update(zeros, s, params))
    state = tx.init(params)
    step = W1 + W2 + 3
    for _ in range(step):
        _, state = update(state)
    updates = flat(update(state)[0])
    lrs = plan.at(step)
    p = flat(params)
    assert set(updates) == set(p) and len(p) == 26 + 14 * DEPTH
    for path in p:
        assert float(lrs[path]) > 0
        np.testing.assert_allclose(updates[path], -float(lrs[path]) * 0.05 * p[path], rtol=1e-5, err_msg=path)


def test_clipping_global_norm():
    clip = optim.clip_by_global_norm(0.01)
    big = {"a": jnp.full((3,), 2.0), "b": {"c": jnp.full((4,), -1.5)}}  # norm sqrt(12 + 9) = sqrt(21)
    out, _ = clip.update(big, clip.init(big))
    np.testing.assert_allclose(float(optax.tree.norm(out)), 0.01 * math.sqrt(21) / (math.sqrt(21) + 1e-6), rtol=1e-6)
    # One factor for all leaves (global, not per-leaf clipping).
    np.testing.assert_allclose(np.asarray(out["a"]) / 2.0, np.asarray(out["b"]["c"])[:3] / -1.5, rtol=1e-6)
    small = jax.tree_util.tree_map(lambda x: x * 1e-4, big)  # norm 4.6e-4 < 0.01: untouched
    out, _ = clip.update(small, clip.init(small))
    jax.tree_util.tree_map(np.testing.assert_array_equal, out, small)

    # In the chain, clipping comes before Adam: the first moment after one step is (1 - b1) · clipped gradient.
    params = {"class_head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "backbone": {"pos_embed": jnp.ones(4)}}
    grads = jax.tree_util.tree_map(lambda x: 100.0 * x, params)  # global norm 100 · sqrt(13)
    for clip_norm, want in ((0.01, 0.1 * 0.01), (None, 0.1 * 100 * math.sqrt(13))):
        tx = optim.build_optimizer(config(clip_norm=clip_norm), params, total_steps=T, depth=1, num_masked_blocks=1)
        _, state = jax.jit(tx.update)(grads, tx.init(params), params)
        (adam,) = [s for s in state if isinstance(s, optax.ScaleByAdamState)]
        np.testing.assert_allclose(float(optax.tree.norm(adam.mu)), want, rtol=1e-5)


def test_upstream_worked_values():
    """The original's layer-wise decay worked through on a 24-block backbone, and the lr_mult quirk."""
    params = tiny_params(depth=24, dim=1)

    def peaks(**kw):
        table = optim.assign_param_lrs(config(**kw), params, depth=24, num_masked_blocks=4)
        return {p: v.peak_lr for p, v in table.items()}

    v2 = peaks()  # DINOv2-L
    np.testing.assert_allclose(v2["backbone/blocks/23/mlp/fc1/kernel"], 1e-4)
    np.testing.assert_allclose(v2["backbone/blocks/20/mlp/fc1/kernel"], 5.12e-5)
    for p in ("backbone/blocks/0/attn/proj/bias", "backbone/pos_embed", "backbone/cls_token", "backbone/reg_token"):
        np.testing.assert_allclose(v2[p], 1e-4 * 0.8**23, rtol=1e-12)
        assert 5.8e-7 < v2[p] < 6.0e-7
    for p in ("q/embedding", "mask_head/fc3/bias", "backbone/norm/bias"):
        assert v2[p] == 1e-4

    v3 = peaks(lr=2e-4, llrd_l2_enabled=False)  # DINOv3-L COCO
    for i in range(20, 24):
        np.testing.assert_allclose(v3[f"backbone/blocks/{i}/ls2/gamma"], 2e-4)
    np.testing.assert_allclose(v3["backbone/blocks/19/ls2/gamma"], 2e-4 * 0.8**4)
    np.testing.assert_allclose(v3["backbone/patch_embed/proj/bias"], 2e-4 * 0.8**23)

    # lr_mult never scales a LR; != 1 only switches off the query blocks' decay (upstream's dead branch).
    assert peaks(lr_mult=0.1) == peaks(llrd_l2_enabled=False) != v2
    flat_lr = peaks(lr=2e-4, llrd=1.0, lr_mult=0.1)  # DINOv3-L ADE20K semantic: everything at 2e-4
    assert set(flat_lr.values()) == {2e-4}


def _dinov3_peaks(config_file):
    """{path: ParamLR} of a DINOv3 zoo config, for the parameters of its real-size network built abstractly."""
    from eomt_jax import config_lib
    from eomt_jax.models.eomt import EoMT
    from eomt_jax.train_step import split_model

    config = config_lib.load_config_file(str(REPO / "configs" / config_file))
    cfg = config_lib.model_config(config)
    _, params, _ = split_model(nnx.eval_shape(lambda: EoMT(cfg, rngs=nnx.Rngs(0))))
    return cfg, optim.assign_param_lrs(config.optim, params, depth=cfg.depth, num_masked_blocks=cfg.num_blocks)


# The DINOv3 settings' peak LRs (the original's `configure_optimizers` in `training/lightning_module.py` worked
# through on the DINOv3 parameter names), lr 2e-4: block i below the K query blocks 2e-4 * llrd ** (L - 1 - i); the
# query blocks, the final norm and the heads 2e-4; the patch embedding and the tokens block 0's rate.
# (config, L, K, llrd, {block: the worked example's rounded figure}).
DINOV3_PEAKS = [
    ("dinov3_coco_panoptic_large.py", 24, 4, 0.8, {19: 8.192e-5, 0: 1.181e-6}),
    ("dinov3_coco_instance_large.py", 24, 4, 0.8, {19: 8.192e-5, 0: 1.181e-6}),
    ("dinov3_coco_panoptic_small.py", 12, 3, 0.8, {8: 1.024e-4, 0: 1.718e-5}),
    ("dinov3_coco_panoptic_base.py", 12, 3, 0.8, {8: 1.024e-4, 0: 1.718e-5}),
    ("dinov3_ade20k_semantic_large.py", 24, 4, 1.0, {19: 2e-4, 0: 2e-4}),  # no decay: everything at 2e-4
]


@pytest.mark.parametrize("config_file,depth,k,llrd,figures", DINOV3_PEAKS, ids=[p[0] for p in DINOV3_PEAKS])
def test_dinov3_zoo_learning_rates(config_file, depth, k, llrd, figures):
    cfg, table = _dinov3_peaks(config_file)
    assert (cfg.backbone, cfg.depth, cfg.num_blocks) == ("dinov3", depth, k)
    assert not any("pos_embed" in p for p in table)  # RoPE: no position parameter
    assert {"backbone/cls_token", "backbone/reg_token", "backbone/patch_embed/proj/kernel"} <= set(table)
    for path, info in table.items():
        if path.startswith("backbone/blocks/"):
            block = int(path.split("/")[2])
            want = 2e-4 if block >= depth - k else 2e-4 * llrd ** (depth - 1 - block)
        elif path.startswith("backbone/") and not path.startswith("backbone/norm/"):
            want = 2e-4 * llrd ** (depth - 1)
        else:
            want = 2e-4
        assert info.group == ("backbone" if path.startswith("backbone/") else "head"), path
        np.testing.assert_allclose(info.peak_lr, want, rtol=1e-9, err_msg=path)
    for block, figure in figures.items():
        np.testing.assert_allclose(table[f"backbone/blocks/{block}/attn/qkv/kernel"].peak_lr, figure, rtol=5e-4)


@pytest.mark.parametrize("l2", [False, True])
def test_dinov3_tiny_learning_rates(l2):
    """L 4, K 2, lr 2e-4 on the parameter names of the DINOv3 network."""
    from eomt_jax.models.eomt import EoMT, preset
    from eomt_jax.train_step import split_model

    cfg = preset("S", backbone="dinov3", num_classes=5, num_queries=4, image_size=64, embed_dim=64, depth=4,
                 num_heads=2, mlp_hidden=128, num_blocks=2)
    _, params, _ = split_model(nnx.eval_shape(lambda: EoMT(cfg, rngs=nnx.Rngs(0))))
    table = optim.assign_param_lrs(config(lr=2e-4, llrd_l2_enabled=l2), params, depth=4, num_masked_blocks=2)
    want = {"backbone/patch_embed/proj/bias": 1.024e-4, "backbone/cls_token": 1.024e-4,
            "backbone/reg_token": 1.024e-4, "backbone/blocks/0/mlp/fc1/kernel": 1.024e-4,
            "backbone/blocks/1/attn/qkv/bias": 1.28e-4, "backbone/blocks/2/ls1/gamma": 1.6e-4 if l2 else 2e-4,
            "backbone/blocks/3/norm2/scale": 2e-4, "backbone/norm/scale": 2e-4, "q/embedding": 2e-4,
            "class_head/kernel": 2e-4, "mask_head/fc3/bias": 2e-4, "upscale/0/conv2/kernel": 2e-4}
    np.testing.assert_allclose([table[p].peak_lr for p in want], list(want.values()), rtol=1e-12)


def test_nnx_state_paths():
    """An nnx.State (Variables add a trailing `.value` key; nnx.List adds int keys) gives the same names."""

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm1 = nnx.LayerNorm(2, rngs=rngs)

    class Backbone(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Block(rngs) for _ in range(2)])
            self.pos_embed = nnx.Param(jnp.zeros((1, 4, 2)))
            self.norm = nnx.LayerNorm(2, rngs=rngs)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.backbone = Backbone(rngs)
            self.class_head = nnx.Linear(2, 3, rngs=rngs)

    _, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    assert sorted(optim.param_paths(state)) == sorted(
        ["backbone/blocks/0/norm1/scale", "backbone/blocks/0/norm1/bias", "backbone/blocks/1/norm1/scale"]
        + ["backbone/blocks/1/norm1/bias", "backbone/pos_embed", "backbone/norm/scale", "backbone/norm/bias"]
        + ["class_head/kernel", "class_head/bias"]
    )
    tx = optim.build_optimizer(config(), state, total_steps=T, depth=2, num_masked_blocks=1)
    grads = jax.tree_util.tree_map(jnp.ones_like, state)
    opt_state = tx.init(state)
    moved = []  # per step: (head moved, backbone moved)
    for _ in range(W1 + 2):
        updates, opt_state = tx.update(grads, opt_state, state)
        u = flat(updates)
        moved.append((bool(np.all(u["class_head/kernel"] < 0)), bool(np.all(u["backbone/blocks/1/norm1/scale"] < 0))))
    # Step 0 has LR 0 everywhere; the backbone is frozen through step w1 (its warmup starts from 0 there).
    assert moved == [(False, False)] + [(True, False)] * W1 + [(True, True)]
    # The update tree keeps the nnx.State structure, so it can be applied to the state.
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(state)


def test_config_errors():
    params = tiny_params()
    kw = dict(total_steps=T, depth=DEPTH, num_masked_blocks=K)
    c = config()
    c.momentum = 0.9  # e.g. a typo'd or stale key: ConfigDicts are not locked by default
    with pytest.raises(ValueError, match="unknown keys \\['momentum'\\]"):
        optim.build_optimizer(c, params, **kw)

    c = config()
    del c["poly_power"]
    with pytest.raises(ValueError, match=r"missing keys \['poly_power'\]"):
        optim.build_optimizer(c, params, **kw)

    extra = dict(params, extra_head={"kernel": jnp.zeros(2)})
    with pytest.raises(ValueError, match="extra_head/kernel: matched by no rule"):
        optim.build_optimizer(config(), extra, **kw)

    with pytest.raises(ValueError, match="backbone/blocks/5/.*outside the backbone's blocks 0..3"):
        optim.build_optimizer(config(), params, total_steps=T, depth=4, num_masked_blocks=K)

    with pytest.raises(ValueError, match="group must be one of"):
        optim.build_optimizer(config(rules=((r".*", "heads", None),)), params, **kw)
    with pytest.raises(ValueError, match="needs a \\(\\?P<block>"):
        optim.build_optimizer(config(rules=((r"backbone/blocks/(\d+)/.*", "backbone", "block"),)), params, **kw)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.build_optimizer(config(warmup_steps=(5,)), params, **kw)

    # A tree with a parameter the optimizer was not built for fails at update time, naming it.
    tx = optim.build_optimizer(config(), params, **kw)
    other = dict(params, mask_head=dict(params["mask_head"], fc4={"kernel": jnp.ones(2)}))
    with pytest.raises(KeyError, match="mask_head/fc4/kernel"):
        jax.eval_shape(tx.update, other, tx.init(other), other)


def test_annealing_values():
    starts, ends = (10, 20), (20, 40)

    def spec(step):
        out = []
        for s, e in zip(starts, ends):
            out.append(1.0 if step < s else 0.0 if step >= e else (1 - (step - s) / (e - s)) ** 0.9)
        return out

    for step in (0, 9, 10, 11, 15, 19, 20, 21, 30, 39, 40, 1000):
        got = annealing.attn_mask_probs(step, starts, ends)
        assert got.shape == (2,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), spec(step), rtol=1e-6, atol=0, err_msg=str(step))
    np.testing.assert_allclose(annealing.attn_mask_probs(15, starts, ends), [0.5**0.9, 1.0], rtol=1e-6)

    # DINOv3 configs start annealing block 0 at step 0: the first batch still runs with 1 (upstream's initial
    # buffer), the second with the value after one step.
    got = jax.vmap(lambda t: annealing.attn_mask_probs(t, (0,), (3000,)))(jnp.array([0, 1, 3000]))
    np.testing.assert_allclose(np.asarray(got)[:, 0], [1.0, (1 - 1 / 3000) ** 0.9, 0.0], rtol=1e-6)

    for bad in (((5,), (5,)), ((5, 6), (7,)), ((-1,), (4,))):
        with pytest.raises(ValueError):
            annealing.attn_mask_probs(0, *bad)


def test_one_compilation_across_schedule_and_annealing_phases():
    params = tiny_params()
    tx = optim.build_optimizer(config(), params, total_steps=T, depth=DEPTH, num_masked_blocks=K)
    starts, ends = (3, 12), (12, 30)  # anneal phases cross the warmup/poly phases of the LR
    grads = jax.tree_util.tree_map(jnp.ones_like, params)

    @jax.jit
    def step_fn(params, opt_state, step):
        probs = annealing.attn_mask_probs(step, starts, ends)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, probs

    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    opt_state = tx.init(params)
    probs = []
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for step in range(T + 2):
            params, opt_state, p = step_fn(params, opt_state, np.int32(step))
            probs.append(p)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(compiles) == 1
    assert step_fn._cache_size() == 1
    probs = np.asarray(probs)
    np.testing.assert_allclose(probs[[0, 3, 12, 20, 30]], [[1, 1], [1, 1], [0, 1], [0, (1 - 8 / 18) ** 0.9], [0, 0]])
