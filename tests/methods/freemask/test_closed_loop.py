"""`segsynth run --method freemask` with the closed loop and the filter, volume and share sweeps, on tiny settings."""

from __future__ import annotations

import json
import shutil

import pytest

from segsynth.formats.manifest import read_manifest
from segsynth.formats.plan import read_plan
from segsynth.io import read_json
from segsynth.run import resolve_run_config, run

TINY = dict(data="toy:n=12,n_val=4,size=32x40", seeds=[0], generator="train", grids=2, device="cpu",
            arms=["real", "joint-filtered-hardness"],
            train=dict(iterations=4, batch_size=4, warmup=1, workers=0),
            train_generator=dict(size=[32, 40], channels=[32, 64], layers_per_block=1, iterations=2, max_minutes=0.0,
                                 batch_size=4),
            synthesize=dict(steps=2, batch_size=12), filter=dict(alpha=1.25))


def _seeds(folder) -> set[int]:
    return {record["seed"] for record in read_manifest(folder)}


def test_one_round_of_the_closed_loop_and_its_resume(tmp_path, capsys):
    """The default suite's run of the loop: one round re-planned from the joint model's class losses, with the
    class-targeted planner and class-centred crops (the slow test below takes the default hardness planner)."""
    out = tmp_path / "run"
    values = {**TINY, "out": str(out), "rounds": 1, "loop_images_per_mask": 1, "loop_planner": "targeted-crops",
              "loop_class_crop": 0.5, "filter": {"alpha": 1.25, "class_alphas": {"person": 0.5}}}
    results = run(resolve_run_config(values))
    # The filter section's per-class alpha reaches every set the run filters, the round's included.
    for name in ("hardness", "hardness-round1"):
        assert read_json(out / "synthetic" / name / "filter.json")["class_alphas"] == {"person": 0.5}
    assert list(results["arms"]) == ["real", "joint-filtered-hardness", "joint-filtered-hardness-round1"]
    signal = read_json(out / "loop" / "round1" / "class_stats.json")
    assert signal["segmenter"].startswith(str(out / "arms" / "joint-filtered-hardness" / "seed0"))
    round_set = out / "synthetic" / "hardness-round1"
    assert len(read_manifest(round_set)) == 12 and not _seeds(round_set) & _seeds(out / "synthetic" / "hardness")
    entries = read_plan(out / "plans" / "hardness-round1.jsonl")
    assert all("targeted" in entry.extra and entry.crop[2:] == [16, 20] for entry in entries)
    assert all(record["meta"]["crop"] for record in read_manifest(round_set))
    assert results["arms"]["joint-filtered-hardness-round1"]["synthetic_images"] == 12 + 24
    # Every image of the round is a class-centred crop, none of which the first plan rendered.
    assert results["arms"]["joint-filtered-hardness-round1"]["plan_change"] == {"moved": 12, "planned": 12}
    assert "| 1 | joint-filtered-hardness-round1 | 36 | 12 of 12 |" in (out / "results.md").read_text()
    assert "(signal loss, planner targeted-crops 0.5, init scratch" in (out / "results.md").read_text()

    capsys.readouterr()
    assert run(resolve_run_config(values))["arms"] == results["arms"]
    printed = capsys.readouterr()
    assert "[skip] round 1: synthesize" in printed.out and "[skip] train joint-filtered-hardness-round1" in printed.out
    assert "[skip] filter hardness" in printed.out and "[skip] round 1: filter" in printed.out


@pytest.mark.slow  # twelve tiny trainings (about 80 s on a busy 2-core machine)
def test_closed_loop_with_filter_volume_and_share_sweeps_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    values = {**TINY, "out": str(out), "filter_alphas": [1.0, 0], "volumes": [1, 2], "synthetic_shares": [0.25],
              "rounds": 2}
    results = run(resolve_run_config(values))

    # Every arm, the derived ones included, was trained and evaluated.
    assert list(results["arms"]) == ["real", "joint-filtered-hardness", "joint-filtered-hardness-alpha1",
                                     "joint-filtered-hardness-unfiltered", "joint-filtered-hardness-k1",
                                     "joint-filtered-hardness-share0.25", "joint-filtered-hardness-round1",
                                     "joint-filtered-hardness-round2"]
    assert all(arm["mean"] is not None for arm in results["arms"].values())
    synthetic = out / "synthetic"

    # The loop: each round re-planned from the round before's model, new seeds, its own filtered set.
    for r in (1, 2):
        signal = read_json(out / "loop" / f"round{r}" / "class_stats.json")
        before = "joint-filtered-hardness" if r == 1 else "joint-filtered-hardness-round1"
        assert signal["segmenter"].startswith(str(out / "arms" / before / "seed0"))
        assert len(read_manifest(synthetic / f"hardness-round{r}")) == 24  # images_per_mask (2) x 12 masks
        assert all("filtered_mask" in rec for rec in read_manifest(synthetic / f"hardness-round{r}"))
    seeds = [_seeds(synthetic / name) for name in ("hardness", "hardness-round1", "hardness-round2")]
    assert not (seeds[0] & seeds[1]) and not (seeds[0] & seeds[2]) and not (seeds[1] & seeds[2])
    assert results["arms"]["joint-filtered-hardness-round2"]["synthetic_sets"] == \
        ["hardness", "hardness-round1", "hardness-round2"]  # loop_sets: accumulate
    assert results["arms"]["joint-filtered-hardness-round2"]["synthetic_images"] == 72
    assert len(results["arms"]["joint-filtered-hardness-round1"]["signal"]) == 9
    change = results["arms"]["joint-filtered-hardness-round2"]["plan_change"]
    assert change["planned"] == 24 and 0 <= change["moved"] <= 24

    # The filter sweep: the copy is filtered at its own alpha, the original keeps the run's.
    assert read_json(synthetic / "hardness" / "filter.json")["alpha"] == 1.25
    assert read_json(synthetic / "hardness-alpha1" / "filter.json")["alpha"] == 1.0
    assert {r["id"] for r in read_manifest(synthetic / "hardness-alpha1")} == \
        {r["id"] for r in read_manifest(synthetic / "hardness")}
    config = (out / "arms" / "joint-filtered-hardness-unfiltered" / "seed0" / "config.yaml").read_text()
    assert "synthetic_masks: raw" in config

    # The volume sweep: K=1 is half of the set rendered at K=2, with its filtered masks.
    subset = {r["id"]: r for r in read_manifest(synthetic / "hardness-k1")}
    assert len(subset) == 12 and set(subset) < {r["id"] for r in read_manifest(synthetic / "hardness")}
    assert all(r["filtered_mask"] for r in subset.values())

    # The share sweep: the joint arm's set, drawn by the replace recipe from its pool.
    config = (out / "arms" / "joint-filtered-hardness-share0.25" / "seed0" / "config.yaml").read_text()
    assert "recipe: replace" in config and "replace_probability: 0.25" in config and "replace_from: pool" in config
    assert f"- {synthetic / 'hardness'}" in config and "synthetic_masks: filtered" in config

    # The tables: per-class IoU per round, the sweeps, and the same in the HTML report.
    text = (out / "results.md").read_text()
    assert "Closed loop of joint-filtered-hardness (signal loss, planner hardness, init scratch, sets accumulate)" in text
    assert "| 2 | joint-filtered-hardness-round2 | 72 |" in text and "Filter settings of" in text
    assert "Synthetic volume of joint-filtered-hardness" in text and "iterations the same for every K" in text
    assert "Synthetic share of joint-filtered-hardness" in text and "| joint-filtered-hardness-share0.25 | 0.25 |" in text
    page = (out / "report.html").read_text()
    assert "Closed loop of joint-filtered-hardness" in page and "Filter settings of" in page
    assert "Synthetic share of joint-filtered-hardness" in page

    # A second run finds every round done and trains nothing.
    capsys.readouterr()
    again = run(resolve_run_config(values))
    printed = capsys.readouterr()
    assert again["arms"] == results["arms"]
    for line in ("[skip] round 2: loss signal of joint-filtered-hardness-round1", "[skip] round 2: synthesize",
                 "[skip] round 2: filter", "[skip] train joint-filtered-hardness-round2 seed 0",
                 "[skip] filter hardness-alpha1", "[skip] subset hardness-k1"):
        assert line in printed.out + printed.err, line

    # The other loop settings, on a copy of the first round's inputs: the IoU signal, the latest set only,
    # each round from the previous round's checkpoint.
    second = tmp_path / "second"
    shutil.copytree(out, second, ignore=shutil.ignore_patterns("*round*", "loop", "results.*", "report.html"))
    values = {**TINY, "out": str(second), "generator": f"builtin:{out / 'generator'}", "rounds": 1,
              "loop_signal": "iou", "loop_sets": "latest", "loop_init": "previous", "loop_images_per_mask": 1}
    results = run(resolve_run_config(values))
    signal = read_json(second / "loop" / "round1" / "class_stats.json")
    assert signal["signal"] == "iou" and all(w is None or 0.01 <= w <= 1 for w in signal["mean_loss"])
    assert results["arms"]["joint-filtered-hardness-round1"]["synthetic_sets"] == ["hardness-round1"]
    assert len(read_manifest(second / "synthetic" / "hardness-round1")) == 12
    config = (second / "arms" / "joint-filtered-hardness-round1" / "seed0" / "config.yaml").read_text()
    assert f"init_checkpoint: {second / 'arms' / 'joint-filtered-hardness' / 'seed0'}" in config
    assert json.loads((second / "results.json").read_text())["arms"]["joint-filtered-hardness-round1"]["round"] == 1
