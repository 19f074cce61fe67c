"""The class-targeted plan: budget split over classes by weight, then over the masks showing each class."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segsynth.formats.plan import read_plan
from segsynth.io import SegsynthError
from segsynth.methods.freemask.hardness import hardness_counts, mask_hardness
from segsynth.methods.freemask.targeted import round_to_budget, targeted_allocation
from segsynth.plan import PlanConfig, make_plan

# 4 masks x 3 classes: road everywhere, a pole in masks 1 and 2 (large in 2), a car in mask 3.
PIXELS = np.array([[100, 0, 0],
                   [99, 1, 0],
                   [80, 20, 0],
                   [70, 0, 30]])


def test_class_shares_follow_the_weights_then_the_coverage():
    per_mask_class = targeted_allocation(PIXELS, np.array([1.0, 2.0, 1.0]), budget=40, nmax=40)
    assert per_mask_class.sum() == pytest.approx(40)
    by_class = per_mask_class.sum(axis=0)
    assert by_class == pytest.approx([10, 20, 10])  # shares w_c / Σw
    # the pole's 20 go to masks 1 and 2 by the share of the mask it covers (0.01 and 0.20)
    assert per_mask_class[1:3, 1] == pytest.approx([20 * 0.01 / 0.21, 20 * 0.20 / 0.21])
    assert per_mask_class[3, 2] == pytest.approx(10) and per_mask_class[:3, 2] == pytest.approx([0, 0, 0])


def test_a_small_failed_class_gets_images_the_hardness_plan_does_not_give_it():
    # the pole is failed (weight 5), the road learned (0.1): hardness barely ranks the 1 %-pole mask up
    weights = np.array([0.1, 5.0, 0.1])
    targeted = round_to_budget(targeted_allocation(PIXELS, weights, budget=8, nmax=20).sum(axis=1), 8, 20)
    hardness = hardness_counts([mask_hardness(np.repeat(np.arange(3), row).reshape(1, -1), weights)
                                for row in PIXELS], nmax=20, budget=8)
    assert targeted[2] > hardness[2] and targeted[2] >= 6
    assert sum(targeted) == sum(hardness) == 8


def test_nmax_caps_a_mask_and_the_excess_stays_with_the_class():
    per_mask_class = targeted_allocation(PIXELS, np.array([0.0, 1.0, 0.0]), budget=10, nmax=6)
    counts = per_mask_class.sum(axis=1)
    assert counts.max() <= 6 + 1e-9 and counts.sum() == pytest.approx(10)
    assert counts[2] == pytest.approx(6) and counts[1] == pytest.approx(4)  # mask 1 takes what mask 2 cannot
    assert round_to_budget(counts, 10, 6) == [0, 4, 6, 0]


def test_a_class_with_no_uncapped_mask_spreads_over_the_others():
    per_mask_class = targeted_allocation(PIXELS, np.array([0.0, 0.0, 1.0]), budget=9, nmax=3)
    counts = per_mask_class.sum(axis=1)
    assert counts.max() <= 3 + 1e-9 and counts.sum() == pytest.approx(9)


def test_rounding_hits_the_budget_and_respects_the_cap():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 50, size=(37, 6))
    for budget in (10, 37, 100, 200):
        counts = round_to_budget(targeted_allocation(pixels, rng.random(6), budget, nmax=8).sum(axis=1), budget, 8)
        assert sum(counts) == budget and max(counts) <= 8 and min(counts) >= 0


def test_impossible_budgets_and_weightless_statistics_are_refused():
    with pytest.raises(SegsynthError, match="more than 4 masks x Nmax 2"):
        targeted_allocation(PIXELS, np.ones(3), budget=9, nmax=2)
    with pytest.raises(SegsynthError, match="no class with a positive weight"):
        targeted_allocation(PIXELS, np.array([np.nan, 0.0, 0.0]), budget=4, nmax=4)


def test_targeted_plan_file(tmp_path):
    from segsynth.data.toy import TOY_CLASSES

    stats = tmp_path / "stats.json"
    mean_loss = [0.1] * 6 + [5.0, 5.0, 5.0]  # person, pole, sign failed
    stats.write_text(json.dumps({"classes": list(TOY_CLASSES), "mean_loss": mean_loss, "pixels": [1] * 9}))
    out = tmp_path / "plan.jsonl"
    make_plan(PlanConfig(data="toy:n=30,size=32", out=str(out), stats=str(stats), targeted=True, budget=45, nmax=10))
    entries = read_plan(out)
    assert sum(len(e.seeds) for e in entries) == 45 and max(len(e.seeds) for e in entries) <= 10
    targets = {e.extra.get("target_class") for e in entries if e.seeds}
    assert targets <= {"person", "pole", "sign"}, targets
    assert "targeted: true" in (tmp_path / "plan.jsonl.config.yaml").read_text()


def test_targeted_needs_statistics(tmp_path):
    with pytest.raises(SegsynthError, match="targeted plan needs --stats"):
        make_plan(PlanConfig(data="toy:n=4,size=32", out=str(tmp_path / "p.jsonl"), targeted=True))


def test_class_window_holds_the_most_pixels_of_the_class_and_centres_ties_on_it():
    from segsynth.methods.freemask.targeted import class_window

    label = np.zeros((20, 40), np.uint8)
    label[2:4, 30:34] = 1  # a small sign in the top right
    top, left, height, width = class_window(label, 1, 0.5)
    assert (height, width) == (10, 20) and top + height <= 20 and left + width <= 40
    assert (label[top:top + height, left:left + width] == 1).sum() == 8  # the whole sign is inside
    # every window that holds the sign ties; the chosen one is centred nearest the sign (rows 2-3, columns 30-33)
    assert (top, left) == (0, 20)
    label[15:20, 0:8] = 1  # a larger patch of the class elsewhere wins
    top, left, _, _ = class_window(label, 1, 0.5)
    assert (label[top:top + 10, left:left + 20] == 1).sum() == 40 and left == 0
    assert class_window(label, 1, 1.0) == [0, 0, 20, 40]


def test_class_crops_split_each_mask_over_its_classes_and_raise_their_share(tmp_path):
    """--class-crop: each targeted mask becomes one entry per class that earned it images, rendering the window
    where that class is; the failed small classes cover a larger share of the planned pixels than with whole
    masks, the seeds and the budget stay the same."""
    from segsynth.data import open_dataset
    from segsynth.data.toy import TOY_CLASSES
    from segsynth.formats.plan import plan_requests

    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"classes": list(TOY_CLASSES), "mean_loss": [0.1] * 6 + [5.0, 5.0, 5.0],
                                 "pixels": [1] * 9}))
    data, settings = "toy:n=30,size=32x40", dict(stats=str(stats), targeted=True, budget=45, nmax=10)
    whole = read_plan(make_plan(PlanConfig(data=data, out=str(tmp_path / "whole.jsonl"), **settings)))
    crops = read_plan(make_plan(PlanConfig(data=data, out=str(tmp_path / "crops.jsonl"), class_crop=0.5, **settings)))
    assert sorted(s for e in crops for s in e.seeds) == sorted(s for e in whole for s in e.seeds)
    split = open_dataset(data).split("train")
    index = {name: c for c, name in enumerate(TOY_CLASSES)}

    def shares(entries) -> np.ndarray:
        pixels = np.zeros(len(TOY_CLASSES))
        for entry in entries:
            label = split.label(split.index_of(entry.source or entry.id))
            if entry.crop:
                top, left, height, width = entry.crop
                label = label[top:top + height, left:left + width]
            pixels += len(entry.seeds) * np.bincount(label.ravel(), minlength=256)[:len(TOY_CLASSES)]
        return pixels / pixels.sum()

    for entry in crops:
        source, target = entry.id.split("@")
        assert entry.source == source and entry.extra["target_class"] == target and "class_images" not in entry.extra
        top, left, height, width = entry.crop
        assert (height, width) == (16, 20) and top + height <= 32 and left + width <= 40
        assert (split.label(split.index_of(source))[top:top + height, left:left + width] == index[target]).any()
    assert len({e.id for e in crops}) == len(crops) >= len(whole)
    failed = [index[name] for name in ("person", "pole", "sign")]
    assert shares(crops)[failed].sum() > 1.5 * shares(whole)[failed].sum()
    assert [r.source for r in plan_requests(crops, "crops.jsonl")] == [e.source for e in crops for _ in e.seeds]


def test_class_crop_needs_the_targeted_plan(tmp_path):
    with pytest.raises(SegsynthError, match="--class-crop .* --targeted"):
        make_plan(PlanConfig(data="toy:n=4,size=32", out=str(tmp_path / "p.jsonl"), uniform=1, class_crop=0.5))
