"""SegGen mask quality: generated vs real mask statistics on hand-made masks with known numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from segsynth.data import open_dataset
from segsynth.io import SegsynthError
from segsynth.methods.seggen.mask_quality import format_mask_quality, mask_quality

ROAD, CAR, SIGN = range(3)


def real_masks() -> list[np.ndarray]:
    half = np.zeros((4, 4), np.uint8)
    half[:, 2:] = CAR  # road on the left, a car on the right
    return [half, np.zeros((4, 4), np.uint8)]  # and a mask of road only


def generated_masks() -> list[np.ndarray]:
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0] = mask[3, 3] = CAR  # two one-pixel cars, not touching
    mask[0, 3] = 255
    return [mask]


def test_identical_sets_score_zero():
    split = open_dataset("toy:n=6,n_val=1,size=32x40").split("train")
    labels = [split[i].label for i in range(len(split))]
    report = mask_quality(labels, [label.copy() for label in reversed(labels)], num_classes=9)
    assert report["kl_real_generated"] == 0.0
    assert report["cooccurrence_mean_abs_diff"] == 0.0
    assert report["components_per_mask"]["generated"] == report["components_per_mask"]["real"]
    assert report["class_frequency"]["generated"] == report["class_frequency"]["real"]
    json.dumps(report)  # JSON-ready


def test_known_numbers_on_hand_made_masks():
    report = mask_quality(generated_masks(), real_masks(), num_classes=2)
    assert report["num_generated"] == 1 and report["num_real"] == 2
    assert report["class_frequency"]["real"] == [0.75, 0.25]  # 24 road and 8 car pixels
    assert report["class_frequency"]["generated"] == pytest.approx([13 / 15, 2 / 15])
    expected_kl = 0.75 * math.log(0.75 / (13 / 15)) + 0.25 * math.log(0.25 / (2 / 15))
    assert report["kl_real_generated"] == pytest.approx(expected_kl, abs=1e-5)
    assert report["components_per_mask"]["real"] == [1.0, 1.0]
    assert report["components_per_mask"]["generated"] == [1.0, 2.0]
    assert report["cooccurrence"]["real"] == [[1.0, 0.5], [0.5, 0.5]]
    assert report["cooccurrence"]["generated"] == [[1.0, 1.0], [1.0, 1.0]]
    assert report["cooccurrence_mean_abs_diff"] == pytest.approx(0.375)
    assert report["ignore_fraction"] == {"generated": 1 / 16, "real": 0.0}


def test_a_class_never_generated_costs_a_large_finite_kl():
    real = real_masks()
    real[1][0, 0] = SIGN
    report = mask_quality(generated_masks(), real, num_classes=3)
    assert 0.01 < report["kl_real_generated"] < 1.0 and math.isfinite(report["kl_real_generated"])
    assert report["components_per_mask"]["generated"][SIGN] is None
    assert report["components_per_mask"]["real"][SIGN] == 1.0


def test_bad_masks_are_refused():
    with pytest.raises(SegsynthError, match="no generated masks"):
        mask_quality([], real_masks(), num_classes=2)
    with pytest.raises(SegsynthError, match=r"generated mask 0 has label value\(s\) \[7\]"):
        mask_quality([np.full((4, 4), 7, np.uint8)], real_masks(), num_classes=2)
    with pytest.raises(SegsynthError, match="real mask 1 must be an H x W integer label map"):
        mask_quality(generated_masks(), [real_masks()[0], np.zeros((4, 4, 3), np.uint8)], num_classes=2)


def test_format_mask_quality_is_a_markdown_table():
    text = format_mask_quality(mask_quality(generated_masks(), real_masks(), num_classes=2), ["road", "car"])
    assert "KL(real || generated): 0.0" in text and "co-occurrence mean absolute difference: 0.3750" in text
    assert "ignore pixels: 6.2% generated, 0.0% real" in text
    assert "| road | 75.0% | 86.7% | 100.0% | 100.0% | 1.00 | 1.00 |" in text
    assert "| car | 25.0% | 13.3% | 50.0% | 100.0% | 1.00 | 2.00 |" in text
    with pytest.raises(SegsynthError, match="3 class names for a report on 2 classes"):
        format_mask_quality(mask_quality(generated_masks(), real_masks(), num_classes=2), ["a", "b", "c"])
