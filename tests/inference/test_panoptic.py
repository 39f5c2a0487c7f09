"""Panoptic merge against a per-query loop written after the original, on random and hand-built logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eomt_jax.inference import pipeline, postprocess
from tests.inference import reference
from tests.inference.fakes import make_forward, random_image

NUM_C = 5
STUFF = (3, 4)


@functools.partial(jax.jit, static_argnames=("score_threshold", "overlap_threshold"))
def _merge(mask_logits, class_logits, valid, score_threshold=0.8, overlap_threshold=0.8):
    is_stuff = jnp.zeros(class_logits.shape[-1] - 1, bool).at[jnp.asarray(STUFF)].set(True)
    return postprocess.panoptic_merge(mask_logits, class_logits, valid, is_stuff=is_stuff,
                                      score_threshold=score_threshold, overlap_threshold=overlap_threshold)


def merge(mask_logits, class_logits, valid=None, **kw):
    valid = np.ones(mask_logits.shape[1:], bool) if valid is None else valid
    return np.asarray(_merge(jnp.asarray(mask_logits, jnp.float32), jnp.asarray(class_logits, jnp.float32),
                             jnp.asarray(valid), **kw))


def confident(classes, num_c=NUM_C, strength=8.0):
    """Class logits whose argmax is `classes[q]` with probability ~0.99 (index num_c = no object)."""
    logits = np.zeros((len(classes), num_c + 1), np.float32)
    logits[np.arange(len(classes)), classes] = strength
    return logits


def random_scene(seed, q=12, shape=(20, 23)):
    """Round blobs of random size and place (so queries overlap partially) plus pixel noise; random classes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    centre = rng.uniform(0, 1, (q, 2)) * shape
    radius = rng.uniform(2, 9, (q, 1, 1))
    dist2 = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
    mask_logits = (4 * (1 - dist2 / radius**2)).clip(-8) + rng.normal(size=(q,) + shape)
    class_logits = confident(rng.integers(0, NUM_C + 1, q), strength=4.0) + rng.normal(size=(q, NUM_C + 1)) * 0.7
    return mask_logits.astype(np.float32), class_logits.astype(np.float32)


def blob(shape, rows, cols, inside=5.0, outside=-5.0):
    m = np.full(shape, outside, np.float32)
    m[rows, cols] = inside
    return m


@pytest.mark.parametrize("seed", range(6))
def test_random_logits_match_reference(seed):
    # Several queries share classes (so stuff merges and thing duplicates happen); most pass the 0.8 threshold.
    mask_logits, class_logits = random_scene(seed)
    ours = merge(mask_logits, class_logits)
    want = reference.panoptic(mask_logits, class_logits, STUFF)
    np.testing.assert_array_equal(ours, want)
    # The draw must exercise the interesting branches, or the comparison proves little.
    assert len(np.unique(want[..., 1])) > 2


def test_random_batch_exercises_merges_and_rejections():
    # Across seeds: some stuff segments merged from several queries, and some queries rejected by the overlap rule.
    merged = rejected = 0
    for seed in range(6):
        mask_logits, class_logits = random_scene(seed)
        out = reference.panoptic(mask_logits, class_logits, STUFF)
        probs = reference.softmax(class_logits)
        kept = (probs.argmax(-1) != NUM_C) & (probs.max(-1) > 0.8)
        painted = len(np.unique(out[..., 1][out[..., 1] >= 0]))
        stuff_kept = [c for c in probs.argmax(-1)[kept] if c in STUFF]
        merged += len(stuff_kept) - len(set(stuff_kept))
        rejected += int(kept.sum()) - painted - (len(stuff_kept) - len(set(stuff_kept)))
    assert merged > 0 and rejected > 0


def test_nothing_kept_gives_void():
    rng = np.random.default_rng(0)
    mask_logits = rng.normal(size=(4, 6, 7)).astype(np.float32)
    class_logits = confident([NUM_C] * 4)  # every query's best guess is "no object"
    out = merge(mask_logits, class_logits)
    assert (out[..., 0] == NUM_C).all() and (out[..., 1] == -1).all()
    class_logits = np.zeros((4, NUM_C + 1), np.float32)  # uniform: score 1/6, below the threshold
    np.testing.assert_array_equal(merge(mask_logits, class_logits), out)


def test_score_threshold_is_strict():
    mask_logits = np.full((1, 4, 4), 5.0, np.float32)
    class_logits = np.full((1, NUM_C + 1), -1e9, np.float32)
    class_logits[0, :2] = 0.0  # softmax exactly 0.5 for classes 0 and 1
    assert (merge(mask_logits, class_logits, score_threshold=0.5)[..., 1] == -1).all()
    assert (merge(mask_logits, class_logits, score_threshold=0.49)[..., 0] == 0).all()  # argmax: first max


def test_ties_go_to_the_first_query():
    # Two identical queries: the first owns every pixel, the second's area is 0 and it is skipped.
    mask_logits = np.stack([blob((6, 6), slice(0, 3), slice(None))] * 2)
    out = merge(mask_logits, confident([1, 1]))
    assert (out[:3, :, 0] == 1).all() and (out[:3, :, 1] == 0).all()
    assert (out[3:, :, 1] == -1).all()
    np.testing.assert_array_equal(out, reference.panoptic(mask_logits, confident([1, 1]), STUFF))


def test_stuff_merges_and_things_do_not():
    shape = (8, 8)
    mask_logits = np.stack([blob(shape, slice(0, 2), slice(None)),   # stuff 3
                            blob(shape, slice(2, 4), slice(None)),   # thing 0
                            blob(shape, slice(4, 6), slice(None)),   # stuff 3 again: joins segment 0
                            blob(shape, slice(6, 7), slice(None)),   # thing 0 again: its own segment
                            blob(shape, slice(7, 8), slice(None))])  # stuff 4: a new segment
    class_logits = confident([3, 0, 3, 0, 4])
    out = merge(mask_logits, class_logits)
    np.testing.assert_array_equal(out[:, 0, 1], [0, 0, 1, 1, 0, 0, 2, 3])
    np.testing.assert_array_equal(out[:, 0, 0], [3, 3, 0, 0, 3, 3, 0, 4])
    np.testing.assert_array_equal(out, reference.panoptic(mask_logits, class_logits, STUFF))


def test_overlap_rule_drops_below_and_keeps_equal():
    # Query 1 (less confident) covers 5 pixels of row 0; query 0 takes some of them. Owning 4 of 5 = 0.8 exactly
    # keeps it (the original drops only when the ratio is < 0.8); owning 3 of 5 drops it.
    def case(taken):
        m1 = blob((2, 5), 0, slice(None))
        m0 = blob((2, 5), 1, slice(None))
        m0[0, :taken] = 5.0
        mask_logits = np.stack([m0, m1])
        class_logits = confident([0, 1])
        class_logits[1, 1] = 7.0
        return mask_logits, class_logits
    out = merge(*case(1))
    assert (out[0, 1:, 0] == 1).all() and out[0, 0, 0] == 0
    out = merge(*case(2))
    assert (out[0, :, 0] == 0).sum() == 2 and (out[0, 2:, 0] == NUM_C).all()
    for taken in (1, 2):
        np.testing.assert_array_equal(merge(*case(taken)), reference.panoptic(*case(taken), STUFF))
    # A threshold that is not a short fraction is refused rather than compared inexactly.
    with pytest.raises(ValueError, match="overlap_threshold"):
        merge(*case(1), overlap_threshold=0.123456789)


def test_areas_count_only_the_valid_region():
    # Outside the image (canvas filler) query 1 would own many pixels; counted, they would rescue it from the
    # overlap rule. Inside, it owns 1 of its 2 pixels and must be dropped.
    m1 = np.full((4, 8), 5.0, np.float32)
    m0 = np.full((4, 8), -5.0, np.float32)
    m0[0, 0] = 5.0
    class_logits = confident([0, 1])
    class_logits[1, 1] = 7.0
    valid = np.zeros((4, 8), bool)
    valid[0, :2] = True
    out = merge(np.stack([m0, m1]), class_logits, valid)
    assert out[0, 0, 0] == 0 and out[0, 1, 1] == -1
    assert (out[~valid] == [NUM_C, -1]).all()
    np.testing.assert_array_equal(out[:1, :2], reference.panoptic(np.stack([m0, m1])[:, :1, :2], class_logits, STUFF))


def test_predict_panoptic_end_to_end():
    size, q = 32, 8
    forward = make_forward(q, NUM_C, size, seed=1)
    rng = np.random.default_rng(5)
    images = [random_image(rng, h, w) for h, w in [(40, 29), (23, 64), (32, 32)]]
    outs = pipeline.predict_panoptic(forward, images, size, stuff_classes=STUFF, all_outputs=True)
    assert forward.calls == [3] and len(outs) == 2
    mask_list, class_list = forward(np.stack([reference.letterbox(im, size)[0] for im in images]) / np.float32(255))
    segments = 0
    for point, out in enumerate(outs):
        for b, image in enumerate(images):
            resized = reference.letterbox(image, size)[1]
            logits = reference.revert(mask_list[point][b], size, resized, image.shape[:2])
            want = reference.panoptic(logits, class_list[point][b], STUFF)
            assert out[b].shape == image.shape[:2] + (2,) and out[b].dtype == np.int32
            # Our resize composes the three bilinear steps into one matrix: logits agree with PyTorch to ~1e-6,
            # which can flip a pixel whose two best queries tie to that precision. Allow 0.5% of the pixels.
            assert (out[b] != want).any(-1).mean() <= 5e-3
            segments += len(np.unique(want[..., 1])) - 1
    assert segments > 3
    last = pipeline.predict_panoptic(forward, images, size, stuff_classes=list(STUFF))  # a list is fine too
    for a, b in zip(last, outs[-1]):
        np.testing.assert_array_equal(a, b)
    # Segment scores: the class probability of the query that opened each segment, indexed by segment id.
    scored = pipeline.predict_panoptic(forward, images, size, stuff_classes=STUFF, with_scores=True)
    for b, ((pan, scores), image) in enumerate(zip(scored, images)):
        np.testing.assert_array_equal(pan, last[b])
        resized = reference.letterbox(image, size)[1]
        logits = reference.revert(mask_list[-1][b], size, resized, image.shape[:2])
        _, want = reference.panoptic(logits, class_list[-1][b], STUFF, with_scores=True)
        assert scores.shape == (q,) and np.all(scores[len(want):] == 0)
        np.testing.assert_allclose(scores[:len(want)], want, rtol=1e-6)


def test_postprocess_rejects_bad_stuff_classes():
    with pytest.raises(ValueError, match="stuff_classes"):
        postprocess.panoptic_postprocess(np.zeros((1, 2, 8, 8), np.float32), np.zeros((1, 2, 3), np.float32),
                                         np.ones((1, 2), np.int32), np.ones((1, 2), np.int32), image_size=32,
                                         canvas_hw=(8, 8), stuff_classes=[2])
