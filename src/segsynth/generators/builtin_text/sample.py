"""Sampling a trained builtin text generator: prompt -> image (or colour-coded mask).

The UNet, text encoder and tokenizer are called directly (no diffusers
pipeline, whose pixel-space UNet would not fit SD's latent pipelines). Each
sample starts from its own seeded noise (`initial_noise`) and the ODE
schedulers add none, so a sample does not depend on its batch.

Classifier-free guidance (Ho & Salimans 2022): with a scale g != 1 every step
runs the UNet on the batch [unconditional (the negative prompt, "" by
default); conditional] -- in that order, as diffusers pipelines do -- and
uses v_uncond + g * (v_cond - v_uncond).

`run` returns the picture with an all-ignore label for now: turning it into
labels (decoding the colours of a text -> mask model, or reading the
cross-attention of an Attn2mask model) is layered on top through `denoise`,
whose `on_step(step_index, timestep)` hook runs before each UNet call so an
attention-capturing processor knows which step it records.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from segsynth import IGNORE_INDEX
from segsynth.generators.base import (
    check_trained_classes,
    Condition,
    GeneratedSample,
    Generator,
    GeneratorSettings,
    Prepared,
    Request,
    check_model_folder,
    folder_fingerprint,
    initial_noise,
    resolve_device,
)
from segsynth.generators.builtin_text.model import IMAGE_CHANNELS, PATCH, decode_images, encode_text, key_mask
from segsynth.generators.builtin_text.train import FORMAT, GENERATOR_FILE
from segsynth.generators.builtin_text.tokenizer import VOCAB_FILE, WordTokenizer
from segsynth.generators.lora import folder_identity, load_adapter
from segsynth.generators.schedulers import make_scheduler, scheduler_name
from segsynth.io import SegsynthError, loading

REQUIRED_FILES = (
    GENERATOR_FILE,
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    f"tokenizer/{VOCAB_FILE}",
    "scheduler/scheduler_config.json",
)
# The parts whose content decides the pixels (training stats and logs do not).
MODEL_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")


def check_text_generator_folder(folder: Path) -> dict:
    """A clear error naming the missing files, before anything is loaded; returns the metadata."""
    return check_model_folder(folder, REQUIRED_FILES, GENERATOR_FILE, FORMAT, "builtin text generator",
                              "train-text-generator")


class BuiltinTextGenerator(Generator):
    """Text -> picture with a trained builtin text generator folder (see the module docstring)."""

    name = "builtin-text"
    request_kinds = ("text",)
    uses_prompts = True

    def __init__(self, folder: str | os.PathLike, settings: GeneratorSettings | None = None):
        settings = settings or GeneratorSettings()
        self.folder = Path(folder)

        # 1. Files and settings first: nothing is loaded until they pass.
        self.meta = check_text_generator_folder(self.folder)
        unused = [name for name, value in (("controlnet", settings.controlnet), ("lcm_lora", settings.lcm_lora),
                                           ("captions", settings.captions)) if value is not None]
        if unused:
            raise SegsynthError(f"the builtin text generator takes no {', '.join(unused)}; leave those settings unset")
        if settings.resolution and tuple(settings.resolution) != tuple(self.meta["size"]):
            raise SegsynthError(f"{self.folder}: the model works at {self.meta['size']} (H,W) only; drop --resolution")
        self.classes = tuple(self.meta["classes"])
        self.palette = tuple(tuple(colour) for colour in self.meta["palette"])
        self.size = tuple(self.meta["size"])
        self.target = self.meta["target"]
        # models saved before the keys option attend to every prompt token
        self.keys, self.class_token_ids = self.meta.get("keys", "all"), self.meta.get("class_token_ids", [])
        self.steps = settings.steps or self.meta["sampling"]["steps"]
        self.guidance = float(self.meta["sampling"]["guidance"] if settings.guidance is None else settings.guidance)
        if self.guidance < 0:
            raise SegsynthError(f"guidance {self.guidance}: give a scale >= 0 (1 = no guidance)")
        self.negative_prompt = settings.negative_prompt
        self.scheduler_name = scheduler_name(settings.scheduler or self.meta["sampling"]["scheduler"])
        if self.scheduler_name == "lcm":
            raise SegsynthError("the builtin text generator is not consistency-distilled; use dpm++, unipc, ddim or euler")
        self.device = resolve_device(settings.device)
        if settings.dtype not in ("auto", "fp32", "float32"):
            raise SegsynthError(f"the builtin text generator runs in fp32 only (got dtype {settings.dtype!r})")

        # 2. The parts, in fp32.
        with loading(self.folder, "the text generator folder is damaged: restore it, or rerun "
                                  "`segsynth train-text-generator`", "the text generator"):
            self.tokenizer = WordTokenizer.load(self.folder / "tokenizer")
            self.text_encoder = CLIPTextModel.from_pretrained(self.folder / "text_encoder", use_safetensors=True)
            self.text_encoder = self.text_encoder.float().to(self.device).eval()
            self.unet = UNet2DConditionModel.from_pretrained(self.folder, subfolder="unet", torch_dtype=torch.float32,
                                                             use_safetensors=True).to(self.device).eval()
            self.noise_schedule_config = DDPMScheduler.from_pretrained(self.folder, subfolder="scheduler").config
        digest = hashlib.sha256()
        for part in MODEL_PARTS:
            digest.update(f"{part}:{folder_fingerprint(self.folder / part)};".encode())
        self.fingerprint = digest.hexdigest()[:16]

        # 3. A LoRA adapter (`segsynth adapt`) made for this model, merged into its UNet.
        self.lora = None
        if settings.lora:
            self.lora = load_adapter(self.unet, settings.lora, settings.lora_scale, self.adapter_base(),
                                     f"attention:{self.folder}")

    def adapter_base(self) -> dict:
        """The identity a LoRA adapter of this model records (generators/lora.py)."""
        return folder_identity("builtin-text", "attention", self.folder, self.fingerprint)

    def check_dataset(self, classes: Sequence[str], palette: Sequence[Sequence[int]]) -> None:
        check_trained_classes(self.folder, self.classes, classes, "a text generator")

    def check_requests(self, requests: Sequence[Request]) -> None:
        wrong = sorted({request.kind for request in requests} - set(self.request_kinds))
        if wrong:
            raise SegsynthError(f"the builtin text generator makes samples from text prompts only; the plan has "
                                f"{', '.join(wrong)} requests")
        self.tokenizer([request.prompt for request in requests])  # warns once about out-of-vocabulary words

    def working_size(self, mask_shape: tuple[int, int] | None) -> tuple[int, int]:
        return self.size

    def new_scheduler(self):
        """A fresh sampling scheduler (schedulers keep per-run state, so one per batch)."""
        scheduler = make_scheduler(self.scheduler_name, self.noise_schedule_config, timestep_spacing="trailing")
        scheduler.set_timesteps(self.steps)
        return scheduler

    def key_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The UNet's `encoder_attention_mask` for these prompt ids (None: every token), as in training."""
        return key_mask(input_ids, self.keys, self.class_token_ids, self.tokenizer.bos_id)

    def prepare(self, conditions: list[Condition]) -> Prepared:
        height, width = self.size
        prompts = [condition.prompt for condition in conditions]
        seeds = [condition.request.seed for condition in conditions]
        tensors = {"input_ids": self.tokenizer(prompts), "uncond_ids": self.tokenizer([self.negative_prompt]),
                   "noise": initial_noise(seeds, (IMAGE_CHANNELS, height // PATCH, width // PATCH))}
        return Prepared(self.size, prompts, seeds, tensors, list(conditions))

    @torch.no_grad()
    def denoise(self, prepared: Prepared, on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """The sampling loop; returns the final (B, 12, H/2, W/2) sample in model space (`decode_images` makes
        pictures of it). `on_step(step_index, timestep)` runs before each step's UNet call; with guidance != 1
        that call's batch is [unconditional; conditional]."""
        input_ids = prepared.tensors["input_ids"].to(self.device)
        conditional = encode_text(self.text_encoder, input_ids)
        mask = self.key_mask(input_ids)
        guided = self.guidance != 1.0
        if guided:
            uncond_ids = prepared.tensors["uncond_ids"].to(self.device)
            unconditional = encode_text(self.text_encoder, uncond_ids)
            states = torch.cat([unconditional.expand(len(input_ids), -1, -1), conditional])
            if mask is not None:
                mask = torch.cat([self.key_mask(uncond_ids).expand(len(input_ids), -1), mask])
        else:
            states = conditional
        scheduler = self.new_scheduler()
        sample = prepared.tensors["noise"].to(self.device) * scheduler.init_noise_sigma
        for step_index, timestep in enumerate(scheduler.timesteps):
            if on_step is not None:
                on_step(step_index, timestep)
            model_input = scheduler.scale_model_input(sample, timestep)
            if guided:
                predicted = self.unet(torch.cat([model_input, model_input]), timestep, encoder_hidden_states=states,
                                      encoder_attention_mask=mask).sample
                predicted_unconditional, predicted_conditional = predicted.chunk(2)
                predicted = predicted_unconditional + self.guidance * (predicted_conditional - predicted_unconditional)
            else:
                predicted = self.unet(model_input, timestep, encoder_hidden_states=states,
                                      encoder_attention_mask=mask).sample
            sample = scheduler.step(predicted, timestep, sample).prev_sample
        return sample

    def run(self, prepared: Prepared) -> list[GeneratedSample]:
        images = decode_images(self.denoise(prepared))
        samples = []
        for image, prompt in zip(images, prepared.prompts):
            meta = {"prompt": prompt}
            _, unknown = self.tokenizer.encode(prompt)
            if unknown:
                meta["unknown_words"] = unknown
            samples.append(GeneratedSample(image, np.full(image.shape[:2], IGNORE_INDEX, np.uint8), meta=meta))
        return samples

    def sample_prompts(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[GeneratedSample]:
        """Samples for prompts and seeds directly (the API for callers without a plan)."""
        conditions = [Condition(Request(f"text{i}_s{seed}", "text", int(seed), prompt=prompt), None, prompt)
                      for i, (prompt, seed) in enumerate(zip(prompts, seeds))]
        return self.generate(conditions)

    def identity(self) -> dict:
        return {"name": self.name, "path": str(self.folder.resolve()), "fingerprint": self.fingerprint,
                "steps": self.steps, "scheduler": self.scheduler_name, "guidance": self.guidance,
                "negative_prompt": self.negative_prompt, "size": list(self.size), "target": self.target,
                "dtype": "fp32", **({"lora": self.lora} if self.lora else {})}
