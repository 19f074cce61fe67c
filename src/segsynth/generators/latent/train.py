"""Training the latent generator: the training images encoded once by the frozen autoencoder, then the
builtin generators' loop (generators/builtin/train.py: v-prediction, min-SNR, EMA, condition dropout,
resume) on their standardised latents.

  1. check the settings and the data; open the autoencoder (nothing is downloaded for taesd:DIR)
  2. the latent cache, OUT/latents.safetensors: every training image resized to the working size (and
     `cached_crops` random rescaled crops of it), each also flipped with --flip, encoded once; reused by a
     rerun or a resume whose data, size, crops and autoencoder weights are the same
  3. the per-channel mean and std of the cached latents: the model works on standardised latents
  4. the model (mask encoder + UNet), trained by `train_denoiser`; its folder holds a copy of the
     autoencoder, so it samples anywhere (and so does every --keep-every snapshot, by hard links)

Flips: a flipped image's latents are encoded, not the flipped latents (the encoder is not exactly
flip-equivariant); the mask is flipped exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from segsynth import __version__
from segsynth.config import to_dict
from segsynth.cpu import thread_governor
from segsynth.data import open_dataset
from segsynth.data.validate import check_before_compute
from segsynth.generators.base import resolve_device
from segsynth.generators.builtin.model import GENERATOR_FILE, one_hot_masks
from segsynth.generators.builtin.train import (TRAINING_STATE, check_guidance_settings, check_resumable, resize_pair,
                                               rescaled_crop, resolve_for_machine, sampling_meta, train_denoiser)
from segsynth.generators.latent.autoencoder import Autoencoder, open_autoencoder
from segsynth.generators.latent.model import AUTOENCODER_FOLDER, FORMAT, build_denoiser, latent_working_size, standardise
from segsynth.generators.schedulers import scheduler_name
from segsynth.io import SegsynthError, loading, staged_swap
from segsynth.outputs import claim_folder
from segsynth.stage_configs import TrainGeneratorConfig

LATENT_CACHE = "latents.safetensors"
ENCODE_BATCH = 8


def train_latent_generator(config: TrainGeneratorConfig) -> Path:
    """Train a latent generator on a dataset's (image, mask) pairs; returns the generator folder."""
    config = resolve_for_machine(config, "latent")
    with claim_folder(config.out, "train-generator", "train_generator.config.yaml", "TrainGeneratorConfig",
                      markers=(GENERATOR_FILE, TRAINING_STATE, LATENT_CACHE)):
        return _train_latent_generator(config)


def _train_latent_generator(config: TrainGeneratorConfig) -> Path:
    out = Path(config.out)

    # 1. Settings and data before any compute; the frozen autoencoder.
    if not config.autoencoder:
        raise SegsynthError("train-generator --kind latent needs --autoencoder: taesd:DIR (a TAESD encoder/decoder "
                            "pair, e.g. taesd:../shared/weights/taef2) or diffusers:ID_OR_DIR")
    scheduler_name(config.sample_scheduler)
    check_guidance_settings(config)
    check_resumable(config)
    dataset = open_dataset(config.data)
    split = dataset.split(config.split)
    check_before_compute(dataset, [config.split])
    autoencoder = open_autoencoder(_absolute(config.autoencoder))
    size = latent_working_size(config.size, autoencoder.factor, len(config.channels))
    device = resolve_device(config.device)
    autoencoder.to(device)

    # 2-3. The latents of every training image (and its variants), encoded once; their statistics.
    latents, masks = _latent_cache(config, out, split, size, autoencoder, device)
    flat = latents[:, :, 0].float().transpose(0, 2).reshape(latents.shape[3], -1)  # per channel, unflipped copies
    mean, std = flat.mean(dim=1), flat.std(dim=1).clamp(min=1e-4)
    latent_size = (size[0] // autoencoder.factor, size[1] // autoencoder.factor)

    # 4. The model, trained by the builtin generators' loop.
    torch.manual_seed(config.seed)
    denoiser = build_denoiser(latent_size, autoencoder.latent_channels, dataset.num_classes, autoencoder.factor,
                              config.channels, config.layers_per_block, config.attention)
    variants, copies = latents.shape[1], latents.shape[2]

    def draw_batch(rng: np.random.Generator, torch_rng: torch.Generator):
        index = torch.from_numpy(rng.integers(0, len(latents), config.batch_size))
        variant = torch.from_numpy(rng.integers(0, variants, config.batch_size))
        flipped = torch.from_numpy(rng.random(config.batch_size) < (0.5 if copies == 2 else 0.0))
        clean = standardise(latents[index, variant, flipped.long()].float(), mean, std)
        batch_masks = masks[index, variant]
        batch_masks[flipped] = batch_masks[flipped].flip(-1)
        return clean, one_hot_masks(batch_masks.numpy(), dataset.num_classes)

    _save_autoencoder(out, autoencoder)
    meta = {"format": FORMAT, "segsynth_version": __version__, "classes": list(dataset.classes),
            "palette": [list(c) for c in dataset.palette], "size": list(size), "latent_size": list(latent_size),
            "autoencoder": autoencoder.identity(),
            "latent_mean": [round(float(v), 6) for v in mean], "latent_std": [round(float(v), 6) for v in std],
            "conditioning": "one-hot mask + ignore channel -> patch embedding to the latent grid, concatenated "
                            "to the noisy latents",
            **sampling_meta(config), "data": config.data, "split": config.split, "train_config": to_dict(config)}
    return train_denoiser(config, out, denoiser, draw_batch, meta, fixed=(AUTOENCODER_FOLDER,))


def _absolute(spec: str) -> str:
    """A spec whose argument is an existing local path, made absolute (the generator records where it came from)."""
    name, _, argument = spec.partition(":")
    path = Path(argument).expanduser()
    return f"{name}:{path.resolve()}" if argument and path.exists() else spec


def _save_autoencoder(out: Path, autoencoder: Autoencoder) -> None:
    """OUT/autoencoder: a copy of the frozen autoencoder, written once (swapped in whole)."""
    with staged_swap(out, [AUTOENCODER_FOLDER], what="autoencoder") as staging:
        autoencoder.save(staging / AUTOENCODER_FOLDER)


# --- the latent cache ----------------------------------------------------------------------------------


def _latent_cache(config: TrainGeneratorConfig, out: Path, split, size, autoencoder: Autoencoder,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V, F, C, h, w) fp16 latents and (N, V, H, W) uint8 masks: V variants (the whole image, then the
    random crops) of each of the N training images, F = 2 copies (as is, flipped) with --flip, else 1."""
    key = {"data": config.data, "split": config.split, "ids": list(split.ids), "size": list(size),
           "cached_crops": config.cached_crops, "crop_scale": config.crop_scale if config.cached_crops else None,
           "flip": config.flip, "seed": config.seed, "autoencoder": _weights_identity(autoencoder)}
    path = out / LATENT_CACHE
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    if not len(split):
        raise SegsynthError(f"dataset {config.data}, split {config.split}: no samples to train on")
    out.mkdir(parents=True, exist_ok=True)
    variants, copies = 1 + config.cached_crops, 2 if config.flip else 1
    all_latents, all_masks, pending = [], [], []
    bar = tqdm(total=len(split) * variants * copies, desc="encode latents", unit="img", dynamic_ncols=True,
               mininterval=1.0)
    for index in range(len(split)):
        sample = split[index]
        image = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1)
        label = torch.from_numpy(np.ascontiguousarray(sample.label))
        rng = np.random.default_rng([config.seed, index])
        pairs = [resize_pair(image, label, size)]
        pairs += [rescaled_crop(image, label, size, config.crop_scale, rng) for _ in range(config.cached_crops)]
        for picture, mask in pairs:
            all_masks.append(mask)
            pending.append(picture)
            if copies == 2:
                pending.append(picture.flip(-1))
        while len(pending) >= ENCODE_BATCH or (pending and index == len(split) - 1):
            batch, pending = pending[:ENCODE_BATCH], pending[ENCODE_BATCH:]
            all_latents.append(_encode(autoencoder, torch.stack(batch), device))
            bar.update(len(batch))
    bar.close()
    latents = torch.cat(all_latents).view(len(split), variants, copies, *all_latents[0].shape[1:])
    masks = torch.stack(all_masks).view(len(split), variants, *size)
    with staged_swap(out, [LATENT_CACHE], what="latents") as staging:  # whole or not at all
        save_file({"latents": latents.contiguous(), "masks": masks.contiguous()}, str(staging / LATENT_CACHE),
                  metadata={"key": json.dumps(key, sort_keys=True)})
    return latents, masks


@torch.no_grad()
def _encode(autoencoder: Autoencoder, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    thread_governor().tick()
    return autoencoder.encode((images / 255.0).to(device)).to(torch.float16).cpu()


def _read_cache(path: Path, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached latents and masks when the cache was made with `key`; None when there is none or it differs."""
    if not path.is_file():
        return None
    with loading(path, f"delete {path} (it is remade)", "the latent cache"):
        with safe_open(str(path), framework="pt") as handle:
            saved = json.loads((handle.metadata() or {}).get("key", "null"))
        if saved != json.loads(json.dumps(key, sort_keys=True)):
            tqdm.write(f"{path}: made with other data, sizes or autoencoder weights; encoding again")
            return None
        tensors = load_file(str(path))
        return tensors["latents"], tensors["masks"]


def _weights_identity(autoencoder: Autoencoder) -> dict:
    identity = autoencoder.identity()
    return {k: v for k, v in identity.items() if k not in ("spec", "path")}

