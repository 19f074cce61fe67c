"""`segsynth run` end to end on tiny settings: every stage, every arm, the table, the grids, resume."""

from __future__ import annotations

import json

import pytest

from segsynth.io import SegsynthError
from segsynth.formats.plan import read_plan
from segsynth.methods.freemask.method import MAIN_ARMS, TARGETED_FIRST_SEED
from segsynth.run import resolve_run_config, run

TINY_RUN = dict(data="toy:n=24,n_val=8,size=32x40", seeds=[0], generator="train", images_per_mask=1, grids=3, device="cpu",
                train=dict(iterations=12, batch_size=4, warmup=2, workers=0),
                train_generator=dict(size=[32, 40], channels=[32, 64], iterations=30, max_minutes=0.0, batch_size=8),
                synthesize=dict(steps=3, batch_size=8))


def test_run_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    results = run(resolve_run_config({**TINY_RUN, "out": str(out)}))

    # Every arm trained, evaluated and kept its checkpoint (the paper's seven: the targeted arm runs when named).
    assert list(results["arms"]) == list(MAIN_ARMS)
    for name, arm in results["arms"].items():
        assert 0.0 <= arm["mean"] <= 100.0, name
        assert (out / "arms" / name / "seed0" / "checkpoint" / "model.safetensors").is_file()
    # Equal synthetic image counts between the uniform and hardness sets.
    assert results["synthetic"]["uniform"]["planned"] == results["synthetic"]["hardness"]["planned"] == 24
    # Filtering happened and training read the filtered masks.
    manifest = [json.loads(l) for l in (out / "synthetic" / "hardness" / "manifest.jsonl").read_text().splitlines()]
    assert all("filtered_mask" in r for r in manifest)
    # Reports and grids.
    table = (out / "results.md").read_text()
    assert "joint-filtered-hardness" in table and "Seconds per stage" in table
    assert json.loads((out / "results.json").read_text())["arms"]["real"]["miou"]["0"] >= 0
    assert (out / "grids" / "hardness.png").is_file() and (out / "grids" / "uniform.png").is_file()
    assert (out / "run.config.yaml").is_file()

    # A second run finds everything done and redoes nothing.
    capsys.readouterr()
    again = run(resolve_run_config({**TINY_RUN, "out": str(out)}))
    assert again["arms"] == results["arms"]
    printed = capsys.readouterr().out + capsys.readouterr().err
    assert "[skip] train generator" in printed or "[skip]" in printed


def test_presets_and_unknown_arm():
    quick = resolve_run_config({"preset": "quick"})
    assert quick.data.startswith("toy:") and quick.seeds == [0]
    assert quick.train["iterations"] == 200 and quick.train["model"] == "segformer-tiny"  # preset over BASE
    camvid = resolve_run_config({"preset": "default", "data": "camvid:/somewhere"})
    assert camvid.train["model"] == "segformer-small" and camvid.seeds == [0, 1]
    assert camvid.train_generator["size"] == [96, 128] and camvid.synthesize["steps"] == 20
    # the user's keys beat presets, key by key inside a section
    tuned = resolve_run_config({"preset": "quick", "train": {"iterations": 7}})
    assert tuned.train["iterations"] == 7 and tuned.train["model"] == "segformer-tiny"
    assert resolve_run_config({}).arms == list(MAIN_ARMS)  # the default method's (FreeMask's) main arms
    with pytest.raises(SegsynthError, match="unknown arm"):
        resolve_run_config({"arms": ["real", "magic"]})
    with pytest.raises(SegsynthError, match="preset = 'huge' is unknown: preset must be one of: quick, default"):
        resolve_run_config({"preset": "huge"})
    with pytest.raises(SegsynthError, match="method = 'magic' is unknown: method must be one of: freemask, seggen, attn2mask"):
        resolve_run_config({"method": "magic"})
    with pytest.raises(SegsynthError, match=r"section 'train': unknown key\(s\) seed .*valid keys: .*iterations"):
        resolve_run_config({"train": {"seed": 3}})  # the run sets seeds itself
    with pytest.raises(SegsynthError, match=r"section 'synthesize': unknown key\(s\) stepz"):
        resolve_run_config({"synthesize": {"stepz": 3}})


def test_the_targeted_arm_renders_a_class_targeted_plan_of_the_same_budget(tmp_path):
    """joint-filtered-targeted: its own plan (the budget split over classes by L̄_c, class-centred crops from the
    plan section's class_crop), rendered, filtered and trained on; the hardness plan keeps no crops."""
    out = tmp_path / "run"
    results = run(resolve_run_config({**TINY_RUN, "out": str(out), "arms": ["real", "joint-filtered-targeted"],
                                      "plan": {"class_crop": 0.5}}))
    assert list(results["arms"]) == ["real", "joint-filtered-targeted"]
    assert 0.0 <= results["arms"]["joint-filtered-targeted"]["mean"] <= 100.0
    targeted = read_plan(out / "plans" / "targeted.jsonl")
    assert sum(len(entry.seeds) for entry in targeted) == 24  # one image per real mask, as the hardness plan
    assert min(seed for entry in targeted for seed in entry.seeds) >= TARGETED_FIRST_SEED
    assert all("@" in entry.id and entry.crop for entry in targeted)  # class-centred crops
    assert not any(entry.crop for entry in read_plan(out / "plans" / "hardness.jsonl"))
    manifest = [json.loads(line) for line in (out / "synthetic" / "targeted" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 24 and all("filtered_mask" in record for record in manifest)
    assert not (out / "synthetic" / "hardness").exists()  # no arm of this run renders the hardness plan
    # A targeted plan made with other crops is refused, not mixed into the set rendered from it.
    with pytest.raises(SegsynthError, match=r"targeted.jsonl: made with class_crop 0.5, this run asks for class_crop 0.8"):
        run(resolve_run_config({**TINY_RUN, "out": str(out), "arms": ["real", "joint-filtered-targeted"],
                                "plan": {"class_crop": 0.8}}))
    # Crops with no arm to render them are refused before any work.
    with pytest.raises(SegsynthError, match="plan.class_crop 0.5: class-centred crops are the targeted plan's"):
        run(resolve_run_config({**TINY_RUN, "out": str(tmp_path / "other"), "arms": ["real", "joint-filtered-hardness"],
                                "plan": {"class_crop": 0.5}}))
    assert not (tmp_path / "other").exists()


def test_run_flags_fill_sections(tmp_path):
    """`--train KEY=VALUE` adds to a YAML file's section; values are read as YAML."""
    from segsynth.cli import build_parser
    from segsynth.config import values_from_args
    from segsynth.stage_configs import RunConfig

    config = tmp_path / "run.yaml"
    config.write_text("preset: quick\ntrain: {model: segformer-tiny, iterations: 50}\n")
    args = build_parser().parse_args(["run", "--config", str(config), "--train", "iterations=9",
                                      "--train", "crop=[32, 40]", "--synthesize", "steps=4"])
    resolved = resolve_run_config(values_from_args(RunConfig, args))
    assert resolved.train == {**resolved.train, "model": "segformer-tiny", "iterations": 9, "crop": [32, 40]}
    assert resolved.synthesize["steps"] == 4 and resolved.seeds == [0]
    with pytest.raises(SegsynthError, match=r"--train 'iterations': write KEY=VALUE, e.g. --train iterations=600"):
        values_from_args(RunConfig, build_parser().parse_args(["run", "--train", "iterations"]))


def test_shipped_toy_generator_renders_toy_masks(tmp_path):
    """The package ships a builtin generator for the toy classes; `run` uses it by default on toy data."""
    import numpy as np

    from segsynth.data import open_dataset
    from segsynth.generators import open_generator
    from segsynth.run import shipped_toy_generator

    dataset = open_dataset("toy:n=4,n_val=2,size=64x80")
    spec = shipped_toy_generator(dataset)
    if spec is None:
        pytest.skip("this install has no shipped toy generator (src/segsynth/assets/toy_generator)")
    generator = open_generator(spec)
    generator.check_dataset(dataset.classes, dataset.palette)
    masks = [dataset.split("train").label(i) for i in range(2)]
    images = generator.render_masks(masks, ["", ""], [0, 1])
    assert [image.shape for image in images] == [(64, 80, 3)] * 2
    assert all(image.dtype == np.uint8 and image.std() > 5 for image in images)
    assert shipped_toy_generator(open_dataset("toy:n=4,size=32").__class__(
        spec="x", classes=("a",), palette=((0, 0, 0),), splits={})) is None


@pytest.mark.slow  # two spawned workers import torch and transformers (the SegGen run test covers parallel: 2 too)
def test_parallel_arm_trainings_match_one_after_the_other(tmp_path, monkeypatch):
    """`parallel: 2` trains in two spawned worker processes (one thread each here) and ends at the weights of
    the same trainings run in turn on one thread; the report counts the group's wall time once."""
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # so each of the two workers gets one thread
    values = {**TINY_RUN, "arms": ["real"], "seeds": [0, 1], "train": {**TINY_RUN["train"], "iterations": 4}}
    side_by_side = run(resolve_run_config({**values, "out": str(tmp_path / "parallel"), "parallel": 2}))
    monkeypatch.undo()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        in_turn = run(resolve_run_config({**values, "out": str(tmp_path / "sequential")}))
    finally:
        torch.set_num_threads(threads)
    assert side_by_side["arms"]["real"]["miou"] == in_turn["arms"]["real"]["miou"]
    from safetensors.torch import load_file

    for seed in (0, 1):
        a, b = (load_file(str(tmp_path / kind / "arms" / "real" / f"seed{seed}" / "checkpoint" / "model.safetensors"))
                for kind in ("parallel", "sequential"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    seconds = side_by_side["seconds"]
    assert set(seconds) == {"train real seed 0 (parallel)", "train real seed 1 (parallel)",
                            "real arm: 2 trainings, 2 at once (wall)"}
    assert side_by_side["total_seconds"] == seconds["real arm: 2 trainings, 2 at once (wall)"]
    assert "(parallel) ran side by side" in (tmp_path / "parallel" / "results.md").read_text()


def test_train_seconds_count_trainings_that_ran_side_by_side(tmp_path):
    """An arm's "train s" adds its seeds' own seconds whether they ran alone or beside others (`parallel`),
    never the group's wall time."""
    from types import SimpleNamespace

    from segsynth.methods.base import Arm, Method
    from segsynth.report import PARALLEL_MARK, collect_results, format_table

    config = resolve_run_config({"out": str(tmp_path), "arms": ["real"], "seeds": [0, 1]})
    seconds = {f"train real seed 0{PARALLEL_MARK}": 30.0, f"train real seed 1{PARALLEL_MARK}": 12.5,
               "real arm: 2 trainings, 2 at once (wall)": 31.0}
    context = SimpleNamespace(config=config, out=tmp_path, seconds=seconds,
                              dataset=SimpleNamespace(classes=["a", "b"], palette=[(0, 0, 0), (1, 1, 1)]),
                              synthetic_set=lambda name: tmp_path / "synthetic" / name,
                              train_settings=SimpleNamespace(model="segformer-tiny", iterations=10, batch_size=2))
    method = Method("freemask", "", {"real": Arm("real", "real")}, lambda *a: [], lambda *a: [], {})
    results = collect_results(context, method)
    assert results["arms"]["real"]["train_seconds"] == 42.5
    assert results["total_seconds"] == 31.0
    assert format_table(results).splitlines()[2].endswith("| 42 |")


def test_a_run_trains_the_generator_kind_its_section_names(tmp_path):
    """`train_generator: {kind: latent, ...}` trains a latent generator and renders with `latent:`; the stage
    resumes a killed generator training; a kind that draws no images from masks is refused."""
    from segsynth.data import open_dataset
    from segsynth.generators.testing import save_tiny_taesd
    from segsynth.run import RunContext

    autoencoder = save_tiny_taesd(tmp_path / "ae")
    section = dict(kind="latent", autoencoder=f"taesd:{autoencoder}", size=[32, 32], channels=[32, 32],
                   layers_per_block=1, attention=False, iterations=2, batch_size=2, max_minutes=0.0)
    config = resolve_run_config({**TINY_RUN, "out": str(tmp_path / "run"), "train_generator": section})
    context = RunContext(config, tmp_path / "run", open_dataset(config.data))
    [stage], spec = context.generator_stages()
    assert spec == f"latent:{tmp_path / 'run' / 'generator'}" and not stage.done()
    stage.action()
    assert stage.done()
    meta = json.loads((tmp_path / "run" / "generator" / "segsynth_generator.json").read_text())
    assert meta["format"] == "segsynth-latent-generator/1" and meta["train_config"]["resume"] is True
    config = resolve_run_config({**TINY_RUN, "out": str(tmp_path / "other"),
                                 "train_generator": {"kind": "text2mask-sd", "base": "some/model"}})
    with pytest.raises(SegsynthError, match="kind 'text2mask-sd' does not render masks; options: builtin, latent"):
        RunContext(config, tmp_path / "other", open_dataset(config.data)).generator_stages()


def test_real_arm_trains_beside_the_others_when_no_stage_left_reads_it(tmp_path, capsys):
    """The real arm trains before the method's stages when one of them scores with it (statistics, filter),
    and with the other arms when a run starts from another run's statistics, plans and filtered sets."""
    import shutil

    values = {**TINY_RUN, "arms": ["real", "joint-filtered-hardness"]}
    first = run(resolve_run_config({**values, "out": str(tmp_path / "first")}))
    printed = capsys.readouterr().out
    assert printed.index("[stage] train real seed 0") < printed.index("[stage] class statistics")

    def derived(name):
        shutil.copytree(tmp_path / "first", tmp_path / name, ignore=lambda folder, names: ["arms"])
        return tmp_path / name

    # Everything the stages make is there: the real arm waits for the stages, then trains with the joint arm.
    again = run(resolve_run_config({**values, "out": str(derived("same"))}))
    printed = capsys.readouterr().out
    assert printed.index("[skip] filter hardness") < printed.index("[stage] train real seed 0")
    assert {name: arm["miou"] for name, arm in again["arms"].items()} == {
        name: arm["miou"] for name, arm in first["arms"].items()}

    # Another alpha: the filter runs again and needs the real model, so the real arm trains first.
    hardness = derived("alpha") / "synthetic" / "hardness"
    shutil.rmtree(hardness / "masks_filtered")  # what the filter's own error asks for before a refilter
    for path in [hardness / "filter.json", *hardness.glob("filter.rank*.jsonl")]:
        path.unlink()
    run(resolve_run_config({**values, "out": str(tmp_path / "alpha"), "filter": {"alpha": 1.5}}))
    printed = capsys.readouterr().out
    assert printed.index("[stage] train real seed 0") < printed.index("[stage] filter hardness")


def test_the_paste_arm_pastes_the_filtered_hardness_set_onto_real_images(tmp_path):
    """paste-filtered-hardness: the hardness set, filtered, pasted class by class onto real draws; its control
    paste-real pastes from real images, paste-hardness-and-real from both; a run naming any of them without the
    classes to paste is refused early."""
    with pytest.raises(SegsynthError, match=r"paste-filtered-hardness paste the train section's paste_classes .*"
                                            r"train: \{paste_classes: \[pole, sign\]\}"):
        resolve_run_config({**TINY_RUN, "out": str(tmp_path / "none"), "arms": ["real", "paste-filtered-hardness"]})
    out = tmp_path / "run"
    results = run(resolve_run_config({**TINY_RUN, "out": str(out),
                                      "arms": ["real", "paste-filtered-hardness", "paste-real",
                                               "paste-hardness-and-real"],
                                      "train": {**TINY_RUN["train"], "paste_classes": ["person", "pole", "sign"]}}))
    assert 0.0 <= results["arms"]["paste-filtered-hardness"]["mean"] <= 100.0
    assert 0.0 <= results["arms"]["paste-real"]["mean"] <= 100.0
    control = (out / "arms" / "paste-real" / "seed0" / "config.yaml").read_text()
    assert "paste_from: real" in control and "synthetic: []" in control
    manifest = [json.loads(line) for line in (out / "synthetic" / "hardness" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 24 and all("filtered_mask" in record for record in manifest)
    saved = (out / "arms" / "paste-filtered-hardness" / "seed0" / "config.yaml").read_text()
    assert "recipe: paste" in saved and "- person" in saved and "synthetic/hardness" in saved
    both = (out / "arms" / "paste-hardness-and-real" / "seed0" / "config.yaml").read_text()
    assert "paste_from: pool+real" in both and "synthetic/hardness" in both
    assert 0.0 <= results["arms"]["paste-hardness-and-real"]["mean"] <= 100.0

