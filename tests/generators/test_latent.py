"""The latent generator: the TAESD-family autoencoder (tiny random, and the real taef2 when ../shared is
there), diffusers autoencoders from a folder, the latent cache, the saved folder, sampling through
`latent:DIR`, and that it learns."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segsynth.cli import main
from segsynth.data import open_dataset
from segsynth.generators import GeneratorSettings, open_generator, train_generator_kind
from segsynth.generators.latent import train_latent_generator
from segsynth.generators.latent.autoencoder import TinyAutoencoder, open_autoencoder, save_taesd, taesd_layout
from segsynth.generators.testing import (save_colour_taesd, save_tiny_diffusers_autoencoder, save_tiny_latent,
                                         save_tiny_taesd)
from segsynth.io import SegsynthError
from segsynth.stage_configs import TrainGeneratorConfig

TOY = "toy:n=12,n_val=4,size=32"
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TAEF2 = SHARED / "weights" / "taef2"
CAMVID = SHARED / "datasets" / "camvid"


@pytest.fixture(scope="module")
def tiny_taesd(tmp_path_factory):
    return save_tiny_taesd(tmp_path_factory.mktemp("taesd") / "ae")


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory, tiny_taesd):
    return save_tiny_latent(tmp_path_factory.mktemp("latent") / "generator", f"taesd:{tiny_taesd}")


# --- the autoencoders ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", [True, False])
def test_taesd_layout_is_read_from_the_weights_and_loaded_strictly(tmp_path, pool):
    model = TinyAutoencoder(width=8, latent_channels=6, pool=pool)
    save_taesd(model, tmp_path / "ae", name="taesdx")
    assert taesd_layout(model.encoder.state_dict()) == (8, 6, pool)
    autoencoder = open_autoencoder(f"taesd:{tmp_path / 'ae'}")
    assert (autoencoder.latent_channels, autoencoder.factor) == (6, 8)
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        latents = autoencoder.encode(images)
        decoded = autoencoder.decode(latents)
    assert latents.shape == (2, 6, 4, 6) and decoded.shape == images.shape
    assert decoded.min() >= 0 and decoded.max() <= 1
    assert autoencoder.identity()["files"] == ["taesdx_encoder.pth", "taesdx_decoder.pth"]


def test_taesd_folders_that_cannot_be_used_are_named(tmp_path):
    with pytest.raises(SegsynthError, match="does not exist"):
        open_autoencoder(f"taesd:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegsynthError, match="expected one NAME_encoder.pth with its NAME_decoder.pth.*found no .pth"):
        open_autoencoder(f"taesd:{tmp_path / 'empty'}")
    folder = save_tiny_taesd(tmp_path / "mismatch")
    wide = TinyAutoencoder(width=16, latent_channels=4)
    torch.save(wide.decoder.state_dict(), folder / "tiny_decoder.pth")  # a decoder of another width
    with pytest.raises(SegsynthError, match=r"tiny_decoder.pth: cannot load the autoencoder's decoder \("):
        open_autoencoder(f"taesd:{folder}")
    (folder / "tiny_encoder.pth").write_bytes(b"not a state dict")
    with pytest.raises(SegsynthError, match="tiny_encoder.pth: cannot load the autoencoder's encoder"):
        open_autoencoder(f"taesd:{folder}")
    with pytest.raises(SegsynthError, match="unknown autoencoder 'vqgan:x'; options: taesd, diffusers"):
        open_autoencoder("vqgan:x")


@pytest.mark.parametrize("kind, factor", [("tiny", 8), ("kl", 4)])
def test_a_diffusers_autoencoder_loads_from_a_folder(tmp_path, kind, factor):
    folder = save_tiny_diffusers_autoencoder(tmp_path / kind, kind)
    autoencoder = open_autoencoder(f"diffusers:{folder}")
    assert (autoencoder.latent_channels, autoencoder.factor) == (4, factor)
    with torch.no_grad():
        decoded = autoencoder.decode(autoencoder.encode(torch.rand(1, 3, 32, 32)))
    assert decoded.shape == (1, 3, 32, 32) and 0 <= decoded.min() and decoded.max() <= 1
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    os.rename(folder, pipeline / "vae")  # a pipeline folder: its vae/ is found
    assert open_autoencoder(f"diffusers:{pipeline}").factor == factor


@pytest.mark.skipif(not (TAEF2 / "taef2_encoder.pth").is_file() or not CAMVID.is_dir(),
                    reason="needs ../shared/weights/taef2 and ../shared/datasets/camvid")
def test_taef2_loads_strictly_and_round_trips_a_camvid_image_above_30_db():
    autoencoder = open_autoencoder(f"taesd:{TAEF2}")
    assert (autoencoder.latent_channels, autoencoder.factor) == (32, 8)
    identity = autoencoder.identity()
    assert identity["sha256"][0].startswith("10a4e1021e89") and identity["sha256"][1].startswith("0a44a31e1ae5")
    image = np.asarray(Image.open(CAMVID / "train" / "0001TP_006690.png").convert("RGB"))[2:178]  # 176 x 240
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        latents = autoencoder.encode(pixels)
        decoded = autoencoder.decode(latents)
    assert latents.shape == (1, 32, 22, 30)
    error = ((decoded * 255).round() - pixels * 255).pow(2).mean().item()
    psnr = 10 * np.log10(255**2 / error)
    assert psnr > 30, psnr


# --- training and sampling --------------------------------------------------------------------------------


def test_trained_folder_holds_its_networks_and_a_copy_of_the_autoencoder(latent_dir):
    for name in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "mask_encoder/config.json",
                 "mask_encoder/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "autoencoder/tiny_encoder.pth", "autoencoder/tiny_decoder.pth", "segsynth_generator.json",
                 "latents.safetensors", "training_state/state.json"):
        assert (latent_dir / name).is_file(), name
    meta = json.loads((latent_dir / "segsynth_generator.json").read_text())
    assert meta["size"] == [32, 32] and meta["latent_size"] == [4, 4] and len(meta["latent_std"]) == 4
    assert meta["autoencoder"]["kind"] == "taesd" and meta["sampling"]["guidance"] == 1.0
    assert meta["training"]["finished"] and meta["classes"] == list(open_dataset(TOY).classes)


def test_latent_samples_do_not_depend_on_the_batch_and_need_no_original_autoencoder(latent_dir, tmp_path):
    moved = tmp_path / "moved"
    os.rename(latent_dir, moved)  # the folder samples from its own copy of the autoencoder
    try:
        generator = open_generator(f"latent:{moved}", GeneratorSettings(steps=3))
        split = open_dataset(TOY).split("train")
        masks = [split.label(i) for i in range(3)]
        together = generator.render_masks(masks, [""] * 3, [10, 11, 12])
        alone = [generator.render_masks([m], [""], [s])[0] for m, s in zip(masks, [10, 11, 12])]
        assert max(np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(together, alone)) <= 1.0
        assert together[0].shape == (32, 32, 3) and together[0].dtype == np.uint8
        assert generator.identity()["fingerprint"] and generator.working_size((180, 240)) == (32, 32)
    finally:
        os.rename(moved, latent_dir)


def test_the_latent_cache_is_made_once_and_remade_when_its_inputs_change(tmp_path, tiny_taesd):
    settings = dict(data=TOY, kind="latent", autoencoder=f"taesd:{tiny_taesd}", size=[32, 32], channels=[32, 32],
                    layers_per_block=1, attention=False, batch_size=2, log_every=1, device="cpu")
    out = tmp_path / "g"
    train_latent_generator(TrainGeneratorConfig(out=str(out), iterations=1, **settings))
    cache = out / "latents.safetensors"
    made = cache.stat().st_mtime_ns
    train_latent_generator(TrainGeneratorConfig(out=str(out), iterations=2, resume=True, **settings))
    assert cache.stat().st_mtime_ns == made  # reused by the resumed run
    train_latent_generator(TrainGeneratorConfig(out=str(tmp_path / "crops"), iterations=1, cached_crops=1, **settings))
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "crops" / "latents.safetensors")
    assert tensors["latents"].shape == (12, 2, 2, 4, 4, 4) and tensors["masks"].shape == (12, 2, 32, 32)


def test_kept_snapshots_sample_like_the_final_model_and_share_its_autoencoder_files(tmp_path, tiny_taesd):
    """--keep-every snapshots of a latent model are generators of their own (the alignment curve samples them):
    each holds the autoencoder too, hard-linked to the model's copy rather than copied again."""
    out = tmp_path / "g"
    train_latent_generator(TrainGeneratorConfig(
        data=TOY, out=str(out), kind="latent", autoencoder=f"taesd:{tiny_taesd}", size=[32, 32], channels=[32, 32],
        layers_per_block=1, attention=False, batch_size=2, iterations=2, save_every=1, keep_every=1, device="cpu"))
    mask = open_dataset(TOY).split("train").label(0)
    final = open_generator(f"latent:{out}", GeneratorSettings(steps=2)).render_masks([mask], [""], [3])[0]
    for iteration in (1, 2):
        snapshot = out / "snapshots" / f"it{iteration}"
        encoder = snapshot / "autoencoder" / "tiny_encoder.pth"
        assert encoder.stat().st_ino == (out / "autoencoder" / "tiny_encoder.pth").stat().st_ino
        image = open_generator(f"latent:{snapshot}", GeneratorSettings(steps=2)).render_masks([mask], [""], [3])[0]
        assert image.shape == (32, 32, 3)
        if iteration == 2:  # the last snapshot is the final model
            assert np.array_equal(image, final)


def test_a_diffusers_autoencoder_trains_and_samples_through_the_cli(tmp_path):
    folder = save_tiny_diffusers_autoencoder(tmp_path / "vae", "tiny")
    out = tmp_path / "generator"
    code = main(["train-generator", "--kind", "latent", "--autoencoder", f"diffusers:{folder}", "--data", TOY,
                 "--out", str(out), "--size", "32,32", "--channels", "32,32", "--layers-per-block", "1",
                 "--no-attention", "--iterations", "1", "--batch-size", "2", "--device", "cpu"])
    assert code == 0 and (out / "autoencoder" / "config.json").is_file()
    generator = open_generator(f"latent:{out}", GeneratorSettings(steps=2))
    assert generator.render_masks([np.zeros((32, 32), np.uint8)], [""], [0])[0].shape == (32, 32, 3)


def test_a_latent_model_trained_with_condition_dropout_samples_with_guidance(tmp_path, tiny_taesd):
    folder = save_tiny_latent(tmp_path / "g", f"taesd:{tiny_taesd}", iterations=2, cond_dropout=0.5)
    mask = open_dataset(TOY).split("train").label(0)
    plain = open_generator(f"latent:{folder}", GeneratorSettings(steps=3)).render_masks([mask], [""], [4])[0]
    guided_generator = open_generator(f"latent:{folder}", GeneratorSettings(steps=3, guidance=3.0))
    guided = guided_generator.render_masks([mask], [""], [4])[0]
    assert guided_generator.identity()["guidance"] == 3.0
    assert np.abs(guided.astype(int) - plain.astype(int)).mean() > 0.5


def test_strength_starts_the_latents_from_the_encoded_source_image(tmp_path):
    """SDEdit on the latent generator: the source is encoded by the generator's own autoencoder and standardised
    as the training latents were; at a small strength the sample is near the autoencoder's round trip of its
    source (here a colour autoencoder: its latents are the image's colours, so the round trip is a colour grid)."""
    folder = save_tiny_latent(tmp_path / "g", f"taesd:{save_colour_taesd(tmp_path / 'ae')}", iterations=2)
    split = open_dataset(TOY).split("train")
    masks, sources = [split.label(i) for i in range(3)], [split[i].image for i in range(3)]

    def render(strength):
        generator = open_generator(f"latent:{folder}", GeneratorSettings(steps=10, strength=strength))
        return generator, generator.render_masks(masks, [""] * 3, [1, 2, 3], sources)

    generator, near = render(0.2)
    _, far = render(1.0)
    with torch.no_grad():
        batch = torch.from_numpy(np.stack(sources)).permute(0, 3, 1, 2).float()
        round_trips = generator.decode(generator.encode_source(batch))
    for trip, small, large in zip(round_trips, near, far):
        assert np.abs(small.astype(float) - trip).mean() < 0.5 * np.abs(large.astype(float) - trip).mean()
    assert generator.identity()["strength"] == 0.2


@pytest.mark.parametrize("settings, message", [
    ({"autoencoder": None}, "--kind latent needs --autoencoder"),
    ({"autoencoder": "taesd:/nowhere/at/all"}, "autoencoder folder /nowhere/at/all does not exist"),
    ({"size": [40, 40]}, "H and W must be multiples of 16"),
    ({"guidance": 2.0}, "--guidance 2 needs a model trained with --cond-dropout > 0"),
    ({"base": "some/model"}, "--kind latent takes no --base"),
])
def test_bad_latent_settings_are_refused_before_any_training(tmp_path, tiny_taesd, settings, message):
    values = dict(data=TOY, out=str(tmp_path / "g"), kind="latent", autoencoder=f"taesd:{tiny_taesd}", size=[32, 32],
                  channels=[32, 32], iterations=1, batch_size=2, device="cpu")
    with pytest.raises(SegsynthError, match=message):
        train_generator_kind(TrainGeneratorConfig(**{**values, **settings}))
    assert not (tmp_path / "g" / "unet").exists()


def test_latent_samples_follow_the_mask_after_brief_training(tmp_path):
    """Red and blue regions where the mask says, on an autoencoder whose latents are the image's colours
    (`save_colour_taesd`: a random one's latents barely tell red from blue)."""
    from test_builtin import _two_colour_dataset

    data = _two_colour_dataset(tmp_path / "data")
    autoencoder = save_colour_taesd(tmp_path / "ae")
    folder = save_tiny_latent(tmp_path / "g", f"taesd:{autoencoder}", data=data, iterations=150, lr=3e-3,
                              warmup=10, batch_size=8, log_every=25, save_every=1000)
    generator = open_generator(f"latent:{folder}", GeneratorSettings(steps=10))
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 1  # left half red, right half blue: a layout never seen in training
    image = generator.render_masks([mask], [""], [123])[0].astype(float)
    left, right = image[:, :16], image[:, 16:]
    assert left[..., 0].mean() - left[..., 2].mean() > 40  # red where the mask says red
    assert right[..., 2].mean() - right[..., 0].mean() > 40  # blue where it says blue
    losses = [json.loads(line)["loss"] for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0]
