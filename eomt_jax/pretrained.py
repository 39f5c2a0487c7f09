"""Load a converted EoMT checkpoint directory (from `convert/torch_to_flax.py`) as a ready network.

    from eomt_jax import pretrained
    model = pretrained.load("out/")
    mask_logits, class_logits = model(images)      # images: float32 (B, H, W, 3) in [0, 1]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from eomt_jax.conversion import CONFIG_FILE, PARAMS_DIR, unflatten
from eomt_jax.models.eomt import EoMT, EoMTConfig
from eomt_jax.tree import flatten_paths, set_from_flat


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON stored beside the parameters: {"model": EoMTConfig fields, "source": ..., ...}."""
    f = Path(path) / CONFIG_FILE
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: {path} is not a converted EoMT checkpoint directory")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
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
    import orbax.checkpoint as ocp

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
