"""The procedural toy dataset: deterministic, parsable options, every class present."""

from __future__ import annotations

import numpy as np
import pytest

from segsynth.data import open_dataset
from segsynth.data.toy import TOY_CLASSES, TOY_PALETTE, ToyOptions, parse_toy_options
from segsynth.io import SegsynthError


def arrays(dataset, split, count):
    return [(dataset.split(split)[i].image, dataset.split(split)[i].label) for i in range(count)]


def test_same_spec_gives_identical_arrays():
    first = open_dataset("toy:n=6,n_val=3,size=32x40,seed=5")
    second = open_dataset("toy:n=6,n_val=3,size=32x40,seed=5")
    for split in ("train", "val", "test"):
        for (image_a, label_a), (image_b, label_b) in zip(arrays(first, split, 3), arrays(second, split, 3)):
            np.testing.assert_array_equal(image_a, image_b)
            np.testing.assert_array_equal(label_a, label_b)
    # Reading twice from one dataset (through the render cache) gives equal, independent copies.
    sample = first.split("train")[0]
    sample.image[:] = 0
    assert first.split("train")[0].image.any()


def test_seed_and_split_change_the_scenes():
    base = open_dataset("toy:n=2,n_val=2,size=32")
    other_seed = open_dataset("toy:n=2,n_val=2,size=32,seed=1")
    assert not np.array_equal(base.split("train")[0].image, other_seed.split("train")[0].image)
    assert not np.array_equal(base.split("train")[0].image, base.split("val")[0].image)
    assert not np.array_equal(base.split("val")[0].image, base.split("test")[0].image)
    # n only sets how many: sample i is the same scene whatever n is
    bigger = open_dataset("toy:n=5,n_val=2,size=32")
    np.testing.assert_array_equal(base.split("train")[1].label, bigger.split("train")[1].label)


def test_splits_ids_shapes_and_classes():
    dataset = open_dataset("toy:n=5,n_val=2,size=32x48")
    assert {name: len(split) for name, split in dataset.splits.items()} == {"train": 5, "val": 2, "test": 2}
    assert dataset.split("val").ids == ["toy_val_00000", "toy_val_00001"]
    assert dataset.classes == TOY_CLASSES and len(TOY_CLASSES) == 9
    assert len(dataset.palette) == 9 and dataset.palette == TOY_PALETTE
    sample = dataset.split("train")[4]
    assert sample.id == "toy_train_00004"
    assert sample.image.shape == (32, 48, 3) and sample.image.dtype == np.uint8
    assert sample.label.shape == (32, 48) and sample.label.dtype == np.uint8
    assert sample.label.max() < 9


def test_all_nine_classes_appear_over_fifty_images():
    train = open_dataset("toy:n=50,n_val=1,size=48x64").split("train")
    counts = np.zeros(256, np.int64)
    for i in range(len(train)):
        counts += np.bincount(train[i].label.ravel(), minlength=256)
    assert (counts[:9] > 0).all(), dict(zip(TOY_CLASSES, counts[:9]))
    assert counts[9:].sum() == 0  # no ignore, no stray values
    # rare classes stay rare: person and sign are each under 5% of pixels
    share = counts[:9] / counts.sum()
    assert share[TOY_CLASSES.index("person")] < 0.05 and share[TOY_CLASSES.index("sign")] < 0.05


def test_bare_toy_spec_uses_defaults():
    assert parse_toy_options("") == ToyOptions()
    dataset = open_dataset("toy")
    assert len(dataset.split("train")) == 400 and len(dataset.split("val")) == 100
    assert dataset.split("val")[0].image.shape == (96, 128, 3)


@pytest.mark.parametrize("text, expected", [
    ("n=12", ToyOptions(n=12)),
    ("size=40", ToyOptions(height=40, width=40)),
    ("size=32x64,n_val=3", ToyOptions(n_val=3, height=32, width=64)),
    (" n = 7 , seed = 2 ,", ToyOptions(n=7, seed=2)),
])
def test_option_parsing(text, expected):
    assert parse_toy_options(text) == expected


@pytest.mark.parametrize("text, message", [
    ("n", "must be key=value"),
    ("colour=red", "unknown toy option 'colour'; options: n, n_val, size"),
    ("n=many", "is not a number"),
    ("size=32xwide", "is not a number"),
    ("n=0", "out of range"),
    ("size=8", "out of range"),
])
def test_bad_options(text, message):
    with pytest.raises(SegsynthError, match=message):
        open_dataset(f"toy:{text}")
