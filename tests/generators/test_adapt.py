"""`segsynth adapt`: LoRA adapters from unlabeled images, for the builtin generators and diffusers UNets; loading
them for synthesis (and attention capture through LoRA layers); resume; what is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import segsynth.generators.adapt as adapt_module
from segsynth.cli import main
from segsynth.formats.adapter import read_adapter_info
from segsynth.generators import open_generator
from segsynth.generators.adapt import adapt
from segsynth.generators.attention_generator import BuiltinAttentionGenerator
from segsynth.generators.base import Condition, GeneratorSettings, Request
from segsynth.generators.builtin_text import BuiltinTextGenerator, TrainTextGeneratorConfig, train_text_generator
from segsynth.generators.lora import ADAPTER_NAME, load_adapter, lora_layers
from segsynth.io import SegsynthError
from segsynth.stage_configs import AdaptConfig

TOY = "toy:n=8,n_val=4,size=32"
TARGET = f"{TOY}?include=toy_val"  # the target domain: the toy val images, their labels never read
TINY_TEXT = dict(data=TOY, size=[32, 32], channels=[32, 64], layers_per_block=1, text_width=32, batch_size=2, warmup=2,
                 log_every=1, sample_steps=3, device="cpu")
ADAPT = dict(images=TARGET, split="val", iterations=3, batch_size=2, rank=4, warmup=1, log_every=1, device="cpu")
ATTENTION = GeneratorSettings(pseudo_mask_settings={"resolutions": [8], "self_attention_resolution": 8}, device="cpu")


def _text_generator(folder, seed=0):
    return train_text_generator(TrainTextGeneratorConfig(out=str(folder), iterations=2, seed=seed, **TINY_TEXT))


@pytest.fixture(scope="module")
def text_generator(tmp_path_factory):
    return _text_generator(tmp_path_factory.mktemp("adapt-text") / "generator")


@pytest.fixture(scope="module")
def text_adapter(text_generator, tmp_path_factory):
    """An adapter trained with a large learning rate, so that its update is far from zero."""
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    return adapt(AdaptConfig(generator=f"attention:{text_generator}", out=str(out), **{**ADAPT, "lr": 0.05}))


def _requests(n=2):
    return [Condition(Request(f"r{i}_s{i}", "text", i, prompt="a photo of sky, road, car"), None,
                      "a photo of sky, road, car") for i in range(n)]


# --- the adapter folder -------------------------------------------------------------------------------


def test_the_adapter_holds_only_lora_weights_and_names_its_base(text_generator, text_adapter):
    info = read_adapter_info(text_adapter)
    weights = load_file(text_adapter / "adapter.safetensors")
    assert weights and all(".lora_A." in key or ".lora_B." in key for key in weights)
    assert any(weights[key].abs().sum() > 0 for key in weights if ".lora_B." in key)  # it trained
    unet_bytes = (text_generator / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert info["bytes"] == (text_adapter / "adapter.safetensors").stat().st_size < unet_bytes / 5
    base = BuiltinTextGenerator(text_generator)
    assert info["base"]["fingerprint"] == base.fingerprint and info["base"]["family"] == "builtin-text"
    assert info["lora"]["rank"] == 4 and info["lora"]["alpha"] == 4.0
    assert info["lora"]["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert info["image_count"] == 4 and info["prompt"] == "" and info["training"]["finished"]
    # self- and cross-attention of every attention block: 4 projections each
    assert info["lora"]["layers"] == len(weights) // 2 == 4 * sum(1 for name, _ in base.unet.named_modules()
                                                                  if name.endswith(("attn1", "attn2")))
    assert (text_adapter / "adapt.config.yaml").read_text().startswith("# resolved AdaptConfig;")


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(text_generator, tmp_path, monkeypatch):
    settings = dict(generator=f"attention:{text_generator}", **{**ADAPT, "iterations": 5, "save_every": 2,
                                                                  "dropout": 0.1})
    straight = adapt(AdaptConfig(out=str(tmp_path / "straight"), **settings))

    class Killed(Exception):
        pass

    original, calls = adapt_module._batch, []

    def kill_at_the_fourth_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # after the save at iteration 2, during iteration 4
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(adapt_module, "_batch", kill_at_the_fourth_batch)
    with pytest.raises(Killed):
        adapt(AdaptConfig(out=str(tmp_path / "resumed"), **settings))
    monkeypatch.setattr(adapt_module, "_batch", original)
    assert read_adapter_info(tmp_path / "resumed")["training"]["iterations"] == 2  # the save before the kill
    resumed = adapt(AdaptConfig(out=str(tmp_path / "resumed"), resume=True, **settings))
    info = json.loads((resumed / "adapter.json").read_text())
    assert info["training"]["resumed_at"] == 2 and info["training"]["iterations"] == 5
    for weights in ("adapter.safetensors", "training_state/trainable.safetensors",
                    "training_state/optimizer.safetensors"):
        expected, got = load_file(straight / weights), load_file(resumed / weights)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), weights
    logged = [json.loads(line)["iteration"] for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]
    with pytest.raises(SegsynthError, match=r"settings differ .*\(rank\)"):
        adapt(AdaptConfig(out=str(tmp_path / "resumed"), resume=True, **{**settings, "rank": 2}))


# --- sampling with it ---------------------------------------------------------------------------------


def test_the_adapter_changes_samples_at_its_scale_and_attention_capture_sees_it(text_generator, text_adapter):
    plain = BuiltinAttentionGenerator(text_generator, ATTENTION)
    for generator in (plain,):
        generator.check_dataset(*_toy_classes())
    before = plain.generate(_requests())
    off = BuiltinAttentionGenerator(text_generator, GeneratorSettings(**{**vars(ATTENTION), "lora": str(text_adapter),
                                                                          "lora_scale": 0.0}))
    on = BuiltinAttentionGenerator(text_generator, GeneratorSettings(**{**vars(ATTENTION), "lora": str(text_adapter)}))
    for generator in (off, on):
        generator.check_dataset(*_toy_classes())
    assert off.identity()["lora"]["scale"] == 0.0 and "lora" not in plain.identity()
    assert on.identity() != plain.identity() and on.identity()["lora"]["fingerprint"]
    unchanged, after = off.generate(_requests()), on.generate(_requests())
    assert all(np.array_equal(a.image, b.image) for a, b in zip(before, unchanged))
    assert all(np.abs(a.image.astype(int) - b.image.astype(int)).mean() > 1 for a, b in zip(before, after))
    # LoRA layers kept apart (not merged): the recording processors call attn.to_q / attn.to_k, peft layers now,
    # and label the same pictures as the merged adapter does
    apart = BuiltinAttentionGenerator(text_generator, ATTENTION)
    apart.check_dataset(*_toy_classes())
    load_adapter(apart.unet, text_adapter, 1.0, apart.text.adapter_base(), "attention:GEN", merge=False)
    layers = lora_layers(apart.unet)
    assert layers and not any(layer.merged for layer in layers.values())
    assert type(apart.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_q).__module__.startswith("peft")
    separate = apart.generate(_requests())
    for merged, kept in zip(after, separate):
        assert np.abs(merged.image.astype(int) - kept.image.astype(int)).max() <= 2  # float rounding only
        assert kept.label.shape == kept.weight.shape == (32, 32)
    # one capture of a noised image: the same maps through merged and separate LoRA layers, other maps without
    request = _requests(1)[0].request
    cross = [generator.attention_of_image(before[0].image, request, 0.5, 0, resolutions=[8])[1][8]
             for generator in (plain, on, apart)]
    assert torch.allclose(cross[1], cross[2], atol=1e-5) and not torch.allclose(cross[0], cross[1], atol=1e-4)


def _toy_classes():
    from segsynth.data import open_dataset

    dataset = open_dataset(TOY)
    return dataset.classes, dataset.palette


def test_synthesize_loads_the_adapter_and_keeps_sets_apart(text_generator, text_adapter, tmp_path, capsys):
    plan = tmp_path / "plan.jsonl"
    assert main(["plan", "--data", TOY, "--class-prompts", "1", "--limit", "1", "--out", str(plan)]) == 0
    common = ["--data", TOY, "--plan", str(plan), "--generator", f"attention:{text_generator}", "--steps", "2",
              "--device", "cpu", "--pseudo-mask-settings", "resolutions=[8]",
              "--pseudo-mask-settings", "self_attention_resolution=8"]
    assert main(["synthesize", *common, "--out", str(tmp_path / "adapted"), "--lora", str(text_adapter),
                 "--lora-scale", "0.5"]) == 0
    state = json.loads((tmp_path / "adapted" / "synthesis.json").read_text())
    assert state["generator"]["lora"]["scale"] == 0.5
    assert main(["synthesize", *common, "--out", str(tmp_path / "adapted")]) == 2  # the same folder without it
    assert "generator settings differ: lora" in capsys.readouterr().err


def test_the_mask_to_image_generator_adapts_on_the_all_ignore_mask(tmp_path):
    from segsynth.generators.builtin import train_generator
    from segsynth.stage_configs import TrainGeneratorConfig

    builtin_dir = train_generator(TrainGeneratorConfig(  # with self-attention at its lowest level, as by default
        data=TOY, out=str(tmp_path / "g"), size=[32, 32], channels=[32, 32], layers_per_block=1, attention=True,
        iterations=2, batch_size=2, log_every=1, sample_steps=2, device="cpu"))
    out = adapt(AdaptConfig(generator=f"builtin:{builtin_dir}", out=str(tmp_path / "a"), **{**ADAPT, "lr": 0.05}))
    info = read_adapter_info(out)
    assert info["base"]["family"] == "builtin" and info["lora"]["layers"] > 0
    plain = open_generator(f"builtin:{builtin_dir}", GeneratorSettings(device="cpu"))
    adapted = open_generator(f"builtin:{builtin_dir}", GeneratorSettings(device="cpu", lora=str(out)))
    mask = np.zeros(plain.size, np.uint8)
    images = [g.render_masks([mask], [""], [3])[0] for g in (plain, adapted)]
    assert images[0].shape == images[1].shape and not np.array_equal(*images)
    assert adapted.identity()["lora"]["path"] == str(out.resolve())


# --- diffusers UNets ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from segsynth.generators.testing import save_tiny_sd

    folder = tmp_path_factory.mktemp("sd")
    return save_tiny_sd(folder), save_tiny_sd(folder / "other", seed=1)


def test_a_diffusers_unet_adapts_and_the_pipeline_generators_load_it(tiny_sd, controlnet_dirs, tmp_path, capsys):
    base, other = tiny_sd
    out = adapt(AdaptConfig(generator=f"attention-sd:{base}", out=str(tmp_path / "sd"), prompt="a street at dusk",
                            **{**ADAPT, "lr": 0.05}))
    info = read_adapter_info(out)
    assert info["base"]["family"] == "diffusers-unet" and info["size"] == [32, 32] and info["train_config"]["lr"] == 0.05
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet_bytes = (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert info["bytes"] < unet_bytes and info["lora"]["base_parameters"] == sum(p.numel() for p in unet.parameters())
    settings = dict(pseudo_mask_settings={"resolutions": [8], "self_attention_resolution": 8}, steps=2, device="cpu")
    generator = open_generator(f"attention-sd:{base}", GeneratorSettings(**settings, lora=str(out)))
    generator.check_dataset(*_toy_classes())
    samples = generator.generate(_requests(1))
    assert samples[0].image.shape == (32, 32, 3) and samples[0].label.shape == (32, 32)
    assert generator.identity()["lora"]["rank"] == 4 and lora_layers(generator.unet)
    # another base: refused with both identities named
    with pytest.raises(SegsynthError, match=f"LoRA adapter {out} was made for attention-sd fingerprint "
                                            f"{info['base']['fingerprint']} .*, not for attention-sd fingerprint "):
        open_generator(f"attention-sd:{other}", GeneratorSettings(**settings, lora=str(out)))
    # the ControlNet pipeline's UNet takes an adapter of its base model
    controlnet_base, controlnet = controlnet_dirs
    adapter = adapt(AdaptConfig(generator=f"controlnet:{controlnet_base}", out=str(tmp_path / "cn"), **ADAPT))
    pipeline = open_generator(f"controlnet:{controlnet_base}", GeneratorSettings(controlnet=str(controlnet),
                                                                                 lora=str(adapter), device="cpu"))
    assert pipeline.identity()["lora"]["fingerprint"] and lora_layers(pipeline.pipeline.unet)


# --- bad input ----------------------------------------------------------------------------------------


def test_target_image_folders_that_cannot_be_used_are_named(text_generator, tmp_path, capsys):
    def run(images, *extra):
        code = main(["adapt", "--generator", f"attention:{text_generator}", "--images", str(images), "--out",
                     str(tmp_path / "out"), "--iterations", "1", "--device", "cpu", *extra])
        return code, capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(empty) == (2, f"segsynth adapt: error: --images {empty}: holds no images; put the target domain's "
                             "images in it\n")
    (empty / "sequence_a").mkdir()
    assert "only the folder(s) sequence_a/: point --images at the one holding the images" in run(empty)[1]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "a.png")
    (mixed / "notes.txt").write_text("dusk frames")
    code, err = run(mixed)
    assert code == 2 and f"--images {mixed}: holds 1 file(s) that are not images: notes.txt" in err
    (mixed / "notes.txt").unlink()
    (mixed / "b.png").write_text("<html>not found</html>")
    code, err = run(mixed)
    assert code == 2 and f"{mixed / 'b.png'}: cannot read image" in err
    code, err = run(tmp_path / "nowhere")
    assert code == 2 and "no such folder; give a folder of images, or a dataset spec" in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_of_another_generator_is_refused_naming_both(text_generator, text_adapter, tmp_path):
    other = _text_generator(tmp_path / "other", seed=1)
    mine, theirs = BuiltinTextGenerator(text_generator).fingerprint, BuiltinTextGenerator(other).fingerprint
    with pytest.raises(SegsynthError, match=f"made for attention fingerprint {mine} .* not for attention fingerprint "
                                            f"{theirs} .*segsynth adapt --generator attention:{other}"):
        BuiltinTextGenerator(other, GeneratorSettings(lora=str(text_adapter)))
    with pytest.raises(SegsynthError, match="not a LoRA adapter, missing adapter.json, adapter.safetensors"):
        BuiltinTextGenerator(text_generator, GeneratorSettings(lora=str(tmp_path)))


@pytest.mark.parametrize("argv, needle", [
    (["--rank", "40"], "--rank 40 is larger than layer down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k "
                       "(32 -> 64 features; "),
    (["--target-modules", "to_q", "--target-modules", "qkv"], "--target-modules 'qkv': no layer of this "
                                                              "UNet2DConditionModel is named so; its linear and "
                                                              "convolution layers end in: "),
    (["--target-modules", "norm1"], "names layer(s) LoRA cannot adapt"),
    (["--prompt", "a street at dusk"], "word(s) 'street', 'at', 'dusk' are not in the text generator's vocabulary"),
    (["--size", "64,64"], "works at [32, 32] (H,W) only"),
], ids=["rank-larger-than-a-layer", "unknown-target", "not-a-linear-layer", "prompt-outside-vocabulary", "size"])
def test_settings_the_generator_cannot_take_are_refused(text_generator, tmp_path, capsys, argv, needle):
    code = main(["adapt", "--generator", f"attention:{text_generator}", "--images", TARGET, "--split", "val",
                 "--out", str(tmp_path / "out"), "--iterations", "1", "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_generators_without_photos_to_adapt_are_refused(tmp_path, capsys):
    for spec, needle in [("text2mask:GEN", "the text2mask generator draws colour-coded masks, not photos of a "
                                           "domain; adapt one of: attention, builtin, attention-sd"),
                         ("magic:x", "unknown generator 'magic'")]:
        assert main(["adapt", "--generator", spec, "--images", TARGET, "--split", "val", "--out",
                     str(tmp_path / "out"), "--device", "cpu"]) == 2
        assert needle in capsys.readouterr().err


def test_adapter_name_is_the_one_peft_layers_carry(text_generator, text_adapter):
    generator = BuiltinTextGenerator(text_generator, GeneratorSettings(lora=str(text_adapter)))
    assert all(ADAPTER_NAME in layer.lora_A for layer in lora_layers(generator.unet).values())


def test_the_class_direction_term_is_zero_for_a_fresh_adapter_and_sees_a_trained_one(text_generator, text_adapter):
    from diffusers import DDPMScheduler

    from segsynth.generators.adapt import class_directions
    from segsynth.generators.builtin_text.model import encode_text
    from segsynth.generators.lora import adapters_off, add_lora

    def term(generator):
        ids = generator.tokenizer(["", "a photo of sky, road"])
        states = encode_text(generator.text_encoder, ids)
        schedule = DDPMScheduler.from_config(generator.noise_schedule_config)
        clean = torch.rand(1, 12, 16, 16) * 2 - 1
        return float(class_directions(generator.unet, clean, states[:1], None, states[1:], None, schedule,
                                      torch.Generator().manual_seed(0)))

    fresh = BuiltinTextGenerator(text_generator)
    add_lora(fresh.unet, 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"])  # B = 0: the base model itself
    assert term(fresh) == 0.0
    trained = BuiltinTextGenerator(text_generator)
    load_adapter(trained.unet, text_adapter, 1.0, trained.adapter_base(), "attention:GEN", merge=False)
    assert term(trained) > 0
    layer = next(iter(lora_layers(trained.unet).values()))
    with adapters_off(trained.unet):
        assert layer.disable_adapters
    assert not layer.disable_adapters and layer.lora_A[ADAPTER_NAME].weight.requires_grad
