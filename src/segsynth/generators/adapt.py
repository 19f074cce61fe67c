"""`segsynth adapt`: a LoRA adapter that moves a generator towards a target domain, learned from unlabeled images.

Attn2mask adapts Stable Diffusion to a distant domain (driving scenes) with LoRA trained on the target
domain's images alone. This stage does that for every generator segsynth samples with a UNet:

  attention:DIR           the builtin text -> image generator (its UNet2DConditionModel)
  builtin:DIR             the builtin mask -> image generator (its UNet2DModel)
  attention-sd:BASE       a diffusers SD 1.x/2.x or SDXL model (its UNet): the GPU path;
  controlnet[-sdxl]:BASE  the same base model's UNet (the ControlNet itself is not adapted)

The UNet is frozen and its attention projections (`--target-modules`) get rank-r LoRA layers
(generators/lora.py), trained with the generator's own diffusion loss, the one it was trained with:
v-prediction with its Min-SNR-style weights for the builtin text model
(`builtin_text.train.diffusion_loss`), the base's own latent loss for diffusers models
(`text2mask_sd.train.latent_diffusion_loss`), the builtin mask model's v-loss (the steps of its trainer).

What the images are conditioned on. They have no labels, so no class prompt can be made for them. The
default is the unconditional input (the empty prompt; zeros for SDXL, as its pipeline does): every
generator here learned it from its prompt dropout (10 %), it is the generator's "any image" mode, and
the adapter learns to move that mode to the target domain. The LoRA layers sit in every attention
layer, self-attention included, and are shared by the conditional and unconditional passes, so class
prompts drawn after adaptation move with it (measured on toy data in tests/generators/test_adapt.py
and README "LoRA adaptation"). `--prompt` gives a domain prompt instead (for SD e.g. "a street at
dusk"; the builtin text model knows only the words it was trained on). A mask -> image model is
conditioned on the all-ignore mask (no layout: what its void pixels taught it).

Images: `--images` is a folder of images, or a dataset spec whose split's images are used (labels never
read), e.g. `camvid:PATH?include=0001TP`. Each iteration draws a batch, a random crop of at least
`crop_scale` of each side (1: the whole image, as the builtin text model was trained) resized to the
working size, and a flip.

Determinism and resume: iteration i draws its images, crops, flips, noise, timesteps and LoRA dropout
from generators seeded by (seed, i), and the learning rate is a function of i, so a run resumed from its
last save (OUT/training_state: the adapter's weights, AdamW state, iteration; swapped in whole) ends with
the weights of an uninterrupted run. Only the adapter is saved (adapter.safetensors, formats/adapter.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from segsynth import __version__
from segsynth.config import save_config, to_dict
from segsynth.data.base import read_image
from segsynth.data.datasets import IMAGE_SUFFIXES
from segsynth.data.specs import DATASET_KINDS, open_dataset
from segsynth.data.validate import inspect_file
from segsynth.distributed import DistInfo
from segsynth.formats.adapter import FORMAT, INFO_FILE, WEIGHTS_FILE, check_base
from segsynth.formats.checkpoint import (check_resumed_settings, load_optimizer_state, save_optimizer_state,
                                         training_state_folder)
from segsynth.generators.base import GeneratorSettings, resolve_device
from segsynth.generators.lora import adapter_state, add_lora, diffusers_identity
from segsynth.generators.training_loop import TrainingParts, run_iterations
from segsynth.io import SegsynthError, atomic_write_json, loading, read_json, staged_swap
from segsynth.outputs import claim_folder
from segsynth.stage_configs import AdaptConfig

TRAINING_STATE = "training_state"
# Settings a resumed run may change (everything else must match the saved run).
RESUMABLE_CHANGES = ("out", "resume", "iterations", "max_minutes", "save_every", "log_every", "device")
BUILTIN_LR, DIFFUSERS_LR = 1e-3, 1e-4  # default peak learning rates: the tiny builtin UNets take a larger one


@dataclass
class Adaptee:
    """A generator's UNet made ready to adapt: its working size, identity, default learning rate, autocast type,
    and its diffusion loss on a batch of pictures ((B, 3, H, W) float 0..255 at working size, CPU) with the
    noise drawn from a CPU generator."""

    unet: torch.nn.Module
    size: tuple[int, int]
    base: dict
    lr: float
    autocast: torch.dtype | None
    loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# --- the generators, one builder each ------------------------------------------------------------------


def _own_size(config: AdaptConfig, size: tuple[int, int], spec: str) -> tuple[int, int]:
    if config.size and tuple(config.size * (2 // len(config.size))) != tuple(size):
        raise SegsynthError(f"--size {config.size}: {spec} works at {list(size)} (H,W) only; drop --size")
    return tuple(size)


def class_directions(unet, clean: torch.Tensor, states: torch.Tensor, mask, class_states: torch.Tensor, class_mask,
                     schedule, generator: torch.Generator) -> torch.Tensor:
    """How far the adapter moves the class directions: at fresh noise and timesteps, (class prompt's prediction
    minus the unconditional one) with the adapter against the same without it, squared and averaged. Classifier-free
    guidance draws uncond + g * (cond - uncond): keeping cond - uncond leaves what tells the classes apart to the
    base model while the unconditional input -- the one the target images train -- moves to the target domain."""
    from segsynth.generators.lora import adapters_off

    batch, device = clean.shape[0], clean.device
    noise = torch.randn(clean.shape, generator=generator).to(device)
    timesteps = torch.randint(0, schedule.config.num_train_timesteps, (batch,), generator=generator).to(device)
    noisy = torch.cat([schedule.add_noise(clean, noise, timesteps)] * 2)
    both = torch.cat([states.expand(batch, -1, -1), class_states])
    masks = None if mask is None else torch.cat([mask.expand(batch, -1), class_mask])
    timesteps = torch.cat([timesteps, timesteps])
    with torch.no_grad(), adapters_off(unet):
        base_u, base_c = unet(noisy, timesteps, encoder_hidden_states=both, encoder_attention_mask=masks).sample.chunk(2)
    adapted_u, adapted_c = unet(noisy, timesteps, encoder_hidden_states=both, encoder_attention_mask=masks).sample.chunk(2)
    return ((adapted_c - adapted_u).float() - (base_c - base_u).float()).pow(2).mean()


def _builtin_text(argument: str, config: AdaptConfig, device: torch.device) -> Adaptee:
    """attention:DIR: the builtin text -> image model, its v-loss given the prompt's token states."""
    from diffusers import DDPMScheduler

    from segsynth.generators.builtin_text import BuiltinTextGenerator
    from segsynth.generators.builtin_text.model import encode_images, encode_text
    from segsynth.generators.builtin_text.train import class_prompt, diffusion_loss
    from segsynth.generators.lora import folder_identity

    generator = BuiltinTextGenerator(argument, GeneratorSettings(device=str(device)))
    if generator.target != "image":
        raise SegsynthError(f"{argument}: a text generator trained with --target {generator.target} draws colour-coded "
                            "masks; adapt a generator that draws photos (train-text-generator --target image)")
    size = _own_size(config, generator.size, f"attention:{argument}")
    _, unknown = generator.tokenizer.encode(config.prompt)
    if unknown:
        words = sorted(generator.tokenizer.ids)[:40]
        raise SegsynthError(f"--prompt {config.prompt!r}: word(s) {', '.join(map(repr, unknown))} are not in the text "
                            f"generator's vocabulary ({argument}/tokenizer: {', '.join(words)}); use its words or "
                            "the empty prompt")
    ids = generator.tokenizer([config.prompt]).to(device)
    with torch.no_grad():
        states = encode_text(generator.text_encoder, ids)
    mask = generator.key_mask(ids)
    schedule = DDPMScheduler.from_config(generator.noise_schedule_config)
    alphas_cumprod = schedule.alphas_cumprod.to(device)
    gamma = float(generator.meta.get("train_config", {}).get("min_snr_gamma", 5.0))
    unet = generator.unet

    classes = list(generator.classes)
    # class prompts as in training ("a photo of sky, road"): up to 4 classes, as many as its prompts hold
    most = min(4, len(classes), (generator.tokenizer.max_length - 4) // 2) if "," in generator.tokenizer.ids else 1

    def loss(pictures: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
        batch = pictures.shape[0]
        clean = encode_images(pictures).to(device)
        value = diffusion_loss(unet, clean, states.expand(batch, -1, -1), None if mask is None else mask.expand(batch, -1),
                               schedule, alphas_cumprod, gamma, noise)
        if config.preserve_classes <= 0:
            return value
        # 2. the class directions: a class prompt's prediction minus the unconditional one, as the base model has them
        prompts = [class_prompt([classes[c] for c in sorted(torch.randperm(len(classes), generator=noise)[
            :int(torch.randint(1, max(1, most) + 1, (1,), generator=noise))].tolist())]) for _ in range(batch)]
        ids = generator.tokenizer(prompts).to(device)
        with torch.no_grad():
            class_states = encode_text(generator.text_encoder, ids)
        class_mask = generator.key_mask(ids)
        directions = class_directions(unet, clean, states, mask, class_states, class_mask, schedule, noise)
        return value + config.preserve_classes * directions

    base = folder_identity("builtin-text", "attention", argument, generator.fingerprint)
    return Adaptee(unet, size, base, BUILTIN_LR, None, loss)


def _builtin_mask(argument: str, config: AdaptConfig, device: torch.device) -> Adaptee:
    """builtin:DIR: the mask -> image model on the all-ignore mask (no layout), its trainer's v-loss."""
    from diffusers import DDPMScheduler

    from segsynth import IGNORE_INDEX
    from segsynth.generators.builtin import BuiltinGenerator
    from segsynth.generators.builtin.model import encode_images, encode_masks
    from segsynth.generators.builtin.train import denoising_loss

    if config.prompt:
        raise SegsynthError(f"--prompt {config.prompt!r}: the builtin mask -> image generator takes no text; its "
                            "target images are conditioned on the all-ignore mask. Leave --prompt out")
    generator = BuiltinGenerator(argument, GeneratorSettings(device=str(device)))
    size = _own_size(config, generator.size, f"builtin:{argument}")
    condition = encode_masks(np.full((1, *size), IGNORE_INDEX, np.uint8), len(generator.classes)).to(device)
    schedule = DDPMScheduler.from_config(generator.noise_schedule_config)
    alphas_cumprod = schedule.alphas_cumprod.to(device)
    gamma = float(generator.meta.get("train_config", {}).get("min_snr_gamma", 5.0))

    def loss(pictures: torch.Tensor, noise_generator: torch.Generator) -> torch.Tensor:
        # the builtin trainer's loss (generators/builtin/train.py), on the all-ignore condition
        clean = encode_images(pictures).to(device)
        return denoising_loss(generator.denoiser, schedule, alphas_cumprod, clean,
                              condition.expand(clean.shape[0], -1, -1, -1), noise_generator, gamma)

    return Adaptee(generator.unet, size, generator.adapter_base(), BUILTIN_LR, None, loss)


def _diffusers(name: str) -> Callable[[str, AdaptConfig, torch.device], Adaptee]:
    """attention-sd / controlnet / controlnet-sdxl:BASE: the base model's UNet, its own latent loss."""

    def build(argument: str, config: AdaptConfig, device: torch.device) -> Adaptee:
        from diffusers import DDPMScheduler

        from segsynth.generators.text2mask_sd.model import load_parts
        from segsynth.generators.text2mask_sd.train import autocast_dtype, latent_diffusion_loss

        amp = autocast_dtype(config.mixed_precision, device)
        frozen = amp or torch.float32
        # An fp16 VAE overflows on SDXL (as in text2mask-sd): under fp16 the VAE stays fp32.
        parts = load_parts(argument, dtype=frozen, vae_dtype=torch.float32 if amp == torch.float16 else frozen,
                           unet_dtype=frozen)
        size = tuple(config.size * (2 // len(config.size))) if config.size else parts.native_size()
        multiple = parts.size_multiple
        if any(side % multiple for side in size):
            raise SegsynthError(f"--size {list(size)}: give H,W, each a multiple of {multiple} for this model (its "
                                f"VAE and UNet downsample {multiple}x), e.g. {parts.native_size()[0]},"
                                f"{parts.native_size()[1]}")
        for module in [parts.unet, parts.vae, *parts.text_encoders]:
            module.to(device)
        schedule = DDPMScheduler.from_config(parts.scheduler_config)
        info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)

        def loss(pictures: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
            batch = pictures.shape[0]
            # the empty prompt is the unconditional input (SDXL's pipeline: zeros), as prompt dropout taught it
            dropped = torch.full((batch,), config.prompt == "")
            return latent_diffusion_loss(parts, parts.unet, schedule, pictures / 127.5 - 1.0, [config.prompt] * batch,
                                         dropped, size, noise, info, amp, 5.0, argument)

        return Adaptee(parts.unet, size, diffusers_identity(name, argument), DIFFUSERS_LR, amp, loss)

    return build


# generator name -> builder(argument, config, device). Generators that draw colour masks have nothing to adapt to.
ADAPTEES = {
    "attention": _builtin_text,
    "builtin": _builtin_mask,
    "attention-sd": _diffusers("attention-sd"),
    "controlnet": _diffusers("controlnet"),
    "controlnet-sdxl": _diffusers("controlnet-sdxl"),
}
NOT_ADAPTABLE = {"text2mask": "draws colour-coded masks", "text2mask-sd": "draws colour-coded masks"}


def open_adaptee(spec: str, config: AdaptConfig, device: torch.device) -> Adaptee:
    name, _, argument = spec.partition(":")
    name = name.strip().lower()
    if name in NOT_ADAPTABLE:
        raise SegsynthError(f"--generator {spec}: the {name} generator {NOT_ADAPTABLE[name]}, not photos of a domain; "
                            f"adapt one of: {', '.join(ADAPTEES)}")
    if name not in ADAPTEES:
        raise SegsynthError(f"unknown generator {name!r} in --generator {spec!r}; options: {', '.join(ADAPTEES)} "
                            "(write NAME:ARGUMENT, e.g. attention:runs/text_generator)")
    if not argument:
        raise SegsynthError(f"generator spec {spec!r} needs an argument: {name}:PATH_OR_HUB_ID")
    return ADAPTEES[name](argument, config, device)


# --- the target images ------------------------------------------------------------------------------


def target_images(images: str, split: str, limit: int | None = None) -> list[np.ndarray]:
    """Every target image (the first `limit`), decoded (HxWx3 uint8): a folder's image files, or a dataset spec's
    split's images (never its labels). A folder that is empty or holds other files is refused, naming them."""
    folder = Path(images)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        others = [p.name for p in files if not p.name.lower().endswith(IMAGE_SUFFIXES)]
        if others:
            raise SegsynthError(f"--images {folder}: holds {len(others)} file(s) that are not images: "
                                f"{', '.join(others[:5])}{', ...' if len(others) > 5 else ''} (images end in "
                                f"{', '.join(IMAGE_SUFFIXES)}); move them out or point --images at a folder of images")
        if not files:
            inside = sorted(p.name + "/" for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise SegsynthError(f"--images {folder}: holds no images" + (
                f" (only the folder(s) {', '.join(inside[:5])}: point --images at the one holding the images)"
                if inside else "; put the target domain's images in it"))
        problems = [info["error"] for path in files if "error" in (info := inspect_file(path, "image"))]
        if problems:
            raise SegsynthError(f"--images {folder}: {problems[0]}" + (f" (and {len(problems) - 1} more)"
                                                                      if len(problems) > 1 else ""))
        return [read_image(path) for path in tqdm(files[:limit], desc="load images", unit="img", leave=False)]
    if images.partition(":")[0].strip().lower() not in DATASET_KINDS:
        raise SegsynthError(f"--images {images}: no such folder; give a folder of images, or a dataset spec such as "
                            "camvid:PATH?include=0001TP")
    dataset = open_dataset(images)
    chosen = dataset.split(split)
    pairs = dataset.pairs.get(split)
    if pairs is not None:  # file-backed: read the image files only (the labels are never opened)
        problems = [info["error"] for pair in pairs if "error" in (info := inspect_file(pair.image, "image"))]
        if problems:
            raise SegsynthError(f"--images {images}: {problems[0]}")
        return [read_image(pair.image) for pair in tqdm(pairs[:limit], desc="load images", unit="img", leave=False)]
    return [chosen[i].image for i in tqdm(range(len(chosen))[:limit], desc="load images", unit="img", leave=False)]


def _batch(images: list[torch.Tensor], size: tuple[int, int], config: AdaptConfig,
           rng: np.random.Generator) -> torch.Tensor:
    """A random crop (at least crop_scale of each side) of randomly drawn images, resized to the working size
    and flipped at random: (B, 3, H, W) float 0..255."""
    out = []
    for index in rng.integers(0, len(images), config.batch_size):
        image = images[index]
        height, width = image.shape[1:]
        scale = rng.uniform(config.crop_scale, 1.0, 2)
        crop_h, crop_w = max(1, int(round(height * scale[0]))), max(1, int(round(width * scale[1])))
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        crop = image[:, top: top + crop_h, left: left + crop_w].float()[None]
        picture = F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        if config.flip and rng.random() < 0.5:
            picture = picture.flip(-1)
        out.append(picture.clamp(0, 255))
    return torch.stack(out)


# --- the stage ---------------------------------------------------------------------------------------


def adapt(config: AdaptConfig) -> Path:
    """Fit a LoRA adapter of `config.generator` to the images `config.images`; returns the adapter folder."""
    with claim_folder(config.out, "adapt", "adapt.config.yaml", "AdaptConfig", markers=(INFO_FILE, TRAINING_STATE)):
        return _adapt(config)


def _adapt(config: AdaptConfig) -> Path:
    out, device = Path(config.out), resolve_device(config.device)

    # 1. The target images, before any model is loaded.
    images = [torch.from_numpy(image).permute(2, 0, 1).contiguous() for image in target_images(config.images,
                                                                                                  config.split)]

    # 2. The generator's UNet, frozen, with fresh LoRA layers on the targeted projections; its loss.
    adaptee = open_adaptee(config.generator, config, device)
    lr, alpha = config.lr or adaptee.lr, config.alpha or float(config.rank)
    torch.manual_seed(config.seed)
    trainable = add_lora(adaptee.unet, config.rank, alpha, config.dropout, config.target_modules)
    names = [name for name, parameter in adaptee.unet.named_parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=adaptee.autocast == torch.float16)

    # 3. Resume, or start afresh.
    start, seconds_before = 0, 0.0
    state_folder = training_state_folder(out, TRAINING_STATE) if config.resume else None
    if state_folder is not None:
        start, seconds_before = _resume(state_folder, config, adaptee, names, optimizer)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".adapter-*"):  # staging folders of a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    save_config(config, out / "adapt.config.yaml")
    base_parameters = sum(p.numel() for name, p in adaptee.unet.named_parameters() if ".lora_" not in name)
    meta = {"format": FORMAT, "segsynth_version": __version__, "base": adaptee.base,
            "lora": {"rank": config.rank, "alpha": alpha, "dropout": config.dropout,
                     "target_modules": list(config.target_modules), "layers": len(names) // 2,
                     "parameters": sum(p.numel() for p in trainable), "base_parameters": base_parameters},
            "prompt": config.prompt, "size": list(adaptee.size), "images": config.images, "image_count": len(images),
            "train_config": {**to_dict(config), "lr": lr, "alpha": alpha}}

    # 4. One iteration's loss: target images -> the generator's diffusion loss (the adapter alone trains), every
    #    draw (images, crops, flips, noise, timesteps, LoRA dropout) from generators seeded by (seed, iteration).
    def batch_loss(iteration: int) -> torch.Tensor:
        rng = np.random.default_rng([config.seed, iteration])
        noise = torch.Generator("cpu").manual_seed(config.seed * 1_000_003 + iteration)
        torch.manual_seed(config.seed * 1_000_003 + iteration)  # LoRA dropout, per iteration
        pictures = _batch(images, adaptee.size, config, rng)
        with torch.autocast(device.type, dtype=adaptee.autocast or torch.float32, enabled=adaptee.autocast is not None):
            return adaptee.loss(pictures, noise)

    # 5. Iterate (generators/training_loop.py); the adapter and its training state are swapped in whole at each
    #    save and at the end.
    adaptee.unet.train()
    run_iterations(config, out, TrainingParts(
        name="adapt", parameters=trainable, optimizer=optimizer, ema=None, batch_loss=batch_loss,
        save=lambda stats: _save(out, adaptee, names, optimizer, config, meta, stats), peak_lr=lr, scaler=scaler,
        saved_note=lambda: (f"the adapter saved earlier in {out} is intact (--resume continues from it)"
                            if (out / INFO_FILE).is_file() else f"no adapter was saved in {out}")),
        start, seconds_before)
    return out


def _save(out: Path, adaptee: Adaptee, names: list[str], optimizer, config: AdaptConfig, meta: dict,
          stats: dict) -> None:
    """adapter.safetensors (the LoRA weights only), adapter.json and the training state, swapped in whole."""
    parameters = dict(adaptee.unet.named_parameters())
    with staged_swap(out, [TRAINING_STATE, WEIGHTS_FILE, INFO_FILE], what="adapter") as staging:
        state = staging / TRAINING_STATE
        state.mkdir()
        save_file({name: parameters[name].detach().contiguous().cpu() for name in names},
                  state / "trainable.safetensors")
        save_optimizer_state(optimizer, state / "optimizer.safetensors")
        atomic_write_json(state / "state.json", {"iteration": stats["iterations"], "seconds": stats["seconds"],
                                                 "base": adaptee.base, "train_config": to_dict(config)})
        save_file(adapter_state(adaptee.unet), staging / WEIGHTS_FILE, metadata={"format": FORMAT})
        size = (staging / WEIGHTS_FILE).stat().st_size
        atomic_write_json(staging / INFO_FILE, {**meta, "bytes": size, "training": stats})


def _resume(folder: Path, config: AdaptConfig, adaptee: Adaptee, names: list[str], optimizer) -> tuple[int, float]:
    """Load the saved adapter weights and AdamW state; returns (iteration, seconds trained so far)."""
    state = read_json(folder / "state.json")
    check_resumed_settings(folder, state.get("train_config", {}), to_dict(config), RESUMABLE_CHANGES)
    check_base(folder, {"base": state.get("base", {})}, adaptee.base, config.generator)
    with loading(folder, "the training state is damaged: adapt again into a new --out (or without --resume)",
                 "the training state"):
        weights = load_file(str(folder / "trainable.safetensors"))
    if sorted(weights) != sorted(names):
        raise SegsynthError(f"{folder}/trainable.safetensors: holds other weights than this adapter trains; resume "
                            "with the same --generator, --rank and --target-modules or use a new --out")
    parameters = dict(adaptee.unet.named_parameters())
    with torch.no_grad():
        for name in names:
            parameters[name].copy_(weights[name])
    load_optimizer_state(optimizer, folder / "optimizer.safetensors")
    return int(state["iteration"]), float(state.get("seconds", 0.0))


__all__ = ["ADAPTEES", "adapt", "open_adaptee", "target_images"]
