"""Attn2mask / DiffuMask as a method of `segsynth run`: text -> image samples labelled by their own attention.

Attn2mask (Yoshihashi et al. 2023, arXiv 2309.01369) and DiffuMask (Wu et al.,
ICCV 2023) train a segmenter on images a text -> image diffusion model draws
for class prompts, labelled by the cross-attention each class word receives;
no pixel label is used anywhere. Stages, after the real-only reference:
  1. the text -> image generator: the builtin one trained here on the real
     images with image-level labels only ("a photo of road, car"), or a given
     attention:DIR / attention-sd:BASE (`RunConfig.generator`). For a builtin
     one the pseudo-mask resolutions default to all its cross-attention maps
     (self-attention refinement at the largest); for SD give them in
     `synthesize.pseudo_mask_settings`
  2. the class-prompt plan: images_per_mask images for each real training
     image's class set (`segsynth plan --class-prompts N`), the same budget
     as FreeMask's uniform plan
  3. pseudo-mask quality on real held-out images, per recipe
     (`segsynth attention-quality`): a diagnostic, nothing is chosen from it
  4. synthesize the plan once with the recipe as published ("attention-band"):
     pixels in the uncertain band (and, without a background class, below
     the threshold) ignored, the rest weighted by their confidence
  5. relabel the same images with the plain pseudo-mask each sample also
     keeps ("attention-raw", variants.py): no band, every pixel its top class
     (or background, where the dataset has that class), no weights -- the
     two sets differ only in their labels
  6. with the arm synthetic-attention-augmented (opt-in, `arms:`): the same
     class-prompt plan with prompt augmentation (`--augment-prompts`: each
     sample's prompt drawn from templates and its classes' synonyms, hyponyms
     and listed words, prompts.py; settings in the plan section's
     `prompt_augmentation`), rendered like the band set ("attention-augmented");
     a builtin generator trained here then learns the augmented prompts too, so
     it knows every word of that plan (the other arms' plan is unchanged)
  7. with `target_images` (unlabeled images of the domain the segmenter is
     evaluated on): adapt the generator to them with LoRA (`segsynth adapt`,
     the `adapt` section) and render the same plan with the adapter
     ("attention-band-lora": the band set's prompts and seeds, drawn by the
     adapted model)
Arms: real (reference); synthetic-attention-raw; synthetic-attention-band
(+ ignore band and confidence weights); synthetic-attention-reliable (the
band set, trained with the reliability-aware loss: per predicted class only
the most confident share of pixels in full, BECO-style, as Attn2mask does);
synthetic-attention-augmented (+ prompt augmentation: the reliable arm on the
augmented set; not run unless named). synthetic-attention-reliable-lora (+ LoRA: the same on the adapted model's
set; runs only when the run is given target_images).
All synthetic arms train on the same images_per_mask x N images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from segsynth.config import build_config
from segsynth.data.base import read_image, read_raw_mask
from segsynth.formats.manifest import read_manifest
from segsynth.io import SegsynthError, atomic_write_png, read_json, safe_relative_path
from segsynth.methods.attn2mask.variants import derive_label_set
from segsynth.methods.base import Arm, Method, Stage
from segsynth.plan import make_plan
from segsynth.report import write_set_grids
from segsynth.stage_configs import (AdaptConfig, AttentionQualityConfig, PlanConfig, SynthesizeConfig,
                                    TrainTextGeneratorConfig)
from segsynth.synthesize import synthesize

ARMS = {
    "real": Arm("real", "real"),
    "synthetic-attention-raw": Arm("synthetic-attention-raw", "synthetic", ("attention-raw",), "raw",
                                   (("loss", "ce"),)),
    "synthetic-attention-band": Arm("synthetic-attention-band", "synthetic", ("attention-band",), "raw",
                                    (("loss", "ce"),)),
    "synthetic-attention-reliable": Arm("synthetic-attention-reliable", "synthetic", ("attention-band",), "raw",
                                        (("loss", "reliable"),)),
    # + prompt augmentation: the reliable arm on images drawn from augmented prompts (opt-in: --arms)
    "synthetic-attention-augmented": Arm("synthetic-attention-augmented", "synthetic", ("attention-augmented",),
                                         "raw", (("loss", "reliable"),)),
    "synthetic-attention-reliable-lora": Arm("synthetic-attention-reliable-lora", "synthetic",
                                             ("attention-band-lora",), "raw", (("loss", "reliable"),),
                                             needs="target_images"),
}
MAIN_ARMS = ("real", "synthetic-attention-raw", "synthetic-attention-band", "synthetic-attention-reliable")
SETS = ("attention-band", "attention-raw", "attention-augmented", "attention-band-lora")
AUGMENTED = "attention-augmented"  # the set an augmented plan renders
PRESET = "dataset-diffusion"  # the recipe when the synthesize section names none


def attention_heights(size, channels) -> list[int]:
    """Cross-attention map heights of a builtin text generator: its UNet runs on the 2x2-packed image and
    has cross-attention on every level but the first (generators/builtin_text/model.py)."""
    height = int(size[0]) // 2
    return sorted({math.ceil(height / 2 ** level) for level in range(1, len(channels))}, reverse=True)


def stages(context, arms: list[Arm]) -> list[Stage]:
    """Attn2mask's stages for the arms being trained (sets no arm uses are not made)."""
    config, out = context.config, context.out
    plan = out / "plans" / "class_prompts.jsonl"
    augmented_plan = out / "plans" / "class_prompts_augmented.jsonl"
    augmenting = any(AUGMENTED in arm.synthetic for arm in arms)
    augmentation = dict(config.plan.get("prompt_augmentation") or {})
    section = dict(config.synthesize)
    pseudo_mask = section.pop("pseudo_mask", PRESET)
    overrides = dict(section.pop("pseudo_mask_settings", {}) or {})
    result = []

    # 1. The generator: given, or the builtin text generator trained here on image-level labels.
    generator = config.generator
    if generator not in ("auto", "train") and not generator.startswith(("attention:", "attention-sd:")):
        raise SegsynthError(f"--generator {generator}: attn2mask needs a text -> image generator with attention: "
                            "auto or train (the builtin one, trained here), attention:DIR or attention-sd:BASE")
    if generator in ("auto", "train"):
        folder = out / "text_generator"
        # With the augmented arm it learns the augmented prompts too, so it knows every word of that plan.
        train_config = build_config(TrainTextGeneratorConfig, {
            "sample_steps": config.synthesize.get("steps", 20), **config.train_text_generator, "data": config.data,
            "out": str(folder), "device": config.device, "target": "image", "prompts": "classes", "resume": True,
            "augment_prompts": augmenting, "prompt_augmentation": augmentation if augmenting else {}},
            "run config section 'train_text_generator'")
        result.append(Stage("train text generator", lambda: _train_text_generator(train_config),
                            lambda: _finished(folder, train_config.max_minutes, train_config)))
        generator = f"attention:{folder}"
        heights = attention_heights(train_config.size, train_config.channels)
        overrides = {"resolutions": heights, "self_attention_resolution": heights[0], **overrides}

    elif generator.startswith("attention:"):  # a given builtin text generator: its own attention heights
        meta = Path(generator.partition(":")[2]) / "segsynth_generator.json"
        trained = read_json(meta).get("train_config", {}) if meta.is_file() else {}
        if trained.get("size") and trained.get("channels"):
            heights = attention_heights(trained["size"], trained["channels"])
            overrides = {"resolutions": heights, "self_attention_resolution": heights[0], **overrides}

    # 2-3. The class-prompt plan; pseudo-mask quality on real held-out images.
    result.append(Stage("class-prompt plan", lambda: make_plan(context.stage_config(
        PlanConfig, "plan", data=config.data, out=str(plan), class_prompts=config.images_per_mask)), plan.is_file))
    if augmenting:
        result.append(Stage("augmented class-prompt plan", lambda: make_plan(context.stage_config(
            PlanConfig, "plan", data=config.data, out=str(augmented_plan), class_prompts=config.images_per_mask,
            augment_prompts=True)), augmented_plan.is_file))
    quality = out / "attention_quality"
    result.append(Stage("attention quality", lambda: _attention_quality(AttentionQualityConfig(
        generator=generator, data=config.data, out=str(quality), split=config.eval_split, pseudo_mask_settings=overrides,
        device=config.device)), (quality / "attention_quality.json").is_file))

    # 4-5. Render the band set once; relabel its images for the raw set (each resumes on its own).
    band, raw = (context.synthetic_set(name) for name in SETS[:2])
    if any(set(arm.synthetic) & {SETS[0], SETS[1], "attention-band-lora"} for arm in arms):
        result.append(Stage("synthesize attention-band", lambda: synthesize(context.stage_config(
            SynthesizeConfig, "synthesize", data=config.data, plan=str(plan), generator=generator, out=str(band),
            device=config.device, pseudo_mask=pseudo_mask, pseudo_mask_settings=overrides))))
    if any("attention-raw" in arm.synthetic for arm in arms):
        result.append(Stage("relabel attention-raw", lambda: derive_label_set(band, raw, "raw_label"),
                            lambda: _relabelled(band, raw)))

    # 6. The augmented plan rendered with the band set's recipe (same generator, seeds and budget).
    if augmenting:
        result.append(Stage(f"synthesize {AUGMENTED}", lambda: synthesize(context.stage_config(
            SynthesizeConfig, "synthesize", data=config.data, plan=str(augmented_plan), generator=generator,
            out=str(context.synthetic_set(AUGMENTED)), device=config.device, pseudo_mask=pseudo_mask,
            pseudo_mask_settings=overrides))))

    # 6. + LoRA: the generator adapted to the target images, the same plan rendered with the adapter.
    if any("attention-band-lora" in arm.synthetic for arm in arms):
        adapter, adapted = out / "adapter", context.synthetic_set("attention-band-lora")
        adapt_config = context.stage_config(AdaptConfig, "adapt", generator=generator, images=config.target_images,
                                            out=str(adapter), resume=True, device=config.device)
        result.append(Stage("adapt generator (LoRA)", lambda: _adapt(adapt_config),
                            lambda: _finished(adapter, adapt_config.max_minutes, meta_file="adapter.json")))
        result.append(Stage("synthesize attention-band-lora", lambda: synthesize(context.stage_config(
            SynthesizeConfig, "synthesize", data=config.data, plan=str(plan), generator=generator, out=str(adapted),
            device=config.device, pseudo_mask=pseudo_mask, pseudo_mask_settings=overrides, lora=str(adapter)))))
    return result


def _adapt(config: AdaptConfig):
    from segsynth.generators.adapt import adapt

    return adapt(config)


def _train_text_generator(config: TrainTextGeneratorConfig):
    from segsynth.generators.builtin_text import train_text_generator

    return train_text_generator(config)


def _attention_quality(config: AttentionQualityConfig):
    from segsynth.methods.attn2mask.quality import attention_quality

    return attention_quality(config)


def _finished(folder: Path, max_minutes: float, wanted: TrainTextGeneratorConfig | None = None,
              meta_file: str = "segsynth_generator.json") -> bool:
    """All iterations done, or the time budget spent (a resumed run would only train past it). A generator
    trained with other prompt augmentation than `wanted` asks for is refused: its vocabulary differs."""
    meta = folder / meta_file
    if not meta.is_file():
        return False
    saved = read_json(meta)
    if wanted is not None:
        trained = saved.get("train_config", {})
        has, needs = (_augmentation_text(trained.get("augment_prompts", False), trained.get("prompt_augmentation")),
                      _augmentation_text(wanted.augment_prompts, wanted.prompt_augmentation))
        if has != needs:
            raise SegsynthError(f"{folder}: this text generator was trained with {has}, but this run's arms need "
                                f"{needs} (the arm synthetic-attention-augmented trains it on augmented prompts, with "
                                "the plan section's prompt_augmentation); use a new --out, or delete that folder to "
                                "train it again")
    training = saved.get("training", {})
    return bool(training.get("finished")) or (max_minutes > 0 and training.get("seconds", 0) >= 60 * max_minutes - 1)


def _augmentation_text(augment: bool, settings: dict | None) -> str:
    return f"prompt augmentation {json.dumps(settings or {}, sort_keys=True)}" if augment else "no prompt augmentation"


def _relabelled(band: Path, raw: Path) -> bool:
    """The raw set lists every sample the band set has (a resumed synthesis may have added some)."""
    return (raw / "manifest.jsonl").is_file() and len(read_manifest(raw)) == len(read_manifest(band))


def grids(context) -> list:
    """Per synthetic set: rows of image | attention heat map | pseudo-mask | ignored pixels (red on the image);
    with the + LoRA set, grids/adaptation.png: the same prompt and seed before | after adaptation | a target image."""
    written = write_set_grids(context, SETS, write_attention_grid)
    before, after = context.synthetic_set("attention-band"), context.synthetic_set("attention-band-lora")
    if context.config.target_images and (after / "manifest.jsonl").is_file():
        split = context.config.adapt.get("split", "train")
        path = write_adaptation_grid(before, after, context.config.target_images, context.out / "grids" /
                                     "adaptation.png", context.config.grids, split)
        written += [path] if path is not None else []
    return written


def write_adaptation_grid(before: Path, after: Path, target: str, path: Path, rows: int,
                          split: str = "train") -> Path | None:
    """Rows of: a sample of the set `before` | the sample of the same id (prompt and seed) in `after`, drawn with
    the adapter | a real target image (from `target`: a folder or a dataset spec, as `segsynth adapt --images`),
    resized to the samples' size. None when the sets share no sample."""
    from segsynth.generators.adapt import target_images

    after_records = {record["id"]: record for record in read_manifest(after)}
    pairs = [(record, after_records[record["id"]]) for record in read_manifest(before)
             if record["id"] in after_records][:rows]
    if not pairs:
        return None
    real = target_images(target, split, limit=max(1, len(pairs)))
    tiles = []
    for row, (old, new) in enumerate(pairs):
        first = read_image(safe_relative_path(before, old["image"], f"manifest image of {old['id']}"))
        second = read_image(safe_relative_path(after, new["image"], f"manifest image of {new['id']}"))
        height, width = first.shape[:2]
        picture = np.asarray(Image.fromarray(real[row % len(real)]).resize((width, height), Image.BILINEAR))
        tiles.append(np.concatenate([first, second, picture], axis=1))
    grid = np.concatenate(tiles, axis=0)
    scale = max(1, 384 // grid.shape[1] + 1) if grid.shape[1] < 384 else 1
    atomic_write_png(path, np.asarray(Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                                                   Image.NEAREST)))
    return path


def write_attention_grid(root: Path, path: Path, palette, rows: int) -> Path | None:
    """The grid of one attention-labelled set (see `grids`); None when it has no samples."""
    if not root.is_dir() or not read_manifest(root):
        return None
    colours = np.zeros((256, 3), np.uint8)
    colours[: len(palette)] = np.asarray(palette, np.uint8)
    tiles = []
    for record in read_manifest(root)[:rows]:
        image = read_image(safe_relative_path(root, record["image"], f"manifest image of {record['id']}"))
        mask = read_raw_mask(safe_relative_path(root, record["mask"], f"manifest mask of {record['id']}"))
        extras = record.get("extras") or {}
        heat = (read_image(safe_relative_path(root, extras["attention"], f"manifest extra of {record['id']}"))
                if "attention" in extras else np.zeros_like(image))
        ignored = image.copy()
        hole = mask == 255
        ignored[hole] = (0.35 * ignored[hole] + 0.65 * np.array([255, 0, 0])).astype(np.uint8)
        tiles.append(np.concatenate([image, heat, colours[mask], ignored], axis=1))
    grid = np.concatenate(tiles, axis=0)
    scale = max(1, 256 // grid.shape[1] + 1) if grid.shape[1] < 512 else 1
    big = np.asarray(Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST))
    atomic_write_png(path, big)
    return path


# Sizes for this method over run.PRESETS (which holds the text generator's): one seed, one image per
# real mask and shorter trainings keep the toy run near five minutes on two cores (four arms).
PRESETS = {
    ("toy", "default"): {"seeds": [0], "images_per_mask": 1, "train": {"iterations": 400}, "synthesize": {"steps": 8}},
    ("toy", "quick"): {"seeds": [0], "images_per_mask": 1, "train": {"iterations": 200}, "synthesize": {"steps": 6},
                       "train_text_generator": {"max_minutes": 0.5}},
    ("real", "default"): {"images_per_mask": 1},
    ("real", "quick"): {"images_per_mask": 1},
}

ATTN2MASK = Method("attn2mask", "Attn2mask / DiffuMask: text -> image samples labelled by their cross-attention",
                   ARMS, stages, grids, PRESETS, main_arms=MAIN_ARMS)
