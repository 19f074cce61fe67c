"""FreeMask's derived arms and sets (variants.py) and the closed loop's IoU signal (loop.py), without a run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from segsynth.data import open_dataset
from segsynth.formats.manifest import read_manifest
from segsynth.formats.plan import PlanEntry, write_plan
from segsynth.formats.stats import load_class_stats
from segsynth.io import SegsynthError, atomic_write_json, atomic_write_png
from segsynth.methods.freemask.loop import write_iou_signal
from segsynth.methods.freemask.method import ARMS, FREEMASK, MAIN_ARMS
from segsynth.methods.freemask.variants import derive_set, derived_set_done, nested_ids
from segsynth.report import format_sweeps, plan_change
from segsynth.run import resolve_run_config
from synthetic_sets import write_synthetic_set


def _plan(path, counts):
    return write_plan(path, [PlanEntry(f"m{i}", list(range(100 * i, 100 * i + n))) for i, n in enumerate(counts)])


def test_nested_shares_of_a_uniform_plan_keep_the_first_k_seeds_of_every_mask(tmp_path):
    plan = _plan(tmp_path / "uniform.jsonl", [4, 4, 4])
    assert nested_ids(plan, (1, 4)) == ["m0_s0", "m1_s100", "m2_s200"]
    assert nested_ids(plan, (2, 4)) == ["m0_s0", "m0_s1", "m1_s100", "m1_s101", "m2_s200", "m2_s201"]
    assert len(nested_ids(plan, (4, 4))) == 12


def test_nested_shares_of_an_uneven_plan_are_subsets_of_each_other_and_follow_the_counts(tmp_path):
    counts = [1, 2, 3, 5, 8, 13]  # a hardness plan: harder masks have more images
    plan = _plan(tmp_path / "hardness.jsonl", counts)
    shares = [set(nested_ids(plan, (k, 8))) for k in range(1, 9)]
    total = sum(counts)
    for k, (smaller, larger) in enumerate(zip(shares, shares[1:]), 1):
        assert smaller < larger, k
        assert len(smaller) == int(np.floor(total * k / 8 + 0.5))
    half = nested_ids(plan, (4, 8))
    per_mask = [sum(sample.startswith(f"m{i}_") for sample in half) for i in range(len(counts))]
    assert all(abs(n - c / 2) <= 1 for n, c in zip(per_mask, counts)), per_mask


def _filtered_set(root, dataset):
    """A hand-made set with filtered masks and verdicts, as `segsynth filter` leaves it."""
    write_synthetic_set(root, dataset, copies=2)
    lines = []
    for record in read_manifest(root):
        mask = np.full((32, 40), 255, np.uint8)
        atomic_write_png(root / "masks_filtered" / f"{record['id']}.png", mask)
        lines.append(json.dumps({**record, "filtered_mask": f"masks_filtered/{record['id']}.png",
                                 "ignored_fraction": 1.0, "ignored": {"sky": 1.0}}) + "\n")
    (root / "manifest.jsonl").write_text("".join(lines))
    atomic_write_json(root / "filter.json", {"alpha": 1.25})
    return root


def test_derived_sets_link_the_images_and_carry_the_filter_only_when_asked(tmp_path):
    dataset = open_dataset("toy:n=3,n_val=1,size=32x40")
    source = _filtered_set(tmp_path / "hardness", dataset)
    ids = [r["id"] for r in read_manifest(source)][::2]

    subset = tmp_path / "hardness-k1"
    derive_set(source, subset, ids, carry_filter=True)
    records = read_manifest(subset)
    assert [r["id"] for r in records] == sorted(ids) and all(r["ignored_fraction"] == 1.0 for r in records)
    assert os.stat(subset / records[0]["image"]).st_ino == os.stat(source / records[0]["image"]).st_ino
    assert (subset / records[0]["filtered_mask"]).is_file() and (subset / "filter.json").is_file()
    assert derived_set_done(source, subset, ids, True) and not derived_set_done(source, subset, ids[:1], True)

    copy = tmp_path / "hardness-alpha2"
    derive_set(source, copy)
    records = read_manifest(copy)
    assert len(records) == 6 and not any("filtered_mask" in r or "ignored" in r for r in records)
    assert not (copy / "masks_filtered").exists() and not (copy / "filter.json").exists()
    assert derived_set_done(source, copy, None, False) and not derived_set_done(source, copy, None, True)

    with pytest.raises(SegsynthError, match="not finished .*finish `segsynth synthesize`"):
        derive_set(source, tmp_path / "x", ["nope_s0"])
    raw = write_synthetic_set(tmp_path / "raw", dataset)
    with pytest.raises(SegsynthError, match="not filtered yet.*segsynth filter"):
        derive_set(raw, tmp_path / "y", None, carry_filter=True)


def test_derived_arm_names_sets_and_settings():
    config = resolve_run_config({"preset": "quick", "arms": ["real", "joint-filtered-hardness", "joint-raw-uniform"],
                                 "filter_alphas": [1.0, 1.25, 0], "filter_judges": {"big": "somewhere"},
                                 "volumes": [1, 3], "volume_iterations": "scaled", "rounds": 2, "loop_sets": "latest",
                                 "loop_init": "previous"})
    assert config.images_per_mask == 3  # the largest volume, as nobody set it
    table = FREEMASK.arm_table(config)
    derived = config.arms[3:]
    assert derived == ["joint-filtered-hardness-alpha1", "joint-filtered-hardness-unfiltered",
                       "joint-filtered-hardness-alpha1-big", "joint-filtered-hardness-alpha1.25-big",
                       "joint-filtered-hardness-k1", "joint-raw-uniform-k1",
                       "joint-filtered-hardness-round1", "joint-filtered-hardness-round2"]
    assert table["joint-filtered-hardness-alpha1-big"].synthetic == ("hardness-alpha1-big",)
    assert table["joint-filtered-hardness-unfiltered"].masks == "raw"
    assert dict(table["joint-raw-uniform-k1"].train)["iterations"] == round(200 / 3)  # scaled with K
    second = table["joint-filtered-hardness-round2"]
    assert second.synthetic == ("hardness-round2",) and second.init_from == "joint-filtered-hardness-round1"
    assert second.round == 2 and dict(second.tags)["signal"] == "loss"
    # Each round's plan is compared with the one before it: round 1's with the loop arm's first set's plan.
    first = dict(table["joint-filtered-hardness-round1"].tags)
    assert (first["plan_file"], first["previous_plan_file"]) == ("plans/hardness-round1.jsonl", "plans/hardness.jsonl")
    assert dict(second.tags)["previous_plan_file"] == "plans/hardness-round1.jsonl"
    # A resolved config resolves to itself (run.config.yaml lists the derived arms).
    again = resolve_run_config({key: getattr(config, key) for key in ("preset", "arms", "filter_alphas",
                                                                      "filter_judges", "volumes", "volume_iterations",
                                                                      "rounds", "loop_sets", "loop_init",
                                                                      "images_per_mask")})
    assert again.arms == config.arms
    # Off by default: the arms of a run without these keys are unchanged.
    assert resolve_run_config({}).arms == list(MAIN_ARMS)


def test_share_arms_replace_from_the_pool_of_the_joint_arms_sets():
    config = resolve_run_config({"preset": "quick", "arms": ["real", "joint-filtered-hardness", "synthetic-filtered-hardness",
                                                            "pretrain-finetune-filtered-hardness"],
                                 "synthetic_shares": [0.2, 0.5, 1.0]})
    table = FREEMASK.arm_table(config)
    # Only the joint arm has a share to vary; 0.5 is the joint arm itself.
    assert config.arms[4:] == ["joint-filtered-hardness-share0.2", "joint-filtered-hardness-share1"]
    arm = table["joint-filtered-hardness-share0.2"]
    assert (arm.recipe, arm.synthetic, arm.masks) == ("replace", ("hardness",), "filtered")
    assert dict(arm.train) == {"replace_probability": 0.2, "replace_from": "pool"}
    assert dict(arm.tags) == {"sweep": "share", "of": "joint-filtered-hardness", "share": 0.2, "base_share": 0.5}
    assert resolve_run_config({"preset": "quick", "arms": config.arms, "synthetic_shares": [0.2, 0.5, 1.0]}).arms \
        == config.arms


@pytest.mark.parametrize("values, message", [
    ({"method": "seggen", "rounds": 1}, "rounds: method seggen derives no arms"),
    ({"method": "seggen", "synthetic_shares": [0.2]}, "synthetic_shares: method seggen derives no arms"),
    ({"arms": ["real", "synthetic-filtered-hardness"], "synthetic_shares": [0.2]}, "none of the run's arms .* is one"),
    ({"synthetic_shares": [0]}, "synthetic_shares"),
    ({"synthetic_shares": [1.5]}, "synthetic_shares"),
    ({"synthetic_shares": [0.2, 0.2]}, "give distinct values"),
    ({"arms": ["real"], "rounds": 1}, "loop_arm 'joint-filtered-hardness', which is not among the run's arms"),
    ({"volumes": [4], "images_per_mask": 2}, r"\[4\] exceed images_per_mask 2"),
    ({"arms": ["real", "joint-raw-uniform"], "filter_alphas": [1.0]}, "none of the run's arms .* uses them"),
    ({"arms": ["real"], "volumes": [1]}, "none of the run's arms .* uses any"),
    ({"filter_judges": {"a-b c": "x"}}, "judge name 'a_b c' cannot name arms"),
    ({"filter_alphas": [1.0, 1.0]}, "give distinct values"),
    ({"arms": ["real", "joint-filtered-hardness-alpha3"]}, "unknown arm.*joint-filtered-hardness-alpha3"),
])
def test_sweep_settings_that_cannot_work_are_refused_before_any_work(values, message):
    with pytest.raises(SegsynthError, match=message):
        resolve_run_config(values)


def test_iou_signal_weights_classes_by_what_the_model_still_gets_wrong(tmp_path):
    classes = ["sky", "road", "car", "sign"]
    reference = tmp_path / "class_stats.json"
    atomic_write_json(reference, {"classes": classes, "mean_loss": [0.1, 0.2, 0.9, None], "pixels": [10, 10, 10, 0],
                                  "segmenter": "x", "data": "toy", "split": "train"})
    metrics = []
    for seed, car in ((0, 10.0), (1, 30.0)):
        metrics.append(tmp_path / f"seed{seed}" / "metrics_val.json")
        atomic_write_json(metrics[-1], {"miou": 50.0, "per_class": {"sky": 100.0, "road": None, "car": car,
                                                                      "sign": None}})
    signal = tmp_path / "loop" / "round1" / "class_stats.json"
    write_iou_signal(signal, metrics + [tmp_path / "missing" / "metrics_val.json"], reference, "val")
    weights = load_class_stats(signal, classes)
    # sky: perfect -> the floor; car: 1 - mean(10, 30)/100; road: no seed scored it -> the mean of the known;
    # sign: no training pixels -> none.
    assert weights[0] == pytest.approx(0.01) and weights[2] == pytest.approx(0.8)
    assert weights[1] == pytest.approx((0.01 + 0.8) / 2) and np.isnan(weights[3])
    with pytest.raises(SegsynthError, match="no metrics to take the IoU signal from"):
        write_iou_signal(signal, [tmp_path / "missing.json"], reference, "val")


def test_plan_change_counts_the_images_a_re_plan_gives_a_mask_beyond_the_plan_before(tmp_path):
    before = _plan(tmp_path / "before.jsonl", [3, 1, 2])  # masks m0..m2
    assert plan_change(before, before) == {"moved": 0, "planned": 6}
    after = write_plan(tmp_path / "after.jsonl", [PlanEntry("m0", [1]), PlanEntry("m1", [2]),
                                                  PlanEntry("m2", [3, 4]), PlanEntry("m3", [5, 6])])
    # two of m0's images went to m3, a mask the plan before did not render
    assert plan_change(after, before) == {"moved": 2, "planned": 6}
    # A crop of a mask is a different thing to render than the whole mask; several entries of a mask add up.
    crops = write_plan(tmp_path / "crops.jsonl", [PlanEntry("m0@car", [1], source="m0", crop=[0, 0, 8, 8]),
                                                  PlanEntry("m1-a", [2], source="m1"), PlanEntry("m1-b", [3], source="m1")])
    assert plan_change(crops, before) == {"moved": 2, "planned": 3}
    assert plan_change(tmp_path / "missing.jsonl", before) is None


def test_sweep_tables_in_the_results():
    classes = ["sky", "car"]

    def arm(mean, variant=None, **more):
        return {"mean": mean, "spread": 0.0, "miou": {"0": mean}, "per_class": {"sky": mean, "car": mean / 2},
                "synthetic_images": 10, "iterations": 100, "variant": variant or {}, **more}

    results = {"classes": classes, "arms": {
        "real": arm(40.0),
        "joint": arm(41.0, ignored_fraction=0.2),
        "joint-alpha2": arm(42.0, {"sweep": "filter", "of": "joint", "alpha": 2.0, "judge": "reference",
                                   "base_alpha": 1.25}, ignored_fraction=0.05),
        "joint-k1": arm(39.0, {"sweep": "volume", "of": "joint", "k": 1, "base_k": 2, "iterations": 100,
                               "base_iterations": 100, "iterations_rule": "same"}),
        "joint-share0.2": arm(40.5, {"sweep": "share", "of": "joint", "share": 0.2, "base_share": 0.5}),
        "joint-round1": arm(43.5, {"sweep": "loop", "of": "joint", "round": 1, "signal": "loss", "init": "scratch",
                                   "sets": "accumulate"}, signal=[0.5, 2.0], plan_change={"moved": 3, "planned": 10}),
    }}
    text = format_sweeps(results)
    assert "| joint | 1.25 | reference | 20.0 % | 41.00 | 0.00 |  |" in text
    assert "| joint-alpha2 | 2.0 | reference | 5.0 % | 42.00 | 0.00 | +1.00 |" in text
    assert "iterations the same for every K" in text
    assert text.index("| joint-k1 | 1 |") < text.index("| joint | 2 |")
    assert "| 0 | joint | 10 |  | 41.00 | 0.00 |  | 41.0 | 20.5 |" in text
    assert "| 1 | joint-round1 | 10 | 3 of 10 | 43.50 | 0.00 | +2.50 | 43.5 | 21.8 |" in text
    assert "Re-planned images: those a round's plan gives a mask beyond" in text
    assert "| 1 | 0.500 | 2.000 |" in text
    # The share table: smallest share first, each against real, with its per-class IoU.
    assert text.index("| joint-share0.2 | 0.2 | 40.50 | 0.00 | +0.50 | 40.5 | 20.2 |") < \
        text.index("| joint | 0.5 | 41.00 | 0.00 | +1.00 | 41.0 | 20.5 |")
    assert format_sweeps({"classes": classes, "arms": {"real": arm(40.0)}}) == ""


def test_a_filter_judge_without_a_checkpoint_stops_the_run_before_any_work(tmp_path, capsys):
    from segsynth.cli import main

    out = tmp_path / "run"
    code = main(["run", f"--out={out}", "--data=toy:n=4,n_val=2,size=32x40", "--arms=real",
                 "--arms=joint-filtered-hardness", "--filter-alphas=1.5", f"--filter-judges=big={tmp_path / 'none'}",
                 "--generator=train", "--device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("segsynth run: error: filter_judges big: ") and "no segsynth checkpoint here" in err
    assert not out.exists()


def test_the_loop_arm_choices_are_freemask_arms():
    from segsynth.stage_configs import FREEMASK_SYNTHETIC_ARMS

    assert FREEMASK_SYNTHETIC_ARMS == tuple(name for name, arm in ARMS.items() if arm.synthetic)
