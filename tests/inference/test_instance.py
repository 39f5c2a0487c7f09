"""Instance top-k against a direct NumPy computation, including ties, empty masks and small Q·C."""

import functools

import jax
import numpy as np
import pytest

from eomt_jax.inference import pipeline, postprocess
from tests.inference import reference
from tests.inference.fakes import make_forward, random_image

NUM_C = 4


@functools.partial(jax.jit, static_argnames="top_k")
def _topk(mask_logits, class_logits, valid, top_k):
    return postprocess.instance_topk(mask_logits, class_logits, valid, top_k=top_k)


def topk(mask_logits, class_logits, top_k=100, valid=None):
    valid = np.ones(mask_logits.shape[1:], bool) if valid is None else valid
    return {k: np.asarray(v) for k, v in _topk(mask_logits, class_logits, valid, top_k).items()}


def check(ours, want):
    for key in ("queries", "labels", "masks"):
        np.testing.assert_array_equal(ours[key], want[key], err_msg=key)
    # Scores: float32 softmax and a float32 sum over at most a few hundred pixels; the reference sums in
    # float64. Relative differences stay at a few ulp.
    np.testing.assert_allclose(ours["class_scores"], want["class_scores"], rtol=1e-5)
    np.testing.assert_allclose(ours["scores"], want["scores"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(3))
def test_random_logits_match_reference(seed):
    rng = np.random.default_rng(seed)
    mask_logits = rng.normal(size=(30, 9, 11)).astype(np.float32) * 3
    class_logits = rng.normal(size=(30, NUM_C + 1)).astype(np.float32) * 2
    ours, want = topk(mask_logits, class_logits, top_k=50), reference.instance(mask_logits, class_logits, 50)
    check(ours, want)
    assert len(ours["labels"]) == 50
    assert len(set(ours["queries"].tolist())) < 50  # some query appears with several classes


def test_ties_prefer_the_lower_flat_index():
    rng = np.random.default_rng(7)
    mask_logits = rng.normal(size=(6, 5, 5)).astype(np.float32)
    class_logits = np.zeros((6, NUM_C + 1), np.float32)  # every (query, class) pair has probability 1/5
    class_logits[4] = [3, 0, 0, 0, 0]
    ours = topk(mask_logits, class_logits, top_k=7)
    # Query 4's class 0 wins, then the tied pairs in flat order: query 0 classes 0..3, query 1 classes 0, 1.
    np.testing.assert_array_equal(ours["queries"], [4, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(ours["labels"], [0, 0, 1, 2, 3, 0, 1])
    check(ours, reference.instance(mask_logits, class_logits, 7))


def test_empty_masks_score_zero_and_small_models_return_all_pairs():
    mask_logits = np.full((2, 4, 4), -3.0, np.float32)
    mask_logits[1, 0, 0] = 0.0  # logit exactly 0 is not inside the mask (strict >)
    class_logits = np.random.default_rng(0).normal(size=(2, NUM_C + 1)).astype(np.float32)
    ours = topk(mask_logits, class_logits, top_k=100)
    assert len(ours["labels"]) == 2 * NUM_C  # fewer than 100 pairs exist
    assert not ours["masks"].any() and (ours["scores"] == 0).all()
    check(ours, reference.instance(mask_logits, class_logits))


def test_mask_score_counts_only_the_valid_region():
    mask_logits = np.full((1, 4, 4), 2.0, np.float32)
    mask_logits[0, :, 2:] = 6.0  # outside the valid region: would raise the mean sigmoid if counted
    valid = np.zeros((4, 4), bool)
    valid[:, :2] = True
    class_logits = np.array([[5.0, 0, 0, 0, 0]], np.float32)
    ours = topk(mask_logits, class_logits, top_k=1, valid=valid)
    probs = reference.softmax(class_logits)
    np.testing.assert_allclose(ours["scores"][0], probs[0, 0] * reference.sigmoid(np.float32(2.0)) * 8 / (8 + 1e-6),
                               rtol=1e-6)
    np.testing.assert_array_equal(ours["masks"][0], valid)


def test_predict_instance_end_to_end():
    size, q = 32, 6
    forward = make_forward(q, NUM_C, size, seed=2, num_outputs=1)
    rng = np.random.default_rng(8)
    images = [random_image(rng, h, w) for h, w in [(45, 30), (20, 33)]]
    outs = pipeline.predict_instance(forward, images, size, top_k=10)
    mask_list, class_list = forward(np.stack([reference.letterbox(im, size)[0] for im in images]) / np.float32(255))
    for b, image in enumerate(images):
        resized = reference.letterbox(image, size)[1]
        logits = reference.revert(mask_list[-1][b], size, resized, image.shape[:2])
        want = reference.instance(logits, class_list[-1][b], top_k=10)
        ours = outs[b]
        assert ours["masks"].shape == (10,) + image.shape[:2]
        np.testing.assert_array_equal(ours["queries"], want["queries"])
        np.testing.assert_array_equal(ours["labels"], want["labels"])
        # Logits agree with PyTorch's three resizes to ~1e-6 (see test_geometry); a pixel within that of 0
        # may flip. Allow 0.5% of the mask pixels and a matching tolerance on the mask scores.
        assert (ours["masks"] != want["masks"]).mean() <= 5e-3
        assert want["masks"].any()
        np.testing.assert_allclose(ours["scores"], want["scores"], rtol=1e-3)


def test_rejects_bad_top_k_and_shapes():
    args = (np.zeros((1, 2, 8, 8), np.float32), np.zeros((1, 2, 3), np.float32), np.ones((1, 2), np.int32),
            np.ones((1, 2), np.int32))
    with pytest.raises(ValueError, match="top_k"):
        postprocess.instance_postprocess(*args, image_size=32, canvas_hw=(8, 8), top_k=0)
    with pytest.raises(ValueError, match="disagree"):
        postprocess.instance_postprocess(args[0], np.zeros((1, 3, 3), np.float32), *args[2:], image_size=32,
                                         canvas_hw=(8, 8))
