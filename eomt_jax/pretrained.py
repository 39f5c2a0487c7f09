"""Converted EoMT checkpoint directories: their format, the writer (used by `eomt_jax.conversion`) and the loader.

    from eomt_jax import pretrained
    model = pretrained.load("out/")
    mask_logits, class_logits = model(images)      # images: float32 (B, H, W, 3) in [0, 1]

A directory holds `eomt_config.json` ({"model": EoMTConfig fields, "source": ..., ...}) and `params/`, an Orbax
StandardCheckpointer save of the parameter tree (float32 or bfloat16; `attn_mask_probs` always float32).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from eomt_jax.atomic import atomic_directory
from eomt_jax.jsonio import read_json
from eomt_jax.models.eomt import Buffer, EoMT, EoMTConfig
from eomt_jax.models.vit import resample_pos_embed
from eomt_jax.tree import flatten_paths, set_from_flat, unflatten

CONFIG_FILE = "eomt_config.json"
PARAMS_DIR = "params"


def write(
    dst: str | os.PathLike,
    flat: dict[str, np.ndarray],
    config: EoMTConfig,
    *,
    metadata: dict[str, Any] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write parameters (Orbax) + model hyper-parameters (JSON) into `dst`, atomically.

    `flat` maps Flax paths ('a/b/c') to arrays. Everything is written into a temporary sibling directory that is
    renamed into place only when complete, so an interrupted conversion never leaves a partial `dst`.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    dst = Path(dst).absolute()
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        params = {
            k: jnp.asarray(v, jnp.float32 if k == "attn_mask_probs" else dtype) for k, v in flat.items()
        }
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS_DIR, unflatten(params))
        ckptr.wait_until_finished()
        meta = {"model": config.replace(param_dtype=dtype).to_dict(), **(metadata or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return dst


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON stored beside the parameters: {"model": EoMTConfig fields, "source": ..., ...}."""
    f = Path(path) / CONFIG_FILE
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: {path} is not a converted EoMT checkpoint directory")
    meta = read_json(f)
    if "model" not in meta:
        raise ValueError(f"{f}: missing the 'model' section with the architecture")
    return meta


def load(
    path: str | Path,
    *,
    masked_attn_enabled: bool = False,
    dtype: str | None = None,
    param_dtype: str | None = None,
    attention: str | None = None,
) -> EoMT:
    """Rebuild the network and restore its parameters.

    Masked attention is off by default, as in every published evaluation; turn it on to reproduce training-time
    validation (the stored per-block probabilities are then used).
    `dtype` sets the compute dtype (e.g. "bfloat16"); `param_dtype` casts the stored parameters; `attention`
    picks the attention implementation ("plain" or "fused").
    """
    path = Path(path).absolute()
    meta = read_metadata(path)
    config = EoMTConfig.from_dict(meta["model"])
    stored_dtype = config.param_dtype
    config = config.replace(
        masked_attn_enabled=masked_attn_enabled,
        dtype=dtype or config.dtype,
        param_dtype=param_dtype or stored_dtype,
        attention=attention or config.attention,
    )
    abstract = nnx.eval_shape(lambda: EoMT(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = flatten_paths(state)
    target = unflatten(
        {
            k: jax.ShapeDtypeStruct(v.shape, jnp.float32 if k == "attn_mask_probs" else jnp.dtype(stored_dtype))
            for k, v in shapes.items()
        }
    )
    params_dir = path / PARAMS_DIR
    if not params_dir.exists():
        raise FileNotFoundError(f"{params_dir} not found: the checkpoint directory {path} is incomplete")
    try:
        restored = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:
        raise ValueError(f"{params_dir}: cannot restore the parameters for {config} ({e})") from None
    flat = {k: jnp.asarray(v, shapes[k].dtype) for k, v in flatten_paths(restored).items()}
    state = set_from_flat(state, flat)
    return nnx.merge(graphdef, state)


def overlay(params: nnx.State, path: str | Path, config: EoMTConfig, load_class_head: bool = True) -> nnx.State:
    """`params` (a network's parameter state for `config`) with the values of the converted checkpoint `path`:
    an EoMT, or a DINOv2 backbone with a fresh head. The position embedding is resampled when the checkpoint's grid
    differs; with `load_class_head=False` the class head keeps its values in `params` (fine-tuning on other
    classes). Any parameter that does not fit is an error naming it."""
    source = load(path)
    _, source_params, _ = nnx.split(source, nnx.Param, Buffer)
    flat = flatten_paths(source_params)
    own = flatten_paths(params)
    if not load_class_head:
        flat = {k: v for k, v in flat.items() if not k.startswith("class_head/")}
    if source.config.grid_size != config.grid_size and "backbone/pos_embed" in flat:
        flat["backbone/pos_embed"] = resample_pos_embed(flat["backbone/pos_embed"], source.config.grid_size,
                                                        config.grid_size)
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
