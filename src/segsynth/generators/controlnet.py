"""ControlNet backends: diffusers' Stable Diffusion (1.x/2.x) and SDXL ControlNet pipelines.

Masks become the colour map the ControlNet was trained on. The segmentation
ControlNets (lllyasviel/control_v11p_sd15_seg and the SDXL ones) were trained
on ADE20K-palette maps, so by default every dataset class is mapped onto an
ADE20K class (by name, or through the synonym table below) and drawn in that
class's ADE20K colour; a JSON file overrides entries ({"class": "ade20k name"}
or {"class": [r, g, b]}), and `colour_map="dataset"` uses the dataset's own
palette (for ControlNets trained on it). A class without a colour is an error
before any compute. Ignore pixels are black.

Prompts follow FreestyleNet/FreeMask: the names of the classes present in the
mask; or a captions file gives one prompt per mask id.

The base model and the ControlNet are each a hub id or a local diffusers
folder, loaded through the same `from_pretrained` calls either way, so the
tiny random models of the tests exercise exactly the code path of SD1.5.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from segsynth import IGNORE_INDEX
from segsynth.data import palettes
from segsynth.generators.base import (
    Condition,
    GeneratorSettings,
    MaskToImageGenerator,
    Prepared,
    Request,
    canonical_json,
    file_fingerprint,
    model_source,
    resolve_device,
    resolve_dtype,
)
from segsynth.generators.lora import diffusers_identity, load_adapter
from segsynth.generators.schedulers import make_scheduler, scheduler_name
from segsynth.io import SegsynthError, read_json, read_jsonl

# Dataset class names (normalised: lower case, '_' and '-' as spaces) -> ADE20K class name or an RGB colour,
# for the names of the standard datasets that are not ADE20K names already.
ADE20K_SYNONYMS: dict[str, str | tuple[int, int, int]] = {
    # CamVid
    "pavement": "sidewalk", "sign symbol": "signboard", "pedestrian": "person", "bicyclist": "bicycle",
    # Cityscapes
    "traffic sign": "signboard", "vegetation": "tree", "terrain": "grass", "rider": "person", "motorcycle": "minibike",
    # Pascal VOC
    "background": (0, 0, 0), "aeroplane": "airplane", "diningtable": "table", "motorbike": "minibike",
    "pottedplant": "plant", "tvmonitor": "monitor", "bird": "animal", "cat": "animal", "cow": "animal",
    "dog": "animal", "horse": "animal", "sheep": "animal",
    # COCO-Stuff (a few frequent ones; the rest by exact name or a --colour-map file)
    "couch": "sofa", "dining table": "table", "potted plant": "plant", "tv": "television receiver",
    "sky other": "sky", "building other": "building", "wall other": "wall", "floor other": "floor",
    "ceiling other": "ceiling", "bush": "plant", "pavement other": "sidewalk",
    # the toy dataset
    "sign": "signboard",
}
IGNORE_COLOUR = (0, 0, 0)
DEFAULTS = {"steps": 20, "guidance": 7.5, "scheduler": "dpm++", "lcm_steps": 6, "lcm_guidance": 1.5}


def normalise_name(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def class_colours(classes: Sequence[str], dataset_palette: Sequence[Sequence[int]], colour_map: str) -> np.ndarray:
    """A (256, 3) uint8 lookup table: class index -> ControlNet colour, ignore -> black.

    `colour_map` is 'ade20k' (names onto ADE20K colours), 'dataset' (the dataset's palette) or a JSON file
    of overrides on top of the ADE20K mapping. A class left without a colour is an error naming it.
    """
    table = np.zeros((256, 3), np.uint8)
    table[IGNORE_INDEX] = IGNORE_COLOUR
    if colour_map == "dataset":
        table[: len(classes)] = np.asarray(dataset_palette, np.uint8)[: len(classes)]
        return table
    ade = {normalise_name(name): colour for name, colour in zip(palettes.ADE20K_CLASSES, palettes.ADE20K_PALETTE)}
    overrides: dict = {}
    if colour_map != "ade20k":
        path = Path(colour_map)
        if not path.is_file():
            raise SegsynthError(f"--colour-map {colour_map!r}: neither 'ade20k', 'dataset' nor an existing JSON file")
        overrides = read_json(path)
        if not isinstance(overrides, dict):
            raise SegsynthError(f"{path}: must map class names to an ADE20K class name or [r, g, b]")
        overrides = {normalise_name(key): value for key, value in overrides.items()}
    missing = []
    for index, name in enumerate(classes):
        key = normalise_name(name)
        target = overrides.get(key, ADE20K_SYNONYMS.get(key, key))
        colour = _colour_of(target, ade, name, colour_map)
        if colour is None:
            missing.append(name)
        else:
            table[index] = colour
    if missing:
        example = json.dumps({name: "ade20k class name or [r, g, b]" for name in missing[:2]})
        raise SegsynthError(f"no ControlNet colour for class(es) {missing}: they are not ADE20K class names and have "
                            f"no default synonym; give --colour-map FILE.json, e.g. {example} "
                            "(or --colour-map dataset for a ControlNet trained on this dataset's palette)")
    return table


def _colour_of(target, ade: dict, name: str, source: str):
    if isinstance(target, str):
        return ade.get(normalise_name(target))
    if isinstance(target, (list, tuple)) and len(target) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in target):
        return tuple(target)
    raise SegsynthError(f"{source}: entry for {name!r} must be an ADE20K class name or [r, g, b] in 0..255, got {target!r}")


def class_prompt(mask: np.ndarray, classes: Sequence[str]) -> str:
    """FreestyleNet's prompt: the names of the classes present, in class order."""
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)[: len(classes)])
    return ", ".join(classes[i].replace("_", " ") for i in present)


def read_captions(path: str) -> dict[str, str]:
    """Captions by mask id from JSON ({id: text}) or JSONL ({"id": ..., "caption": ...} per line)."""
    file = Path(path)
    if not file.is_file():
        raise SegsynthError(f"captions file {path} not found")
    if file.suffix == ".jsonl":
        captions = {}
        for number, record in enumerate(read_jsonl(file), 1):
            text = record.get("caption", record.get("prompt")) if isinstance(record, dict) else None
            if not isinstance(record.get("id") if isinstance(record, dict) else None, str) or not isinstance(text, str):
                raise SegsynthError(f"{path}: line {number} needs \"id\" and \"caption\" strings")
            captions[record["id"]] = text
        return captions
    captions = read_json(file)
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise SegsynthError(f"{path}: must be a JSON object {{mask id: caption}} (or a .jsonl file)")
    return captions


def check_model_location(name: str, what: str, required: Sequence[Sequence[str]]) -> None:
    """A local folder must hold the expected files; anything else is taken as a hub id (checked when loaded)."""
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if not looks_local:
        return
    if not path.is_dir():
        raise SegsynthError(f"{what} {name}: no such folder (give a diffusers folder or a hub id like org/name)")
    missing = [" or ".join(options) for options in required if not any((path / o).is_file() for o in options)]
    if missing:
        raise SegsynthError(f"{what} {name}: not a diffusers folder, missing {', '.join(missing)}")


def finish_pipeline(pipeline, lcm_lora: str | None, scheduler: str, device):
    """What every diffusers backend does after loading its pipeline: fuse an LCM-LoRA when given, sample with
    the chosen scheduler on the pipeline's own noise schedule, no progress bars of its own, on the device."""
    if lcm_lora:
        pipeline.load_lora_weights(lcm_lora)
        pipeline.fuse_lora()
    pipeline.scheduler = make_scheduler(scheduler, pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


class ControlNetGenerator(MaskToImageGenerator):
    """Stable Diffusion (or SDXL) + ControlNet through diffusers' pipelines."""

    uses_prompts = True

    def __init__(self, base: str, settings: GeneratorSettings, sdxl: bool = False):
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars would break our own

        # 1. Settings and file checks first: nothing is loaded until they pass.
        self.name = "controlnet-sdxl" if sdxl else "controlnet"
        self.settings, self.sdxl, self.base = settings, sdxl, base
        if not settings.controlnet:
            raise SegsynthError(f"the {self.name} generator needs --controlnet (a hub id or folder), e.g. "
                                + ("diffusers/controlnet-... for SDXL" if sdxl else "lllyasviel/control_v11p_sd15_seg"))
        check_model_location(base, "base model", [("model_index.json",)])
        check_model_location(settings.controlnet, "ControlNet", [
            ("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                               "diffusion_pytorch_model.fp16.safetensors")])
        lcm = settings.lcm_lora is not None
        self.scheduler_name = scheduler_name(settings.scheduler or ("lcm" if lcm else DEFAULTS["scheduler"]))
        if self.scheduler_name == "lcm" and not lcm:
            raise SegsynthError("--scheduler lcm needs --lcm-lora (an LCM-LoRA for this base model)")
        self.steps = settings.steps or (DEFAULTS["lcm_steps"] if lcm else DEFAULTS["steps"])
        self.guidance = settings.guidance if settings.guidance is not None else (
            DEFAULTS["lcm_guidance"] if lcm else DEFAULTS["guidance"])
        self.captions = read_captions(settings.captions) if settings.captions else None
        self.resolution = tuple(settings.resolution) if settings.resolution else None
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.colour_table: np.ndarray | None = None

        # 2. Load the ControlNet and the pipeline around it (hub id or folder alike).
        try:
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            controlnet = ControlNetModel.from_pretrained(settings.controlnet, torch_dtype=self.dtype)
            if sdxl:
                pipeline = StableDiffusionXLControlNetPipeline.from_pretrained(
                    base, controlnet=controlnet, torch_dtype=self.dtype, add_watermarker=False)
            else:
                pipeline = StableDiffusionControlNetPipeline.from_pretrained(
                    base, controlnet=controlnet, torch_dtype=self.dtype, safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False)
        except (OSError, ValueError, EnvironmentError) as error:
            raise SegsynthError(f"cannot load {self.name} from base {base!r} and ControlNet {settings.controlnet!r}: "
                                f"{str(error).splitlines()[0]}") from None
        self.pipeline = finish_pipeline(pipeline, settings.lcm_lora if lcm else None, self.scheduler_name, self.device)
        self.lora = None  # a LoRA adapter (`segsynth adapt`) of the base model, merged into its UNet
        if settings.lora:
            self.lora = load_adapter(pipeline.unet, settings.lora, settings.lora_scale,
                                     diffusers_identity(self.name, base), f"{self.name}:{base}")

        # 3. Sizes must divide through the VAE and every UNet downsampling.
        self.latent_factor = pipeline.vae_scale_factor
        self.size_multiple = self.latent_factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
        self.default_short_side = 1024 if sdxl else 512
        if self.resolution and any(v % self.size_multiple for v in self.resolution):
            raise SegsynthError(f"--resolution {list(self.resolution)}: H and W must be multiples of {self.size_multiple}")

    def check_dataset(self, classes: Sequence[str], palette: Sequence[Sequence[int]]) -> None:
        self.colour_table = class_colours(classes, palette, self.settings.colour_map)

    def check_requests(self, requests: Sequence[Request]) -> None:
        if self.captions is not None:
            missing = sorted({r.source for r in requests if not r.prompt and r.source not in self.captions})
            if missing:
                raise SegsynthError(f"captions file {self.settings.captions} has no caption for {len(missing)} "
                                    f"mask(s), e.g. {missing[:5]}")

    def working_size(self, mask_shape: tuple[int, int] | None) -> tuple[int, int]:
        """--resolution if given; else the short side at 512 (SDXL: 1024), aspect kept, rounded to the size multiple."""
        if self.resolution:
            return self.resolution
        height, width = mask_shape
        scale = self.default_short_side / min(height, width)
        return (max(self.size_multiple, int(round(height * scale / self.size_multiple)) * self.size_multiple),
                max(self.size_multiple, int(round(width * scale / self.size_multiple)) * self.size_multiple))

    def prompt(self, request: Request, mask: np.ndarray | None, classes: Sequence[str]) -> str:
        """The plan's caption, else the captions file's, else the classes present (FreestyleNet / FreeMask)."""
        if request.prompt:
            return request.prompt
        if self.captions is not None:
            return self.captions[request.source]
        return class_prompt(mask, classes)

    def colourise(self, mask: np.ndarray) -> np.ndarray:
        if self.colour_table is None:
            raise SegsynthError("call check_dataset(classes, palette) before generating: the colour map depends on the classes")
        return self.colour_table[mask]

    def prepare(self, conditions: list[Condition]) -> Prepared:
        controls = [Image.fromarray(self.colourise(condition.mask)) for condition in conditions]
        return Prepared(tuple(conditions[0].mask.shape), [c.prompt for c in conditions],
                        [c.request.seed for c in conditions], {"control": controls}, conditions)

    @torch.no_grad()
    def render(self, prepared: Prepared) -> list[np.ndarray]:
        height, width = prepared.size
        # One CPU generator per sample draws its initial latents here and, for LCM, its later noise in the
        # pipeline: a sample's randomness never depends on its batch or on the device.
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in prepared.seeds]
        shape = (self.pipeline.unet.config.in_channels, height // self.latent_factor, width // self.latent_factor)
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)
        negative = [self.settings.negative_prompt] * len(prepared.prompts) if self.settings.negative_prompt else None
        result = self.pipeline(
            prompt=prepared.prompts, image=prepared.tensors["control"], height=height, width=width,
            num_inference_steps=self.steps, guidance_scale=self.guidance, negative_prompt=negative,
            generator=generators, latents=latents, output_type="np",
            controlnet_conditioning_scale=self.settings.controlnet_scale,
        )
        return [(np.clip(image, 0, 1) * 255).round().astype(np.uint8) for image in result.images]

    def identity(self) -> dict:
        settings = self.settings
        return {
            "name": self.name, "base": model_source(self.base), "controlnet": model_source(settings.controlnet),
            "lcm_lora": model_source(settings.lcm_lora) if settings.lcm_lora else None,
            "scheduler": self.scheduler_name, "steps": self.steps, "guidance": self.guidance,
            "negative_prompt": settings.negative_prompt, "controlnet_scale": settings.controlnet_scale,
            "dtype": str(self.dtype).replace("torch.", ""), "resolution": list(self.resolution) if self.resolution else None,
            "colour_map": {"source": settings.colour_map, "colours": _table_fingerprint(self.colour_table)},
            "captions": file_fingerprint(settings.captions) if settings.captions else None,
            **({"lora": self.lora} if self.lora else {}),
        }


def _table_fingerprint(table: np.ndarray | None) -> str | None:
    if table is None:
        return None
    return hashlib.sha256(canonical_json(table.tolist()).encode()).hexdigest()[:16]
