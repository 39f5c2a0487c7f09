"""Official names -> Flax parameter paths ('a/b/c'): one ordered table of rules with the layout changes (Linear
and conv transposes), checked key by key and shape by shape against the paths a config expects."""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np
from flax import nnx

from eomt_jax.conversion.errors import ConversionError, problem_report
from eomt_jax.conversion.formats import BB, invert_rename
from eomt_jax.models.eomt import IMAGENET_MEAN, IMAGENET_STD, EoMT, EoMTConfig
from eomt_jax.tree import flatten_paths


def _t(a):  # torch Linear (out, in) -> Flax (in, out)
    return a.T


def _conv(a):  # OIHW -> HWIO
    return a.transpose(2, 3, 1, 0)


def _conv_t(a):  # ConvTranspose (in, out, kh, kw) -> (kh, kw, in, out); our op is a direct matmul, no flip
    return a.transpose(2, 3, 0, 1)


def _copy(a):
    return a


# (pattern over official keys, Flax path template, transform). Ordered; first match wins.
_RULES: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
    (r"network\.encoder\.backbone\.(cls_token|reg_token|pos_embed)", r"backbone/\1", _copy),
    (r"network\.encoder\.backbone\.patch_embed\.proj\.weight", "backbone/patch_embed/proj/kernel", _conv),
    (r"network\.encoder\.backbone\.patch_embed\.proj\.bias", "backbone/patch_embed/proj/bias", _copy),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.(norm1|norm2)\.weight", r"backbone/blocks/\1/\2/scale", _copy),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.(norm1|norm2)\.bias", r"backbone/blocks/\1/\2/bias", _copy),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.attn\.(qkv|proj)\.weight", r"backbone/blocks/\1/attn/\2/kernel", _t),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.attn\.(qkv|proj)\.bias", r"backbone/blocks/\1/attn/\2/bias", _copy),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.(ls1|ls2)\.gamma", r"backbone/blocks/\1/\2/gamma", _copy),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.weight", r"backbone/blocks/\1/mlp/\2/kernel", _t),
    (r"network\.encoder\.backbone\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.bias", r"backbone/blocks/\1/mlp/\2/bias", _copy),
    (r"network\.encoder\.backbone\.norm\.weight", "backbone/norm/scale", _copy),
    (r"network\.encoder\.backbone\.norm\.bias", "backbone/norm/bias", _copy),
    (r"network\.q\.weight", "q/embedding", _copy),
    (r"network\.class_head\.weight", "class_head/kernel", _t),
    (r"network\.class_head\.bias", "class_head/bias", _copy),
    (r"network\.mask_head\.0\.weight", "mask_head/fc1/kernel", _t),
    (r"network\.mask_head\.2\.weight", "mask_head/fc2/kernel", _t),
    (r"network\.mask_head\.4\.weight", "mask_head/fc3/kernel", _t),
    (r"network\.mask_head\.0\.bias", "mask_head/fc1/bias", _copy),
    (r"network\.mask_head\.2\.bias", "mask_head/fc2/bias", _copy),
    (r"network\.mask_head\.4\.bias", "mask_head/fc3/bias", _copy),
    (r"network\.upscale\.(\d+)\.conv1\.weight", r"upscale/\1/conv1/kernel", _conv_t),
    (r"network\.upscale\.(\d+)\.conv1\.bias", r"upscale/\1/conv1/bias", _copy),
    (r"network\.upscale\.(\d+)\.conv2\.weight", r"upscale/\1/conv2/kernel", _conv),
    (r"network\.upscale\.(\d+)\.norm\.weight", r"upscale/\1/norm/scale", _copy),
    (r"network\.upscale\.(\d+)\.norm\.bias", r"upscale/\1/norm/bias", _copy),
    (r"network\.attn_mask_probs", "attn_mask_probs", _copy),
]


def official_to_flat(sd: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                     source_name: Callable[[str], str] = lambda key: key, *,
                     missing: Sequence[str] = (), problems: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Map official-named tensors onto Flax paths ('a/b/c'), checking every key and shape against `expected`.

    Collects every unknown key, missing key and shape mismatch, then raises once; every key is named as the
    source names it (`source_name` of its official name), a missing one with its Flax path in brackets.
    `missing` (keys) and `problems` (lines) are what earlier steps found, already in the source's naming; they
    join the same report.
    """
    sd = dict(sd)
    # Loss-only buffer, regenerated from the loss config at training time.
    sd.pop("criterion.empty_weight", None)
    # Models without registers may still store an empty (1, 0, D) register table.
    if BB + "reg_token" in sd and sd[BB + "reg_token"].size == 0:
        del sd[BB + "reg_token"]
    unknown, shapes = [], []
    for name, const in (("pixel_mean", IMAGENET_MEAN), ("pixel_std", IMAGENET_STD)):
        v = sd.pop(f"network.encoder.{name}", None)
        if v is not None and not np.allclose(v.reshape(-1), const, atol=1e-6):
            shapes.append(
                f"network.encoder.{name}: values {v.reshape(-1).tolist()} differ from the ImageNet statistics "
                f"{list(const)} that the network applies"
            )
    flat: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        for pat, template, fn in _RULES:
            m = re.fullmatch(pat, key)
            if m:
                path = m.expand(template)
                flat[path] = fn(value)
                break
        else:
            unknown.append(source_name(key))
            continue
        if path not in expected:
            unknown.append(source_name(key))
            del flat[path]
        elif flat[path].shape != tuple(expected[path]):
            shapes.append(f"{source_name(key)}: shape {tuple(value.shape)} maps to {flat[path].shape}, expected "
                          f"{tuple(expected[path])}")
    missing = [*missing, *(f"{source_name(official_name(p) or p)} ({p})" for p in expected if p not in flat)]
    shapes = [*problems, *shapes]
    if unknown or missing or shapes:
        raise ConversionError(problem_report(unknown=unknown, missing=missing, shapes=shapes))
    return flat


def official_name(path: str) -> str | None:
    """The official key that maps onto the Flax path `path`, or None."""
    for pattern, template, _ in _RULES:
        key = invert_rename(pattern, template, path)
        if key is not None:
            return key
    return None


def expected_shapes(config: EoMTConfig) -> dict[str, tuple[int, ...]]:
    """Flax path -> shape for a config, computed abstractly (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: EoMT(config, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    return {k: tuple(v.shape) for k, v in flatten_paths(state).items()}
