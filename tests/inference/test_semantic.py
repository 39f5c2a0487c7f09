"""Sliding-window semantic inference against the original's procedure written as a per-window loop."""

import numpy as np
import pytest
from PIL import Image

from eomt_jax.inference import pipeline, semantic
from tests.inference import reference
from tests.inference.fakes import make_forward, random_image

SIZE, NUM_C = 32, 5


def test_window_class_scores_match_torch():
    rng = np.random.default_rng(0)
    mask_logits = rng.normal(size=(3, 4, 8, 8)).astype(np.float32) * 3
    class_logits = rng.normal(size=(3, 4, NUM_C + 1)).astype(np.float32)
    ours = np.asarray(semantic.window_class_scores(mask_logits, class_logits, window_size=SIZE))
    for w in range(3):
        up = reference.sigmoid(reference.interpolate(mask_logits[w], (SIZE, SIZE)))
        want = np.einsum("qhw,qc->chw", up, reference.softmax(class_logits[w])[:, :NUM_C])
        # Sigmoids of logits within 1e-6 of PyTorch's, weighted by probabilities summing to < 1.
        np.testing.assert_allclose(ours[w], want, atol=2e-6)
    with pytest.raises(ValueError, match="window size"):
        semantic.window_class_scores(mask_logits, class_logits, window_size=64)


def _agree(ours, want, scores):
    """Labels agree except where the reference's best two classes tie to float32 precision."""
    assert ours.shape == want.shape and ours.dtype == np.int32
    differ = ours != want
    if differ.any():
        top = np.take_along_axis(scores, want[None], 0)[0]
        mine = np.take_along_axis(scores, ours[None], 0)[0]
        assert np.all(top[differ] - mine[differ] < 1e-5)
    assert differ.mean() <= 1e-3


@pytest.mark.parametrize("shapes,num_windows", [
    ([(40, 40), (32, 60), (70, 32)], 6),  # 1, 2 and 3 windows; landscape and portrait in one batch
    ([(20, 50), (16, 16), (33, 90)], 7),  # 3 windows, an upscaled square, 3 windows with a fractional step
])
def test_predict_semantic_matches_reference(shapes, num_windows):
    forward = make_forward(6, NUM_C, SIZE, seed=3)
    rng = np.random.default_rng(len(shapes[0]))
    images = [random_image(rng, h, w) for h, w in shapes]
    ours = pipeline.predict_semantic(forward, images, SIZE, window_multiple=4)
    want, scores, windows = reference.semantic(forward, images, SIZE)
    assert windows == num_windows
    assert forward.calls[0] == 8  # one forward over all windows, padded to a multiple of 4
    for o, w, s, image in zip(ours, want, scores, images):
        assert o.shape == image.shape[:2]
        _agree(o, w, s)
        assert len(np.unique(w)) > 1  # the fake network must produce more than one class per image


def test_every_prediction_point_and_no_recompilation():
    forward = make_forward(6, NUM_C, SIZE, seed=4)
    rng = np.random.default_rng(9)
    first = [random_image(rng, h, w) for h, w in [(30, 50), (60, 30)]]
    second = [random_image(rng, h, w) for h, w in [(31, 45), (50, 28)]]  # other sizes, same canvases
    outs = pipeline.predict_semantic(forward, first, SIZE, all_outputs=True)
    assert len(outs) == 2 and not all((a == b).all() for a, b in zip(*outs))
    before = semantic.stitch_windows._cache_size()
    pipeline.predict_semantic(forward, second, SIZE)
    assert semantic.stitch_windows._cache_size() == before


def test_stitch_averages_overlaps():
    # Two windows of constant scores over a 32x48 image: the overlap (columns 16..31) gets their mean.
    scores = np.zeros((2, 2, SIZE, SIZE), np.float32)
    scores[0, 0], scores[0, 1] = 1.0, 0.0
    scores[1, 0], scores[1, 1] = 0.2, 0.7   # class 1 wins where window 1 is alone, class 0 in the overlap
    labels = np.asarray(semantic.stitch_windows(scores, np.array([0, 0]), np.array([0, 16]), np.array([[32, 48]]),
                                                np.array([[32, 48]]), canvas_long=64, out_canvas=(32, 64)))
    np.testing.assert_array_equal(labels[0, 0, :48], [0] * 32 + [1] * 16)
    # The same image as portrait: windows are transposed into the canonical (short, long) layout.
    scores_t = np.swapaxes(scores, -1, -2)
    labels_t = np.asarray(semantic.stitch_windows(scores_t, np.array([0, 0]), np.array([0, 16]),
                                                  np.array([[48, 32]]), np.array([[48, 32]]), canvas_long=64,
                                                  out_canvas=(32, 64)))
    np.testing.assert_array_equal(labels_t, labels)


def test_non_square_image_size_is_refused():
    with pytest.raises(ValueError, match="square"):
        pipeline.predict_semantic(make_forward(2, 2, SIZE), [np.zeros((8, 8, 3), np.uint8)], (32, 64))


def test_elongated_images_are_letterboxed_into_max_windows():
    # 6x200 needs 34 windows at its short-side size (32x1067); with max_windows=2 its long side spans 2 windows
    # (64 px), its short side becomes round(6 * 64 / 200) = 2 px, zero-padded to the window.
    forward = make_forward(6, NUM_C, SIZE, seed=4)
    image = random_image(np.random.default_rng(1), 6, 200)
    ours = pipeline.predict_semantic(forward, [image], SIZE, window_multiple=1, max_windows=2)[0]
    assert forward.calls == [2]
    canvas = np.zeros((SIZE, 2 * SIZE, 3), np.uint8)
    canvas[:2] = np.asarray(Image.fromarray(image).resize((2 * SIZE, 2), Image.BILINEAR))
    mask_list, class_list = forward(np.stack([canvas[:, :SIZE], canvas[:, SIZE:]]) / np.float32(255))
    window_scores = [np.einsum("qhw,qc->chw", reference.sigmoid(reference.interpolate(m, (SIZE, SIZE))),
                               reference.softmax(c)[:, :NUM_C]) for m, c in zip(mask_list[-1], class_list[-1])]
    # Only the two image rows of the windows are resized to the original size; the padding is cut off.
    stitched = np.concatenate(window_scores, axis=-1)
    scores = reference.interpolate(stitched[:, :2], image.shape[:2])
    _agree(ours, np.argmax(scores, axis=0), scores)
    assert len(np.unique(ours)) > 1
    with_padding = np.argmax(reference.interpolate(stitched, image.shape[:2]), axis=0)
    assert (with_padding != ours).mean() > 0.5  # the padding rows would decide most labels
