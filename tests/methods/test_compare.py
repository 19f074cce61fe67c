"""`segsynth run --method all`: the three methods side by side on one real reference, segmenter, seeds and budget."""

from __future__ import annotations

import json

import pytest

from fakes import TINY_COMPARE
from segsynth.io import SegsynthError
from segsynth.methods.compare import ARMS, MAIN_ARMS as ALL_MAIN_ARMS, member_config

# Without target images the + LoRA arm (Arm.needs) stays out of the default arms.
MAIN_ARMS = tuple(name for name in ALL_MAIN_ARMS if not ARMS[name].needs)
from segsynth.run import resolve_run_config, run


def test_the_main_arms_of_three_methods_share_one_real_reference_and_budget(compare_run):
    out, results, printed = compare_run
    assert list(results["arms"]) == list(MAIN_ARMS)
    for name, arm in results["arms"].items():
        assert set(arm["miou"]) == {"0", "1"} and arm["spread"] is not None, name
    # The real reference is trained once per seed, not once per method.
    seconds = json.loads((out / "seconds.json").read_text())
    assert [stage for stage in seconds if "real" in stage and stage.startswith("train")] == \
        ["train real seed 0", "train real seed 1"]
    assert sorted(p.name for p in (out / "arms").iterdir()) == sorted(MAIN_ARMS)
    # Every synthetic arm trains on the same number of synthetic samples: 8 real masks x 1.
    assert {name: arm["synthetic_images"] for name, arm in results["arms"].items() if name != "real"} == \
        {name: 8 for name in MAIN_ARMS if name != "real"}
    assert {arm["method"] for arm in results["arms"].values()} == {"shared", "freemask", "seggen", "attn2mask"}
    # Each member ran its own stages, named after it; SegGen rendered only the halves its arm uses.
    for stage in ("freemask: filter hardness", "seggen: synthesize masksyn-b", "seggen: mask quality",
                  "attn2mask: synthesize attention-band", "attn2mask: attention quality"):
        assert stage in seconds, stage
    assert not (out / "synthetic" / "masksyn-a").exists() and not (out / "synthetic" / "imgsyn-b").exists()
    assert not (out / "synthetic" / "uniform").exists()  # no main arm trains on FreeMask's uniform set
    # The same segmenter and schedule for every arm; each arm's own keys on top (Attn2mask's reliable loss).
    configs = {name: (out / "arms" / name / "seed0" / "config.yaml").read_text() for name in MAIN_ARMS}
    assert all("iterations: 4" in text and "model: segformer-tiny" in text for text in configs.values())
    assert "loss: reliable" in configs["attn2mask-synthetic-attention-reliable"]
    # One table printed at the end; results, classes and the report on disk.
    assert "seggen-masksyn+imgsyn-replace" in printed and "per-class IoU" in printed and "seconds per stage" in printed
    assert (out / "report.html").is_file() and (out / "results.md").is_file()
    assert json.loads((out / "classes.json").read_text())["classes"][0] == "sky"


def test_a_second_compare_run_redoes_nothing(compare_run, capsys):
    out, results, _ = compare_run
    metrics = {path: path.stat().st_mtime_ns for path in out.glob("arms/*/seed*/metrics_val.json")}
    again = run(resolve_run_config({**TINY_COMPARE, "out": str(out)}))
    printed = capsys.readouterr().out
    for stage in ("freemask: class statistics", "seggen: train text -> mask generator", "seggen: mask quality",
                  "attn2mask: train text generator", "attn2mask: attention quality"):
        assert f"[skip] {stage}: already done" in printed, stage
    assert all(summary["generated"] == 0 for summary in again["synthetic"].values()), again["synthetic"]
    assert {path: path.stat().st_mtime_ns for path in metrics} == metrics  # no arm trained or evaluated again
    assert {name: arm["miou"] for name, arm in again["arms"].items()} == \
        {name: arm["miou"] for name, arm in results["arms"].items()}


def test_each_member_gets_its_own_generator_sections_under_the_users_keys():
    config = resolve_run_config({"method": "all"})
    assert config.arms == list(MAIN_ARMS)
    seggen, attn2mask = config.per_method["seggen"], config.per_method["attn2mask"]
    assert seggen["train_text_generator"]["size"] == [32, 40]  # SegGen's toy text -> mask size
    assert "size" not in attn2mask.get("train_text_generator", {})  # Attn2mask keeps the shared 64x80
    assert member_config(config, "attn2mask").train_text_generator["size"] == [64, 80]
    assert member_config(config, "seggen").train_text_generator["size"] == [32, 40]
    # Shared run keys stay shared: one segmenter schedule, seeds, budget (not Attn2mask's own 400 iterations).
    assert config.train["iterations"] == 600 and config.seeds == [0, 1] and config.images_per_mask == 2
    # A user's shared key beats the members' presets; a per_method key beats the shared one.
    tuned = resolve_run_config({"method": "all", "train_text_generator": {"max_minutes": 2.0},
                                "per_method": {"seggen": {"train_text_generator": {"max_minutes": 0.25}}}})
    assert member_config(tuned, "attn2mask").train_text_generator["max_minutes"] == 2.0
    assert member_config(tuned, "seggen").train_text_generator["max_minutes"] == 0.25
    assert member_config(tuned, "seggen").train_text_generator["size"] == [32, 40]
    # The demo preset: lighter shared sizes, both text generators shortened.
    demo = resolve_run_config({"method": "all", "preset": "demo"})
    assert demo.train["iterations"] == 300 and demo.images_per_mask == 1 and demo.seeds == [0, 1]
    assert all(member_config(demo, name).train_text_generator["max_minutes"] == 0.75
               for name in ("seggen", "attn2mask"))
    assert member_config(demo, "attn2mask").synthesize["steps"] == 6 and member_config(demo, "freemask").synthesize[
        "steps"] == 8
    # Any arm of any member can be chosen.
    chosen = resolve_run_config({"method": "all", "arms": ["real", "freemask-joint-raw-uniform"]})
    assert chosen.arms == ["real", "freemask-joint-raw-uniform"] and len(ARMS) == 1 + 10 + 4 + 5
    assert member_config(chosen, "freemask").arms == ["real", "joint-raw-uniform"]


def test_one_generator_key_goes_to_the_members_that_can_use_it():
    given = resolve_run_config({"method": "all", "generator": "builtin:/models/gen"})
    assert member_config(given, "freemask").generator == member_config(given, "seggen").generator == "builtin:/models/gen"
    assert member_config(given, "attn2mask").generator == "auto"  # a mask -> image generator has no word attention
    text = resolve_run_config({"method": "all", "generator": "train",
                               "per_method": {"attn2mask": {"generator": "attention:/models/text"}}})
    assert member_config(text, "attn2mask").generator == "attention:/models/text"
    assert member_config(text, "freemask").generator == "train"


@pytest.mark.parametrize("values, message", [
    ({"method": "all", "per_method": {"dreambooth": {}}}, r"per_method: unknown method\(s\) dreambooth; options: "
                                                          "freemask, seggen, attn2mask"),
    ({"method": "all", "per_method": {"seggen": {"train": {"iterations": 5}}}},
     r"per_method.seggen: unknown key\(s\) train \(every arm trains the same segmenter"),
    ({"method": "all", "per_method": {"seggen": {"train_text_generator": {"target": "image"}}}},
     r"section 'per_method.seggen.train_text_generator': unknown key\(s\) target"),
    ({"method": "freemask", "per_method": {"seggen": {}}}, "'per_method' is for --method all"),
    ({"method": "all", "preset": "demo", "data": "camvid:/data/camvid"},
     "preset 'demo' has no sizes for real data .*options for real data: quick, default"),
    ({"method": "all", "arms": ["real", "joint-raw-uniform"]}, "unknown arm.*freemask-joint-raw-uniform"),
])
def test_bad_comparison_configs_are_refused(values, message):
    with pytest.raises(SegsynthError, match=message):
        resolve_run_config(values)
