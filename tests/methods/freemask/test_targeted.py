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
