"""Input geometry (Pillow resizes, rounding, window offsets) and the bilinear logits resizes against PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from eomt_jax.inference import postprocess, preprocess, resize
from tests.inference import reference
from tests.inference.fakes import random_image

# float32 bilinear weights are computed identically; what differs is only the summation order of two or three
# products per output (and the composed matrices of `revert_mask_logits`), a few ulp of values of order 1-10.
ATOL = 1e-5


@jax.jit
def _resize_in_canvas(x, n_in, n_out):
    """Traced sizes: resize x[:, :n_in, :n_in + 3] to (n_out, n_out + 1) inside fixed (170, 170) canvases."""
    rows = resize.bilinear_matrix(n_out, n_in, 170, x.shape[1])
    cols = resize.bilinear_matrix(n_out + 1, n_in + 3, 170, x.shape[2])
    return resize.apply_separable(x, rows, cols)


def test_bilinear_matrix_matches_torch_for_traced_sizes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 163, 163)).astype(np.float32)
    for n_in, n_out in [(8, 32), (32, 8), (7, 13), (13, 7), (5, 5), (1, 4), (4, 1), (160, 100), (20, 40), (17, 5)]:
        out = np.asarray(_resize_in_canvas(x, n_in, n_out))
        want = reference.interpolate(x[:, :n_in, :n_in + 3], (n_out, n_out + 1))
        np.testing.assert_allclose(out[:, :n_out, :n_out + 1], want, atol=ATOL, err_msg=f"{n_in} -> {n_out}")
        assert not out[:, n_out:].any() and not out[:, :, n_out + 1:].any()  # filler rows/columns are zero
    assert _resize_in_canvas._cache_size() == 1


def test_upsampling_matches_jax_image_resize():
    # The S/4 -> S upsampling is also what `jax.image.resize(..., antialias=False)` computes.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8)), jnp.float32)
    ours = resize.resize_bilinear(x, (32, 32))
    theirs = jax.image.resize(x, (3, 32, 32), "bilinear", antialias=False)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=ATOL)


def test_revert_mask_logits_matches_torch_without_recompiling():
    size, rng = 32, np.random.default_rng(2)
    orig = np.array([[48, 31], [17, 60], [32, 32], [0, 0]], np.int32)  # the last row is batch padding
    resized = np.array([reference.letterbox(np.zeros((h, w, 3), np.uint8), size)[1] if h else (0, 0)
                        for h, w in orig], np.int32)
    for trial in range(2):
        logits = rng.normal(size=(4, 3, 8, 8)).astype(np.float32) * 3
        out = np.asarray(postprocess.revert_mask_logits(logits, resized, orig, image_size=size, canvas_hw=(64, 64)))
        for b, (h, w) in enumerate(orig[:3]):
            want = reference.revert(logits[b], size, resized[b], (h, w))
            np.testing.assert_allclose(out[b, :, :h, :w], want, atol=ATOL)
            assert not out[b, :, h:].any() and not out[b, :, :, w:].any()
        assert not out[3].any()
        orig[:3] = orig[:3, ::-1]  # new sizes, same canvas: must reuse the compiled program
        resized[:3] = resized[:3, ::-1]
    assert postprocess.revert_mask_logits._cache_size() == 1


def test_revert_rejects_mismatched_inputs():
    logits = np.zeros((1, 2, 8, 8), np.float32)
    with pytest.raises(ValueError, match="1/4 of the image size"):
        postprocess.revert_mask_logits(logits, np.ones((1, 2), np.int32), np.ones((1, 2), np.int32),
                                       image_size=64, canvas_hw=(8, 8))
    with pytest.raises(ValueError, match=r"orig_hw must be \(1, 2\)"):
        postprocess.revert_mask_logits(logits, np.ones((1, 2), np.int32), np.ones((2, 2), np.int32),
                                       image_size=32, canvas_hw=(8, 8))
    with pytest.raises(ValueError, match="mask logits"):
        postprocess.revert_mask_logits(logits[0], np.ones((1, 2), np.int32), np.ones((1, 2), np.int32),
                                       image_size=32, canvas_hw=(8, 8))


def test_canvas_for_buckets_sizes():
    assert postprocess.canvas_for([[480, 640], [427, 640]]) == (512, 640)
    assert postprocess.canvas_for([[1, 1]], multiple=64) == (64, 64)


def test_letterbox_matches_pillow():
    rng = np.random.default_rng(3)
    for h, w in [(48, 31), (31, 48), (100, 100), (7, 90)]:
        image = random_image(rng, h, w)
        padded, resized = preprocess.resize_and_pad(image, 32)
        want, want_resized = reference.letterbox(image, 32)
        assert resized == want_resized and max(resized) == 32
        np.testing.assert_array_equal(padded, want)


def test_sizes_round_half_to_even_like_python():
    # 129 · 64/128 = 64.5: Python's round gives 64 (one window); rounding half up would give 65 (two windows).
    assert preprocess.short_side_size((128, 129), 64) == (64, 64)
    assert len(preprocess.semantic_windows(np.zeros((128, 129, 3), np.uint8), 64).starts) == 1
    # 81 · 64/128 = 40.5 -> 40 on the letterbox path.
    assert preprocess.resize_and_pad(np.zeros((81, 128, 3), np.uint8), 64)[1] == (40, 64)


def test_window_starts():
    assert preprocess.window_starts(683, 512) == [0, 171]          # ADE20K 512x683 at 512
    assert preprocess.window_starts(2048, 1024) == [0, 1024]       # Cityscapes at 1024: no overlap
    assert preprocess.window_starts(512, 512) == [0]
    assert preprocess.window_starts(1101, 512) == [0, 294, 589]    # fractional step 294.5, truncated
    for size in (32, 512, 640):
        for long in range(size, 4 * size, 7):
            starts = preprocess.window_starts(long, size)
            n = -(-long // size)
            overlap = n * size - long
            step = size - overlap / (n - 1) if overlap > 0 else size
            assert starts[:-1] == [int(j * step) for j in range(n - 1)]
            assert starts[-1] == long - size
    # The original leaves the last pixel uncovered here (int(7 * 548.43) + 640 = 4480); we align to the border.
    assert preprocess.window_starts(4481, 640)[-1] == 4481 - 640
    with pytest.raises(ValueError):
        preprocess.window_starts(10, 32)


@pytest.mark.parametrize("hw,n", [((40, 40), 1), ((32, 60), 2), ((70, 32), 3), ((20, 50), 3)])
def test_semantic_windows_cut_the_resized_image(hw, n):
    image = random_image(np.random.default_rng(4), *hw)
    cut = preprocess.semantic_windows(image, 32)
    new_h, new_w = cut.resized_hw
    assert min(new_h, new_w) == 32 and len(cut.starts) == n and cut.windows.shape == (n, 32, 32, 3)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    for window, start in zip(cut.windows, cut.starts):
        want = resized[start:start + 32] if cut.portrait else resized[:, start:start + 32]
        np.testing.assert_array_equal(window, want)
    assert cut.starts[-1] + 32 == max(new_h, new_w)


def test_sides_that_would_round_to_zero_keep_one_pixel():
    assert preprocess.long_side_size((2, 3000), 640) == (1, 640)  # round(0.43) is 0: Pillow would refuse it
    padded, resized = preprocess.resize_and_pad(np.full((2, 3000, 3), 100, np.uint8), 64)
    assert resized == (1, 64) and (padded[:1] == 100).all() and not padded[1:].any()


def test_semantic_size_caps_the_window_count():
    assert preprocess.semantic_size((512, 683), 512) == (512, 683)  # ordinary images: the original's resize
    assert preprocess.semantic_size((1024, 2048), 1024) == (1024, 2048)
    n = preprocess.MAX_WINDOWS
    assert preprocess.semantic_size((64, 64 * n), 64) == (64, 64 * n)  # n windows: still the original's
    assert preprocess.semantic_size((64, 64 * n + 70), 64) == (56, 64 * n)  # n + 1: long side to n windows
    assert preprocess.semantic_size((3000, 2), 64) == (64 * n, 1)  # 1500 windows otherwise
    cut = preprocess.semantic_windows(np.full((2, 3000, 3), 100, np.uint8), 64)
    assert cut.windows.shape == (n, 64, 64, 3) and cut.resized_hw == (1, 64 * n) and not cut.portrait
    assert (cut.windows[:, :1] == 100).all() and not cut.windows[:, 1:].any()


def test_bad_images_are_rejected():
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess.semantic_windows(np.zeros((8, 8), np.uint8), 32)
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess.check_image(np.zeros((8, 8, 3), np.float32))
