"""A fake network for the inference tests: logits that depend on the pixels of each input, so a window cut from
the wrong place or a mis-resized image changes the result."""

from __future__ import annotations

import numpy as np


def make_forward(num_queries: int, num_classes: int, size: int, seed: int = 0, num_outputs: int = 2):
    rng = np.random.default_rng(seed)
    w_mask = rng.normal(size=(3, num_queries)).astype(np.float32) * 6
    b_mask = rng.normal(size=num_queries).astype(np.float32)
    w_cls = rng.normal(size=(3, num_queries, num_classes + 1)).astype(np.float32) * 2
    b_cls = rng.normal(size=(num_queries, num_classes + 1)).astype(np.float32)
    # Give most queries one confident class so that the panoptic score threshold keeps some of them.
    b_cls[np.arange(num_queries), rng.integers(0, num_classes, num_queries)] += 4.0
    calls = []

    def forward(images):
        images = np.asarray(images)
        assert images.dtype == np.float32 and images.shape[1:] == (size, size, 3), images.shape
        assert 0 <= images.min() and images.max() <= 1
        calls.append(images.shape[0])
        b, g = images.shape[0], size // 4
        pooled = images.reshape(b, g, 4, g, 4, 3).mean((2, 4)) - 0.5
        masks = np.einsum("bhwc,cq->bqhw", pooled, w_mask) + b_mask[:, None, None]
        classes = np.einsum("bc,cqk->bqk", pooled.mean((1, 2)), w_cls) + b_cls
        masks, classes = masks.astype(np.float32), classes.astype(np.float32)
        # Earlier prediction points: a damped copy, enough to check that every point is post-processed.
        scales = [0.5 ** (num_outputs - 1 - i) for i in range(num_outputs)]
        return [masks * s for s in scales], [classes * s for s in scales]

    forward.calls = calls
    return forward


def random_image(rng, h: int, w: int) -> np.ndarray:
    # Smooth-ish content (a blurred random field) so resizing is not dominated by aliasing of pure noise.
    coarse = rng.integers(0, 256, size=(max(h // 4, 2), max(w // 4, 2), 3)).astype(np.float32)
    rows = np.linspace(0, coarse.shape[0] - 1, h).round().astype(int)
    cols = np.linspace(0, coarse.shape[1] - 1, w).round().astype(int)
    noise = rng.integers(-20, 21, size=(h, w, 3))
    return np.clip(coarse[rows][:, cols] + noise, 0, 255).astype(np.uint8)
