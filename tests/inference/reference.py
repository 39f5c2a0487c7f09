"""Straightforward references for the inference tests: the original's evaluation steps written as plain
per-image, per-query loops in NumPy, with PyTorch's `F.interpolate` for every logits resize."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def interpolate(x: np.ndarray, size) -> np.ndarray:
    """PyTorch bilinear (align_corners=False, no antialias) over the last two axes of a (N, h, w) array."""
    return F.interpolate(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None], size=tuple(size),
                         mode="bilinear", align_corners=False)[0].numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def letterbox(image: np.ndarray, size: int):
    h, w = image.shape[:2]
    f = min(size / h, size / w)
    nh, nw = round(h * f), round(w * f)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((size, size, 3), np.uint8)
    out[:nh, :nw] = resized
    return out, (nh, nw)


def revert(mask_logits: np.ndarray, size: int, resized_hw, orig_hw) -> np.ndarray:
    """(Q, S/4, S/4) -> (Q, H, W): upsample to S×S, crop to the resized image, resize to the original size."""
    up = interpolate(mask_logits, (size, size))
    return interpolate(up[:, :resized_hw[0], :resized_hw[1]], orig_hw)


def panoptic(mask_logits, class_logits, stuff, score_thr=0.8, overlap_thr=0.8, with_scores=False):
    """(Q, H, W) logits at original size, (Q, C+1) -> (H, W, 2) with a loop over kept queries in order; with
    `with_scores` also the list of segment scores by segment id (the score of the query that opened each)."""
    num_c = class_logits.shape[-1] - 1
    probs = softmax(class_logits)
    scores, classes = probs.max(-1), probs.argmax(-1)
    out = np.empty(mask_logits.shape[1:] + (2,), np.int64)
    out[..., 0], out[..., 1] = num_c, -1
    kept = [k for k in range(len(scores)) if classes[k] != num_c and scores[k] > np.float32(score_thr)]
    segment_scores = []
    if not kept:
        return (out, segment_scores) if with_scores else out
    masks = sigmoid(mask_logits[kept])
    owner = np.argmax(scores[kept][:, None, None] * masks, axis=0)
    stuff_ids, next_id = {}, 0
    for i, k in enumerate(kept):
        c = int(classes[k])
        orig = masks[i] >= 0.5
        new = owner == i
        final = orig & new
        a_orig, a_new, a_final = int(orig.sum()), int(new.sum()), int(final.sum())
        if a_orig == 0 or a_new == 0 or a_final == 0 or a_new / a_orig < overlap_thr:
            continue
        if c in stuff and c in stuff_ids:
            seg = stuff_ids[c]
        else:
            seg = next_id
            next_id += 1
            segment_scores.append(float(scores[k]))
            if c in stuff:
                stuff_ids[c] = seg
        out[final, 0], out[final, 1] = c, seg
    return (out, segment_scores) if with_scores else out


def instance(mask_logits, class_logits, top_k=100):
    """Top-k (query, class) pairs; ties broken by the lower flat index (the documented rule of our port)."""
    num_c = class_logits.shape[-1] - 1
    probs = softmax(class_logits)[:, :num_c].reshape(-1)
    order = np.argsort(-probs, kind="stable")[:min(top_k, probs.size)]
    query, label = order // num_c, order % num_c
    logits = mask_logits[query]
    binary = logits > 0
    mask_score = (sigmoid(logits) * binary).reshape(len(order), -1).sum(1) / (
        binary.reshape(len(order), -1).sum(1) + 1e-6)
    return {"masks": binary, "labels": label, "queries": query, "class_scores": probs[order],
            "scores": probs[order] * mask_score}


def semantic(forward_fn, images, size):
    """Sliding windows written after the original's procedure, one forward over all windows.

    Returns per image the (C, H, W) class scores and their argmax, and the number of windows.
    """
    crops, origins, resized_sizes = [], [], []
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        f = max(size / h, size / w)
        nh, nw = round(h * f), round(w * f)
        resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        resized_sizes.append((nh, nw))
        long = max(nh, nw)
        n = math.ceil(long / size)
        overlap = n * size - long
        per = overlap / (n - 1) if overlap > 0 else 0
        for j in range(n):
            start = int(j * (size - per))
            crops.append(resized[start:start + size, :] if nh > nw else resized[:, start:start + size])
            origins.append((i, start))
    mask_list, class_list = forward_fn(np.stack(crops).astype(np.float32) / np.float32(255))
    mask_logits, class_logits = np.asarray(mask_list[-1]), np.asarray(class_list[-1])
    num_c = class_logits.shape[-1] - 1
    sums = [np.zeros((num_c,) + s, np.float64) for s in resized_sizes]
    counts = [np.zeros(s, np.float64) for s in resized_sizes]
    for crop_i, (i, start) in enumerate(origins):
        up = sigmoid(interpolate(mask_logits[crop_i], (size, size)))
        scores = np.einsum("qhw,qc->chw", up.astype(np.float64), softmax(class_logits[crop_i])[:, :num_c])
        nh, nw = resized_sizes[i]
        if nh > nw:
            sums[i][:, start:start + size] += scores
            counts[i][start:start + size] += 1
        else:
            sums[i][:, :, start:start + size] += scores
            counts[i][:, start:start + size] += 1
    scores = [interpolate((s / c).astype(np.float32), image.shape[:2]) for s, c, image in zip(sums, counts, images)]
    return [np.argmax(s, axis=0) for s in scores], scores, len(crops)
