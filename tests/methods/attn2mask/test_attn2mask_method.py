"""`segsynth run --method attn2mask` end to end on tiny data, and `segsynth attention-quality`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segsynth.cli import main
from segsynth.io import SegsynthError
from segsynth.methods.attn2mask.method import MAIN_ARMS, attention_heights
from segsynth.run import resolve_run_config, run

TOY = "toy:n=6,n_val=3,size=32x40"
TINY_RUN = {"method": "attn2mask", "data": TOY, "preset": "quick", "device": "cpu",
            "train": {"iterations": 3, "batch_size": 2, "workers": 0},
            "train_text_generator": {"size": [32, 40], "channels": [32, 64], "layers_per_block": 1, "text_width": 32,
                                     "iterations": 2, "batch_size": 2, "warmup": 1, "max_minutes": 0},
            "synthesize": {"steps": 2, "batch_size": 4}}


def test_attention_heights_follow_the_builtin_text_unet():
    assert attention_heights([64, 80], [32, 64, 128]) == [16, 8]  # 32x40 packed; levels 2 and 3
    assert attention_heights([96, 128], [32, 64, 128]) == [24, 12]


# The + LoRA arm's target domain: the toy val images (labels never read), adapted for 2 iterations.
TARGET = {"target_images": f"{TOY}?include=toy_val", "adapt": {"split": "val", "iterations": 2, "batch_size": 2,
                                                                 "rank": 2}}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("attn2mask") / "run"
    config = resolve_run_config({**TINY_RUN, **TARGET, "out": str(out)})
    return out, run(config)


def test_a_tiny_attn2mask_run_trains_every_arm_on_equal_budgets(tiny_run):
    out, results = tiny_run
    # the augmented arm runs only when named; the + LoRA arm joins because the run has target images
    assert list(results["arms"]) == [*MAIN_ARMS, "synthetic-attention-reliable-lora"]
    assert all(arm["mean"] is not None for arm in results["arms"].values())
    raw, band = (out / "synthetic" / name for name in ("attention-raw", "attention-band"))
    manifests = {folder.name: [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
                 for folder in (raw, band)}
    assert len(manifests["attention-raw"]) == len(manifests["attention-band"]) == 6  # images_per_mask x 6 masks
    for first, second in zip(manifests["attention-raw"], manifests["attention-band"]):
        # the same images, labelled two ways: raw labels every pixel and has no weights
        assert np.array_equal(np.array(Image.open(raw / first["image"])), np.array(Image.open(band / second["image"])))
        assert "weight" not in first and "weight" in second
        raw_mask, band_mask = (np.array(Image.open(folder / record["mask"])) for folder, record in
                               ((raw, first), (band, second)))
        assert (raw_mask != 255).all()  # toy has no background class: every pixel its top class
        labelled = band_mask != 255  # where the band set commits, both agree
        assert np.array_equal(raw_mask[labelled], band_mask[labelled])
    text = (out / "arms" / "synthetic-attention-reliable" / "seed0" / "config.yaml").read_text()
    assert "loss: reliable" in text and "loss: ce" in (out / "arms" / "synthetic-attention-band" / "seed0" /
                                                        "config.yaml").read_text()
    assert (out / "attention_quality" / "attention_quality.json").is_file()
    assert (out / "grids" / "attention-band.png").is_file() and (out / "grids" / "attention-raw.png").is_file()
    assert "train text generator" in json.loads((out / "seconds.json").read_text())


def test_the_lora_arm_renders_the_same_plan_with_the_adapted_generator(tiny_run):
    out, results = tiny_run
    band, adapted = (out / "synthetic" / name for name in ("attention-band", "attention-band-lora"))
    records = [[json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
               for folder in (band, adapted)]
    assert [r["id"] for r in records[0]] == [r["id"] for r in records[1]]  # same prompts and seeds
    info = json.loads((out / "adapter" / "adapter.json").read_text())
    assert info["image_count"] == 3 and info["training"]["iterations"] == 2 and info["lora"]["rank"] == 2
    state = json.loads((adapted / "synthesis.json").read_text())
    assert state["generator"]["lora"]["fingerprint"] and "lora" not in json.loads(
        (band / "synthesis.json").read_text())["generator"]
    assert "loss: reliable" in (out / "arms" / "synthetic-attention-reliable-lora" / "seed0" / "config.yaml").read_text()
    assert (out / "grids" / "adaptation.png").is_file() and (out / "grids" / "attention-band-lora.png").is_file()
    seconds = json.loads((out / "seconds.json").read_text())
    assert "adapt generator (LoRA)" in seconds and "synthesize attention-band-lora" in seconds


def test_the_lora_arm_runs_only_with_target_images():
    config = resolve_run_config({**TINY_RUN, "out": "unused"})
    assert "synthetic-attention-reliable-lora" not in config.arms and config.arms == list(MAIN_ARMS)
    with pytest.raises(SegsynthError, match="synthetic-attention-reliable-lora of method attn2mask need the run key "
                                            "'target_images' \\(--target-images\\)"):
        resolve_run_config({**TINY_RUN, "out": "unused", "arms": ["real", "synthetic-attention-reliable-lora"]})
    with pytest.raises(SegsynthError, match="section 'adapt': unknown key.*images"):
        resolve_run_config({**TINY_RUN, **TARGET, "out": "unused", "adapt": {"images": "elsewhere"}})


def test_attention_quality_verb_scores_each_recipe(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    code = main(["attention-quality", "--generator", f"attention:{out / 'text_generator'}", "--data", TOY,
                 "--out", str(tmp_path / "q"), "--presets", "daam", "--presets", "dataset-diffusion", "--limit", "2",
                 "--pseudo-mask-settings", "resolutions=[8]", "--pseudo-mask-settings", "self_attention_resolution=8",
                 "--device", "cpu"])
    assert code == 0
    results = json.loads((tmp_path / "q" / "attention_quality.json").read_text())
    assert results["images"] == 2 and list(results["recipes"]) == ["daam", "dataset-diffusion"]
    for row in results["recipes"].values():
        assert 0 <= row["miou"] <= 100 and 0 < row["coverage"] <= 1 and set(row["per_class"]) >= {"sky", "road"}
    assert "| daam |" in (tmp_path / "q" / "attention_quality.md").read_text() and "| daam |" in capsys.readouterr().out
    code = main(["attention-quality", "--generator", f"attention:{out / 'text_generator'}", "--data", TOY,
                 "--out", str(tmp_path / "bad"), "--pseudo-mask-settings", "resolutions=[3]", "--device", "cpu"])
    assert code == 2 and "no cross-attention at resolution(s) [3]" in capsys.readouterr().err


def test_run_config_checks_the_text_generator_section(tmp_path):
    with pytest.raises(SegsynthError, match="section 'train_text_generator': unknown key.*target"):
        resolve_run_config({**TINY_RUN, "out": "unused", "train_text_generator": {"target": "colour-mask"}})
    with pytest.raises(SegsynthError, match="attn2mask needs a text -> image generator"):
        run(resolve_run_config({**TINY_RUN, "out": str(tmp_path / "wrong"), "generator": "builtin:somewhere"}))
    assert not (tmp_path / "wrong" / "arms").exists()  # refused before the real arm trained
    config = resolve_run_config({"method": "attn2mask", "out": "unused"})
    assert config.seeds == [0] and config.images_per_mask == 1  # the method's toy sizes over run.PRESETS
    assert resolve_run_config({"out": "unused"}).seeds == [0, 1]  # FreeMask's unchanged


def test_relabelling_needs_the_raw_label_extra(tiny_run, tmp_path):
    from segsynth.methods.attn2mask.variants import derive_label_set

    out, _ = tiny_run
    with pytest.raises(SegsynthError, match="no 'heat' extra"):
        derive_label_set(out / "synthetic" / "attention-band", tmp_path / "x", "heat")
    with pytest.raises(SegsynthError, match="no finished samples"):
        derive_label_set(tmp_path / "empty", tmp_path / "y")


def test_a_run_with_a_given_text_generator_reads_its_attention_heights(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    given = resolve_run_config({**TINY_RUN, "out": str(tmp_path / "given"), "generator": f"attention:{out / 'text_generator'}",
                                "arms": ["real", "synthetic-attention-band"]})
    run(given)
    assert not (tmp_path / "given" / "text_generator").exists()
    state = json.loads((tmp_path / "given" / "synthetic" / "attention-band" / "synthesis.json").read_text())
    assert state["generator"]["pseudo_mask"]["resolutions"] == [8]
    assert not (tmp_path / "given" / "synthetic" / "attention-raw").exists()  # no arm uses it


def test_train_text_generator_verb(tmp_path, capsys):
    code = main(["train-text-generator", "--data", TOY, "--out", str(tmp_path / "gen"), "--size", "32,40",
                 "--channels", "32,64", "--layers-per-block", "1", "--text-width", "32", "--iterations", "1",
                 "--batch-size", "2", "--warmup", "1", "--device", "cpu"])
    assert code == 0 and f"--generator attention:{tmp_path / 'gen'}" in capsys.readouterr().out
    assert (tmp_path / "gen" / "segsynth_generator.json").is_file()


def test_the_prompt_augmentation_arm_renders_an_augmented_plan(tmp_path):
    words = tmp_path / "words.yaml"
    words.write_text("car: [motor car]\nroad: [street]\nsky: [heavens]\n", encoding="utf-8")
    out = tmp_path / "augmented"
    augmentation = {"synonyms": False, "hyponyms": False, "words": str(words)}
    results = run(resolve_run_config({**TINY_RUN, "out": str(out), "arms": ["real", "synthetic-attention-augmented"],
                                      "plan": {"prompt_augmentation": augmentation}}))
    assert list(results["arms"]) == ["real", "synthetic-attention-augmented"]
    assert results["arms"]["synthetic-attention-augmented"]["mean"] is not None
    assert not (out / "synthetic" / "attention-band").exists()  # no arm uses it
    records = [json.loads(line) for line in
               (out / "synthetic" / "attention-augmented" / "manifest.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (out / "plans" / "class_prompts.jsonl").read_text().splitlines()]
    assert len(records) == len(plain) == 6  # the same budget as the other arms
    augmented = [json.loads(line) for line in (out / "plans" / "class_prompts_augmented.jsonl").read_text().splitlines()]
    assert any("street" in entry["prompt"] or "heavens" in entry["prompt"] for entry in augmented)
    trained = json.loads((out / "text_generator" / "segsynth_generator.json").read_text())["train_config"]
    assert trained["augment_prompts"] and trained["prompt_augmentation"] == augmentation
    assert "loss: reliable" in (out / "arms" / "synthetic-attention-augmented" / "seed0" / "config.yaml").read_text()
    # The same folder without the arm: its generator learned other prompts, which the run says before using it.
    with pytest.raises(SegsynthError, match="trained with prompt augmentation .*but this run's arms need no prompt "
                                            "augmentation.*use a new --out"):
        run(resolve_run_config({**TINY_RUN, "out": str(out), "arms": ["real", "synthetic-attention-band"]}))
