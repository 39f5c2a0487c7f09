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
# A backbone conversion keeps the backbone's own position embedding (its native grid, before resampling to the
# image size), so that a run at another image size resamples once from it, as timm does, not twice.
SOURCE_POS_EMBED = "source_pos_embed.npy"


def write(
    dst: str | os.PathLike,
    flat: dict[str, np.ndarray],
    config: EoMTConfig,
    *,
    metadata: dict[str, Any] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    source_pos_embed: np.ndarray | None = None,
) -> Path:
    """Write parameters (Orbax) + model hyper-parameters (JSON) into `dst`, atomically.

    `flat` maps Flax paths ('a/b/c') to arrays; `source_pos_embed` (1, gh * gw, D) on a square grid is the
    backbone's position embedding before resampling (`SOURCE_POS_EMBED`). Everything is written into a temporary
    sibling directory that is renamed into place only when complete, so an interrupted conversion never leaves a
    partial `dst`.
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
        if source_pos_embed is not None:
            np.save(tmp / SOURCE_POS_EMBED, np.asarray(source_pos_embed, np.float32))
            side = int(round(np.sqrt(source_pos_embed.shape[1])))
            meta["source_pos_embed_grid"] = [side, side]
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return dst


def write_network(dst: str | os.PathLike, model: EoMT, *, metadata: dict[str, Any] | None = None,
                  overwrite: bool = False) -> Path:
    """Write a network held in memory (e.g. at the end of a training run) as a converted checkpoint directory: its
    parameters and stored masked-attention probabilities, its architecture computing in float32 (`load` chooses
    another policy), and `metadata` (e.g. "class_names" and "stuff_classes", which `predict` names classes by).
    The arrays must be addressable by this process."""
    _, state = nnx.split(model)
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten_paths(state).items()}
    return write(dst, flat, model.config.with_precision("float32"), metadata=metadata, overwrite=overwrite)


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
    `dtype` sets the precision policy (`eomt_jax.models.eomt.PRECISIONS`: "float32", "bfloat16" or
    "mixed_bfloat16"); `param_dtype` casts the stored parameters; `attention`
    picks the attention implementation ("plain" or "fused").
    """
    path = Path(path).absolute()
    meta = read_metadata(path)
    config = EoMTConfig.from_dict(meta["model"])
    stored_dtype = config.param_dtype
    config = config.replace(
        masked_attn_enabled=masked_attn_enabled,
        param_dtype=param_dtype or stored_dtype,
        attention=attention or config.attention,
    )
    if dtype:
        config = config.with_precision(dtype)
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


def load_into(params: nnx.State, buffers: nnx.State, path: str | Path, config: EoMTConfig,
              load_class_head: bool = True) -> tuple[nnx.State, nnx.State]:
    """A network's parameter and buffer states (for `config`) with the values of the converted checkpoint `path`:
    an EoMT, or a DINOv2 backbone with a fresh head; the stored buffers (the per-block masked-attention
    probabilities) come with the parameters. The position embedding is resampled when the checkpoint's grid
    differs (from the backbone's own grid when the checkpoint carries it, `SOURCE_POS_EMBED`); with
    `load_class_head=False` the class head keeps its values in `params` (fine-tuning on other
    classes). Any parameter that does not fit is an error naming it."""
    source = load(path)
    _, source_params, source_buffers = nnx.split(source, nnx.Param, Buffer)
    flat = flatten_paths(source_params)
    own = flatten_paths(params)
    if not load_class_head:
        flat = {k: v for k, v in flat.items() if not k.startswith("class_head/")}
    if source.config.grid_size != config.grid_size and "backbone/pos_embed" in flat:
        grid, pos = source.config.grid_size, flat["backbone/pos_embed"]
        meta = read_metadata(path)
        if (Path(path) / SOURCE_POS_EMBED).exists() and "source_pos_embed_grid" in meta:
            # Resample the backbone's own grid once (e.g. DINOv2's 37 x 37 straight to 80 x 80 for 1280 px).
            grid, pos = tuple(meta["source_pos_embed_grid"]), np.load(Path(path) / SOURCE_POS_EMBED)
        flat["backbone/pos_embed"] = resample_pos_embed(pos, grid, config.grid_size)
    stored, own_buffers = flatten_paths(source_buffers), flatten_paths(buffers)
    problems = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(mine[k].shape)}"
        for checkpoint, mine in ((flat, own), (stored, own_buffers))
        for k, v in checkpoint.items()
        if k in mine and tuple(v.shape) != tuple(mine[k].shape)
    ]
    unknown = sorted(set(flat) - set(own)) + sorted(set(stored) - set(own_buffers))
    if problems or unknown:
        raise ValueError(
            f"{path} does not fit the configured model:\n  "
            + "\n  ".join(problems + [f"unexpected {k}" for k in unknown])
            + ("\n(use --config.load_class_head=False to fine-tune on other classes)" if problems else "")
        )

    def merged(checkpoint, mine):
        return {k: jnp.asarray(checkpoint[k], mine[k].dtype) if k in checkpoint else mine[k] for k in mine}

    return set_from_flat(params, merged(flat, own)), set_from_flat(buffers, merged(stored, own_buffers))
