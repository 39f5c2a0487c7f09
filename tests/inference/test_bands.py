"""Post-processing memory: maps at original resolution are produced band by band, never for every query (or class)
at once, and the band height changes no result."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from eomt_jax.inference import postprocess, semantic
from tests.inference import reference

SIZE, NUM_C = 32, 5


def largest_intermediate(fn, *args) -> int:
    """Elements of the largest array any step of `fn`'s traced program produces, nested programs (jit, scan,
    loops, map) included: what the compiled program can at most hold as one buffer."""
    largest = 0

    def walk(jaxpr):
        nonlocal largest
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if isinstance(sub, jax_core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax_core.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return largest


def test_no_array_of_every_query_at_original_resolution():
    q, canvas = 64, (1024, 768)  # a photo of 0.8 megapixels: one map per query would hold 50 M floats
    every_query = q * canvas[0] * canvas[1]
    args = (jnp.zeros((2, q, SIZE // 4, SIZE // 4)), jnp.zeros((2, q, NUM_C + 1)), jnp.ones((2, 2), jnp.int32),
            jnp.ones((2, 2), jnp.int32))
    # The instrument sees such an array where one exists: the inspection helper materialises all maps.
    assert largest_intermediate(lambda m, c, r, o: postprocess.revert_mask_logits(
        m, r, o, image_size=SIZE, canvas_hw=canvas), *args) >= 2 * every_query

    panoptic = largest_intermediate(lambda *a: postprocess.panoptic_postprocess(
        *a, image_size=SIZE, canvas_hw=canvas, stuff_classes=(3,)), *args)
    assert panoptic <= every_query // 8, panoptic

    top_k = 10
    instance = largest_intermediate(lambda *a: postprocess.instance_postprocess(
        *a, image_size=SIZE, canvas_hw=canvas, top_k=top_k), *args)
    assert instance <= 2 * top_k * canvas[0] * canvas[1], instance  # the batch's kept masks: the output itself

    num_c = 150
    stitch = largest_intermediate(lambda s: semantic.stitch_windows(
        s, jnp.array([0, 0]), jnp.array([0, SIZE // 2]), jnp.array([[SIZE, SIZE + SIZE // 2]]),
        jnp.array([[1024, 1536]]), canvas_long=2 * SIZE, out_canvas=(1024, 1536)),
        jnp.zeros((2, num_c, SIZE, SIZE)))
    assert stitch <= num_c * 1024 * 1536 // 8, stitch


def _scene(vertical: bool):
    """Grid logits of four regions (quadrants or stripes) with confident classes: two things and a stuff class
    owning two regions, so the merge paints three segments, one of them merged; plus a query nobody keeps."""
    g = SIZE // 4
    masks = np.full((5, g, g), -5.0, np.float32)
    for k in range(4):
        if vertical:
            masks[k, :, 2 * k : 2 * k + 2] = 5.0
        else:
            masks[k, (k // 2) * 4 : (k // 2) * 4 + 4, (k % 2) * 4 : (k % 2) * 4 + 4] = 5.0
    masks += np.random.default_rng(int(vertical)).normal(size=masks.shape).astype(np.float32)  # uneven borders
    classes = np.zeros((5, NUM_C + 1), np.float32)
    classes[np.arange(5), [0, 3, 1, 3, NUM_C]] = 8.0
    return masks, classes


def test_band_height_changes_nothing():
    scenes = [_scene(False), _scene(True)]
    mask_logits = np.stack([m for m, _ in scenes])
    class_logits = np.stack([c for _, c in scenes])
    resized = np.array([[32, 21], [15, 32]], np.int32)
    orig = np.array([[300, 197], [93, 200]], np.int32)
    canvas = (384, 256)
    kw = dict(image_size=SIZE, canvas_hw=canvas)
    one_band = postprocess.panoptic_postprocess(mask_logits, class_logits, resized, orig, stuff_classes=(3, 4),
                                                band_rows=384, **kw)
    bands = postprocess.panoptic_postprocess(mask_logits, class_logits, resized, orig, stuff_classes=(3, 4),
                                             band_rows=8, **kw)
    np.testing.assert_array_equal(np.asarray(bands), np.asarray(one_band))
    assert [len(np.unique(np.asarray(one_band)[b, ..., 1])) for b in range(2)] == [4, 4]  # 3 segments + void
    # And both equal the merge of the full-resolution logits (the original's procedure).
    for b, (h, w) in enumerate(orig):
        logits = reference.revert(mask_logits[b], SIZE, resized[b], (h, w))
        want = reference.panoptic(logits, class_logits[b], (3, 4))
        assert (np.asarray(bands)[b, :h, :w] != want).any(-1).mean() <= 5e-3

    one_band = postprocess.instance_postprocess(mask_logits, class_logits, resized, orig, top_k=12, band_rows=384,
                                                **kw)
    bands = postprocess.instance_postprocess(mask_logits, class_logits, resized, orig, top_k=12, band_rows=8, **kw)
    for key in ("masks", "labels", "queries", "class_scores"):
        np.testing.assert_array_equal(np.asarray(bands[key]), np.asarray(one_band[key]), err_msg=key)
    # Mask scores sum band by band: float32 totals in another order.
    np.testing.assert_allclose(np.asarray(bands["scores"]), np.asarray(one_band["scores"]), rtol=1e-6)
    assert np.asarray(bands["masks"]).any()

    rng = np.random.default_rng(0)
    scores = rng.uniform(size=(2, NUM_C, SIZE, SIZE)).astype(np.float32)
    stitch = dict(window_image=np.array([0, 0]), window_start=np.array([0, 16]), resized_hw=np.array([[32, 48]]),
                  orig_hw=np.array([[300, 450]]), canvas_long=64, out_canvas=(384, 512))
    np.testing.assert_array_equal(np.asarray(semantic.stitch_windows(scores, **stitch, band_rows=4)),
                                  np.asarray(semantic.stitch_windows(scores, **stitch, band_rows=384)))


def test_bands_follow_the_memory_budget():
    from eomt_jax.inference import resize

    assert resize.band_rows(8, (256, 256)) == 128  # small: whole bands of 128 rows
    assert resize.band_rows(200, (3072, 4096)) == 16  # 200 maps of 4096 columns: 16 rows fit in 64 MB
    assert resize.band_rows(8, (20, 64)) == 32  # never much taller than the output
    assert resize.band_rows(8, (20, 64), 5) == 5
