"""The parts of a diffusers text-to-image model, loaded one by one, and the prompt encoding its pipeline uses.

Parts are loaded with their own `from_pretrained` calls (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, CLIPTokenizer and the noise scheduler; SDXL adds
CLIPTextModelWithProjection and a second tokenizer), the same calls for a hub id
and a local folder, so the tiny random models of the tests go through exactly
the code path of SD 1.5 and SDXL. SDXL is recognised by its UNet: extra "text_time"
conditioning (pooled text embedding + image size and crop numbers).

Prompts are encoded by the diffusers pipeline built from these parts
(`pipeline.encode_prompt`), in training and in sampling alike, so what the UNet
is fine-tuned on is exactly what it is later sampled with.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from segsynth.generators.controlnet import check_model_location
from segsynth.io import SegsynthError

# What a diffusers text-to-image folder needs for the parts loaded here (SDXL: plus text_encoder_2, tokenizer_2).
BASE_FILES = [("model_index.json",), ("unet/config.json",), ("vae/config.json",), ("text_encoder/config.json",),
              ("scheduler/scheduler_config.json",)]
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")


@dataclass
class Parts:
    """A text-to-image model's parts. `pipeline` is the diffusers pipeline made of them (for prompt encoding,
    sampling and saving)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    sdxl: bool
    pipeline: object

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must divide by this: the VAE's factor times every UNet downsampling."""
        return self.latent_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def native_size(self) -> tuple[int, int]:
        sample = self.unet.config.sample_size
        sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
        return int(sample[0]) * self.latent_factor, int(sample[1]) * self.latent_factor


def load_parts(source: str, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
               unet_dtype: torch.dtype | None = None, use_safetensors: bool | None = None,
               what: str = "base model") -> Parts:
    """Load every part from a hub id or a diffusers folder, in `dtype` unless `vae_dtype` / `unet_dtype` say
    otherwise; errors name the source and say what is wrong."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    diffusers_logging.disable_progress_bar()
    check_model_location(source, what, BASE_FILES)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
    load = {"use_safetensors": use_safetensors}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=unet_dtype or dtype,
                                                    **load)
        sdxl = unet.config.addition_embed_type == "text_time"
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype or dtype, **load)
        text_encoders = [CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype, **load)]
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")]
        if sdxl:
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2",
                                                                             torch_dtype=dtype, **load))
            tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2"))
        scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, ValueError, EnvironmentError) as error:
        raise SegsynthError(f"cannot load the text-to-image model {source!r} (UNet2DConditionModel, AutoencoderKL, "
                            f"CLIP text encoder(s) and tokenizer(s)): {str(error).splitlines()[0]}") from None
    if unet.config.addition_embed_type not in (None, "text_time"):
        raise SegsynthError(f"{source}: UNet conditioning {unet.config.addition_embed_type!r} is neither SD 1.x/2.x "
                            "(none) nor SDXL (text_time); text2mask-sd fine-tunes those two families")
    for encoder in text_encoders:
        encoder.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    parts = Parts(unet, vae, text_encoders, tokenizers, scheduler_config, sdxl, None)
    parts.pipeline = make_pipeline(parts)
    return parts


def make_pipeline(parts: Parts, unet: torch.nn.Module | None = None, scheduler: str = "ddpm"):
    """The diffusers pipeline of these parts (with `unet` in place of theirs when given), a `scheduler`
    (generators.schedulers name, or ddpm) on the base's noise schedule, no safety checker, no watermark, no
    progress bars."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from segsynth.generators.schedulers import make_scheduler

    scheduler = (DDPMScheduler.from_config(parts.scheduler_config) if scheduler == "ddpm"
                 else make_scheduler(scheduler, parts.scheduler_config))
    unet = parts.unet if unet is None else unet
    if parts.sdxl:
        pipeline = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoders[0],
                                             text_encoder_2=parts.text_encoders[1], tokenizer=parts.tokenizers[0],
                                             tokenizer_2=parts.tokenizers[1], unet=unet, scheduler=scheduler,
                                             add_watermarker=False)
    else:
        pipeline = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoders[0],
                                           tokenizer=parts.tokenizers[0], unet=unet, scheduler=scheduler,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def encode_prompts(parts: Parts, prompts: Sequence[str], dropped: torch.Tensor, device: torch.device,
                   size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """The UNet's text conditioning for a training batch, as the pipeline makes it at sampling time:
    (encoder_hidden_states, added_cond_kwargs). `dropped` marks prompts replaced by the unconditional input
    (classifier-free guidance): the empty prompt for SD; zeros for SDXL, whose pipeline uses zeros for an
    empty negative prompt (force_zeros_for_empty_prompt)."""
    prompts = ["" if drop else prompt for prompt, drop in zip(prompts, dropped.tolist())]
    if not parts.sdxl:
        states, _ = parts.pipeline.encode_prompt(prompts, device, 1, False)
        return states, {}
    states, _, pooled, _ = parts.pipeline.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False)
    if parts.pipeline.config.force_zeros_for_empty_prompt and dropped.any():
        keep = (~dropped).to(device, states.dtype)
        states, pooled = states * keep[:, None, None], pooled * keep[:, None]
    height, width = size
    # original size, crop top-left, target size: the pipeline's defaults for an image generated at `size`
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=states.dtype, device=device)
    return states, {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)}


def folder_parts(sdxl: bool) -> list[str]:
    """The entries a saved text2mask-sd model folder holds (what is swapped in at a save)."""
    parts = ["model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    return parts + (list(SDXL_PARTS) if sdxl else [])
