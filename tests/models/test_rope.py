"""DINOv3's rotary positions in the network and the train step: tables, which tokens rotate, the key bias, and
the training-time coordinate rescale (drawn per step from the run's key, 1 in evaluation, never recompiling)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eomt_jax import config_lib, train_step
from eomt_jax.models.eomt import EoMT, EoMTConfig, draw_rope_scale
from eomt_jax.models.vit import apply_rope, rope_tables
from eomt_jax.train_step import make_train_step
from tests.tiny import random_batch, runlocal_config, tiny_setup

TINY = dict(backbone="dinov3", embed_dim=64, depth=3, num_heads=2, mlp_hidden=128, num_queries=6, num_classes=4,
            num_blocks=2, image_size=(64, 48), layer_norm_eps=1e-5)


def test_rope_tables_follow_the_formula():
    # 3 x 2 grid, head dim 8: 2 frequencies 100^0 and 100^-1/2, coordinates per axis at the patch centres.
    cos, sin = rope_tables((3, 2), 8, 100.0)
    freqs = np.array([1.0, 0.1])
    y = np.array([-2 / 3, 0.0, 2 / 3]).repeat(2)
    x = np.tile([-0.5, 0.5], 3)
    angles = 2 * np.pi * np.concatenate([y[:, None] * freqs, x[:, None] * freqs], axis=1)
    angles = np.concatenate([angles, angles], axis=1)  # [y | x | y | x]
    np.testing.assert_allclose(cos, np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(angles), atol=1e-6)
    scaled, _ = rope_tables((3, 2), 8, 100.0, scale=2.0)
    np.testing.assert_allclose(scaled, np.cos(2 * angles), atol=1e-6)


def test_only_the_last_grid_tokens_rotate_as_half_split_pairs():
    rope = rope_tables((2, 2), 8, 100.0)
    x = jax.random.normal(jax.random.key(0), (1, 7, 2, 8))  # 3 tokens before the 4 patch tokens
    out = apply_rope(x, rope)
    np.testing.assert_array_equal(out[:, :3], x[:, :3])
    cos, sin = (np.asarray(a)[None, :, None] for a in rope)
    patches = np.asarray(x[:, 3:])
    expected = patches * cos + np.concatenate([-patches[..., 4:], patches[..., :4]], -1) * sin
    np.testing.assert_allclose(out[:, 3:], expected, atol=1e-6)
    # A rotation: each (d, d + 4) pair keeps its length.
    pair_norm = lambda a: np.asarray(a)[..., :4] ** 2 + np.asarray(a)[..., 4:] ** 2  # noqa: E731
    np.testing.assert_allclose(pair_norm(out[:, 3:]), pair_norm(patches), rtol=1e-5)


def _sharp_model():
    """The tiny network with blocks that act (LayerScale 1 instead of its 1e-5 init) and attention sharp enough
    (qkv weights x 20) for positions to matter."""
    model = EoMT(EoMTConfig(**TINY), rngs=nnx.Rngs(0))
    for block in model.backbone.blocks:
        block.attn.qkv.kernel[...] = block.attn.qkv.kernel[...] * 20
        block.ls1.gamma[...] = jnp.ones_like(block.ls1.gamma[...])
        block.ls2.gamma[...] = jnp.ones_like(block.ls2.gamma[...])
    return model


def test_key_bias_never_acts_and_gets_no_gradient():
    model = _sharp_model()
    images = jax.random.uniform(jax.random.key(1), (1, 64, 48, 3))
    qkv_bias = model.backbone.blocks[0].attn.qkv.bias
    forward = nnx.jit(lambda model: model(images)[0][-1])  # the module's current values are its inputs
    base = forward(model)
    qkv_bias[...] = qkv_bias[...].at[64:128].set(5.0)  # the key third
    np.testing.assert_array_equal(forward(model), base)
    qkv_bias[...] = qkv_bias[...].at[:64].add(0.5)  # the query third does act
    assert np.abs(np.asarray(forward(model)) - np.asarray(base)).max() > 1e-2

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, rest)(images)[0][-1] ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    for block in grads["backbone"]["blocks"].values():
        g = np.asarray(block["attn"]["qkv"]["bias"][...])
        assert np.all(g[64:128] == 0) and np.abs(g[:64]).max() > 0


def test_rope_scale_is_a_traced_input_and_one_by_default():
    model = _sharp_model()
    images = jax.random.uniform(jax.random.key(1), (2, 64, 48, 3))
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def forward(state, scale):
        traces.append(1)
        return nnx.merge(graphdef, state)(images, rope_scale=scale)[0][-1]

    one, other = forward(state, 1.0), forward(state, 1.7)
    assert len(traces) == 1  # a new scale does not recompile
    np.testing.assert_allclose(one, model(images)[0][-1], atol=1e-5)  # evaluation = scale 1
    assert np.abs(np.asarray(one) - np.asarray(other)).max() > 1e-2


def test_draws_are_log_uniform_in_the_rescale_range_and_reproducible():
    cfg = EoMTConfig(**TINY)
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = np.asarray(jax.vmap(lambda k: draw_rope_scale(cfg, k))(keys))
    assert draws.min() >= 0.5 and draws.max() <= 2.0
    logs = np.log2(draws)
    assert abs(logs.mean()) < 0.05 and abs(np.mean(logs < 0) - 0.5) < 0.05  # symmetric in log space
    assert np.histogram(logs, bins=4, range=(-1, 1))[0].min() > 400  # flat in log space
    assert float(draw_rope_scale(cfg, keys[3])) == draws[3]
    assert float(draw_rope_scale(cfg.replace(rope_rescale=1.0), keys[3])) == 1.0
    assert float(draw_rope_scale(cfg.replace(backbone="dinov2"), keys[3])) == 1.0


def _dinov3_runlocal(rope_rescale):
    config = runlocal_config()
    assert config.model.backbone == "dinov2"
    config.model.num_classes = 5
    config.model.backbone = "dinov3"
    config.model.layer_norm_eps = 1e-5
    config.model.rope_rescale = rope_rescale
    config.model.layerscale_init = 1.0  # blocks that act, so that positions show in the loss
    assert config_lib.model_config(config).backbone == "dinov3"
    return config


def test_train_step_draws_a_scale_per_step_from_the_run_key(monkeypatch):
    # The scale each step uses is recorded on its way into the network; the loss shows that it reaches it.
    seen = []

    def recorded(cfg, key):
        scale = draw_rope_scale(cfg, key)
        jax.debug.callback(lambda s: seen.append(float(s)), scale)
        return scale

    monkeypatch.setattr(train_step, "draw_rope_scale", recorded)
    batch = random_batch(0, 8, 64, 8, 5)
    losses = {}
    for rope_rescale in (2.0, 1.0):
        graphdef, tx, _, state, step_cfg = tiny_setup(_dinov3_runlocal(rope_rescale))
        for block in state["params"]["backbone"]["blocks"].values():  # sharp attention: positions matter
            block["attn"]["qkv"]["kernel"][...] = block["attn"]["qkv"]["kernel"][...] * 20
        step = jax.jit(make_train_step(graphdef, tx, step_cfg))
        for n in (1, 2, 1):
            at_n = dict(state, step=jnp.asarray(n, state["step"].dtype))
            losses[rope_rescale, n] = float(step(at_n, batch)[1]["train/loss"])
    by_step = dict(zip([(2.0, 1), (2.0, 2), (2.0, "again"), (1.0, 1), (1.0, 2), (1.0, "again")], seen))
    assert len(seen) == 6
    assert all(0.5 <= by_step[2.0, n] <= 2.0 for n in (1, 2))
    assert by_step[2.0, 1] != by_step[2.0, 2]  # a new draw each step
    assert by_step[2.0, 1] == by_step[2.0, "again"]  # from the run's key and the step: reproducible
    assert by_step[1.0, 1] == by_step[1.0, 2] == 1.0
    assert abs(losses[2.0, 1] - losses[1.0, 1]) > 1e-4 * abs(losses[1.0, 1])  # the scale reaches the network
