"""`text2mask-sd:DIR`: a fine-tuned Stable Diffusion (1.x/2.x or SDXL) drawing colour-coded masks from captions.

DIR is a `segsynth train-generator --kind text2mask-sd` folder: a complete
diffusers pipeline folder plus segsynth_generator.json with the classes and the
colour coding its samples decode by. Text requests (a plan made with
`segsynth plan --captions FILE --per-caption N`) go through the diffusers
pipeline; each sample is the drawn colour map (image and extras/colour_mask)
and, after `finish` (synthesize's writer thread), its decoding (label;
generators/colour_decoding.py), exactly as the CPU `text2mask:DIR` model's.

Determinism: each sample's initial latents come from its own CPU generator
seeded with its seed, which the pipeline also uses for any later noise, so a
sample's pixels depend on (model, prompt, seed, settings) and not on its batch,
as for every backend (generators/base.py). The default sampler (DPM-Solver++)
adds no noise.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

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
    resolve_device,
    resolve_dtype,
)
from segsynth.generators.colour_decoding import ColourMaskDecoding
from segsynth.generators.controlnet import finish_pipeline
from segsynth.generators.schedulers import scheduler_name
from segsynth.generators.text2mask_sd.model import folder_parts
from segsynth.generators.text2mask_sd.train import FORMAT, GENERATOR_FILE
from segsynth.io import SegsynthError

REQUIRED_FILES = (GENERATOR_FILE, "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                  "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                  "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json")
SDXL_FILES = ("text_encoder_2/config.json", "text_encoder_2/model.safetensors", "tokenizer_2/tokenizer_config.json")


def check_text2mask_sd_folder(folder: Path) -> dict:
    """A clear error naming the missing files, before anything is loaded; returns the metadata."""
    meta = check_model_folder(folder, REQUIRED_FILES, GENERATOR_FILE, FORMAT, "text2mask-sd model",
                              "train-generator --kind text2mask-sd")
    missing = [name for name in SDXL_FILES if meta.get("sdxl") and not (folder / name).is_file()]
    if missing:
        raise SegsynthError(f"{folder}: an SDXL text2mask-sd model, missing {', '.join(missing)}; give a "
                            "`segsynth train-generator --kind text2mask-sd --out` folder (or rerun that training)")
    return meta


class SDTextToMaskGenerator(ColourMaskDecoding, Generator):
    """Text -> (colour map, decoded label map) with a fine-tuned diffusers text-to-image model."""

    name = "text2mask-sd"
    request_kinds = ("text",)
    uses_prompts = True

    def __init__(self, folder: str | os.PathLike, settings: GeneratorSettings | None = None):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        settings = settings or GeneratorSettings()
        self.folder, self.settings = Path(folder), settings

        # 1. Files, metadata and settings first: nothing is loaded until they pass.
        self.meta = check_text2mask_sd_folder(self.folder)
        self.setup_decoding(self.meta, self.folder / GENERATOR_FILE)
        unused = [name for name, value in (("controlnet", settings.controlnet), ("lcm_lora", settings.lcm_lora),
                                           ("captions", settings.captions), ("lora", settings.lora))
                  if value is not None]
        if unused:
            raise SegsynthError(f"the text2mask-sd generator takes no {', '.join(unused)} (prompts come from the "
                                "plan's text requests); leave those settings unset")
        self.classes = tuple(self.meta["classes"])
        self.sdxl = bool(self.meta["sdxl"])
        sampling = self.meta["sampling"]
        self.steps = settings.steps or sampling["steps"]
        self.guidance = float(sampling["guidance"] if settings.guidance is None else settings.guidance)
        if self.guidance < 0:
            raise SegsynthError(f"guidance {self.guidance}: give a scale >= 0 (1 = no guidance)")
        self.scheduler_name = scheduler_name(settings.scheduler or sampling["scheduler"])
        if self.scheduler_name == "lcm":
            raise SegsynthError("the text2mask-sd model is not consistency-distilled; use dpm++, unipc, ddim or euler")
        self.size = tuple(int(v) for v in (settings.resolution or self.meta["size"]))
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)

        # 2. The pipeline, from the folder's safetensors only.
        pipeline_class = StableDiffusionXLPipeline if self.sdxl else StableDiffusionPipeline
        extra = {"add_watermarker": False} if self.sdxl else {"safety_checker": None, "feature_extractor": None,
                                                             "requires_safety_checker": False}
        try:
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipeline = pipeline_class.from_pretrained(self.folder, torch_dtype=self.dtype, use_safetensors=True,
                                                      **extra)
        except (OSError, ValueError, EnvironmentError) as error:
            raise SegsynthError(f"cannot load the text2mask-sd model {self.folder}: {str(error).splitlines()[0]}; "
                                "the folder is damaged: retrain it") from None
        self.pipeline = finish_pipeline(pipeline, None, self.scheduler_name, self.device)
        self.latent_factor = pipeline.vae_scale_factor
        self.latent_channels = pipeline.unet.config.in_channels
        multiple = self.latent_factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
        if len(self.size) != 2 or any(v < multiple or v % multiple for v in self.size):
            raise SegsynthError(f"--resolution {list(self.size)}: H and W must be multiples of {multiple} for "
                                f"{self.folder}")
        digest = hashlib.sha256()
        for part in folder_parts(self.sdxl):
            path = self.folder / part
            digest.update(f"{part}:{folder_fingerprint(path) if path.is_dir() else path.read_bytes().hex()};".encode())
        self.fingerprint = digest.hexdigest()[:16]

    def check_dataset(self, classes: Sequence[str], palette: Sequence[Sequence[int]]) -> None:
        check_trained_classes(self.folder, self.classes, classes, "a text2mask-sd model")

    def check_requests(self, requests: Sequence[Request]) -> None:
        empty = [request.id for request in requests if not request.prompt.strip()]
        if empty:
            raise SegsynthError(f"{len(empty)} text request(s) have an empty prompt, e.g. {empty[:3]}; every text "
                                "-> mask sample needs a caption")

    def working_size(self, mask_shape: tuple[int, int] | None) -> tuple[int, int]:
        return self.size

    def prepare(self, conditions: list[Condition]) -> Prepared:
        """Each sample's CPU generator, and the initial latents drawn from it (loader thread)."""
        height, width = self.size
        seeds = [condition.request.seed for condition in conditions]
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        shape = (self.latent_channels, height // self.latent_factor, width // self.latent_factor)
        latents = torch.stack([torch.randn(shape, generator=generator) for generator in generators])
        return Prepared(self.size, [c.prompt for c in conditions], seeds,
                        {"generators": generators, "latents": latents}, list(conditions))

    @torch.no_grad()
    def run(self, prepared: Prepared) -> list[GeneratedSample]:
        """The drawn colour maps; their labels are decoded in `finish` (the writer thread in synthesize)."""
        height, width = prepared.size
        negative = [self.settings.negative_prompt] * len(prepared.prompts) if self.settings.negative_prompt else None
        result = self.pipeline(prompt=prepared.prompts, height=height, width=width, num_inference_steps=self.steps,
                               guidance_scale=self.guidance, negative_prompt=negative,
                               generator=prepared.tensors["generators"],
                               latents=prepared.tensors["latents"].to(self.device, self.dtype), output_type="np")
        pictures = [(np.clip(image, 0, 1) * 255).round().astype(np.uint8) for image in result.images]
        return [self.colour_sample(picture, prompt) for picture, prompt in zip(pictures, prepared.prompts)]

    def sample_prompts(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[GeneratedSample]:
        """Samples for prompts and seeds directly (the API for callers without a plan)."""
        conditions = [Condition(Request(f"text{i}_s{seed}", "text", int(seed), prompt=prompt), None, prompt)
                      for i, (prompt, seed) in enumerate(zip(prompts, seeds))]
        return self.generate(conditions)

    def identity(self) -> dict:
        return {"name": self.name, "path": str(self.folder.resolve()), "fingerprint": self.fingerprint,
                "sdxl": self.sdxl, "steps": self.steps, "scheduler": self.scheduler_name, "guidance": self.guidance,
                "negative_prompt": self.settings.negative_prompt, "size": list(self.size),
                "dtype": str(self.dtype).replace("torch.", ""), "decoding": self.decoding_identity()}


__all__ = ["SDTextToMaskGenerator", "check_text2mask_sd_folder"]
