"""Resizing a patch-embedding kernel to another patch size (FlexiViT pseudo-inverse), as DINOv2 14 -> 16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def resample_patch_kernel(w: np.ndarray, new_size: int) -> np.ndarray:
    """FlexiViT pseudo-inverse resize of a patch-embedding kernel (OIHW), as timm resamples DINOv2 14 -> 16.

    R maps a flattened old-size patch to its bicubic (antialiased) resize; the new kernel solves
    <x, w_old> = <R x, w_new> in the least-squares sense: w_new = pinv(R^T) w_old.
    """
    old = w.shape[-1]
    if old == new_size:
        return w
    basis = np.eye(old * old, dtype=np.float32).reshape(old * old, old, old)
    resize = jax.vmap(lambda b: jax.image.resize(b, (new_size, new_size), method="bicubic", antialias=True))
    mat = np.asarray(resize(jnp.asarray(basis))).reshape(old * old, new_size * new_size).T  # (new², old²)
    pinv = np.linalg.pinv(mat.T)  # (new², old²)
    o, i = w.shape[:2]
    flat = w.reshape(o * i, old * old)
    return (flat @ pinv.T).reshape(o, i, new_size, new_size).astype(np.float32)
