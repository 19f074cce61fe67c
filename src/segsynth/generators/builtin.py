"""The built-in generator: a small mask-conditioned diffusion model that trains on CPU.

Built from diffusers parts -- a `UNet2DModel` and its noise schedulers -- in
pixel space, with two choices made for CPU budgets:

* Space-to-depth ("patchify", `pixel_unshuffle` by 2): an RxS RGB image becomes
  an R/2 x S/2 x 12 tensor, so every convolution touches 4x fewer positions
  while no pixel is lost and no autoencoder has to be trained first. The
  UNet denoises that tensor; `pixel_shuffle` turns it back into an image.
* The mask is the conditioning, concatenated to the noisy input: a one-hot
  map over the dataset's classes plus one "ignore" channel, patchified the
  same way, so the model sees every label pixel at full resolution.

It is trained with v-prediction on a cosine noise schedule (good for small
images), min-SNR loss weighting (faster convergence), horizontal flips and
random rescaled crops, and an EMA of the weights; it samples with
DPM-Solver++ in ~20 steps.

A trained generator is a diffusers-style folder:

    DIR/unet/config.json, DIR/unet/diffusion_pytorch_model.safetensors   (UNet2DModel.save_pretrained)
    DIR/scheduler/scheduler_config.json                                  (the training noise schedule)
    DIR/segsynth_generator.json   classes, palette, working size, patch, sampling defaults, training stats
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from segsynth import IGNORE_INDEX, __version__
from segsynth.config import field, save_config, to_dict
from segsynth.data import open_dataset
from segsynth.data.validate import quick_check
from segsynth.generators.base import (
    Generator,
    GeneratorSettings,
    Prepared,
    file_fingerprint,
    initial_noise,
    resolve_device,
)
from segsynth.generators.schedulers import make_scheduler, scheduler_name
from segsynth.io import (SegsynthError, append_jsonl, atomic_write_json, default_mode, disk_full_error, is_disk_full,
                         read_json)

GENERATOR_FILE = "segsynth_generator.json"
FORMAT = "segsynth-builtin-generator/1"
REQUIRED_FILES = (
    GENERATOR_FILE,
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
)
PATCH = 2  # space-to-depth factor


@dataclass
class TrainGeneratorConfig:
    data: str = field(help="dataset spec whose (image, mask) pairs the generator learns, e.g. camvid:PATH")
    out: str = field(help="output folder: a builtin generator (load it with --generator builtin:OUT)")
    split: str = field("train", help="split to train on")
    size: list[int] = field([96, 128], help="working resolution H,W (each a multiple of 2*2^(levels-1))")
    channels: list[int] = field([64, 128, 256], help="UNet widths per level (one level per entry)")
    layers_per_block: int = field(2, help="ResNet blocks per UNet level")
    attention: bool = field(True, help="self-attention at the lowest UNet level")
    iterations: int = field(4000, help="training iterations")
    max_minutes: float = field(0.0, help="stop after this many minutes, the LR schedule shortened to fit (0: no limit)")
    batch_size: int = field(16, help="images per iteration")
    lr: float = field(6e-4, help="peak learning rate (AdamW, linear warm-up then cosine decay)")
    warmup: int = field(100, help="warm-up iterations")
    ema_decay: float = field(0.9995, help="largest EMA decay (EMA warm-up ramps towards it)")
    min_snr_gamma: float = field(5.0, help="min-SNR loss weighting gamma (0: plain MSE)")
    crop_scale: float = field(0.7, help="random crops cover this fraction of each side or more, then resize")
    flip: bool = field(True, help="random horizontal flips")
    sample_steps: int = field(20, help="default sampling steps stored with the model")
    sample_scheduler: str = field("dpm++", help="default sampling scheduler stored with the model")
    seed: int = field(0, help="run seed")
    save_every: int = field(500, help="write the (EMA) model every N iterations, so a kill loses little")
    log_every: int = field(50, help="write a OUT/train_log.jsonl line every N iterations")
    device: str = field("auto", help="auto, cpu or cuda")


# --- tensors <-> model space ----------------------------------------------------------


def encode_masks(masks: np.ndarray, num_classes: int) -> torch.Tensor:
    """(B, H, W) uint8 labels -> (B, 4*(C+1), H/2, W/2) float: one-hot plus an ignore channel, patchified."""
    labels = torch.from_numpy(np.ascontiguousarray(masks)).long()
    labels = torch.where(labels == IGNORE_INDEX, torch.full_like(labels, num_classes), labels)
    if labels.max() > num_classes:
        raise SegsynthError(f"mask holds label {int(labels.max())} but the generator knows {num_classes} classes")
    one_hot = F.one_hot(labels, num_classes + 1).permute(0, 3, 1, 2).float()
    return F.pixel_unshuffle(one_hot, PATCH)


def encode_images(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float 0..255 -> (B, 12, H/2, W/2) in [-1, 1]."""
    return F.pixel_unshuffle(images / 127.5 - 1.0, PATCH)


def decode_images(sample: torch.Tensor) -> list[np.ndarray]:
    """Model space -> list of HxWx3 uint8 images."""
    pixels = F.pixel_shuffle(sample.float(), PATCH).clamp(-1, 1)
    pixels = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(pixels)


def build_unet(size: Sequence[int], num_classes: int, channels: Sequence[int], layers_per_block: int,
               attention: bool) -> UNet2DModel:
    levels = len(channels)
    down = ["DownBlock2D"] * (levels - 1) + ["AttnDownBlock2D" if attention else "DownBlock2D"]
    up = ["AttnUpBlock2D" if attention else "UpBlock2D"] + ["UpBlock2D"] * (levels - 1)
    groups = 32 if all(c % 32 == 0 for c in channels) else 8
    return UNet2DModel(
        sample_size=(size[0] // PATCH, size[1] // PATCH),
        in_channels=3 * PATCH * PATCH + (num_classes + 1) * PATCH * PATCH,
        out_channels=3 * PATCH * PATCH,
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=groups,
        attention_head_dim=32,
        resnet_time_scale_shift="scale_shift",  # AdaGN: the timestep scales and shifts every norm
    )


def training_noise_schedule() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=False, timestep_spacing="trailing")


# --- training -----------------------------------------------------------------------------


def train_generator(config: TrainGeneratorConfig) -> Path:
    """Train a builtin generator on a dataset's (image, mask) pairs; returns the generator folder."""
    out = Path(config.out)
    device = resolve_device(config.device)

    # 1. Check the data and the settings before any compute.
    dataset = open_dataset(config.data)
    split = dataset.split(config.split)
    quick_check(dataset, [config.split])
    size = _working_size(config.size, len(config.channels))
    scheduler_name(config.sample_scheduler)
    if config.batch_size < 1 or config.iterations < 1:
        raise SegsynthError("--batch-size and --iterations must be >= 1")

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
        progress = iteration / config.iterations
        if budget > 0:
            progress = max(progress, (time.time() - started) / budget)
            if progress >= 1.0:
                break
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, iteration, progress)
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
        if not torch.isfinite(loss):
            bar.close()  # so the error starts on a line of its own
            raise SegsynthError(f"non-finite loss at iteration {iteration + 1} of {config.iterations}: training "
                                f"diverged; lower the learning rate (--lr {config.lr:g} now; try {config.lr / 10:g})"
                                + (f"; the model saved earlier in {out} is intact" if (out / GENERATOR_FILE).is_file()
                                   else f"; no model was saved in {out}"))
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


def _working_size(values: Sequence[int], levels: int) -> tuple[int, int]:
    if len(values) == 1:
        values = [values[0], values[0]]
    multiple = PATCH * 2 ** (levels - 1)
    if len(values) != 2 or any(v < multiple or v % multiple for v in values):
        raise SegsynthError(f"--size {values}: H and W must be multiples of {multiple} "
                            f"(space-to-depth x{PATCH} and {levels - 1} UNet downsamplings); e.g. 96,128")
    return int(values[0]), int(values[1])


def _learning_rate(config: TrainGeneratorConfig, iteration: int, progress: float) -> float:
    if iteration < config.warmup:
        return config.lr * (iteration + 1) / config.warmup
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


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
    """Write the EMA model into a staging folder, then swap it in: the folder is never half-written."""
    staging = Path(tempfile.mkdtemp(prefix=".generator-", dir=out))
    os.chmod(staging, default_mode(directory=True))  # mkdtemp makes 0700; a model folder should be shareable
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    try:
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        noise_schedule.save_pretrained(staging / "scheduler")
        atomic_write_json(staging / GENERATOR_FILE, meta)
    except BaseException as error:  # the previous weights stay; the staging folder goes
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error):
            raise disk_full_error(out, error) from error
        raise
    finally:
        ema.restore(unet.parameters())
    for name in ("unet", "scheduler", GENERATOR_FILE):
        old = out / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        if (out / name).exists():
            os.replace(out / name, old)
        os.replace(staging / name, out / name)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


# --- sampling ------------------------------------------------------------------------------


def check_generator_folder(folder: Path) -> None:
    """A clear error naming the missing files, before anything is loaded."""
    if not folder.is_dir():
        raise SegsynthError(f"builtin generator folder {folder} does not exist; train one with "
                            f"`segsynth train-generator --data SPEC --out {folder}`")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise SegsynthError(f"{folder}: not a builtin generator, missing {', '.join(missing)}; "
                            "give a `segsynth train-generator --out` folder (or rerun that training)")
    meta = read_json(folder / GENERATOR_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SegsynthError(f"{folder / GENERATOR_FILE}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                            f"expected {FORMAT!r}")


class BuiltinGenerator(Generator):
    """Samples a trained builtin model: the UNet and a DPM-Solver++ (or other) scheduler, called directly."""

    name = "builtin"
    uses_prompts = False

    def __init__(self, folder: str | os.PathLike, settings: GeneratorSettings | None = None):
        settings = settings or GeneratorSettings()
        self.folder = Path(folder)
        check_generator_folder(self.folder)
        self.meta = read_json(self.folder / GENERATOR_FILE)
        unused = [name for name, value in (("guidance", settings.guidance), ("controlnet", settings.controlnet),
                                           ("lcm_lora", settings.lcm_lora), ("captions", settings.captions))
                  if value is not None]
        if unused:
            raise SegsynthError(f"the builtin generator takes no {', '.join(unused)} (mask-only conditioning); "
                                "leave those settings unset")
        if settings.resolution and tuple(settings.resolution) != tuple(self.meta["size"]):
            raise SegsynthError(f"{self.folder}: the model works at {self.meta['size']} (H,W) only; drop --resolution")
        self.classes = tuple(self.meta["classes"])
        self.size = tuple(self.meta["size"])
        self.steps = settings.steps or self.meta["sampling"]["steps"]
        self.scheduler_name = scheduler_name(settings.scheduler or self.meta["sampling"]["scheduler"])
        if self.scheduler_name == "lcm":
            raise SegsynthError("the builtin generator is not consistency-distilled; use dpm++, unipc, ddim or euler")
        self.device = resolve_device(settings.device)
        self.dtype = torch.float32 if settings.dtype in ("auto", "fp32", "float32") else None
        if self.dtype is None:
            raise SegsynthError(f"the builtin generator runs in fp32 only (got dtype {settings.dtype!r})")
        # fp32 always: the shipped toy model is stored in fp16 to keep the package small
        self.unet = UNet2DModel.from_pretrained(self.folder, subfolder="unet", torch_dtype=torch.float32,
                                                use_safetensors=True).to(self.device).eval()
        self.noise_schedule_config = DDPMScheduler.from_pretrained(self.folder, subfolder="scheduler").config
        self.fingerprint = file_fingerprint(self.folder / "unet" / "diffusion_pytorch_model.safetensors")

    def check_dataset(self, classes: Sequence[str], palette: Sequence[Sequence[int]]) -> None:
        if tuple(classes) != self.classes:
            raise SegsynthError(f"{self.folder} was trained on classes {list(self.classes)}, but the dataset has "
                                f"{list(classes)}; train a generator on this dataset's classes")

    def working_size(self, mask_shape: tuple[int, int]) -> tuple[int, int]:
        return self.size

    def new_scheduler(self):
        """A fresh sampling scheduler (schedulers keep per-run state, so one per batch)."""
        scheduler = make_scheduler(self.scheduler_name, self.noise_schedule_config, timestep_spacing="trailing")
        scheduler.set_timesteps(self.steps)
        return scheduler

    def prepare(self, masks: list[np.ndarray], prompts: list[str], seeds: list[int]) -> Prepared:
        height, width = self.size
        condition = encode_masks(np.stack(masks), len(self.classes))
        noise = initial_noise(seeds, (3 * PATCH * PATCH, height // PATCH, width // PATCH))
        return Prepared(self.size, list(prompts), list(seeds), {"condition": condition, "noise": noise})

    @torch.no_grad()
    def run(self, prepared: Prepared) -> list[np.ndarray]:
        condition = prepared.tensors["condition"].to(self.device)
        scheduler = self.new_scheduler()
        sample = prepared.tensors["noise"].to(self.device) * scheduler.init_noise_sigma
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, timestep)
            predicted = self.unet(torch.cat([model_input, condition], dim=1), timestep).sample
            sample = scheduler.step(predicted, timestep, sample).prev_sample
        return decode_images(sample)

    def identity(self) -> dict:
        return {"name": self.name, "path": str(self.folder.resolve()), "fingerprint": self.fingerprint,
                "steps": self.steps, "scheduler": self.scheduler_name, "size": list(self.size), "dtype": "fp32"}
