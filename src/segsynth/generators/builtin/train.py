"""Training the built-in generator: v-prediction on a cosine noise schedule, min-SNR weighting,
rescaled crops and flips, EMA weights; saved whole through a staging folder."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from segsynth import __version__
from segsynth.config import save_config, to_dict
from segsynth.cpu import thread_governor
from segsynth.data import open_dataset
from segsynth.data.validate import check_before_compute
from segsynth.generators.base import resolve_device
from segsynth.generators.builtin.model import (FORMAT, GENERATOR_FILE, PATCH, build_unet, encode_images, encode_masks,
                                               training_noise_schedule, working_size)
from segsynth.generators.schedulers import scheduler_name
from segsynth.io import SegsynthError, append_jsonl, atomic_write_json, staged_swap
from segsynth.outputs import claim_folder
from segsynth.stage_configs import TrainGeneratorConfig, resolve_generator_kind
from segsynth.training.schedule import check_finite, warmup_cosine


def train_generator(config: TrainGeneratorConfig) -> Path:
    """Train a builtin generator on a dataset's (image, mask) pairs; returns the generator folder."""
    config = resolve_generator_kind(config)
    if config.kind != "builtin":
        raise SegsynthError(f"train_generator trains the builtin kind, not {config.kind!r}; use "
                            "segsynth.generators.train_generator_kind")
    with claim_folder(config.out, "train-generator", "train_generator.config.yaml", "TrainGeneratorConfig",
                      markers=("segsynth_generator.json",)):
        return _train_generator(config)


def _train_generator(config: TrainGeneratorConfig) -> Path:
    out = Path(config.out)
    device = resolve_device(config.device)

    # 1. Check the data and the settings before any compute.
    dataset = open_dataset(config.data)
    split = dataset.split(config.split)
    check_before_compute(dataset, [config.split])
    size = working_size(config.size, len(config.channels))
    scheduler_name(config.sample_scheduler)

    # 2. Hold every training pair in memory at native size: crops are cut from originals each iteration.
    pairs = [split[i] for i in tqdm(range(len(split)), desc="load", unit="img", leave=False)]
    images = [torch.from_numpy(p.image).permute(2, 0, 1).contiguous() for p in pairs]
    labels = [torch.from_numpy(p.label).contiguous() for p in pairs]

    # 3. Model, noise schedule, optimizer and EMA.
    torch.manual_seed(config.seed)
    unet = build_unet(size, dataset.num_classes, config.channels, config.layers_per_block, config.attention).to(device)
    noise_schedule = training_noise_schedule()
    alphas_cumprod = noise_schedule.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=2 / 3)
    parameters = sum(p.numel() for p in unet.parameters())
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "train_generator.config.yaml")
    log_path = out / "train_log.jsonl"
    log_path.unlink(missing_ok=True)

    # 4. Iterate: rescaled crops + flips -> noise at a random timestep -> v-prediction loss (min-SNR weighted).
    meta = _meta(config, dataset, size, parameters)
    started, loss_sum, loss_count, smoothed = time.time(), 0.0, 0, None
    budget = config.max_minutes * 60.0
    bar = tqdm(total=config.iterations, desc="train-generator", unit="it", dynamic_ncols=True, mininterval=1.0)
    completed = 0
    unet.train()
    for iteration in range(config.iterations):
        thread_governor().tick()  # load-aware thread count (segsynth.cpu)
        progress = iteration / config.iterations
        if budget > 0:
            progress = max(progress, (time.time() - started) / budget)
            if progress >= 1.0:
                break
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(config.lr, iteration, config.warmup, progress)
        rng = np.random.default_rng([config.seed, iteration])
        torch_rng = torch.Generator("cpu").manual_seed(config.seed * 1_000_003 + iteration)
        batch_images, batch_masks = _training_batch(images, labels, size, config, rng)
        clean = encode_images(batch_images).to(device)
        condition = encode_masks(batch_masks.numpy(), dataset.num_classes).to(device)
        noise = torch.randn(clean.shape, generator=torch_rng).to(device)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (clean.shape[0],), generator=torch_rng).to(device)
        noisy = noise_schedule.add_noise(clean, noise, timesteps)
        target = noise_schedule.get_velocity(clean, noise, timesteps)
        predicted = unet(torch.cat([noisy, condition], dim=1), timesteps).sample
        per_sample = (predicted.float() - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * _loss_weights(alphas_cumprod, timesteps, config.min_snr_gamma)).mean()
        check_finite(loss, iteration + 1, config.iterations, config.lr,
                     saved=(f"the model saved earlier in {out} is intact" if (out / GENERATOR_FILE).is_file()
                            else f"no model was saved in {out}"), before_raise=bar.close)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema.step(unet.parameters())

        value = loss.item()
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        loss_sum, loss_count = loss_sum + value, loss_count + 1
        completed = done = iteration + 1
        if done % config.log_every == 0:
            elapsed = time.time() - started
            append_jsonl(log_path, {"iteration": done, "loss": round(loss_sum / loss_count, 5), "lr": optimizer.param_groups[0]["lr"],
                                    "elapsed_s": round(elapsed, 1), "images_per_s": round(done * config.batch_size / elapsed, 2)})
            loss_sum, loss_count = 0.0, 0
            bar.set_postfix(loss=f"{smoothed:.4f}")
        bar.update(1)
        if done % config.save_every == 0 and done < config.iterations:
            _save(out, unet, ema, noise_schedule, {**meta, "training": _stats(config, done, started, smoothed, finished=False)})
    bar.close()

    # 5. The final model: EMA weights, the noise schedule and the metadata, swapped in whole.
    _save(out, unet, ema, noise_schedule, {**meta, "training": _stats(config, completed, started, smoothed, finished=True)})
    return out


def _training_batch(images, labels, size, config: TrainGeneratorConfig, rng: np.random.Generator):
    """A random rescaled crop (and flip) of randomly drawn pairs, resized to the working size."""
    out_images, out_masks = [], []
    for index in rng.integers(0, len(images), config.batch_size):
        image, label = images[index], labels[index]
        height, width = label.shape
        scale = rng.uniform(config.crop_scale, 1.0)
        crop_h, crop_w = max(8, int(round(height * scale))), max(8, int(round(width * scale)))
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        image = image[:, top: top + crop_h, left: left + crop_w].float()[None]
        label = label[top: top + crop_h, left: left + crop_w].float()[None, None]
        image = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        label = F.interpolate(label, size=size, mode="nearest-exact")[0, 0].to(torch.uint8)
        if config.flip and rng.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        out_images.append(image.clamp(0, 255))
        out_masks.append(label)
    return torch.stack(out_images), torch.stack(out_masks)


def _loss_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights for v-prediction: min(SNR, gamma) / (SNR + 1) (Hang et al. 2023)."""
    if gamma <= 0:
        return torch.ones(len(timesteps), device=timesteps.device)
    alpha = alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha).clamp(min=1e-8)
    return snr.clamp(max=gamma) / (snr + 1)


def _meta(config: TrainGeneratorConfig, dataset, size, parameters: int) -> dict:
    return {"format": FORMAT, "segsynth_version": __version__, "classes": list(dataset.classes),
            "palette": [list(c) for c in dataset.palette], "size": list(size), "patch": PATCH,
            "conditioning": "one-hot mask + ignore channel, concatenated to the noisy input",
            "sampling": {"steps": config.sample_steps, "scheduler": config.sample_scheduler},
            "parameters": parameters, "data": config.data, "split": config.split, "train_config": to_dict(config)}


def _stats(config: TrainGeneratorConfig, done: int, started: float, smoothed_loss, finished: bool) -> dict:
    seconds = time.time() - started
    return {"iterations": done, "finished": finished, "seconds": round(seconds, 1), "minutes": round(seconds / 60, 2),
            "images_seen": done * config.batch_size, "images_per_s": round(done * config.batch_size / max(seconds, 1e-9), 2),
            "loss": None if smoothed_loss is None else round(smoothed_loss, 5)}


def _save(out: Path, unet: UNet2DModel, ema: EMAModel, noise_schedule: DDPMScheduler, meta: dict) -> None:
    """Write the EMA model, its noise schedule and its metadata, swapped in whole (segsynth.io.staged_swap)."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    try:
        with staged_swap(out, ["unet", "scheduler", GENERATOR_FILE], what="generator") as staging:
            unet.save_pretrained(staging / "unet", safe_serialization=True)
            noise_schedule.save_pretrained(staging / "scheduler")
            atomic_write_json(staging / GENERATOR_FILE, meta)
    finally:
        ema.restore(unet.parameters())
