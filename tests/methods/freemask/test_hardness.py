"""FreeMask's hardness-aware plan: hardness, the k formula, budgets, and the file it writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from segsynth.io import SegsynthError
from segsynth.formats.plan import read_plan, summarize_plan
from segsynth.methods.freemask.hardness import hardness_counts, mask_hardness
from segsynth.plan import PlanConfig, make_plan


def test_hardness_is_pixel_weighted_mean_class_loss():
    label = np.array([[0, 0, 0, 1], [255, 255, 1, 2]], np.uint8)
    mean_loss = np.array([0.5, 2.0, np.nan])  # class 2 has no statistics: left out
    assert mask_hardness(label, mean_loss) == pytest.approx((3 * 0.5 + 2 * 2.0) / 5)


def test_k_formula_matches_freemask():
    hardness = [0.3, 0.1, 0.9, 0.5]  # ranks (easiest first): 0.1->1, 0.3->2, 0.5->3, 0.9->4
    counts = hardness_counts(hardness, nmax=20)
    n = 4
    expected_by_rank = {r: min(1 + math.floor(r / n * 20 + 0.5), 20) for r in range(1, 5)}
    assert counts == [expected_by_rank[2], expected_by_rank[1], expected_by_rank[4], expected_by_rank[3]]
    assert counts == [11, 6, 20, 16]


def test_budget_hits_total_exactly_and_keeps_order():
    rng = np.random.default_rng(0)
    hardness = rng.random(101).tolist()
    for budget in (50, 101, 333, 2000):
        counts = hardness_counts(hardness, nmax=20, budget=budget)
        assert sum(counts) == budget
        order = np.argsort(hardness, kind="stable")
        ranked = np.array(counts)[order]
        assert (np.diff(ranked) >= -1).all()  # non-decreasing up to rounding
        assert ranked[-10:].mean() > ranked[:10].mean()


def test_nmax_plan_renders_about_half_of_render_nmax_then_pick():
    counts = hardness_counts(np.linspace(0, 1, 1000).tolist(), nmax=20)
    assert sum(counts) / (1000 * 20) == pytest.approx(0.55, abs=0.01)


def test_plan_file_and_summary(tmp_path):
    stats = tmp_path / "stats.json"
    from segsynth.data.toy import TOY_CLASSES

    mean_loss = [0.2, 0.3, 0.3, 0.4, 0.6, 1.0, 3.0, 3.5, 4.0]
    stats.write_text(json.dumps({"classes": list(TOY_CLASSES), "mean_loss": mean_loss, "pixels": [1] * 9}))
    out = tmp_path / "plan.jsonl"
    make_plan(PlanConfig(data="toy:n=30,size=32", out=str(out), stats=str(stats), budget=60))
    entries = read_plan(out)
    assert sum(len(e.seeds) for e in entries) == 60
    all_seeds = [s for e in entries for s in e.seeds]
    assert len(set(all_seeds)) == len(all_seeds)
    hardest = max(entries, key=lambda e: e.extra["hardness"])
    easiest = min(entries, key=lambda e: e.extra["hardness"])
    assert len(hardest.seeds) > len(easiest.seeds)
    assert "plan: 60 images" in summarize_plan(entries)
    assert (tmp_path / "plan.jsonl.config.yaml").is_file()


def test_hardness_without_stats_and_stats_for_other_classes(tmp_path):
    with pytest.raises(SegsynthError, match="needs --stats"):
        make_plan(PlanConfig(data="toy:n=4,size=32", out=str(tmp_path / "p.jsonl"), hardness=True))
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"classes": ["a", "b"], "mean_loss": [1, 2], "pixels": [1, 1]}))
    with pytest.raises(SegsynthError, match="not this dataset"):
        make_plan(PlanConfig(data="toy:n=4,size=32", out=str(tmp_path / "p.jsonl"), stats=str(stats)))
    assert not (tmp_path / "p.jsonl").exists()
