"""Memory levers of the train step: gradient accumulation (`config.grad_accum_steps`) and per-block
rematerialisation (`config.remat`). Both must leave the training arithmetic unchanged, up to float rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from eomt_jax.mesh import batch_sharding, make_mesh, state_shardings
from eomt_jax.models.eomt import REMAT_POLICIES
from eomt_jax.train_step import make_train_step
from eomt_jax.tree import flatten_paths
from tests.tiny import random_batch, runlocal_config, tiny_setup
QUERIES, SLOTS, SIZE, CLASSES = 4, 6, 32, 3


def _setup(grad_accum_steps=1, remat="none"):
    config = runlocal_config()
    config.model.update(embed_dim=32, num_heads=2, mlp_hidden=64, patch_size=8, image_size=(SIZE, SIZE),
                        num_queries=QUERIES, num_classes=CLASSES,  # depth 2, one masked block (runlocal)
                        layerscale_init=0.1)  # blocks that matter, as in a pretrained backbone, not 1e-5
    config.total_steps = 6
    # Step 0 masks always, step 1 with probability 0.5 ** 0.9 (the random per-(image, query) disabling is live),
    # step 2 never: three steps cross both annealing phases.
    config.anneal.starts, config.anneal.ends = (0,), (2,)
    config.loss.num_points = 32
    config.grad_accum_steps, config.remat = grad_accum_steps, remat
    return tiny_setup(config)


def _batch(seed, b=32):
    """Images with 0 to SLOTS targets: some have more targets than there are queries (matched: only QUERIES)."""
    return random_batch(seed, b, SIZE, SLOTS, CLASSES, targets=(0, SLOTS + 1), box=(4, 12), margin=8)


def _jit_step(mesh, graphdef, tx, lrs, state, step_cfg, batch):
    step = make_train_step(graphdef, tx, step_cfg, lr_fn=lrs.groups_at, mesh=mesh)
    sh = state_shardings(jax.eval_shape(lambda: state), mesh, min_size=1024)
    fn = jax.jit(step, in_shardings=(sh, {k: batch_sharding(mesh) for k in batch}),
                 out_shardings=(sh, NamedSharding(mesh, P())))
    return fn, jax.device_put(state, sh)


def test_four_microbatches_equal_one_large_batch_over_annealing_phases():
    """Both levers at once against the plain step: 4 rematerialised microbatches of 8 images (one per device) vs
    one batch of 32, three consecutive updates. The random draws are per image (`image_index`), so every image
    gets the same attention-mask disabling and loss points either way and the comparison is of the arithmetic
    alone. (The remat test below checks remat on its own, per policy; one compile fewer keeps this file fast.)"""
    mesh = make_mesh([("data", 8)])
    batches = [_batch(i) for i in range(3)]
    assert batches[0]["valid"].sum(-1).max() > QUERIES  # the CE normaliser's min(targets, queries) is exercised
    runs = {}
    for n, remat in ((1, "none"), (4, "block")):
        fn, state = _jit_step(mesh, *_setup(grad_accum_steps=n, remat=remat), batches[0])
        history = []
        for batch in batches:
            state, metrics = fn(state, batch)
            history.append(jax.device_get(metrics))
        runs[n] = history, jax.device_get(flatten_paths(state["params"])), fn
    (one, params1, _), (four, params4, fn4) = runs[1], runs[4]
    assert fn4._cache_size() == 1  # the scan, remat and the annealing (probabilities 1 -> 0.54 -> 0) compile once
    assert [float(m["train/attn_mask_prob_0"]) for m in four] == pytest.approx([1.0, 0.5**0.9, 0.0])
    for step, (a, b) in enumerate(zip(one, four)):
        assert set(a) == set(b)
        for k in a:
            if "lr" in k or "attn_mask_prob" in k or k == "train/num_masks":
                assert float(a[k]) == float(b[k]), (step, k)  # evaluated once per update, from the same inputs
            else:
                # float32 sums in another order (per microbatch, then over microbatches): relative round-off.
                np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=f"step {step} {k}")
    for k in params1:
        # AdamW moves every parameter by about lr (1e-4) per step: 1e-5 relative round-off in a gradient shows
        # far below atol 1e-7.
        np.testing.assert_allclose(params4[k], params1[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_grad_accum_steps_must_split_the_batch_over_every_device():
    mesh = make_mesh([("data", 8)])
    batch = _batch(0, b=16)
    for n in (3, 4):  # 16 / 3 is no integer; 16 / 4 = 4 images cannot span 8 devices
        fn, state = _jit_step(mesh, *_setup(grad_accum_steps=n), batch)
        with pytest.raises(ValueError, match="config.grad_accum_steps"):
            fn.lower(state, batch)
    with pytest.raises(ValueError, match="config.grad_accum_steps"):
        _setup(grad_accum_steps=0)


def test_remat_policies_give_the_same_loss_and_gradients():
    """Remat changes only what the backward pass recomputes. The objective is a smooth function of every output
    rather than the training loss: remat touches only the network, and the full step with remat (matching and
    point losses included) is in the accumulation test."""
    graphdef, _, _, state, _ = _setup()
    images = jnp.asarray(_batch(1, b=4)["image"], jnp.float32) / 255.0
    probs = jnp.full((1,), 0.5, jnp.float32)  # masked attention, randomly disabled per (image, query)

    def objective(params, remat):
        model = nnx.merge(graphdef, params, state["buffers"])
        ml, cl = model(images, probs, key=jax.random.key(1), masked_attn=True, remat=remat)
        return sum(jnp.mean(jnp.sin(x)) for x in ml + cl)

    results = {}
    for remat in REMAT_POLICIES:
        # The policy reaches the program: one checkpointed computation per transformer block (depth 2).
        eqns = jax.make_jaxpr(lambda p: objective(p, remat))(state["params"]).jaxpr.eqns
        policies = [e.params["policy"] for e in eqns if "policy" in e.params]
        assert policies == ([] if remat == "none" else [REMAT_POLICIES[remat]] * 2), remat
        value, grads = jax.jit(jax.value_and_grad(lambda p: objective(p, remat)))(state["params"])
        results[remat] = float(value), jax.device_get(flatten_paths(grads))
    ref_value, ref_grads = results["none"]
    for remat, (value, grads) in results.items():
        assert set(grads) == set(ref_grads)  # same parameter tree, same paths
        np.testing.assert_allclose(value, ref_value, rtol=1e-6)
        for k in grads:
            # The same operations, recomputed: float32 round-off at most (atol for entries near zero).
            np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-6, atol=1e-9, err_msg=f"{remat} {k}")


def test_saved_activations_are_counted_from_the_program_and_remat_reduces_them():
    """`saved_activation_bytes` (printed by --mode=compile and before every run) counts what the backward pass
    keeps; per-block remat keeps only each block's input, so it must count less, and more images count more."""
    from eomt_jax.train_step import saved_activation_bytes

    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batch(0, b=4).items()}
    counts = {}
    for remat in ("none", "block"):
        graphdef, _, _, state, step_cfg = _setup(remat=remat)
        abstract = jax.eval_shape(lambda: state)
        counts[remat] = [saved_activation_bytes(graphdef, step_cfg, abstract, n, batch) for n in (1, 2)]
    assert 0 < counts["block"][0] < counts["none"][0]
    assert counts["none"][1] > counts["none"][0] and counts["block"][1] > counts["block"][0]
