"""Text -> image generators that label their own images from cross-attention (Attn2mask, DiffuMask).

A text request names the classes in its prompt (`Request.class_words`: class
name -> the words of the prompt standing for it; the plan's
`segsynth plan --class-prompts N` writes them). While the model draws, an
`AttentionCapture` records the attention paid to each class word's tokens;
`methods.attn2mask.pseudo_mask` turns the maps into a label map and a
per-pixel confidence, which become the sample's label and loss weight:

  attention:DIR        a builtin text generator folder trained with --target image
                       (`segsynth train-text-generator`): a tiny CLIP text encoder +
                       a pixel-space UNet, trained on CPU with image-level labels only
  attention-sd:BASE    a diffusers StableDiffusionPipeline (hub id or folder): the GPU path

How maps become labels is a pseudo-mask recipe (`pseudo_mask.PRESETS`, chosen
by `GeneratorSettings.pseudo_mask`, any PseudoMaskConfig field overridden by
`GeneratorSettings.pseudo_mask_settings`). Its resolutions are attention-map
heights of *this* UNet at *this* working size (SD1.5 at 512: 64, 32, 16, 8; the
builtin toy model at 64x80: 16 and 8); a resolution the UNet lacks is an error
listing the ones it has, before any compute.

Background: a dataset with a class named "background" gets the pixels where no
prompt class reaches the threshold. Datasets without one (CamVid, Cityscapes,
the toy data: every pixel is some class) label those pixels ignore (255) with
weight 0 -- they are not known to be anything; set background_threshold=0 to
give every pixel its best class instead.

Each sample keeps, besides image / label / weight, two extras and meta
{prompt, preset, classes, coverage}:
  attention   the winning class's colour scaled by its score (dark = little attention)
  raw_label   the same scores labelled with no uncertain band (and, without a
              background class, no threshold: every pixel its top class) -- the
              plain pseudo-mask the ablations compare against, from the same image
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Sequence

import numpy as np
import torch

from segsynth import IGNORE_INDEX
from segsynth.generators.attention import AttentionCapture, token_indices_for_words
from segsynth.generators.base import (
    Condition,
    GeneratedSample,
    Generator,
    GeneratorSettings,
    Prepared,
    Request,
    model_source,
    resolve_device,
    resolve_dtype,
)
from segsynth.generators.builtin_text import BuiltinTextGenerator
from segsynth.generators.builtin_text.model import decode_images, encode_images, encode_text
from segsynth.generators.builtin_text.tokenizer import normalise
from segsynth.generators.controlnet import check_model_location, finish_pipeline
from segsynth.generators.lora import diffusers_identity, load_adapter
from segsynth.generators.schedulers import scheduler_name
from segsynth.io import SegsynthError
from segsynth.methods.attn2mask.pseudo_mask import (
    PseudoMaskConfig,
    capture_settings,
    class_scores,
    preset_config,
    scores_to_mask,
)

SD_DEFAULTS = {"steps": 30, "guidance": 7.5, "scheduler": "dpm++"}


def pseudo_mask_config(settings: GeneratorSettings) -> PseudoMaskConfig:
    """The settings' pseudo-mask recipe: a preset with any PseudoMaskConfig field overridden."""
    return preset_config(settings.pseudo_mask, **dict(settings.pseudo_mask_settings or {}))


def background_class(classes: Sequence[str]) -> int:
    """The id of a class named 'background' (any case), else IGNORE_INDEX (no-class pixels are ignored)."""
    names = [name.strip().lower() for name in classes]
    return names.index("background") if "background" in names else IGNORE_INDEX


def class_words_of(request: Request, classes: Sequence[str], words_in_prompt) -> list[tuple[int, list[str]]]:
    """[(class id, words)] of a text request: its class_words, or else the class names found in its prompt.

    `words_in_prompt(prompt, name)` says whether a class name occurs in the prompt (tokenizer-specific)."""
    ids = {name: index for index, name in enumerate(classes)}
    where = f"request {request.id} (prompt {request.prompt!r})"
    if request.class_words:
        unknown = [name for name, _ in request.class_words if name not in ids]
        if unknown:
            raise SegsynthError(f"{where}: class_words names {unknown}, not classes of the dataset "
                                f"({', '.join(classes)}); fix the plan's class_words")
        empty = [name for name, words in request.class_words if not words]
        if empty:
            raise SegsynthError(f"{where}: class_words gives no word for {empty}; list the prompt's words for each")
        return [(ids[name], list(words)) for name, words in request.class_words]
    found = [(index, [name]) for index, name in enumerate(classes) if words_in_prompt(request.prompt, name)]
    if not found:
        raise SegsynthError(f"{where}: names none of the dataset's classes ({', '.join(classes)}), so no pixel "
                            "could be labelled; name classes in the prompt or give the plan entry class_words "
                            "(segsynth plan --class-prompts N writes both)")
    return found


def raw_recipe(config: PseudoMaskConfig, has_background: bool) -> PseudoMaskConfig:
    """The recipe without an uncertain band; without a background class, also without a threshold."""
    return dataclasses.replace(config, uncertain_band=[],
                               background_threshold=config.background_threshold if has_background else 0.0)


def heat_map(scores: torch.Tensor, class_ids: Sequence[int], palette: Sequence[Sequence[int]]) -> np.ndarray:
    """HxWx3 uint8: each pixel in its top class's colour, scaled by that class's score."""
    if scores.shape[0] == 0:
        return np.zeros((*scores.shape[1:], 3), np.uint8)
    top, winner = scores.max(dim=0)
    colours = torch.tensor([list(palette[c]) for c in class_ids], dtype=torch.float32)
    return (colours[winner] * top[..., None]).round().clamp(0, 255).to(torch.uint8).numpy()


class _AttentionLabelling:
    """What both backends share: the recipe, class words -> token groups, maps -> sample."""

    pseudo_mask: PseudoMaskConfig
    preset: str
    classes: tuple[str, ...] | None = None
    palette: tuple | None = None

    def _setup_recipe(self, settings: GeneratorSettings, unet, latent_size: tuple[int, int]) -> None:
        self.pseudo_mask = pseudo_mask_config(settings)
        self.preset = settings.pseudo_mask
        self.capture_kwargs = capture_settings(self.pseudo_mask)
        self.latent_size = latent_size
        # Built once here so a UNet without cross-attention, or without a resolution the recipe names, fails
        # before any compute (nothing is installed until the capture is entered).
        AttentionCapture(unet, [0], latent_size=latent_size, **self.capture_kwargs)

    def check_dataset(self, classes: Sequence[str], palette: Sequence[Sequence[int]]) -> None:
        self.classes = tuple(classes)
        self.palette = tuple(tuple(int(v) for v in colour) for colour in palette)
        self.background_id = background_class(classes)
        self.raw_recipe = raw_recipe(self.pseudo_mask, self.background_id != IGNORE_INDEX)

    def _classes_or_error(self) -> tuple[str, ...]:
        if self.classes is None:
            raise SegsynthError("call check_dataset(classes, palette) before generating: class ids come from the "
                                "dataset's class names")
        return self.classes

    def check_requests(self, requests: Sequence[Request]) -> None:
        wrong = sorted({request.kind for request in requests} - {"text"})
        if wrong:
            raise SegsynthError(f"the {self.name} generator makes samples from text prompts only; the plan has "
                                f"{', '.join(wrong)} requests (make one with segsynth plan --class-prompts N)")
        for request in requests:  # every class word located in its prompt, before any compute
            self._groups(request)

    def _groups(self, request: Request) -> tuple[list[int], list[list[int]]]:
        """(class ids, prompt token positions of each class's words) of one request.

        A token inside a longer word of another class belongs to that class alone: with class_words
        {road: [road], sign: [road sign]}, the 'road' of 'road sign' is the sign's (a sub-word tokenizer finds
        'road' in both places; the builtin word tokenizer already reads 'road sign' as one token)."""
        classes = self._classes_or_error()
        found = [(class_id, {word: self._positions(request, word) for word in words})
                 for class_id, words in class_words_of(request, classes, self._names_in_prompt)]
        longest: dict[int, int] = {}  # position -> characters of the longest class word covering it
        for _, words in found:
            for word, positions in words.items():
                for position in positions:
                    longest[position] = max(longest.get(position, 0), len(normalise(word)))
        class_ids, groups = [], []
        for class_id, words in found:
            positions = sorted({p for word, at in words.items() for p in at if len(normalise(word)) == longest[p]})
            if not positions:
                raise SegsynthError(f"request {request.id} (prompt {request.prompt!r}): the words of class "
                                    f"{classes[class_id]!r} ({', '.join(words)}) occur only inside longer words of "
                                    "other classes; put the class's own word in the prompt")
            class_ids.append(class_id)
            groups.append(positions)
        return class_ids, groups

    def _capture(self, groups_per_sample: list[list[list[int]]], batch) -> AttentionCapture:
        tokens = [sorted({p for group in groups for p in group}) for groups in groups_per_sample]
        return AttentionCapture(self.unet, tokens, latent_size=self.latent_size, batch=batch, **self.capture_kwargs)

    def _samples(self, capture: AttentionCapture, images: list[np.ndarray], prepared: Prepared) -> list[GeneratedSample]:
        samples = []
        for row, (image, condition) in enumerate(zip(images, prepared.conditions)):
            class_ids, groups = prepared.tensors["groups"][row]
            cross = capture.cross_attention(row, groups=groups)
            self_attention = capture.self_attention(row) if self.pseudo_mask.refine_power else None
            scores = class_scores(cross, self_attention, self.pseudo_mask, image.shape[:2]).cpu()
            label, confidence = scores_to_mask(scores, self.pseudo_mask, class_ids, self.background_id)
            raw, _ = scores_to_mask(scores, self.raw_recipe, class_ids, self.background_id)
            meta = {"prompt": condition.prompt, "preset": self.preset,
                    "classes": [self.classes[c] for c in class_ids],
                    "coverage": round(float((label != IGNORE_INDEX).mean()), 4)}
            weight = None if self.pseudo_mask.confidence == "none" else confidence
            samples.append(GeneratedSample(image, label, weight,
                                           {"attention": heat_map(scores, class_ids, self.palette), "raw_label": raw},
                                           meta))
        return samples

    @torch.no_grad()
    def attention_of_image(self, image: np.ndarray, request: Request, timestep: float, seed: int,
                           resolutions: Sequence[int], self_resolutions: Sequence[int] = ()):
        """A real image's attention to its request's class words: the image at working size, noised to
        `timestep` (a fraction of the training schedule when <= 1, else a timestep) with seeded noise, one
        conditional UNet call. Returns (class ids, {res: (C, h, w)} cross-attention, {res: self-attention})."""
        from diffusers import DDPMScheduler
        from PIL import Image

        class_ids, groups = self._groups(request)
        height, width = self.working_size(None)
        picture = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        clean = self._encode_image(torch.from_numpy(picture.copy()).permute(2, 0, 1)[None].float())
        schedule = DDPMScheduler.from_config(self._noise_schedule_config())
        total = schedule.config.num_train_timesteps
        step = int(round(timestep * (total - 1))) if timestep <= 1 else int(timestep)
        if not 0 <= step < total:
            raise SegsynthError(f"timestep {timestep}: give a fraction in [0, 1] or a timestep below {total}")
        noise = torch.randn(clean.shape, generator=torch.Generator("cpu").manual_seed(int(seed))).to(clean)
        t = torch.tensor([step], device=clean.device)
        noisy = schedule.add_noise(clean, noise, t)
        states, mask = self._encode_prompt(request.prompt)
        tokens = [sorted({p for group in groups for p in group})]
        with AttentionCapture(self.unet, tokens, resolutions=resolutions, self_resolutions=self_resolutions,
                              latent_size=self.latent_size, batch="all") as capture:
            self.unet(noisy.to(self.unet.dtype), t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
            cross = capture.cross_attention(0, groups=groups)
            self_attention = capture.self_attention(0) if self_resolutions else {}
        return class_ids, cross, self_attention

    def _recipe_identity(self) -> dict:
        return {"pseudo_mask": {"preset": self.preset, **dataclasses.asdict(self.pseudo_mask)},
                "background": "ignore" if getattr(self, "background_id", IGNORE_INDEX) == IGNORE_INDEX
                else self.classes[self.background_id]}


class BuiltinAttentionGenerator(_AttentionLabelling, Generator):
    """attention:DIR -- a builtin text generator (target image) whose cross-attention labels its images."""

    name = "attention"
    request_kinds = ("text",)
    uses_prompts = True

    def __init__(self, folder: str | os.PathLike, settings: GeneratorSettings):
        self.text = BuiltinTextGenerator(folder, settings)
        if self.text.target != "image":
            raise SegsynthError(f"{folder}: a text generator trained with --target {self.text.target}; attention "
                                "pseudo-masks need one trained on photos (segsynth train-text-generator --target image)")
        self.unet, self.tokenizer = self.text.unet, self.text.tokenizer
        self.steps, self.guidance = self.text.steps, self.text.guidance
        self._setup_recipe(settings, self.unet, tuple(self.text.size[i] // 2 for i in range(2)))

    def check_dataset(self, classes: Sequence[str], palette: Sequence[Sequence[int]]) -> None:
        self.text.check_dataset(classes, palette)
        super().check_dataset(classes, palette)

    def _names_in_prompt(self, prompt: str, name: str) -> bool:
        return self._known(name) and bool(self.tokenizer.token_index(prompt, name))

    def _known(self, word: str) -> bool:
        return normalise(word) in self.tokenizer.ids

    def _positions(self, request: Request, word: str) -> list[int]:
        where = f"request {request.id} (prompt {request.prompt!r})"
        if not self._known(word):
            raise SegsynthError(f"{where}: class word {word!r} is not in the text generator's vocabulary "
                                f"({self.text.folder}/tokenizer); use the class names it was trained with, or "
                                "train it with the plan's prompt augmentation (train-text-generator "
                                "--augment-prompts, the same prompt_augmentation settings)")
        positions = self.tokenizer.token_index(request.prompt, word)
        if not positions:
            raise SegsynthError(f"{where}: class word {word!r} is not in the prompt; put it in as written")
        if max(positions) >= self.tokenizer.max_length - 1:
            raise SegsynthError(f"{where}: class word {word!r} falls past the generator's {self.tokenizer.max_length - 2}"
                                "-word prompt limit; shorten the prompt")
        return positions

    def working_size(self, mask_shape: tuple[int, int] | None) -> tuple[int, int]:
        return self.text.size

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_images(pixels).to(self.text.device)

    def _noise_schedule_config(self):
        return self.text.noise_schedule_config

    def _encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token states, the UNet's key mask or None) of one prompt."""
        ids = self.tokenizer([prompt]).to(self.text.device)
        return encode_text(self.text.text_encoder, ids), self.text.key_mask(ids)

    def prepare(self, conditions: list[Condition]) -> Prepared:
        prepared = self.text.prepare(conditions)
        prepared.tensors["groups"] = [self._groups(condition.request) for condition in conditions]
        return prepared

    def run(self, prepared: Prepared) -> list[GeneratedSample]:
        batch = "second-half" if self.guidance != 1.0 else "all"
        with self._capture([groups for _, groups in prepared.tensors["groups"]], batch) as capture:
            sample = self.text.denoise(prepared, on_step=lambda index, timestep: capture.step(index))
            return self._samples(capture, decode_images(sample), prepared)

    def identity(self) -> dict:
        return {**self.text.identity(), "name": self.name, **self._recipe_identity()}


class SDAttentionGenerator(_AttentionLabelling, Generator):
    """attention-sd:BASE -- Stable Diffusion 1.x/2.x through diffusers, labelled by its cross-attention."""

    name = "attention-sd"
    request_kinds = ("text",)
    uses_prompts = True

    def __init__(self, base: str, settings: GeneratorSettings):
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        # 1. Settings and files first.
        unused = [name for name, value in (("controlnet", settings.controlnet), ("captions", settings.captions))
                  if value is not None]
        if unused:
            raise SegsynthError(f"the attention-sd generator takes no {', '.join(unused)}; leave those settings unset")
        check_model_location(base, "base model", [("model_index.json",)])
        self.base, self.settings = base, settings
        lcm = settings.lcm_lora is not None
        self.scheduler_name = scheduler_name(settings.scheduler or ("lcm" if lcm else SD_DEFAULTS["scheduler"]))
        self.steps = settings.steps or (6 if lcm else SD_DEFAULTS["steps"])
        self.guidance = float(settings.guidance if settings.guidance is not None else (1.5 if lcm else SD_DEFAULTS["guidance"]))
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)

        # 2. The pipeline (hub id or folder alike).
        try:
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipeline = StableDiffusionPipeline.from_pretrained(base, torch_dtype=self.dtype, safety_checker=None,
                                                               feature_extractor=None, requires_safety_checker=False)
        except (OSError, ValueError, EnvironmentError) as error:
            raise SegsynthError(f"cannot load Stable Diffusion from {base!r}: {str(error).splitlines()[0]}") from None
        self.pipeline = finish_pipeline(pipeline, settings.lcm_lora if lcm else None, self.scheduler_name, self.device)
        self.unet, self.tokenizer = pipeline.unet, pipeline.tokenizer
        self.lora = None  # a LoRA adapter (`segsynth adapt`) of this base, merged into its UNet
        if settings.lora:
            self.lora = load_adapter(self.unet, settings.lora, settings.lora_scale,
                                     diffusers_identity(self.name, base), f"{self.name}:{base}")

        # 3. The working size, and the recipe checked against the UNet at that size.
        self.latent_factor = pipeline.vae_scale_factor
        multiple = self.latent_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if settings.resolution:
            self.size = tuple(int(v) for v in settings.resolution)
        else:
            sample_size = self.unet.config.sample_size
            sample_size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
            self.size = tuple(int(v) * self.latent_factor for v in sample_size)
        if any(v % multiple for v in self.size):
            raise SegsynthError(f"--resolution {list(self.size)}: H and W must be multiples of {multiple}")
        self._setup_recipe(settings, self.unet, (self.size[0] // self.latent_factor, self.size[1] // self.latent_factor))

    def _names_in_prompt(self, prompt: str, name: str) -> bool:
        import re

        return re.search(rf"(?<!\w){re.escape(name.lower())}(?!\w)", prompt.lower()) is not None

    def _positions(self, request: Request, word: str) -> list[int]:
        try:
            return token_indices_for_words(self.tokenizer, request.prompt, [word], on_split="ignore")[word]
        except SegsynthError as error:
            raise SegsynthError(f"request {request.id}: {error}") from None

    def working_size(self, mask_shape: tuple[int, int] | None) -> tuple[int, int]:
        return self.size

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        pixels = (pixels / 127.5 - 1.0).to(self.device, vae.dtype)
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    def _noise_schedule_config(self):
        return self.pipeline.scheduler.config

    def _encode_prompt(self, prompt: str) -> tuple[torch.Tensor, None]:
        embeddings, _ = self.pipeline.encode_prompt(prompt, self.device, 1, False)
        return embeddings, None

    def prepare(self, conditions: list[Condition]) -> Prepared:
        seeds = [condition.request.seed for condition in conditions]
        groups = [self._groups(condition.request) for condition in conditions]
        return Prepared(self.size, [c.prompt for c in conditions], seeds, {"groups": groups}, list(conditions))

    @torch.no_grad()
    def run(self, prepared: Prepared) -> list[GeneratedSample]:
        height, width = prepared.size
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in prepared.seeds]
        shape = (self.unet.config.in_channels, height // self.latent_factor, width // self.latent_factor)
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)
        negative = [self.settings.negative_prompt] * len(prepared.prompts) if self.settings.negative_prompt else None
        batch = "second-half" if self.guidance > 1.0 else "all"  # diffusers runs CFG only for a scale > 1
        with self._capture([groups for _, groups in prepared.tensors["groups"]], batch) as capture:
            result = self.pipeline(prompt=prepared.prompts, height=height, width=width, num_inference_steps=self.steps,
                                   guidance_scale=self.guidance, negative_prompt=negative, generator=generators,
                                   latents=latents, output_type="np")
            images = [(np.clip(image, 0, 1) * 255).round().astype(np.uint8) for image in result.images]
            return self._samples(capture, images, prepared)

    def identity(self) -> dict:
        settings = self.settings
        return {"name": self.name, "base": model_source(self.base),
                "lcm_lora": model_source(settings.lcm_lora) if settings.lcm_lora else None,
                "scheduler": self.scheduler_name, "steps": self.steps, "guidance": self.guidance,
                "negative_prompt": settings.negative_prompt, "dtype": str(self.dtype).replace("torch.", ""),
                "size": list(self.size), **self._recipe_identity(), **({"lora": self.lora} if self.lora else {})}


__all__ = ["BuiltinAttentionGenerator", "SDAttentionGenerator", "background_class", "class_words_of", "heat_map",
           "pseudo_mask_config", "raw_recipe"]
