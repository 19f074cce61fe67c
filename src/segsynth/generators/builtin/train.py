"""Training the built-in mask -> image generators: v-prediction on a cosine noise schedule, min-SNR weighting,
an EMA of the weights, optional condition dropout for classifier-free guidance; saved whole through a
staging folder, with a training state that `--resume` continues from.

`train_generator` trains the pixel generator (rescaled crops and flips of the real pairs, 2x2-packed);
`train_denoiser` is the trainer shared with the latent generator (generators/latent/train.py), which hands it
its own networks and batches; the iterations themselves run in generators/training_loop.py.

Determinism and resume: iteration i draws its batch (crops, flips, dropped conditions), noise and timesteps
from generators seeded by (seed, i), the networks have no dropout, and the learning rate is a function of
i, so a run resumed from its last save (OUT/training_state: raw weights, EMA, AdamW state, iteration) ends
with the weights of an uninterrupted run (unless --max-minutes shortens the schedule by wall time: that budget
counts the training time of every session of the run). A resume with a larger --iterations (or, for a run
its --max-minutes ended, a larger --max-minutes) trains a finished model further, on the schedule of the new
length.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from segsynth import __version__
from segsynth.config import save_config, to_dict
from segsynth.data import open_dataset
from segsynth.data.validate import check_before_compute
from segsynth.formats.checkpoint import check_resumed_settings, training_state_folder
from segsynth.generators.base import resize_image_tensor, resolve_device
from segsynth.generators.builtin.model import (FORMAT, GENERATOR_FILE, PATCH, MaskDenoiser, build_unet, encode_images,
                                               encode_masks, training_noise_schedule, working_size)
from segsynth.generators.schedulers import scheduler_name
from segsynth.io import SegsynthError, atomic_write_json, link_or_copy, loading, read_json, staged_swap
from segsynth.outputs import claim_folder
from segsynth.stage_configs import TrainGeneratorConfig, preset_keys, resolve_generator_kind
from segsynth.generators.training_loop import TrainingParts, run_iterations

TRAINING_STATE = "training_state"
# Settings a resumed run may change (everything else must match the saved run).
RESUMABLE_CHANGES = ("out", "resume", "iterations", "max_minutes", "save_every", "keep_every", "log_every", "device",
                     "sample_steps", "sample_scheduler", "guidance")
SNAPSHOTS = "snapshots"

# (generator RNG for this iteration) -> (clean sample in model space, mask condition), both on the CPU
DrawBatch = Callable[[np.random.Generator, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def train_generator(config: TrainGeneratorConfig) -> Path:
    """Train a builtin generator on a dataset's (image, mask) pairs; returns the generator folder."""
    config = resolve_for_machine(config, "builtin")
    with claim_folder(config.out, "train-generator", "train_generator.config.yaml", "TrainGeneratorConfig",
                      markers=(GENERATOR_FILE, TRAINING_STATE)):
        return _train_generator(config)


def check_resumable(config: TrainGeneratorConfig) -> None:
    """With --resume, the saved run's settings must be these (checked before any data is read)."""
    folder = training_state_folder(Path(config.out), TRAINING_STATE) if config.resume else None
    if folder is not None:
        state = read_json(folder / "state.json")
        check_resumed_settings(folder, state.get("train_config", {}), to_dict(config), RESUMABLE_CHANGES)


def resolve_for_machine(config: TrainGeneratorConfig, kind: str) -> TrainGeneratorConfig:
    """The config of a `kind` trainer with the kind's defaults filled in, the size and width from the CPU
    preset unless a GPU is present; says which preset keys it chose."""
    gpu = resolve_device(config.device).type == "cuda"
    chosen = preset_keys(config, gpu)
    resolved = resolve_generator_kind(config, gpu=gpu)
    if config.kind != kind:
        raise SegsynthError(f"this trainer trains the {kind} kind, not {config.kind!r}; use "
                            "segsynth.generators.train_generator_kind")
    if chosen:
        shown = ", ".join(f"--{key.replace('_', '-')} {_shown(getattr(resolved, key))}" for key in chosen)
        tqdm.write(f"train-generator --kind {kind}: {'GPU' if gpu else 'no GPU, so the CPU'} preset: {shown} "
                   "(give them to choose)")
    return resolved


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _train_generator(config: TrainGeneratorConfig) -> Path:
    out = Path(config.out)

    # 1. Check the settings and the data before any compute.
    check_resumable(config)
    dataset = open_dataset(config.data)
    split = dataset.split(config.split)
    check_before_compute(dataset, [config.split])
    size = working_size(config.size, len(config.channels))
    scheduler_name(config.sample_scheduler)
    check_guidance_settings(config)

    # 2. Hold every training pair in memory at native size: crops are cut from originals each iteration.
    pairs = [split[i] for i in tqdm(range(len(split)), desc="load", unit="img", leave=False)]
    images = [torch.from_numpy(p.image).permute(2, 0, 1).contiguous() for p in pairs]
    labels = [torch.from_numpy(p.label).contiguous() for p in pairs]

    # 3. The model: a UNet on packed pixels with the packed one-hot mask concatenated.
    torch.manual_seed(config.seed)
    denoiser = MaskDenoiser(build_unet(size, dataset.num_classes, config.channels, config.layers_per_block,
                                       config.attention))

    def draw_batch(rng: np.random.Generator, torch_rng: torch.Generator):
        batch_images, batch_masks = _training_batch(images, labels, size, config, rng)
        return encode_images(batch_images), encode_masks(batch_masks.numpy(), dataset.num_classes)

    # 4. Train (resuming from OUT/training_state with --resume) and save.
    meta = _meta(config, dataset, size)
    return train_denoiser(config, out, denoiser, draw_batch, meta)


def check_guidance_settings(config: TrainGeneratorConfig) -> None:
    if config.guidance != 1.0 and not config.cond_dropout:
        raise SegsynthError(f"--guidance {config.guidance:g} needs a model trained with --cond-dropout > 0 (e.g. "
                            "0.1): without it the model has no unconditional mode to guide against")


def train_denoiser(config: TrainGeneratorConfig, out: Path, denoiser: MaskDenoiser, draw_batch: DrawBatch,
                   meta: dict, files: dict[str, Callable[[Path], None]] | None = None,
                   fixed: tuple[str, ...] = ()) -> Path:
    """The mask-conditioned generators' training: `denoiser` learns to predict v from the noisy sample and
    the condition `draw_batch` gives (the condition zeroed with probability `cond_dropout`), iterated by
    generators/training_loop.py. `meta` is written as segsynth_generator.json (with the training statistics
    added); `files` are extra entries of the model folder, name -> writer(path), swapped in with it; `fixed`
    are entries written once before training (the latent generator's frozen autoencoder), which every kept
    snapshot holds too, so a snapshot samples like the final model. Returns `out`."""
    device = resolve_device(config.device)
    denoiser.to(device)

    # 1. Noise schedule, optimizer and EMA; the saved state when resuming.
    noise_schedule = training_noise_schedule()
    alphas_cumprod = noise_schedule.alphas_cumprod.to(device)
    parameters = list(denoiser.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    ema = EMAModel(parameters, decay=config.ema_decay, use_ema_warmup=True, power=2 / 3)
    meta = {**meta, "parameters": sum(p.numel() for p in parameters)}
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".generator-*"):  # staging folders of a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    start, seconds_before = 0, 0.0
    state_folder = training_state_folder(out, TRAINING_STATE) if config.resume else None
    if state_folder is not None:
        start, seconds_before = _resume(state_folder, config, denoiser, optimizer, ema, device)
    save_config(config, out / "train_generator.config.yaml")
    saver = _Saver(out, denoiser, noise_schedule, optimizer, ema, meta, files or {}, fixed)

    # 2. One iteration's loss: batch -> dropped conditions -> noise at a random timestep -> v-prediction loss
    #    (min-SNR weighted), every draw from generators seeded by (seed, iteration).
    def batch_loss(iteration: int) -> torch.Tensor:
        rng = np.random.default_rng([config.seed, iteration])
        torch_rng = torch.Generator("cpu").manual_seed(config.seed * 1_000_003 + iteration)
        clean, condition = draw_batch(rng, torch_rng)
        if config.cond_dropout:  # drawn after the batch: a run without dropout draws what it always drew
            condition[torch.from_numpy(rng.random(len(condition)) < config.cond_dropout)] = 0.0
        return denoising_loss(denoiser, noise_schedule, alphas_cumprod, clean.to(device), condition.to(device),
                              torch_rng, config.min_snr_gamma)

    # 3. Iterate, saving the EMA model with its training state as it goes and at the end.
    denoiser.train()
    run_iterations(config, out, TrainingParts(
        name="train-generator", parameters=parameters, optimizer=optimizer, ema=ema, batch_loss=batch_loss,
        save=saver.save, keep=lambda iteration: saver.keep(out / SNAPSHOTS / f"it{iteration}"),
        saved_note=lambda: (f"the model saved earlier in {out} is intact" if (out / GENERATOR_FILE).is_file()
                            else f"no model was saved in {out}")), start, seconds_before)
    return out


def denoising_loss(denoiser: MaskDenoiser, noise_schedule, alphas_cumprod: torch.Tensor, clean: torch.Tensor,
                   condition: torch.Tensor, torch_rng: torch.Generator, min_snr_gamma: float) -> torch.Tensor:
    """Noise at a random timestep, the v-prediction loss, min-SNR weighted; noise and timesteps from `torch_rng`."""
    noise = torch.randn(clean.shape, generator=torch_rng).to(clean.device)
    timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (clean.shape[0],),
                              generator=torch_rng).to(clean.device)
    noisy = noise_schedule.add_noise(clean, noise, timesteps)
    target = noise_schedule.get_velocity(clean, noise, timesteps)
    predicted = denoiser(noisy, condition, timesteps)
    per_sample = (predicted.float() - target).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * _loss_weights(alphas_cumprod, timesteps, min_snr_gamma)).mean()


def _training_batch(images, labels, size, config: TrainGeneratorConfig, rng: np.random.Generator):
    """A random rescaled crop (and flip) of randomly drawn pairs, resized to the working size."""
    out_images, out_masks = [], []
    for index in rng.integers(0, len(images), config.batch_size):
        image, label = rescaled_crop(images[index], labels[index], size, config.crop_scale, rng)
        if config.flip and rng.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        out_images.append(image)
        out_masks.append(label)
    return torch.stack(out_images), torch.stack(out_masks)


def rescaled_crop(image: torch.Tensor, label: torch.Tensor, size, crop_scale: float, rng: np.random.Generator):
    """A random crop covering `crop_scale` or more of each side of a (3, H, W) uint8 image and its (H, W)
    label, resized to `size`: (3, h, w) float in 0..255 (bilinear, antialiased) and (h, w) uint8 (nearest)."""
    height, width = label.shape
    scale = rng.uniform(crop_scale, 1.0)
    crop_h, crop_w = max(8, int(round(height * scale))), max(8, int(round(width * scale)))
    top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
    return resize_pair(image[:, top: top + crop_h, left: left + crop_w], label[top: top + crop_h, left: left + crop_w],
                       size)


def resize_pair(image: torch.Tensor, label: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
    label = F.interpolate(label.float()[None, None], size=tuple(size), mode="nearest-exact")[0, 0].to(torch.uint8)
    return resize_image_tensor(image, size), label


def _loss_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights for v-prediction: min(SNR, gamma) / (SNR + 1) (Hang et al. 2023)."""
    if gamma <= 0:
        return torch.ones(len(timesteps), device=timesteps.device)
    alpha = alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha).clamp(min=1e-8)
    return snr.clamp(max=gamma) / (snr + 1)


def _meta(config: TrainGeneratorConfig, dataset, size) -> dict:
    return {"format": FORMAT, "segsynth_version": __version__, "classes": list(dataset.classes),
            "palette": [list(c) for c in dataset.palette], "size": list(size), "patch": PATCH,
            "conditioning": "one-hot mask + ignore channel, concatenated to the noisy input",
            **sampling_meta(config), "data": config.data, "split": config.split, "train_config": to_dict(config)}


def sampling_meta(config: TrainGeneratorConfig) -> dict:
    """The sampling defaults stored with a model, and whether it has an unconditional mode (guidance)."""
    return {"sampling": {"steps": config.sample_steps, "scheduler": config.sample_scheduler,
                         "guidance": config.guidance},
            "cond_dropout": config.cond_dropout}


# --- saving and resuming ---------------------------------------------------------------------------------


class _Saver:
    """Writes the EMA model, its noise schedule, the metadata, the extra `files` and the training state into a
    staging folder, then swaps each in (segsynth.io.staged_swap). The training state goes first, so a resume
    always finds a whole one (or its `.old` copy when a kill fell between two renames). `fixed` entries are
    not rewritten by a save, but a snapshot holds them too."""

    def __init__(self, out: Path, denoiser: MaskDenoiser, noise_schedule, optimizer, ema: EMAModel, meta: dict,
                 files: dict[str, Callable[[Path], None]], fixed: tuple[str, ...] = ()):
        self.out, self.denoiser, self.noise_schedule = out, denoiser, noise_schedule
        self.optimizer, self.ema, self.meta, self.files, self.fixed = optimizer, ema, meta, files, fixed

    def model_files(self) -> list[str]:
        """What a generator folder holds besides its training state and its fixed entries."""
        return [*self.denoiser.parts(), "scheduler", *self.files, GENERATOR_FILE]

    def keep(self, folder: Path) -> None:
        """A copy of the model just saved (no training state), whole or not at all: a snapshot. The fixed
        entries are hard-linked where the file system allows (a snapshot of the latent generator would
        otherwise copy the autoencoder each time)."""
        if folder.exists():  # a resumed run passing an iteration it had kept already
            return
        staging = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        copies = [(name, shutil.copy2) for name in self.model_files()] + [(name, link_or_copy) for name in self.fixed]
        for name, copy in copies:
            source = self.out / name
            if source.is_dir():
                shutil.copytree(source, staging / name, copy_function=copy)
            else:
                copy(source, staging / name)
        staging.rename(folder)

    def save(self, stats: dict) -> None:
        meta = {**self.meta, "training": stats}
        parameters = list(self.denoiser.parameters())
        names = [TRAINING_STATE, *self.model_files()]
        with staged_swap(self.out, names, what="generator") as staging:
            save_training_state(staging / TRAINING_STATE, self.denoiser, self.optimizer, self.ema, meta)
            self.ema.store(parameters)
            self.ema.copy_to(parameters)
            try:
                for name, module in self.denoiser.parts().items():
                    module.save_pretrained(staging / name, safe_serialization=True)
            finally:
                self.ema.restore(parameters)
            self.noise_schedule.save_pretrained(staging / "scheduler")
            for name, write in self.files.items():
                write(staging / name)
            atomic_write_json(staging / GENERATOR_FILE, meta)


def save_training_state(folder: Path, model: torch.nn.Module, optimizer, ema: EMAModel, meta: dict) -> None:
    """Raw weights, EMA shadow weights and AdamW state as safetensors, the iteration and settings as JSON."""
    folder.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, folder / "weights.safetensors")
    ema_state = ema.state_dict()
    save_file({f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(ema_state.pop("shadow_params"))},
              folder / "ema.safetensors", metadata={"state": json.dumps(ema_state)})
    state = optimizer.state_dict()
    tensors = {f"state.{index}.{key}": value.detach().contiguous().cpu() for index, entry in state["state"].items()
               for key, value in entry.items()}
    save_file(tensors, folder / "optimizer.safetensors", metadata={"param_groups": json.dumps(state["param_groups"])})
    atomic_write_json(folder / "state.json", {"iteration": meta["training"]["iterations"],
                                              "seconds": meta["training"]["seconds"],
                                              "train_config": meta["train_config"]})


def _resume(folder: Path, config: TrainGeneratorConfig, denoiser: MaskDenoiser, optimizer, ema: EMAModel,
            device: torch.device) -> tuple[int, float]:
    """Load the saved training state into the fresh networks; returns (iteration, seconds trained so far)."""
    state = read_json(folder / "state.json")
    check_resumed_settings(folder, state.get("train_config", {}), to_dict(config), RESUMABLE_CHANGES)
    with loading(folder, "the training state is damaged: train again into a new --out (or without --resume)",
                 "the training state"):
        return load_training_state(folder, state, denoiser, optimizer, ema, device)


def load_ema_and_optimizer(folder: Path, ema: EMAModel, optimizer, device: torch.device) -> None:
    """A saved training state's EMA weights and AdamW state (ema.safetensors, optimizer.safetensors), loaded; the
    builtin generators' and the builtin text generator's trainers save them alike."""
    with safe_open(str(folder / "ema.safetensors"), framework="pt") as handle:
        ema_state = json.loads(handle.metadata()["state"])
    shadow = load_file(str(folder / "ema.safetensors"))
    ema.load_state_dict({**ema_state, "shadow_params": [shadow[f"shadow.{i}"].to(device) for i in range(len(shadow))]})
    with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as handle:
        groups = json.loads(handle.metadata()["param_groups"])
    optimizer_state: dict = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        _, index, name = key.split(".", 2)
        # AdamW keeps `step` on the CPU and its moments beside the parameters
        optimizer_state.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})


def load_training_state(folder: Path, state: dict, model: torch.nn.Module, optimizer, ema: EMAModel,
                        device: torch.device) -> tuple[int, float]:
    """(iteration, seconds) of a saved training state, with the model, EMA and optimizer loaded from it."""
    model.load_state_dict(load_file(str(folder / "weights.safetensors")))
    load_ema_and_optimizer(folder, ema, optimizer, device)
    return int(state["iteration"]), float(state.get("seconds", 0.0))
