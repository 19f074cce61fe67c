"""Sampling the built-in mask -> image generators: the trained `MaskDenoiser` and a DPM-Solver++ (or other)
scheduler, called directly, with classifier-free guidance when the model was trained for it.

`BuiltinGenerator` samples the pixel model; the latent generator (generators/latent/sample.py) subclasses it
and changes what a sample is made of (its folder, its networks, the noise shape, the decoding)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from segsynth.generators.base import (Condition, GeneratorSettings, MaskToImageGenerator, Prepared,
                                      check_trained_classes, file_fingerprint, initial_noise, resolve_device)
from segsynth.generators.builtin.model import (PATCH, MaskDenoiser, check_generator_folder, decode_images, encode_images,
                                              encode_masks)
from segsynth.generators.lora import folder_identity, load_adapter
from segsynth.generators.schedulers import make_scheduler, scheduler_name
from segsynth.io import SegsynthError, loading


class BuiltinGenerator(MaskToImageGenerator):
    """Samples a trained builtin model: the UNet and a DPM-Solver++ (or other) scheduler, called directly."""

    name = "builtin"
    uses_prompts = False
    takes_source_images = True

    def __init__(self, folder: str | os.PathLike, settings: GeneratorSettings | None = None):
        settings = settings or GeneratorSettings()
        self.folder = Path(folder)
        self.meta = self.check_folder(self.folder)
        unused = [name for name, value in (("controlnet", settings.controlnet), ("lcm_lora", settings.lcm_lora),
                                           ("captions", settings.captions)) if value is not None]
        if unused:
            raise SegsynthError(f"the {self.name} generator takes no {', '.join(unused)} (mask-only conditioning); "
                                "leave those settings unset")
        if settings.resolution and tuple(settings.resolution) != tuple(self.meta["size"]):
            raise SegsynthError(f"{self.folder}: the model works at {self.meta['size']} (H,W) only; drop --resolution")
        self.classes = tuple(self.meta["classes"])
        self.size = tuple(self.meta["size"])
        sampling = self.meta["sampling"]
        self.steps = settings.steps or sampling["steps"]
        scale = float(settings.guidance if settings.guidance is not None else sampling.get("guidance", 1.0))
        if scale != 1.0 and not self.meta.get("cond_dropout"):
            raise SegsynthError(f"{self.folder}: guidance {scale:g} needs a model trained with --cond-dropout > 0 "
                                "(this one has no unconditional mode); use guidance 1 or retrain with "
                                "--cond-dropout 0.1")
        # classifier-free guidance scale; None at 1 (no guidance), as before guidance existed, so manifests
        # and identities of unguided sets stay what they were
        self.guidance = None if scale == 1.0 else scale
        # SDEdit (Meng et al. 2022): start from the mask's own image noised to this share of the schedule and run
        # only the remaining steps, so the sample keeps that image's layout and colours and the model redraws
        # the detail; None renders from pure noise
        self.strength = None if settings.strength is None else float(settings.strength)
        if self.strength is not None:
            if not 0.0 < self.strength <= 1.0:
                raise SegsynthError(f"strength {self.strength:g} is outside (0, 1]: 1 starts from pure noise, "
                                    "small values stay close to the source image")
            if self.denoising_steps() < 1:
                raise SegsynthError(f"strength {self.strength:g} with {self.steps} steps runs no denoising step; "
                                    f"raise --strength to at least {1 / self.steps:g} or --steps")
        self.scheduler_name = scheduler_name(settings.scheduler or sampling["scheduler"])
        if self.scheduler_name == "lcm":
            raise SegsynthError(f"the {self.name} generator is not consistency-distilled; use dpm++, unipc, ddim or "
                                "euler")
        self.device = resolve_device(settings.device)
        if settings.dtype not in ("auto", "fp32", "float32"):
            raise SegsynthError(f"the {self.name} generator runs in fp32 only (got dtype {settings.dtype!r})")
        # fp32 always: the shipped toy model is stored in fp16 to keep the package small
        with loading(self.folder, "the generator folder is damaged: restore it, or rerun `segsynth train-generator`",
                     "the generator"):
            self.denoiser = self.load_denoiser().to(self.device).eval()
            self.noise_schedule_config = DDPMScheduler.from_pretrained(self.folder, subfolder="scheduler").config
        self.fingerprint = self.weights_fingerprint()
        self.lora = None  # a LoRA adapter (`segsynth adapt`) made for this model, merged into its UNet
        if settings.lora:
            self.lora = load_adapter(self.unet, settings.lora, settings.lora_scale, self.adapter_base(),
                                     f"{self.name}:{self.folder}")

    @property
    def unet(self):
        """The denoiser's UNet (what a LoRA adapter adapts)."""
        return self.denoiser.unet

    def adapter_base(self) -> dict:
        """The identity a LoRA adapter of this model records (generators/lora.py)."""
        return folder_identity(self.name, self.name, self.folder, self.fingerprint)

    # --- what the latent generator changes ---------------------------------------------------------------

    def check_folder(self, folder: Path) -> dict:
        return check_generator_folder(folder)

    def load_denoiser(self) -> MaskDenoiser:
        return MaskDenoiser(UNet2DModel.from_pretrained(self.folder, subfolder="unet", torch_dtype=torch.float32,
                                                        use_safetensors=True))

    def weights_fingerprint(self) -> str:
        return file_fingerprint(self.folder / "unet" / "diffusion_pytorch_model.safetensors")

    def noise_shape(self) -> tuple[int, int, int]:
        height, width = self.size
        return 3 * PATCH * PATCH, height // PATCH, width // PATCH

    def encode_condition(self, masks: np.ndarray) -> torch.Tensor:
        return encode_masks(masks, len(self.classes))

    def decode(self, sample: torch.Tensor) -> list[np.ndarray]:
        return decode_images(sample)

    def encode_source(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float 0..255 at working size -> the model's sample space (for `strength`)."""
        return encode_images(images)

    # --- the contract ------------------------------------------------------------------------------------

    def check_dataset(self, classes: Sequence[str], palette: Sequence[Sequence[int]]) -> None:
        check_trained_classes(self.folder, self.classes, classes, "a generator")

    def working_size(self, mask_shape: tuple[int, int] | None) -> tuple[int, int]:
        return self.size

    def new_scheduler(self):
        """A fresh sampling scheduler (schedulers keep per-run state, so one per batch)."""
        scheduler = make_scheduler(self.scheduler_name, self.noise_schedule_config, timestep_spacing="trailing")
        scheduler.set_timesteps(self.steps)
        return scheduler

    def prepare(self, conditions: list[Condition]) -> Prepared:
        seeds = [condition.request.seed for condition in conditions]
        condition = self.encode_condition(np.stack([c.mask for c in conditions]))
        noise = initial_noise(seeds, self.noise_shape())
        tensors = {"condition": condition, "noise": noise}
        if self.strength is not None:
            tensors["source"] = source_images(conditions, self.size)
        return Prepared(self.size, [c.prompt for c in conditions], seeds, tensors, conditions)

    def denoising_steps(self) -> int:
        """The steps a sample runs: all of them from noise, the last `strength` share of them from a source image."""
        # (+1e-9: 100 x 0.29 is 28.999... in floating point and means 29 steps)
        return self.steps if self.strength is None else min(int(self.steps * self.strength + 1e-9), self.steps)

    @torch.no_grad()
    def render(self, prepared: Prepared) -> list[np.ndarray]:
        condition = prepared.tensors["condition"].to(self.device)
        scheduler = self.new_scheduler()
        noise = prepared.tensors["noise"].to(self.device)
        timesteps = scheduler.timesteps
        if self.strength is None:
            sample = noise * scheduler.init_noise_sigma
        else:  # as diffusers' img2img pipelines: skip the first steps, noise the source to the first one kept
            begin = (self.steps - self.denoising_steps()) * scheduler.order
            timesteps = timesteps[begin:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(begin)
            clean = self.encode_source(prepared.tensors["source"].to(self.device))
            sample = scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(clean)))
        for timestep in timesteps:
            model_input = scheduler.scale_model_input(sample, timestep)
            predicted = self.denoiser.guided(model_input, condition, timestep, self.guidance or 1.0)
            sample = scheduler.step(predicted, timestep, sample).prev_sample
        return self.decode(sample)

    def identity(self) -> dict:
        identity = {"name": self.name, "path": str(self.folder.resolve()), "fingerprint": self.fingerprint,
                    "steps": self.steps, "scheduler": self.scheduler_name, "size": list(self.size), "dtype": "fp32"}
        if self.guidance is not None:
            identity["guidance"] = self.guidance
        if self.strength is not None:
            identity["strength"] = self.strength
        if self.lora:
            identity["lora"] = self.lora
        return identity


def source_images(conditions: list[Condition], size: tuple[int, int]) -> torch.Tensor:
    """The conditions' source images as one (B, 3, H, W) float 0..255 batch, each checked to be at `size`."""
    missing = [c.request.id for c in conditions if c.image is None]
    if missing:
        raise SegsynthError(f"requests {missing[:3]} carry no source image, which a generator opened with a strength "
                            "starts from; render them through `segsynth synthesize` (it reads each mask's image) or "
                            "pass images to render_masks")
    wrong = [c.request.id for c in conditions if tuple(c.image.shape) != (*size, 3)]
    if wrong:
        raise SegsynthError(f"requests {wrong[:3]}: source images must be {size[0]}x{size[1]}x3 (the working size)")
    return torch.from_numpy(np.stack([c.image for c in conditions])).permute(0, 3, 1, 2).float()
