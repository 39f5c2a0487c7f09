import numpy as np
import pytest
import torch

from eomt_jax.data import load_source, transforms
from eomt_jax.data.transforms import (Augmentation, TrainTransform, apply_augmentation, apply_color_jitter,
                                      pad_targets, resize_nearest)


def record(image, masks, labels=None, crowd=None):
    n = len(masks)
    return {"image": image, "masks": np.asarray(masks, bool), "image_id": "x",
            "labels": np.arange(n, dtype=np.int32) if labels is None else np.asarray(labels, np.int32),
            "is_crowd": np.zeros(n, bool) if crowd is None else np.asarray(crowd, bool)}


@pytest.mark.parametrize("size", [(7, 5), (13, 31), (40, 17)])
def test_nearest_resize_matches_pytorch(size):
    x = np.random.default_rng(0).integers(0, 255, (19, 23)).astype(np.uint8)
    want = torch.nn.functional.interpolate(torch.from_numpy(x).float()[None, None], size=size, mode="nearest")
    np.testing.assert_array_equal(resize_nearest(x, size), want[0, 0].numpy().astype(np.uint8))


def test_image_resize_matches_pytorch_antialiased_bilinear():
    rng = np.random.default_rng(0)
    image = np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(rng.integers(0, 256, (1, 3, 12, 16)).astype(np.float32)), size=(90, 120),
        mode="bilinear").round().byte()[0].permute(1, 2, 0))
    masks = np.ones((1, 90, 120), bool)
    for resized, offset in [((45, 60), (0, 0)), ((80, 100), (7, 20)), ((150, 200), (37, 51))]:
        out = apply_augmentation(record(image, masks), Augmentation((), False, resized, offset), 64)
        full = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), resized,
                                               mode="bilinear", antialias=True)[0].permute(1, 2, 0)
        full = full.round().clamp(0, 255).numpy()
        crop = full[offset[0]:offset[0] + 64, offset[1]:offset[1] + 64]
        h, w = crop.shape[:2]
        # Pillow and PyTorch differ only in rounding: at most one grey level.
        assert np.abs(out["image"][:h, :w].astype(float) - crop).max() <= 1
        assert not out["image"][h:].any() and not out["image"][:, w:].any()  # zero padding bottom/right


def test_flip_and_crop_move_image_and_masks_together():
    # At scale 1 the view is an exact copy: the crop/flip of a known pattern can be checked pixel by pixel.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    masks = np.zeros((2, 40, 50), bool)
    masks[0, 2:20, 3:30] = True
    masks[1, 25:39, 31:49] = True
    for flip in (False, True):
        out = apply_augmentation(record(image, masks), Augmentation((), flip, (40, 50), (5, 11)), 32)
        want_image, want_masks = image, masks
        if flip:
            want_image, want_masks = image[:, ::-1], masks[:, :, ::-1]
        np.testing.assert_array_equal(out["image"], want_image[5:37, 11:43])
        np.testing.assert_array_equal(out["masks"], want_masks[:, 5:37, 11:43])


def test_random_views_keep_masks_aligned_with_the_image():
    # Red where mask 0 is, blue where mask 1 is: after any flip/scale/crop, pixels well inside a mask
    # (bilinear only blends at borders) must still have that mask's colour.
    image = np.zeros((60, 80, 3), np.uint8)
    masks = np.zeros((2, 60, 80), bool)
    masks[0, :, :30] = True
    masks[1, 10:50, 45:75] = True
    image[masks[0]] = (255, 0, 0)
    image[masks[1]] = (0, 0, 255)
    transform = TrainTransform(48, 4, scale_range=(0.5, 2.0))
    checked = 0
    for seed in range(12):
        out = transform(record(image, masks), np.random.default_rng(seed))
        for m, label in zip(out["masks"][out["valid"]], out["labels"][out["valid"]]):
            inner = m.copy()
            for dy, dx in [(-2, 0), (2, 0), (0, -2), (0, 2)]:
                inner &= np.roll(m, (dy, dx), (0, 1))
            colour = out["image"][inner]
            expected = (255, 0, 0) if label == 0 else (0, 0, 255)
            if len(colour):
                assert np.abs(colour.astype(int) - expected).max() <= 1
            checked += len(colour)
    assert checked > 1000


def test_transform_is_deterministic_and_drops_empty_masks(generated):
    root, _ = generated["coco_panoptic"]
    source = load_source("coco_panoptic", root, "train")
    transform = TrainTransform(32, 6, scale_range=(0.1, 2.0))
    differs = False
    for i in range(len(source)):
        a = transform(source[i], np.random.default_rng(i))
        b = transform(source[i], np.random.default_rng(i))
        c = transform(source[i], np.random.default_rng(i + 100))
        if a is None:
            continue
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        differs |= not np.array_equal(a["image"], c["image"])
        assert a["image"].shape == (32, 32, 3) and a["masks"].shape == (6, 32, 32)
        assert a["masks"][a["valid"]].any(axis=(1, 2)).all()  # no empty mask is valid
        assert not a["masks"][~a["valid"]].any() and not a["is_crowd"].any()
    assert differs


def test_hopeless_sample_is_skipped_after_bounded_redraws():
    # One pixel at (5, 5) of a 100 px image: a 10x nearest downscale samples rows/cols 0, 10, 20..., so the
    # mask vanishes from every view.
    masks = np.zeros((1, 100, 100), bool)
    masks[0, 5, 5] = True
    transform = TrainTransform(100, 4, scale_range=(0.1, 0.1), max_redraws=3)
    before = transforms.COUNTS["skipped_redraws"]
    assert transform(record(np.zeros((100, 100, 3), np.uint8), masks), np.random.default_rng(0)) is None
    assert transforms.COUNTS["skipped_redraws"] == before + 1


def test_crowd_segments_are_dropped_and_crowd_only_samples_skipped():
    masks = np.ones((2, 20, 20), bool)
    transform = TrainTransform(16, 4)
    out = transform(record(np.zeros((20, 20, 3), np.uint8), masks, [3, 7], [True, False]),
                    np.random.default_rng(0))
    assert out["labels"][out["valid"]].tolist() == [7]
    before = transforms.COUNTS["skipped_no_masks"]
    assert transform(record(np.zeros((20, 20, 3), np.uint8), masks, [3, 7], [True, True]),
                     np.random.default_rng(0)) is None
    assert transforms.COUNTS["skipped_no_masks"] == before + 1


def test_pad_targets_keeps_the_largest_masks_in_order():
    masks = np.zeros((4, 10, 10), bool)
    for i, area in enumerate([5, 30, 2, 20]):
        masks[i].flat[:area] = True
    sample = {"image": np.zeros((10, 10, 3), np.uint8), "masks": masks,
              "labels": np.array([10, 11, 12, 13], np.int32), "is_crowd": np.zeros(4, bool)}
    out = pad_targets(sample, 2)
    assert out["labels"].tolist() == [11, 13] and out["valid"].all()
    np.testing.assert_array_equal(out["masks"], masks[[1, 3]])
    out = pad_targets(sample, 6)
    assert out["valid"].tolist() == [True] * 4 + [False] * 2 and out["labels"][4:].tolist() == [0, 0]


def test_color_jitter_operations():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 9, 3)).astype(np.uint8)
    # Brightness scales and truncates; saturation 0 gives the grey image; a hue turn of 1/3 maps red to green.
    np.testing.assert_array_equal(apply_color_jitter(image, [("brightness", 1.1)]),
                                  np.floor(np.clip(image * np.float32(1.1), 0, 255)).astype(np.uint8))
    grey = apply_color_jitter(image, [("saturation", 0.0)])
    assert (grey == grey[..., :1]).all()
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 200
    green = apply_color_jitter(red, [("hue", 1 / 3)])
    assert np.abs(green.astype(int) - [0, 200, 0]).max() <= 1  # float round trip through HSV
    assert np.abs(apply_color_jitter(image, [("hue", 0.0)]).astype(int) - image).max() <= 1
    # Contrast 0 gives the (integer) mean grey level everywhere.
    flat = apply_color_jitter(image, [("contrast", 0.0)])
    assert len(np.unique(flat)) == 1
    # torchvision's adjust_contrast: blend with the mean of the truncated greyscale image, the mean not rounded.
    grey = np.floor(image[..., 0] * np.float32(0.2989) + image[..., 1] * np.float32(0.587)
                    + image[..., 2] * np.float32(0.114))
    mean = grey.astype(np.float32).mean()
    assert mean != np.floor(mean)  # the case where rounding the mean would change pixels
    expected = np.floor(np.clip(np.float32(0.7) * image + np.float32(0.3) * mean, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(apply_color_jitter(image, [("contrast", 0.7)]), expected)
