"""Paired augmentation: image, label and weight map always share one geometry."""

from __future__ import annotations

import numpy as np
import pytest

from segsynth.data.transforms import AugmentConfig, augment, photometric_distortion, resize_pair

# Six well-separated, non-black colours: the image's colour encodes its label.
COLOURS = np.array([(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30), (30, 230, 230), (230, 30, 230)],
                   np.uint8)
SRC_H, SRC_W = 48, 64


def block_scene(seed: int = 0, block: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Random blocks of classes 0..5 (asymmetric, so flips and shifts show), and the image painted from them."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, len(COLOURS), (SRC_H // block + 1, SRC_W // block + 1))
    label = np.repeat(np.repeat(coarse, block, 0), block, 1)[:SRC_H, :SRC_W].astype(np.uint8)
    return COLOURS[label], label


def nearest_colour_class(image: np.ndarray) -> np.ndarray:
    distance = ((image[..., None, :].astype(np.int32) - COLOURS.astype(np.int32)) ** 2).sum(-1)
    return distance.argmin(-1)


def uniform_neighbourhood(label: np.ndarray, radius: int = 2) -> np.ndarray:
    """True where every label within `radius` (Chebyshev) equals the centre's: away from any boundary."""
    padded = np.pad(label.astype(np.int16), radius, constant_values=-1)
    same = np.ones(label.shape, bool)
    h, w = label.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy: dy + h, dx: dx + w] == label
    return same


def check_consistent(image, label, weight, min_agreement=0.9):
    """Image colour matches label everywhere away from boundaries; padding is ignore + black + zero weight."""
    valid = label != 255
    assert valid.any()
    assert set(np.unique(label[valid])) <= set(range(len(COLOURS)))
    interior = valid & uniform_neighbourhood(label)
    assert interior.any()
    np.testing.assert_allclose(image[interior].astype(int), COLOURS[label[interior]].astype(int), atol=2)
    agreement = (nearest_colour_class(image)[valid] == label[valid]).mean()
    assert agreement >= min_agreement, agreement  # only resize boundaries may blend
    assert (image[~valid] == 0).all()  # padding: image 0 where label is ignore
    np.testing.assert_array_equal(weight[valid], label[valid].astype(np.float32))
    assert (weight[~valid] == 0).all()


@pytest.mark.parametrize("seed", range(24))
def test_image_label_and_weight_share_geometry(seed):
    image, label = block_scene(seed)
    weight = label.astype(np.float32)  # the weight map carries the label too, so its geometry is checked as well
    config = AugmentConfig(crop=(40, 40), base=(SRC_H, SRC_W), photometric=False)
    out_image, out_label, out_weight = augment(image, label, weight, config, np.random.default_rng(seed))
    assert out_image.shape == (40, 40, 3) and out_image.dtype == np.uint8
    assert out_label.shape == (40, 40) and out_label.dtype == np.uint8
    assert out_weight.shape == (40, 40) and out_weight.dtype == np.float32
    check_consistent(out_image, out_label, out_weight)


def test_consistency_check_catches_misalignment():
    """The check above has teeth: a label flipped or shifted apart from its image fails it."""
    image, label = block_scene(3)
    weight = label.astype(np.float32)
    config = AugmentConfig(crop=(40, 40), base=(SRC_H, SRC_W), photometric=False, scale_range=(1.0, 1.0))
    out_image, out_label, out_weight = augment(image, label, weight, config, np.random.default_rng(0))
    check_consistent(out_image, out_label, out_weight)
    for broken in (out_label[:, ::-1], np.roll(out_label, 12, axis=1)):
        with pytest.raises(AssertionError):
            check_consistent(out_image, broken, broken.astype(np.float32))


def test_flip_happens_and_stays_paired():
    image, label = block_scene(1)
    config = AugmentConfig(crop=(SRC_H, SRC_W), base=(SRC_H, SRC_W), scale_range=(1.0, 1.0), photometric=False)
    flipped = 0
    for seed in range(16):
        out_image, out_label, _ = augment(image, label, None, config, np.random.default_rng(seed))
        np.testing.assert_array_equal(out_image, COLOURS[out_label])  # scale 1, full crop: exact
        if np.array_equal(out_label, label[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(out_label, label)
    assert 0 < flipped < 16
    no_flip = AugmentConfig(crop=(SRC_H, SRC_W), base=(SRC_H, SRC_W), scale_range=(1.0, 1.0), photometric=False,
                            flip=False)
    for seed in range(8):
        np.testing.assert_array_equal(augment(image, label, None, no_flip, np.random.default_rng(seed))[1], label)


@pytest.mark.parametrize("crop", [(16, 16), (24, 36), (40, 80), (100, 30)])
def test_crop_size_is_respected(crop):
    image, label = block_scene(0)
    config = AugmentConfig(crop=crop, base=(SRC_H, SRC_W))
    for seed in range(6):
        out_image, out_label, out_weight = augment(image, label, None, config, np.random.default_rng(seed))
        assert out_image.shape == (*crop, 3) and out_label.shape == crop and out_weight is None
        assert out_image.flags["C_CONTIGUOUS"] and out_label.flags["C_CONTIGUOUS"]


def test_padding_uses_ignore_and_zero():
    """Half-size resize (24x32) into a 40x40 crop: the rest is padding, bottom and right before any flip."""
    image, label = block_scene(2)
    weight = np.ones(label.shape, np.float32)
    config = AugmentConfig(crop=(40, 40), base=(SRC_H, SRC_W), scale_range=(0.5, 0.5), flip=False, photometric=False)
    out_image, out_label, out_weight = augment(image, label, weight, config, np.random.default_rng(0))
    assert (out_label[24:] == 255).all() and (out_label[:, 32:] == 255).all()
    assert (out_label[:24, :32] != 255).all()
    assert (out_label == 255).sum() == 40 * 40 - 24 * 32
    assert (out_image[24:] == 0).all() and (out_image[:, 32:] == 0).all()
    assert (out_weight[:24, :32] == 1).all() and (out_weight[out_label == 255] == 0).all()


def test_existing_ignore_pixels_survive():
    image, label = block_scene(4)
    label = label.copy()
    label[10:20, 10:30] = 255
    image = image.copy()
    image[10:20, 10:30] = 0
    config = AugmentConfig(crop=(SRC_H, SRC_W), base=(SRC_H, SRC_W), scale_range=(1.0, 1.0), photometric=False)
    _, out_label, _ = augment(image, label, None, config, np.random.default_rng(0))
    assert (out_label == 255).sum() == 200


def test_photometric_changes_image_only():
    image, label = block_scene(5)
    geometric = AugmentConfig(crop=(32, 32), base=(SRC_H, SRC_W), photometric=False)
    full = AugmentConfig(crop=(32, 32), base=(SRC_H, SRC_W), photometric=True)
    changed = 0
    for seed in range(8):
        plain = augment(image, label, None, geometric, np.random.default_rng(seed))
        jittered = augment(image, label, None, full, np.random.default_rng(seed))
        np.testing.assert_array_equal(plain[1], jittered[1])  # the same draws, the same geometry
        assert jittered[0].dtype == np.uint8 and jittered[0].shape == plain[0].shape
        changed += not np.array_equal(plain[0], jittered[0])
    assert changed > 0


def test_same_seed_same_output():
    image, label = block_scene(6)
    config = AugmentConfig(crop=(32, 32), base=(SRC_H, SRC_W))
    a = augment(image, label, None, config, np.random.default_rng(42))
    b = augment(image, label, None, config, np.random.default_rng(42))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_photometric_distortion_keeps_shape_and_range():
    image, _ = block_scene(7)
    for seed in range(10):
        out = photometric_distortion(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8


def test_resize_pair_nearest_for_labels():
    image, label = block_scene(8)
    weight = label.astype(np.float32)
    out_image, out_label, out_weight = resize_pair(image, label, weight, (24, 40))
    assert out_image.shape == (24, 40, 3) and out_label.shape == (24, 40) and out_weight.shape == (24, 40)
    assert set(np.unique(out_label)) <= set(np.unique(label))  # nearest: no invented labels
    np.testing.assert_array_equal(out_weight, out_label.astype(np.float32))
