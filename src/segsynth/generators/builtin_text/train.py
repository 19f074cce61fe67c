"""Training the builtin text generator: text encoder and UNet together, from scratch, on CPU budgets.

What it learns from (`--target`):

* "image": real photos, each with a prompt naming the classes present in it.
  Only image-level labels are used (which classes an image holds -- the
  Attn2mask / DiffuMask setting); no pixel label reaches the loss, so any
  class localisation must come from the cross-attention.
* "colour-mask": the label map drawn in colours (`target_image`) with SegGen's
  colour coding (segsynth.methods.seggen.colour): by default the class colours
  are as far apart as possible (`separated_palette`), so sampling errors do not
  move a pixel to another class. The palette (class rows, then the ignore
  colour) is stored in segsynth_generator.json under "colour_coding"; the
  `text2mask:DIR` generator decodes its samples by it (SegGen's MaskSyn).

Prompts (`--prompts`): "classes" makes "a photo of sky, road, car" from the
classes covering at least 0.5% of an image, in the dataset's class order (the
label is read once per image for that list and never again); or a captions
JSONL file with one {"id", "caption"} line per training sample.
With `--augment-prompts` (class prompts only) each sample gets 16 prompts drawn
from templates and its classes' words -- synonyms, hyponyms, listed words
(methods/attn2mask/prompts.py) -- and each iteration trains on one of them, so
an augmented plan's every word is in the vocabulary and was seen naming its
class; each word (also a multi-word one) is one token, like a class name.

Recipe: v-prediction on a cosine schedule, the loss weight of nearly clean
steps capped Min-SNR style (Hang et al. 2023; `_loss_weights` says why the
noisiest steps keep their full weight), an EMA of both networks, horizontal
flips, AdamW with linear warm-up and cosine decay. Classifier-free guidance (Ho & Salimans 2022)
is trained in: each prompt is swapped for the empty prompt with probability
`cond_dropout`.

Determinism and resume: every iteration draws its batch, flips, prompt drops,
noise and timesteps from generators seeded by (seed, iteration), the networks
have no dropout, and the learning rate is a function of the iteration, so a
run resumed from its last save (raw weights, EMA, AdamW state, iteration, in
OUT/training_state/) ends with the weights of an uninterrupted run (unless
--max-minutes shortens the schedule by wall time; that budget counts the
training time of every session of the run). The iterations themselves run in
generators/training_loop.py, the loop the mask generators' trainer shares.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm import tqdm
from transformers import CLIPTextModel

from segsynth import __version__
from segsynth.config import save_config, to_dict
from segsynth.data import open_dataset
from segsynth.data.validate import check_before_compute
from segsynth.generators.base import resolve_device
from segsynth.generators.builtin.train import load_training_state, save_training_state
from segsynth.generators.builtin_text.model import (
    PATCH,
    build_text_encoder,
    build_unet,
    encode_images,
    encode_text,
    key_mask,
    training_noise_schedule,
    working_size,
)
from segsynth.generators.builtin_text.tokenizer import WordTokenizer, normalise
from segsynth.generators.schedulers import scheduler_name
from segsynth.generators.training_loop import TrainingParts, run_iterations
from segsynth.formats.checkpoint import check_resumed_settings, training_state_folder
from segsynth.io import SegsynthError, atomic_write_json, loading, read_json, staged_swap
from segsynth.methods.attn2mask.prompts import PromptAugmenter
from segsynth.methods.seggen.captions import read_captions as read_caption_file
from segsynth.methods.seggen.colour import MIN_COMPONENT, ColourCodingConfig, encode_mask, resolve_palette
from segsynth.outputs import claim_folder
from segsynth.stage_configs import TrainTextGeneratorConfig

GENERATOR_FILE = "segsynth_generator.json"
FORMAT = "segsynth-builtin-text-generator/1"
TRAINING_STATE = "training_state"
MIN_CLASS_FRACTION = 0.005  # classes under 0.5% of an image's pixels are left out of its prompt
AUGMENTED_VARIANTS = 16  # --augment-prompts: prompts drawn per training sample, one of them per iteration
PROMPT_TEMPLATE = "a photo of {classes}"
# Settings a resumed run may change (everything else must match the saved run).
RESUMABLE_CHANGES = ("out", "resume", "iterations", "max_minutes", "save_every", "log_every", "device",
                     "decode_max_distance")


# --- what is generated, and from which prompt ---------------------------------------------


# target name -> (the HxWx3 uint8 picture of a sample given the colour-coding palette, how it is resized to the
# working size)
TARGETS = {
    "image": (lambda sample, palette: sample.image, Image.BILINEAR),
    "colour-mask": (lambda sample, palette: encode_mask(sample.label, palette), Image.NEAREST),
}


def coding_palette(config: TrainTextGeneratorConfig, dataset) -> np.ndarray | None:
    """The colour-mask target's palette ((C + 1) x 3 uint8, the ignore colour last); None for other targets."""
    if config.target != "colour-mask":
        return None
    return resolve_palette(ColourCodingConfig(palette=config.palette), dataset.classes, dataset.palette)


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise SegsynthError(f"unknown --target {target!r}; options: {', '.join(TARGETS)}")
    return target


def target_image(sample, target: str, palette: Sequence[Sequence[int]] | None) -> np.ndarray:
    """The picture the generator learns to make for `sample` (HxWx3 uint8, the sample's own size); `palette` is
    the colour coding of the colour-mask target (class colours, then the ignore colour; `coding_palette`)."""
    return np.ascontiguousarray(TARGETS[check_target(target)][0](sample, palette), dtype=np.uint8)


def present_classes(label: np.ndarray, num_classes: int, min_fraction: float = MIN_CLASS_FRACTION) -> list[int]:
    """The classes covering at least `min_fraction` of the image's pixels, in class order (image-level labels)."""
    counts = np.bincount(label.ravel(), minlength=256)[:num_classes]
    return [int(c) for c in np.flatnonzero(counts >= min_fraction * label.size)]


def class_prompt(class_names: Sequence[str]) -> str:
    """'a photo of sky, road, car'; no class -> the empty prompt."""
    return PROMPT_TEMPLATE.format(classes=", ".join(class_names)) if class_names else ""


def read_captions(path: str | os.PathLike, ids: Sequence[str]) -> list[str]:
    """One caption per id from a captions file (SegGen's format: JSONL {"id", "caption"} lines or JSON {id: caption},
    refused with file and line for ids not in `ids`, empty captions and repeated ids); every id must have one."""
    captions = read_caption_file(path, ids)
    missing = [sample_id for sample_id in ids if sample_id not in captions]
    if missing:
        raise SegsynthError(f"{path}: no caption for {len(missing)} of the {len(ids)} training samples "
                            f"(e.g. {', '.join(missing[:5])}); add a line per sample id or use --prompts classes")
    return [captions[sample_id] for sample_id in ids]


def prompts_kind(prompts: str) -> str:
    """'classes' or 'captions' (a file path), or an error naming both options."""
    if prompts == "classes":
        return "classes"
    if Path(prompts).is_file():
        return "captions"
    raise SegsynthError(f"--prompts {prompts!r}: give 'classes' or the path of a captions JSONL file "
                        "(one {\"id\", \"caption\"} line per sample); no such file")


# --- training -----------------------------------------------------------------------------


def train_text_generator(config: TrainTextGeneratorConfig) -> Path:
    """Train a builtin text generator; returns the generator folder."""
    with claim_folder(config.out, "train-text-generator", "train_text_generator.config.yaml",
                      "TrainTextGeneratorConfig", markers=("segsynth_generator.json", TRAINING_STATE)):
        return _train_text_generator(config)


def _train_text_generator(config: TrainTextGeneratorConfig) -> Path:
    out = Path(config.out)
    device = resolve_device(config.device)

    # 1. Check the settings and the data before any compute.
    check_target(config.target)
    kind = prompts_kind(config.prompts)
    size = working_size(config.size, len(config.channels))
    scheduler_name(config.sample_scheduler)
    if config.keys == "class-words" and config.prompts != "classes":
        raise SegsynthError("--keys class-words needs --prompts classes (class prompts name the classes the keys are "
                            "restricted to); with a captions file use --keys all")
    if config.augment_prompts and config.prompts != "classes":
        raise SegsynthError("--augment-prompts varies class prompts: it needs --prompts classes (a captions file "
                            "brings its own words)")
    dataset = open_dataset(config.data)
    augmenter = PromptAugmenter(dataset.classes, config.prompt_augmentation) if config.augment_prompts else None
    split = dataset.split(config.split)
    check_before_compute(dataset, [config.split])

    # 2. Every target at working size and every prompt, in memory (small images; read once).
    palette = coding_palette(config, dataset)
    targets, prompts, class_names = _load_training_set(config, dataset, split, size, kind, palette)
    if augmenter is None:
        tokenizer = WordTokenizer.build(prompts, phrases=dataset.classes, max_length=config.max_length)
        token_ids = tokenizer(prompts)
        class_token_ids = class_tokens(tokenizer, dataset.classes)
    else:  # (N, variants, length): each iteration draws one variant per sample
        tokenizer, token_ids = augmented_prompt_ids(augmenter, class_names, config.max_length)
        class_token_ids = class_tokens(tokenizer, list(dataset.classes) + augmenter.all_words())
    empty_ids = tokenizer([""])[0]

    # 3. Networks, noise schedule, optimizer, EMA; the saved state when resuming.
    torch.manual_seed(config.seed)
    text_encoder = build_text_encoder(len(tokenizer), tokenizer.max_length, config.text_width, config.text_layers).to(device)
    unet = build_unet(size, config.channels, config.layers_per_block, config.text_width).to(device)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    noise_schedule = training_noise_schedule()
    alphas_cumprod = noise_schedule.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    ema = EMAModel(parameters, decay=config.ema_decay, use_ema_warmup=True, power=2 / 3)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".text-generator-*"):  # staging folders of a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    start, seconds_before = 0, 0.0
    state_folder = training_state_folder(out, TRAINING_STATE) if config.resume else None
    if state_folder is not None:
        start, seconds_before = _resume(state_folder, config, tokenizer, unet, text_encoder, optimizer, ema, device)
    save_config(config, out / "train_text_generator.config.yaml")
    meta = _meta(config, dataset, size, kind, tokenizer, unet, text_encoder, palette, class_token_ids)
    meta["prompt_augmentation"] = None if augmenter is None else augmenter.describe()
    models = (unet, text_encoder, tokenizer, noise_schedule)

    # 4. One iteration's loss: batch -> flips -> prompt drops -> noise at a random timestep -> v-prediction loss
    #    (capped weights), every draw from generators seeded by (seed, iteration).
    def batch_loss(iteration: int) -> torch.Tensor:
        rng = np.random.default_rng([config.seed, iteration])
        torch_rng = torch.Generator("cpu").manual_seed(config.seed * 1_000_003 + iteration)
        indices = torch.from_numpy(rng.integers(0, len(targets), config.batch_size))
        flips = torch.from_numpy(rng.random(config.batch_size) < (0.5 if config.flip else 0.0))
        dropped = torch.from_numpy(rng.random(config.batch_size) < config.cond_dropout)
        pictures = targets[indices].float()
        pictures[flips] = pictures[flips].flip(-1)
        if augmenter is None:
            ids = token_ids[indices].clone()
        else:  # drawn after the plain run's draws, which stay as they were
            ids = token_ids[indices, torch.from_numpy(rng.integers(0, token_ids.shape[1], config.batch_size))].clone()
        ids[dropped] = empty_ids
        clean = encode_images(pictures).to(device)
        ids = ids.to(device)
        states = encode_text(text_encoder, ids)
        mask = key_mask(ids, config.keys, class_token_ids, tokenizer.bos_id)
        return diffusion_loss(unet, clean, states, mask, noise_schedule, alphas_cumprod, config.min_snr_gamma,
                              torch_rng)

    # 5. Iterate (generators/training_loop.py), saving the EMA networks with their training state as it goes
    #    and at the end.
    unet.train()
    text_encoder.train()
    run_iterations(config, out, TrainingParts(
        name="train-text-generator", parameters=parameters, optimizer=optimizer, ema=ema, batch_loss=batch_loss,
        save=lambda stats: _save(out, models, optimizer, ema, {**meta, "training": stats}),
        saved_note=lambda: (f"the model saved earlier in {out} is intact" if (out / GENERATOR_FILE).is_file()
                            else f"no model was saved in {out}")), start, seconds_before)
    return out


def augmented_prompt_ids(augmenter: PromptAugmenter, class_names: list[list[str]],
                         max_length: int) -> tuple[WordTokenizer, torch.Tensor]:
    """(tokenizer, (N, AUGMENTED_VARIANTS, length) ids): AUGMENTED_VARIANTS prompts per sample drawn from its
    classes' words (key: sample index, variant), a vocabulary holding every word and template any augmented
    prompt can have (each word one token), and a length that fits every sample's longest template."""
    variants = [[augmenter.prompt(names, index, variant)[0] for variant in range(AUGMENTED_VARIANTS)]
                for index, names in enumerate(class_names)]
    texts = ([text for row in variants for text in row] + augmenter.vocabulary_texts()
             + [augmenter.longest_prompt(names) for names in class_names])
    tokenizer = WordTokenizer.build(texts, phrases=augmenter.classes + tuple(augmenter.all_words()),
                                    max_length=max_length)
    return tokenizer, torch.stack([tokenizer(row) for row in variants])


def diffusion_loss(unet: UNet2DConditionModel, clean: torch.Tensor, states: torch.Tensor, mask: torch.Tensor | None,
                   noise_schedule, alphas_cumprod: torch.Tensor, min_snr_gamma: float,
                   generator: torch.Generator) -> torch.Tensor:
    """The training loss on one batch (also what `segsynth adapt` fits a LoRA with): `clean` pictures in model
    space noised at random timesteps (noise and timesteps drawn from the CPU `generator`, in that order), the
    v-prediction error given the token `states` (and the key `mask`), weighted by `_loss_weights`."""
    device = clean.device
    noise = torch.randn(clean.shape, generator=generator).to(device)
    timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (clean.shape[0],), generator=generator).to(device)
    noisy = noise_schedule.add_noise(clean, noise, timesteps)
    target = noise_schedule.get_velocity(clean, noise, timesteps)
    predicted = unet(noisy, timesteps, encoder_hidden_states=states, encoder_attention_mask=mask).sample
    per_sample = (predicted.float() - target).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * _loss_weights(alphas_cumprod, timesteps, min_snr_gamma)).mean()


def _load_training_set(config: TrainTextGeneratorConfig, dataset, split, size, kind: str, palette):
    """(N, 3, H, W) uint8 targets at working size, one prompt per sample, and (class prompts) the names of
    the classes each prompt lists."""
    resample = TARGETS[config.target][1]
    targets, prompts, class_names = [], [], []
    captions = read_captions(config.prompts, split.ids) if kind == "captions" else None
    for index in tqdm(range(len(split)), desc="load", unit="img", leave=False):
        sample = split[index]
        picture = Image.fromarray(target_image(sample, config.target, palette))
        picture = np.asarray(picture.resize((size[1], size[0]), resample))
        targets.append(torch.from_numpy(picture.copy()).permute(2, 0, 1))
        if captions is None:  # image-level labels: which classes are present, read once here
            class_names.append([dataset.classes[c] for c in present_classes(sample.label, dataset.num_classes)])
            prompts.append(class_prompt(class_names[-1]))
        else:
            prompts.append(captions[index])
    if not targets:
        raise SegsynthError(f"dataset {config.data}, split {config.split}: no samples to train on")
    return torch.stack(targets), prompts, class_names


def class_tokens(tokenizer: WordTokenizer, classes: Sequence[str]) -> list[int]:
    """The token id of each class name (class names are single tokens of the vocabulary, by construction)."""
    return [tokenizer.ids[normalise(name)] for name in classes]


def _loss_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-style weights on the v-loss: min(SNR + 1, gamma) / (SNR + 1).

    The v-loss is the x0-loss weighted by SNR + 1; Min-SNR-gamma (Hang et al. 2023) caps that x0 weight
    at gamma so nearly clean steps stop dominating. Its published v-form, min(SNR, gamma) / (SNR + 1),
    also scales the noisiest steps by SNR (~0) -- and those are the steps where only the prompt tells
    what to draw. Measured on flat red / blue images named by their prompt (the learning test in
    tests/generators/test_builtin_text.py: 16 px, batch 8, 100 iterations): the published form left the
    colour undecided (red-minus-blue margin under 10 on two seeds), this one decided it (230-360 on five
    seeds); the published form needed about twice the iterations. So the cap is kept and the noisy end
    left at the plain v-loss weight."""
    if gamma <= 0:
        return torch.ones(len(timesteps), device=timesteps.device)
    alpha = alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha).clamp(min=1e-8)
    return (snr + 1).clamp(max=gamma) / (snr + 1)


def _meta(config: TrainTextGeneratorConfig, dataset, size, kind: str, tokenizer: WordTokenizer,
          unet: UNet2DConditionModel, text_encoder: CLIPTextModel, palette: np.ndarray | None,
          class_token_ids: Sequence[int]) -> dict:
    return {"format": FORMAT, "segsynth_version": __version__, "classes": list(dataset.classes),
            "palette": [list(c) for c in dataset.palette],
            # how colour-mask samples are read back (text2mask:DIR): palette rows are the classes, then ignore
            "colour_coding": None if palette is None else {
                "palette": palette.tolist(), "choice": config.palette, "max_distance": config.decode_max_distance,
                "min_component": MIN_COMPONENT},
            "size": list(size), "patch": PATCH, "target": config.target, "prompts": kind,
            "prompt_template": PROMPT_TEMPLATE if kind == "classes" else None,
            "min_class_fraction": MIN_CLASS_FRACTION if kind == "classes" else None,
            "vocab_size": len(tokenizer), "max_length": tokenizer.max_length,
            "conditioning": "word tokens -> CLIP text encoder -> UNet cross-attention (levels 2+ and the middle)",
            # which prompt positions cross-attention may attend to (model.key_mask), and the class tokens it keeps
            "keys": config.keys, "class_token_ids": list(map(int, class_token_ids)),
            "sampling": {"steps": config.sample_steps, "scheduler": config.sample_scheduler, "guidance": config.guidance},
            "parameters": {"unet": sum(p.numel() for p in unet.parameters()),
                           "text_encoder": sum(p.numel() for p in text_encoder.parameters())},
            "data": config.data, "split": config.split, "train_config": to_dict(config)}


# --- saving and resuming ---------------------------------------------------------------------


def _save(out: Path, models, optimizer, ema: EMAModel, meta: dict) -> None:
    """Write the EMA model and the training state into a staging folder, then swap each part in.

    The training state (raw weights, EMA, AdamW, iteration) is one folder, swapped first, so a resume
    always finds a whole one (or its `.old` copy when the kill fell between the two renames)."""
    unet, text_encoder, tokenizer, noise_schedule = models
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    names = [TRAINING_STATE, "unet", "text_encoder", "tokenizer", "scheduler", GENERATOR_FILE]
    with staged_swap(out, names, what="text-generator") as staging:
        save_training_state(staging / TRAINING_STATE, _networks(unet, text_encoder), optimizer, ema, meta)
        tokenizer.save(staging / TRAINING_STATE)  # a resume checks that the prompts' vocabulary is the same
        ema.store(parameters)
        ema.copy_to(parameters)
        try:
            unet.save_pretrained(staging / "unet", safe_serialization=True)
            text_encoder.save_pretrained(staging / "text_encoder")
        finally:
            ema.restore(parameters)
        tokenizer.save(staging / "tokenizer")
        noise_schedule.save_pretrained(staging / "scheduler")
        atomic_write_json(staging / GENERATOR_FILE, meta)


def _networks(unet, text_encoder) -> torch.nn.ModuleDict:
    """Both networks as one module for the training state (generators/builtin/train.py writes and reads it):
    its weights are named unet.* and text_encoder.*."""
    return torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})


def _resume(folder: Path, config: TrainTextGeneratorConfig, tokenizer: WordTokenizer, unet, text_encoder,
            optimizer, ema: EMAModel, device: torch.device) -> tuple[int, float]:
    """Load the saved training state into the fresh networks; returns (iteration, seconds trained so far)."""
    state = read_json(folder / "state.json")
    check_resumed_settings(folder, state.get("train_config", {}), to_dict(config), RESUMABLE_CHANGES)
    if WordTokenizer.load(folder) != tokenizer:
        raise SegsynthError(f"{folder}: the training prompts changed since this run was saved (its vocabulary "
                            "differs); resume on the same data and prompts or use a new --out")
    with loading(folder, "the training state is damaged: train again into a new --out (or without --resume)",
                 "the training state"):
        return load_training_state(folder, state, _networks(unet, text_encoder), optimizer, ema, device)
