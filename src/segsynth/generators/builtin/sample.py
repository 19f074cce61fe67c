"""Sampling the built-in generator: its UNet and a DPM-Solver++ (or other) scheduler, called directly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from segsynth.generators.base import (Condition, GeneratorSettings, MaskToImageGenerator, Prepared,
                                      check_trained_classes, file_fingerprint, initial_noise, resolve_device)
from segsynth.generators.builtin.model import PATCH, check_generator_folder, decode_images, encode_masks
from segsynth.generators.lora import folder_identity, load_adapter
from segsynth.generators.schedulers import make_scheduler, scheduler_name
from segsynth.io import SegsynthError, loading


class BuiltinGenerator(MaskToImageGenerator):
    """Samples a trained builtin model: the UNet and a DPM-Solver++ (or other) scheduler, called directly."""

    name = "builtin"
    uses_prompts = False

    def __init__(self, folder: str | os.PathLike, settings: GeneratorSettings | None = None):
        settings = settings or GeneratorSettings()
        self.folder = Path(folder)
        self.meta = check_generator_folder(self.folder)
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
        with loading(self.folder, "the generator folder is damaged: restore it, or rerun `segsynth train-generator`",
                     "the generator"):
            self.unet = UNet2DModel.from_pretrained(self.folder, subfolder="unet", torch_dtype=torch.float32,
                                                    use_safetensors=True).to(self.device).eval()
            self.noise_schedule_config = DDPMScheduler.from_pretrained(self.folder, subfolder="scheduler").config
        self.fingerprint = file_fingerprint(self.folder / "unet" / "diffusion_pytorch_model.safetensors")
        self.lora = None  # a LoRA adapter (`segsynth adapt`) made for this model, merged into its UNet
        if settings.lora:
            self.lora = load_adapter(self.unet, settings.lora, settings.lora_scale, self.adapter_base(),
                                     f"builtin:{self.folder}")

    def adapter_base(self) -> dict:
        """The identity a LoRA adapter of this model records (generators/lora.py)."""
        return folder_identity("builtin", "builtin", self.folder, self.fingerprint)

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
        height, width = self.size
        seeds = [condition.request.seed for condition in conditions]
        condition = encode_masks(np.stack([c.mask for c in conditions]), len(self.classes))
        noise = initial_noise(seeds, (3 * PATCH * PATCH, height // PATCH, width // PATCH))
        return Prepared(self.size, [c.prompt for c in conditions], seeds, {"condition": condition, "noise": noise},
                        conditions)

    @torch.no_grad()
    def render(self, prepared: Prepared) -> list[np.ndarray]:
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
                "steps": self.steps, "scheduler": self.scheduler_name, "size": list(self.size), "dtype": "fp32",
                **({"lora": self.lora} if self.lora else {})}
