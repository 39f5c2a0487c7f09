"""Reading a source checkpoint: torch pickles (weights only) or safetensors as float32 numpy, the Hugging Face
config.json beside them, and a Hugging Face hub id resolved to a local snapshot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (makes numpy understand the dtype name "bfloat16")
import numpy as np

from eomt_jax.conversion.errors import ConversionError

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_state_dict(src: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """Load a checkpoint as float32 numpy arrays, without executing pickled code.

    Returns (state dict, Hugging Face config.json contents or None).
    """
    path = Path(src)
    hf_config = None
    if path.is_dir():
        cfg_file = path / "config.json"
        if cfg_file.exists():
            try:
                hf_config = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise ConversionError(f"{cfg_file}: not valid JSON ({e})") from None
        weights = [path / f for f in _WEIGHT_FILES if (path / f).exists()]
        if not weights:
            raise ConversionError(f"{path}: no weights found; expected one of {', '.join(_WEIGHT_FILES)}")
        path = weights[0]
    elif not path.exists():
        raise ConversionError(f"{path}: no such file or directory")

    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated headers/data
            raise ConversionError(f"{path}: cannot read safetensors file ({e})") from None
    else:
        sd = _torch_load(path)
    sd = {k: _to_float32(k, v, path) for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not np.isfinite(v).all()]
    if bad:
        raise ConversionError(
            f"{path}: {len(bad)} tensor(s) hold NaN or infinite values (a diverged or damaged checkpoint): "
            + ", ".join(bad[:20]) + (" ..." if len(bad) > 20 else ""))
    return sd, hf_config


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path}: reading PyTorch pickle files needs torch; install it (CPU build is enough) "
            "or convert from a .safetensors file"
        ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{path}: cannot load as a PyTorch state dict ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not hasattr(v, "detach"):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor")
        out[k.replace("._orig_mod", "").replace("_orig_mod.", "")] = v.detach().to(torch.float32).numpy()
    return out


def _to_float32(key: str, v, path: Path) -> np.ndarray:
    a = np.asarray(v)
    if not np.issubdtype(a.dtype, np.floating) and a.dtype != np.dtype("bfloat16"):
        raise ConversionError(f"{path}: entry {key!r} has dtype {a.dtype}, expected a floating-point tensor")
    return a.astype(np.float32)


def resolve_src(src: str) -> str:
    """A local path as given; an `owner/name` that is not a local path is fetched from the Hugging Face hub."""
    if Path(src).exists() or src.count("/") != 1 or src.startswith((".", "/")):
        return src
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConversionError(f"{src}: no such file, and huggingface_hub is not installed to fetch it") from None
    return snapshot_download(src, allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"])
