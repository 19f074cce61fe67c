"""train-generator --kind text2mask-sd and `text2mask-sd:DIR`, end to end with tiny random SD / SDXL parts.

The tiny base models are saved to tmp and loaded through the same `from_pretrained` calls as a hub id; the
fine-tuned folder is loaded back through them too, and synthesized into a MaskSyn mask set by `segsynth
synthesize`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from segsynth.cli import main
from segsynth.data import open_dataset
from segsynth.formats.manifest import read_manifest
from segsynth.formats.plan import PlanEntry, write_plan
from segsynth.generators import open_generator, train_generator_kind
from segsynth.generators.base import Condition, Request
from segsynth.io import SegsynthError
from segsynth.methods.seggen.colour import encode_mask, separated_palette
from segsynth.stage_configs import TrainGeneratorConfig

TOY = "toy:n=6,n_val=2,size=32"
TINY = dict(data=TOY, kind="text2mask-sd", batch_size=2, warmup=1, log_every=1, sample_steps=2, device="cpu")


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    from segsynth.generators.testing import save_tiny_sd

    root = tmp_path_factory.mktemp("bases")
    return {"sd": save_tiny_sd(root), "sdxl": save_tiny_sd(root, sdxl=True)}


@pytest.fixture(scope="module")
def trained(tiny_bases, tmp_path_factory):
    """A few iterations through the CLI verb, as a user runs it."""
    out = tmp_path_factory.mktemp("text2mask-sd") / "model"
    code = main(["train-generator", "--kind", "text2mask-sd", "--data", TOY, "--base", str(tiny_bases["sd"]),
                 "--out", str(out), "--iterations", "3", "--batch-size", "2", "--warmup", "1", "--log-every", "1",
                 "--sample-steps", "2", "--device", "cpu"])
    assert code == 0
    return out


def test_training_writes_a_diffusers_pipeline_folder_with_the_colour_coding(trained, tiny_bases):
    meta = json.loads((trained / "segsynth_generator.json").read_text())
    classes = open_dataset(TOY).classes
    assert meta["format"] == "segsynth-text2mask-sd/1" and meta["sdxl"] is False
    assert meta["colour_coding"]["palette"] == separated_palette(len(classes)).tolist()
    assert meta["size"] == [32, 32]  # the base model's native size (16x16 latents, VAE factor 2)
    assert meta["training"]["iterations"] == 3 and meta["training"]["finished"]
    assert meta["trained"]["what"] == "the whole UNet"
    index = json.loads((trained / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"][1] == "DPMSolverMultistepScheduler"
    assert len((trained / "train_log.jsonl").read_text().splitlines()) == 3
    # the UNet moved away from the base; the frozen VAE did not
    tuned, base = (load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
                   for folder in (trained, tiny_bases["sd"]))
    assert max((tuned[k] - base[k]).abs().max().item() for k in base) > 0
    vae, base_vae = (load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
                     for folder in (trained, tiny_bases["sd"]))
    assert all(torch.equal(vae[k], base_vae[k]) for k in base_vae)


def test_synthesize_makes_a_deterministic_mask_set_from_captions(trained, tmp_path):
    plan = write_plan(tmp_path / "masks.jsonl", [PlanEntry("street", [0, 1], kind="text", prompt="road across the bottom"),
                                                 PlanEntry("sky", [2], kind="text", prompt="sky at the top")])
    out = tmp_path / "masks"
    code = main(["synthesize", "--data", TOY, "--plan", str(plan), "--generator", f"text2mask-sd:{trained}",
                 "--out", str(out), "--batch-size", "2", "--device", "cpu", "--no-progress"])
    assert code == 0
    records = read_manifest(out)
    assert [r["id"] for r in records] == ["sky_s2", "street_s0", "street_s1"]
    generator = open_generator(f"text2mask-sd:{trained}")
    palette = generator.coding_palette
    for record in records:
        assert record["generator"]["name"] == "text2mask-sd" and record["meta"]["prompt"] == record["prompt"]
        colours = np.asarray(Image.open(out / record["extras"]["colour_mask"]))
        assert np.array_equal(colours, np.asarray(Image.open(out / record["image"])))
        label = np.asarray(Image.open(out / record["mask"]))
        assert label.shape == (32, 32) and set(np.unique(label)) <= set(range(len(palette) - 1)) | {255}
    # a sample alone (batch 1, through the Python API) decodes to the same label as in its batch of 2
    [alone] = generator.sample_prompts(["road across the bottom"], [1])
    batched = np.asarray(Image.open(out / records[2]["mask"]))
    assert np.mean(alone.label == batched) > 0.99


def test_samples_decode_by_the_stored_palette_in_finish(trained, monkeypatch):
    generator = open_generator(f"text2mask-sd:{trained}")
    label = np.zeros((32, 32), np.uint8)
    label[:, 16:] = 3
    label[:4] = 255
    colours = encode_mask(label, generator.coding_palette)
    monkeypatch.setattr(generator, "pipeline", lambda **kwargs: type("Out", (), {"images": [colours / 255.0]}))
    prepared = generator.prepare([Condition(Request("c_s0", "text", 0, prompt="road"), None, "road")])
    [drawn] = generator.run(prepared)
    assert drawn.label is None and np.array_equal(drawn.image, colours)
    [sample] = generator.finish(prepared, [drawn])
    assert np.array_equal(sample.label, label) and np.array_equal(sample.extras["colour_mask"], colours)


def test_a_generated_colour_map_of_the_wrong_size_is_refused_naming_the_sample(trained, monkeypatch):
    generator = open_generator(f"text2mask-sd:{trained}")
    monkeypatch.setattr(generator, "pipeline", lambda **kwargs: type("Out", (), {"images": [np.zeros((16, 24, 3))]}))
    prepared = generator.prepare([Condition(Request("street_s7", "text", 7, prompt="road"), None, "road")])
    with pytest.raises(SegsynthError, match="text2mask-sd sample street_s7: colour-coded mask is 24x16 \\(WxH\\) "
                                            "but 32x32 was expected"):
        generator.finish(prepared, generator.run(prepared))


def test_a_killed_training_resumes_to_the_weights_of_an_uninterrupted_one(tiny_bases, tmp_path, monkeypatch):
    from segsynth.generators.text2mask_sd import train as train_module

    config = dict(TINY, base=str(tiny_bases["sd"]), iterations=4, save_every=2, ema_decay=0.9)
    straight = train_generator_kind(TrainGeneratorConfig(out=str(tmp_path / "straight"), **config))[0]

    real_loss, calls = train_module._loss, []

    def dies_after_the_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # iteration 3: after the save at 2
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "_loss", dies_after_the_save)
    with pytest.raises(KeyboardInterrupt):
        train_generator_kind(TrainGeneratorConfig(out=str(tmp_path / "resumed"), **config))
    assert json.loads((tmp_path / "resumed" / "training_state" / "state.json").read_text())["iteration"] == 2
    assert not (tmp_path / "resumed" / "unet").exists()  # the model is written only when training ends
    monkeypatch.setattr(train_module, "_loss", real_loss)
    resumed = train_generator_kind(TrainGeneratorConfig(out=str(tmp_path / "resumed"), resume=True, **config))[0]
    meta = json.loads((resumed / "segsynth_generator.json").read_text())
    assert meta["training"]["resumed_at"] == 2 and meta["training"]["iterations"] == 4
    a, b = (load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")) for folder in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SegsynthError, match="settings differ from the run being resumed \\(lr\\)"):
        train_generator_kind(TrainGeneratorConfig(out=str(tmp_path / "resumed"), resume=True,
                                                  **{**config, "iterations": 6, "lr": 1e-3}))


def test_lora_trains_only_adapters_and_merges_them_into_the_saved_unet(tiny_bases, tmp_path):
    folder, spec = train_generator_kind(TrainGeneratorConfig(out=str(tmp_path / "lora"), base=str(tiny_bases["sd"]),
                                                             iterations=2, lora_rank=4, **TINY))
    assert spec == f"text2mask-sd:{folder}"
    trained_keys = load_file(str(folder / "training_state" / "trainable.safetensors"))
    assert trained_keys and all(".lora_A." in k or ".lora_B." in k for k in trained_keys)
    meta = json.loads((folder / "segsynth_generator.json").read_text())
    assert meta["train_config"]["lr"] == 1e-4 and meta["trained"]["what"].startswith("LoRA rank 4")
    tuned = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(tiny_bases["sd"] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert sorted(tuned) == sorted(base)  # a plain UNet: no adapter keys left
    changed = {k for k in base if not torch.equal(tuned[k], base[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for k in changed)
    [sample] = open_generator(spec).sample_prompts(["sky at the top"], [3])
    assert sample.label.shape == (32, 32)


def test_sdxl_trains_one_step_and_samples(tiny_bases, tmp_path):
    folder, spec = train_generator_kind(TrainGeneratorConfig(out=str(tmp_path / "xl"), base=str(tiny_bases["sdxl"]),
                                                             iterations=1, cond_dropout=0.5, **TINY))
    assert json.loads((folder / "segsynth_generator.json").read_text())["sdxl"] is True
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    generator = open_generator(spec)
    [sample] = generator.sample_prompts(["road across the bottom"], [0])
    assert sample.image.shape == (32, 32, 3) and sample.label.shape == (32, 32)


@pytest.mark.parametrize("args, message", [
    (["--channels", "32,64"], "--kind text2mask-sd takes no --channels"),
    (["--size", "30,32"], "--size \\[30, 32\\]: give H,W, each a multiple of 4"),
    (["--base", "MISSING"], "base model .*MISSING: no such folder"),
    (["--kind", "builtin"], "--kind builtin takes no --base"),
    (["--kind", "diffusion"], "--kind diffusion is unknown: kind must be one of: builtin, latent, text2mask-sd"),
    (["--mixed-precision", "fp8"], "--mixed-precision fp8 is unknown: mixed_precision must be one of: auto, no, fp16, bf16"),
])
def test_bad_settings_are_refused_before_any_training(tiny_bases, tmp_path, capsys, args, message):
    base = str(tmp_path / "MISSING") if "MISSING" in args else str(tiny_bases["sd"])
    args = [base if a == "MISSING" else a for a in args]
    flags = ["train-generator", "--kind", "text2mask-sd", "--data", TOY, "--base", base, "--out", str(tmp_path / "o"),
             "--iterations", "1", "--device", "cpu"]
    code = main(flags + args)
    assert code == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_a_folder_missing_its_files_is_refused(trained, tmp_path):
    import shutil

    broken = shutil.copytree(trained, tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SegsynthError, match="not a text2mask-sd model, missing unet/diffusion_pytorch_model.safetensors"):
        open_generator(f"text2mask-sd:{broken}")


def test_a_diverging_training_stops_with_a_clear_error_and_writes_no_model(tiny_bases, tmp_path):
    out = tmp_path / "diverged"
    with pytest.raises(SegsynthError, match=r"non-finite loss \(\w+\) at iteration \d of 4: training diverged; lower "
                                            r"the learning rate \(--lr 1e\+30 now; try 1e\+29\); no model was saved"):
        train_generator_kind(TrainGeneratorConfig(out=str(out), base=str(tiny_bases["sd"]), iterations=4, lr=1e30,
                                                  **{**TINY, "warmup": 0}))
    assert not (out / "unet").exists() and not (out / "segsynth_generator.json").exists()
