"""The builtin generator: encoding, the saved folder, loading by `builtin:DIR`, determinism, and that it learns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import segsynth.generators.builtin.train as train_module
import segsynth.generators.training_loop as training_loop
from segsynth.cli import main
from segsynth.data import open_dataset
from segsynth.generators import GENERATORS, GeneratorSettings, open_generator
from segsynth.generators.builtin import train_generator
from segsynth.generators.builtin.model import PATCH, decode_images, encode_images, encode_masks
from segsynth.stage_configs import TrainGeneratorConfig, resolve_generator_kind
from segsynth.io import SegsynthError

TOY = "toy:n=12,n_val=4,size=32"


def test_masks_become_patchified_one_hot_with_an_ignore_channel():
    masks = np.array([[[0, 1], [2, 255]]], np.uint8).repeat(2, 1).repeat(2, 2)  # 1 x 4 x 4
    encoded = encode_masks(masks, num_classes=3)
    assert encoded.shape == (1, 4 * PATCH * PATCH, 2, 2)
    unpatched = torch.nn.functional.pixel_shuffle(encoded, PATCH)[0]
    assert unpatched.sum(0).eq(1).all()  # exactly one channel per pixel
    assert unpatched[3, 2:, 2:].eq(1).all()  # ignore (255) lands in the extra channel
    with pytest.raises(SegsynthError, match="label 7"):
        encode_masks(np.full((1, 4, 4), 7, np.uint8), num_classes=3)


def test_image_encoding_round_trips():
    images = torch.randint(0, 256, (2, 3, 8, 12)).float()
    decoded = decode_images(encode_images(images))
    np.testing.assert_array_equal(np.stack(decoded), images.permute(0, 2, 3, 1).numpy().astype(np.uint8))


def test_trained_folder_is_diffusers_style_and_loads_by_path(builtin_dir):
    for name in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "segsynth_generator.json", "train_log.jsonl", "train_generator.config.yaml"):
        assert (builtin_dir / name).is_file(), name
    meta = json.loads((builtin_dir / "segsynth_generator.json").read_text())
    assert meta["classes"] == list(open_dataset(TOY).classes) and meta["size"] == [32, 32]
    assert meta["training"]["finished"] and meta["training"]["iterations"] == 2 and meta["parameters"] > 0
    generator = open_generator(f"builtin:{builtin_dir}")
    assert generator.identity()["fingerprint"] and generator.steps == 4 and generator.working_size((180, 240)) == (32, 32)


def test_builtin_pixels_do_not_depend_on_the_batch(builtin_dir):
    generator = open_generator(f"builtin:{builtin_dir}")
    split = open_dataset(TOY).split("train")
    masks = [split.label(i) for i in range(3)]
    together = generator.render_masks(masks, [""] * 3, [10, 11, 12])
    alone = [generator.render_masks([m], [""], [s])[0] for m, s in zip(masks, [10, 11, 12])]
    assert max(np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(together, alone)) <= 1.0
    assert together[0].shape == (32, 32, 3) and together[0].dtype == np.uint8


@pytest.mark.parametrize("scheduler", ["dpm++", "unipc", "ddim", "euler"])
def test_builtin_samples_with_each_ode_scheduler(builtin_dir, scheduler):
    generator = open_generator(f"builtin:{builtin_dir}", GeneratorSettings(scheduler=scheduler, steps=3))
    assert generator.render_masks([np.zeros((32, 32), np.uint8)], [""], [0])[0].shape == (32, 32, 3)


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


@pytest.mark.parametrize("scheduler", ["dpm++", "euler"])
def test_strength_starts_from_the_source_image_and_stays_near_it_when_small(builtin_dir, scheduler):
    """SDEdit: at a small strength the sample is its source image redrawn a little; at strength 1 the source is
    all but drowned in noise; another source image under the same mask and seed gives another sample."""
    split = open_dataset(TOY).split("train")
    masks, images = [split.label(i) for i in range(3)], [split[i].image for i in range(3)]

    def render(strength, sources):
        generator = open_generator(f"builtin:{builtin_dir}", GeneratorSettings(steps=10, strength=strength,
                                                                               scheduler=scheduler))
        return generator.render_masks(masks, [""] * 3, [5, 6, 7], sources)

    near, far = render(0.2, images), render(1.0, images)
    for source, small, large in zip(images, near, far):
        assert _distance(small, source) < 0.5 * _distance(large, source)
    swapped = render(0.2, images[1:] + images[:1])
    assert _distance(swapped[0], near[0]) > 10
    # one sample alone is the same as in its batch
    alone = open_generator(f"builtin:{builtin_dir}", GeneratorSettings(steps=10, strength=0.2, scheduler=scheduler)
                           ).render_masks(masks[1:2], [""], [6], images[1:2])[0]
    assert _distance(alone, near[1]) <= 1.0


def test_strength_is_part_of_the_identity_and_needs_source_images(builtin_dir):
    generator = open_generator(f"builtin:{builtin_dir}", GeneratorSettings(steps=10, strength=0.35))
    assert generator.identity()["strength"] == 0.35 and generator.denoising_steps() == 3
    assert "strength" not in open_generator(f"builtin:{builtin_dir}").identity()
    with pytest.raises(SegsynthError, match="carry no source image"):
        generator.render_masks([np.zeros((32, 32), np.uint8)], [""], [0])
    with pytest.raises(SegsynthError, match="must be 32x32x3"):
        generator.render_masks([np.zeros((32, 32), np.uint8)], [""], [0], [np.zeros((16, 16, 3), np.uint8)])


@pytest.mark.parametrize("settings, message", [
    (GeneratorSettings(guidance=2.0), "guidance 2 needs a model trained with --cond-dropout > 0"),
    (GeneratorSettings(captions="c.jsonl"), "takes no captions"),
    (GeneratorSettings(scheduler="lcm"), "not consistency-distilled"),
    (GeneratorSettings(dtype="fp16"), "fp32 only"),
    (GeneratorSettings(resolution=(64, 64)), "works at"),
    (GeneratorSettings(strength=0.05, steps=10), "runs no denoising step; raise --strength to at least 0.1"),
    (GeneratorSettings(strength=1.5), r"outside \(0, 1\]"),
])
def test_builtin_refuses_settings_it_cannot_honour(builtin_dir, settings, message):
    with pytest.raises(SegsynthError, match=message):
        open_generator(f"builtin:{builtin_dir}", settings)


def test_unknown_generator_lists_the_options():
    with pytest.raises(SegsynthError, match=", ".join(GENERATORS)):
        open_generator("stylegan:foo")
    with pytest.raises(SegsynthError, match="needs an argument"):
        open_generator("builtin")


def test_working_size_must_divide_through_the_unet(tmp_path):
    with pytest.raises(SegsynthError, match="multiples of 8"):
        train_generator(TrainGeneratorConfig(data=TOY, out=str(tmp_path / "g"), size=[30, 32], channels=[32, 32, 32]))


def test_cli_train_generator(tmp_path):
    out = tmp_path / "generator"
    code = main(["train-generator", "--data", TOY, "--out", str(out), "--size", "32,32", "--channels", "32,32",
                 "--layers-per-block", "1", "--no-attention", "--iterations", "1", "--batch-size", "2"])
    assert code == 0 and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def _two_colour_dataset(root, count=24, size=32):
    """Class 0 is pure red, class 1 pure blue, laid out as random rectangles: the mask fully decides the image."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        mask[top: top + size // 2, left: left + size // 2] = 1
        image = np.where(mask[..., None] == 1, np.uint8([0, 0, 255]), np.uint8([255, 0, 0]))
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": ["red", "blue"]}))
    return f"folder:{root}"


def test_samples_follow_the_mask_after_brief_training(tmp_path):
    data = _two_colour_dataset(tmp_path / "data")
    folder = train_generator(TrainGeneratorConfig(data=data, out=str(tmp_path / "g"), size=[32, 32], channels=[32, 32],
                                                  layers_per_block=1, attention=False, iterations=120, batch_size=8,
                                                  lr=2e-3, warmup=10, crop_scale=1.0, log_every=20, save_every=1000))
    generator = open_generator(f"builtin:{folder}", GeneratorSettings(steps=10))
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 1  # left half red, right half blue: a layout never seen in training
    image = generator.render_masks([mask], [""], [123])[0].astype(float)
    left, right = image[:, :16], image[:, 16:]
    assert left[..., 0].mean() - left[..., 2].mean() > 60  # red where the mask says red
    assert right[..., 2].mean() - right[..., 0].mean() > 60  # blue where it says blue


TINY = dict(size=[32, 32], channels=[32, 32], layers_per_block=1, attention=False, batch_size=2, warmup=2,
            log_every=1, sample_steps=3, device="cpu")


def test_keep_every_leaves_snapshots_that_open_as_generators_and_survive_a_resume(tmp_path):
    """--keep-every N: the EMA model of every Nth iteration (at saves, and the last one) in OUT/snapshots/it<N>,
    without training state; each opens and samples; a resumed run adds the new ones and keeps the old."""
    out = tmp_path / "g"
    settings = dict(data=TOY, out=str(out), save_every=2, keep_every=2, **TINY)
    train_generator(TrainGeneratorConfig(iterations=4, **settings))
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["it2", "it4"]
    first = (out / "snapshots" / "it2" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert not (out / "snapshots" / "it2" / "training_state").exists()
    assert json.loads((out / "snapshots" / "it2" / "segsynth_generator.json").read_text())["training"]["iterations"] == 2
    final = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    kept = load_file(out / "snapshots" / "it4" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[name], kept[name]) for name in final)
    generator = open_generator(f"builtin:{out / 'snapshots' / 'it2'}", GeneratorSettings(steps=2, device="cpu"))
    assert generator.steps == 2

    train_generator(TrainGeneratorConfig(iterations=6, resume=True, **settings))
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["it2", "it4", "it6"]
    assert (out / "snapshots" / "it2" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == first


def test_keep_every_must_be_a_multiple_of_save_every(tmp_path):
    with pytest.raises(SegsynthError, match="keep_every. 3 is not a multiple of save_every 2.*--keep-every 4"):
        TrainGeneratorConfig(data=TOY, out=str(tmp_path / "g"), save_every=2, keep_every=3)


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    settings = dict(data=TOY, iterations=5, save_every=2, cond_dropout=0.5, **TINY)
    straight = train_generator(TrainGeneratorConfig(out=str(tmp_path / "straight"), **settings))

    class Killed(Exception):
        pass

    original = training_loop._report_speed

    def kill_after_three(name, done_here, *rest):
        if done_here == 3:  # after the save at iteration 2, before the next one
            raise Killed
        return original(name, done_here, *rest)

    monkeypatch.setattr(training_loop, "_report_speed", kill_after_three)
    with pytest.raises(Killed):
        train_generator(TrainGeneratorConfig(out=str(tmp_path / "resumed"), **settings))
    monkeypatch.setattr(training_loop, "_report_speed", original)
    resumed = main(["train-generator", "--data", TOY, "--out", str(tmp_path / "resumed"), "--resume", "--iterations", "5",
                    "--save-every", "2", "--cond-dropout", "0.5", "--size", "32,32", "--channels", "32,32",
                    "--layers-per-block", "1", "--no-attention", "--batch-size", "2", "--warmup", "2",
                    "--log-every", "1", "--sample-steps", "3", "--device", "cpu"])
    assert resumed == 0
    resumed = tmp_path / "resumed"
    meta = json.loads((resumed / "segsynth_generator.json").read_text())
    assert meta["training"]["resumed_at"] == 2 and meta["training"]["iterations"] == 5
    for weights in ("unet/diffusion_pytorch_model.safetensors", "training_state/weights.safetensors",
                    "training_state/optimizer.safetensors", "training_state/ema.safetensors"):
        expected, got = load_file(straight / weights), load_file(resumed / weights)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), weights
    logged = [json.loads(line)["iteration"] for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]
    with pytest.raises(SegsynthError, match=r"settings differ .*\(lr\)"):
        train_generator(TrainGeneratorConfig(out=str(resumed), resume=True, **{**settings, "lr": 1e-3}))
    # a larger --iterations trains the finished model further
    longer = train_generator(TrainGeneratorConfig(out=str(resumed), resume=True, **{**settings, "iterations": 7}))
    meta = json.loads((longer / "segsynth_generator.json").read_text())
    assert meta["training"]["resumed_at"] == 5 and meta["training"]["iterations"] == 7


def test_guidance_needs_condition_dropout_and_changes_the_samples(tmp_path):
    with pytest.raises(SegsynthError, match="--guidance 3 needs a model trained with --cond-dropout > 0"):
        train_generator(TrainGeneratorConfig(data=TOY, out=str(tmp_path / "no"), iterations=1, guidance=3.0, **TINY))
    folder = train_generator(TrainGeneratorConfig(data=TOY, out=str(tmp_path / "cfg"), iterations=3, cond_dropout=0.3,
                                                  guidance=2.5, **TINY))
    meta = json.loads((folder / "segsynth_generator.json").read_text())
    assert meta["cond_dropout"] == 0.3 and meta["sampling"]["guidance"] == 2.5
    mask = open_dataset(TOY).split("train").label(0)
    stored = open_generator(f"builtin:{folder}")  # the stored default scale
    off = open_generator(f"builtin:{folder}", GeneratorSettings(guidance=1.0))
    assert stored.guidance == 2.5 and stored.identity()["guidance"] == 2.5
    assert off.guidance is None and "guidance" not in off.identity()  # unguided sets keep their old identity
    guided, plain = stored.render_masks([mask], [""], [5])[0], off.render_masks([mask], [""], [5])[0]
    assert np.abs(guided.astype(int) - plain.astype(int)).mean() > 1.0


def test_condition_dropout_blanks_the_drawn_share_of_masks(tmp_path, monkeypatch):
    seen = []
    original = train_module.MaskDenoiser.forward

    def record(self, noisy, condition, timesteps):
        seen.append(condition.flatten(1).abs().sum(1).eq(0))
        return original(self, noisy, condition, timesteps)

    monkeypatch.setattr(train_module.MaskDenoiser, "forward", record)
    train_generator(TrainGeneratorConfig(data=TOY, out=str(tmp_path / "g"), iterations=8, cond_dropout=0.5,
                                         **{**TINY, "batch_size": 8}))
    blank = torch.cat(seen).float().mean().item()
    assert 0.2 < blank < 0.8  # 64 draws at p = 0.5
    seen.clear()
    train_generator(TrainGeneratorConfig(data=TOY, out=str(tmp_path / "off"), iterations=2, **TINY))
    assert not torch.cat(seen).any()  # off by default


@pytest.mark.parametrize("kind, gpu, expected", [
    ("builtin", False, {"size": [96, 128], "channels": [32, 64, 128], "layers_per_block": 1}),
    ("builtin", True, {"size": [96, 128], "channels": [64, 128, 256], "layers_per_block": 2}),
    ("latent", False, {"size": [192, 256], "channels": [64, 128, 256], "layers_per_block": 1}),
    ("latent", True, {"size": [192, 256], "channels": [128, 256, 512], "layers_per_block": 2}),
])
def test_sizes_and_widths_left_unset_come_from_the_machine_preset(kind, gpu, expected):
    config = resolve_generator_kind(TrainGeneratorConfig(data=TOY, out="unused", kind=kind), gpu=gpu)
    assert {key: getattr(config, key) for key in expected} == expected
    assert config.cond_dropout == 0.0 and config.guidance == 1.0  # classifier-free guidance off by default
    chosen = resolve_generator_kind(TrainGeneratorConfig(data=TOY, out="unused", kind=kind, channels=[32, 32],
                                                         layers_per_block=3), gpu=gpu)
    assert chosen.channels == [32, 32] and chosen.layers_per_block == 3  # what is given stays


def test_train_generator_without_a_config_says_its_preset_and_time(tmp_path, capsys):
    code = main(["train-generator", "--data", TOY, "--out", str(tmp_path / "g"), "--iterations", "5", "--size", "32,32",
                 "--batch-size", "1", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "no GPU, so the CPU preset: --channels 32,64,128, --layers-per-block 1" in printed
    assert "s/iteration; about" in printed and "for the 1 iterations left" in printed
