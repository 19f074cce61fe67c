"""SegGen as a method of `segsynth run`: MaskSyn and ImgSyn, and the arms that train on them.

SegGen (Ye et al., 2023, "SegGen: Supercharging Segmentation Models with
Text2Mask and Mask2Img Synthesis") makes training pairs two ways:

  ImgSyn   new images for the real masks (a mask -> image generator);
  MaskSyn  new masks from text (a text -> mask generator trained on captions
           of the real masks, drawing colour-coded maps that are decoded to
           labels), then images for those masks (the same mask -> image
           generator).

and trains the segmenter on real data in which each draw is replaced by a
synthetic sample with probability p (0.6; `--train replace_probability=...`).
Here every replace arm draws its synthetic samples uniformly from its sets
(`replace_from: pool`): MaskSyn samples have no real twin, and the ImgSyn arm
draws the same way so the arms differ only in their data.

Stages, after the real-only reference segmenter:
  1. captions of the real training masks (`captions` section; from the masks by default)
  2. the text -> mask generator, trained on (caption, colour-coded mask) pairs (`train_text_generator`)
  3. the masks plan: `images_per_mask` text requests per caption
  4. the mask set: that plan through `text2mask:` (OUT/synthetic/masks)
  5. the MaskSyn plans and images: one image per generated mask, by the mask -> image generator
     (given, shipped for toy data, or trained: the `generator` key, as FreeMask)
  6. the ImgSyn plans and images: `images_per_mask` images per real mask
  7. mask quality: the mask set against the real masks, the alignment of the MaskSyn images
     (methods/seggen/quality_report.py), and its grid

Budget: every arm that uses synthetic data gets the same number of synthetic
samples, images_per_mask x N real masks. Each plan is split into two halves
by alternating entries (sets "<name>-a" and "<name>-b"); the single-source
arms use both halves of their source, the combined arms ImgSyn's half a and
MaskSyn's half b (the same total, give or take images_per_mask when N is odd).
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from segsynth.config import build_config
from segsynth.formats.plan import read_plan, write_plan
from segsynth.generators.builtin_text import train_text_generator
from segsynth.io import read_json
from segsynth.methods.base import Arm, Method, Stage
from segsynth.methods.seggen.captions import make_captions
from segsynth.methods.seggen.quality_report import write_mask_quality
from segsynth.plan import make_plan
from segsynth.report import write_set_grids
from segsynth.stage_configs import (CaptionConfig, MaskQualityConfig, PlanConfig, SynthesizeConfig,
                                    TrainTextGeneratorConfig)
from segsynth.synthesize import synthesize

POOL = (("replace_from", "pool"),)
# The SegGen arms, in table order.
ARMS = {
    "real": Arm("real", "real"),
    "imgsyn-replace": Arm("imgsyn-replace", "replace", ("imgsyn-a", "imgsyn-b"), train=POOL),
    "masksyn-replace": Arm("masksyn-replace", "replace", ("masksyn-a", "masksyn-b"), train=POOL),
    "masksyn+imgsyn-replace": Arm("masksyn+imgsyn-replace", "replace", ("imgsyn-a", "masksyn-b"), train=POOL),
    "masksyn+imgsyn-pretrain-finetune": Arm("masksyn+imgsyn-pretrain-finetune", "pretrain-finetune",
                                            ("imgsyn-a", "masksyn-b")),
}
SOURCES = ("imgsyn", "masksyn")
MASK_SET = "masks"
# Seeds of the three plans never meet (distinct noise for every sample of the run).
MASKS_FIRST_SEED = 20_000_000
MASKSYN_FIRST_SEED = 10_000_000


def stages(context, arms: list[Arm]) -> list[Stage]:
    """SegGen's stages for the arms being trained (a source no arm uses is not made)."""
    config, out = context.config, context.out
    sets = {name for arm in arms for name in arm.synthetic}  # a half no arm trains on is not rendered
    used = {name.rsplit("-", 1)[0] for name in sets}
    plans = out / "plans"
    result: list[Stage] = []

    # 1-6. MaskSyn's chain, then ImgSyn's; the mask -> image generator (stages, spec) is shared.
    generator_stages, generator = context.generator_stages()
    if "masksyn" in used:
        result += masksyn_stages(context, generator)
    result += generator_stages
    for source in [name for name in SOURCES if name in used]:
        if source == "imgsyn":
            result.append(_plan_halves_stage("imgsyn plans", plans / "imgsyn.jsonl", lambda: make_plan(
                context.stage_config(PlanConfig, "plan", data=config.data, out=str(plans / "imgsyn.jsonl"),
                                     uniform=config.images_per_mask))))
            data = config.data
        else:
            mask_set = f"synthetic-raw:{context.synthetic_set(MASK_SET)}"
            result.append(_plan_halves_stage("masksyn plans", plans / "masksyn.jsonl", lambda s=mask_set: make_plan(
                context.stage_config(PlanConfig, "plan", data=s, out=str(plans / "masksyn.jsonl"), uniform=1,
                                     seed=MASKSYN_FIRST_SEED))))
            data = mask_set
        for name in [f"{source}-{half}" for half in ("a", "b") if f"{source}-{half}" in sets]:
            result.append(Stage(f"synthesize {name}", lambda n=name, d=data: synthesize(context.stage_config(
                SynthesizeConfig, "synthesize", data=d, plan=str(plans / f"{n}.jsonl"), generator=generator,
                out=str(context.synthetic_set(n)), device=config.device))))

    # 7. How good the generated masks are, and how well the MaskSyn images follow them.
    if "masksyn" in used:
        quality = out / "mask_quality"
        result.append(Stage("mask quality", lambda: write_mask_quality(MaskQualityConfig(
            masks=str(context.synthetic_set(MASK_SET)), data=config.data, out=str(quality),
            rendered=[str(context.synthetic_set(name)) for name in ("masksyn-a", "masksyn-b") if name in sets],
            segmenter=str(context.reference_segmenter), eval_split=config.eval_split,
            size=context.train_settings.eval_size, grid_rows=config.grids, device=config.device)),
            lambda: (quality / "mask_quality.json").is_file(), reads_reference=True))
    return result


def masksyn_stages(context, generator: str) -> list[Stage]:
    """Captions -> text -> mask generator -> masks plan -> mask set."""
    config, out = context.config, context.out
    captions = out / "captions" / "captions.jsonl"
    text_generator = out / "text2mask"
    masks_plan = out / "plans" / "masks.jsonl"
    caption_config = context.stage_config(CaptionConfig, "captions", data=config.data, out=str(captions.parent),
                                          split="train", device=config.device)
    result = [Stage("captions", lambda: make_captions(caption_config), captions.is_file)]
    spec = config.text_mask_generator
    if spec == "train":
        generator_config = build_config(TrainTextGeneratorConfig, {
            "sample_steps": config.synthesize.get("steps", 20), **config.train_text_generator, "data": config.data,
            "out": str(text_generator), "target": "colour-mask", "prompts": str(captions), "resume": True,
            "device": config.device}, "run config section 'train_text_generator'")
        result.append(Stage("train text -> mask generator", lambda: train_text_generator(generator_config),
                            lambda: _finished(text_generator)))
        spec = f"text2mask:{text_generator}"
    else:
        tqdm.write(f"[skip] train text -> mask generator: using {spec}")
    return result + [
        Stage("masks plan", lambda: make_plan(context.stage_config(
            PlanConfig, "plan", data=config.data, out=str(masks_plan), captions=str(captions),
            per_caption=config.images_per_mask, seed=MASKS_FIRST_SEED)), masks_plan.is_file),
        Stage("synthesize masks", lambda: synthesize(context.stage_config(
            SynthesizeConfig, "synthesize", data=config.data, plan=str(masks_plan), generator=spec,
            out=str(context.synthetic_set(MASK_SET)), device=config.device))),
    ]


def _plan_halves_stage(name: str, full: Path, make) -> Stage:
    """Make the full plan, then split it by alternating entries into <stem>-a.jsonl and <stem>-b.jsonl."""
    halves = [full.with_name(f"{full.stem}-{half}.jsonl") for half in ("a", "b")]

    def action() -> None:
        make()
        entries = read_plan(full)
        for index, path in enumerate(halves):
            write_plan(path, entries[index::2])

    return Stage(name, action, lambda: all(path.is_file() for path in halves))


def _finished(folder: Path) -> bool:
    meta = folder / "segsynth_generator.json"
    return meta.is_file() and read_json(meta).get("training", {}).get("finished", False)


def grids(context) -> list:
    """The mask-quality grid (caption | colour map | decoded mask | rendered image), and per ImgSyn / MaskSyn
    set rows of mask | synthetic image."""
    written = []
    quality_grid = context.out / "mask_quality" / "mask_quality_grid.png"
    if quality_grid.is_file():
        written.append(quality_grid)
    return written + write_set_grids(context, ("imgsyn-a", "masksyn-a"))


# The toy preset (5 arms x 2 seeds on 2 cores in under 5 minutes; measured in results/toy_seggen.md):
# * SegGen's text -> mask model draws masks at half the toy resolution (the mask -> image generator scales them
#   up, nearest): flat colour maps need few pixels, and a quarter of the pixels is a quarter of the CPU time.
#   It trains for a fixed 500 iterations of batch 8 at lr 2e-3 (not for a wall-clock budget, whose result
#   would depend on the machine's load): measured on the toy captions, KL(real || generated) 0.087 and 4.4% of
#   pixels decoded to ignore for 67 CPU-seconds, against 0.125 / 15.4% for 250 x 16 at lr 1e-3 (59 s) and
#   0.089 / 8.5% for 400 x 16 (97 s). A model trained for minutes paints its colours 64-100 RGB units off the
#   palette; the separated palette's colours are 155+ apart for up to 11 classes, so decoding up to 100 away
#   still picks the intended colour (80% of the pixels decoded to ignore at the default 64, 15% at 100).
# * One synthetic image per real mask (images_per_mask 1: 240 per arm, equal for every arm) halves synthesis.
# * Segmenters train 480 iterations at lr 3e-3 instead of 600 at 2e-3 (measured, mean of 2 seeds: real 47.2
#   vs 47.7, masksyn+imgsyn-replace 45.8 vs 46.0, masksyn-replace 44.4 vs 45.0; 300 and 400 iterations at
#   2e-3 lose 3-6 points: 600 is not converged, so the schedule is shortened, not cut), two at once
#   (`parallel: 2`, one thread each: a segformer-tiny step at 64x80 gains little from a second thread).
# * 8 denoising steps instead of 12 (as the quick preset and Attn2mask's toy run): with 12 the run took 5 min
#   20 s on a quiet 2-core machine (77 s of it synthesis), with 8 see results/toy_seggen.md.
TOY_TEXT_TO_MASK = {"size": [32, 40], "channels": [32, 64], "layers_per_block": 1, "iterations": 500,
                    "max_minutes": 0.0, "batch_size": 8, "lr": 2e-3, "warmup": 20, "decode_max_distance": 100.0}
PRESETS = {
    ("toy", "default"): {"images_per_mask": 1, "parallel": 2, "train": {"iterations": 480, "lr": 3e-3},
                         "synthesize": {"steps": 8}, "train_text_generator": TOY_TEXT_TO_MASK},
    ("toy", "quick"): {"parallel": 2, "train_text_generator": {**TOY_TEXT_TO_MASK, "iterations": 250}},
}

SEGGEN = Method("seggen", "SegGen: MaskSyn (text -> mask -> image) and ImgSyn (mask -> image), replace training",
                ARMS, stages, grids, PRESETS)
