"""The builtin generator: encoding, the saved folder, loading by `builtin:DIR`, determinism, and that it learns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segsynth.cli import main
from segsynth.data import open_dataset
from segsynth.generators import GENERATORS, GeneratorSettings, open_generator
from segsynth.generators.builtin import train_generator
from segsynth.generators.builtin.model import PATCH, decode_images, encode_images, encode_masks
from segsynth.stage_configs import TrainGeneratorConfig
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


@pytest.mark.parametrize("settings, message", [
    (GeneratorSettings(guidance=2.0), "takes no guidance"),
    (GeneratorSettings(scheduler="lcm"), "not consistency-distilled"),
    (GeneratorSettings(dtype="fp16"), "fp32 only"),
    (GeneratorSettings(resolution=(64, 64)), "works at"),
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
