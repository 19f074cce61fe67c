"""FreeMask's closed loop: synthesize more of what the trained model still fails, train again, R rounds.

FreeMask plans its hardness-aware set once, from the class losses L̄_c of a
segmenter trained on real data alone. The loop asks the model trained WITH the
synthetic data instead. Round r (1..R), after loop_arm's round r-1 model
(loop_arm itself for r = 1) is trained with every seed:

  1. the signal that plans round r: `loop_signal: loss`, the class-wise mean
     loss L̄_c of that model (its first seed) over the real training pixels,
     exactly what `segsynth stats` computes for the reference; or `iou`,
     1 - its per-class IoU on eval_split / 100 (mean over seeds; floored at
     0.01 so that no class drops out), written in the class-statistics format
     so the hardness planner reads either unchanged
     -> OUT/loop/round<r>/class_stats.json
  2. a plan from it (`loop_planner`: FreeMask's hardness-aware ranking of
     masks, or `targeted`: the budget split over classes by the signal, then
     over the masks showing each class; methods/freemask/targeted.py; or
     `targeted-crops`: the same, each class's images rendered from a crop of
     the mask centred on that class, loop_class_crop x each side),
     loop_images_per_mask (default
     images_per_mask) x N images, seeds starting at a new block per round, so
     no sample of any round or of the first plans is rendered twice
     -> OUT/plans/hardness-round<r>.jsonl
  3. synthesize it -> OUT/synthetic/hardness-round<r>
  4. filter it as the first sets are filtered: the real-data reference segmenter
     and its L̄_c, the run's alpha (the filter's judge stays the one FreeMask
     defines; only the plan follows the trained model)
then run.py trains <loop_arm>-round<r> (variants.py: loop_arm's recipe and
masks, on its sets plus every round's so far or round r's alone, from scratch
or from round r-1's checkpoint of the same seed). Each step is skipped when its
output is complete, so an interrupted loop resumes round by round.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from segsynth.formats.manifest import read_manifest
from segsynth.formats.plan import read_plan
from segsynth.formats.stats import write_class_stats
from segsynth.io import SegsynthError, read_json
from segsynth.methods.base import Stage
from segsynth.methods.freemask.filter import filter_synthetic
from segsynth.methods.freemask.stats import compute_class_stats
from segsynth.methods.freemask.variants import (HARDNESS_FIRST_SEED, LOOP_SET, ROUND_SEEDS, filtered_done, run_alpha,
                                                run_filter_rules)
from segsynth.plan import make_plan
from segsynth.stage_configs import FilterConfig, PlanConfig, StatsConfig, SynthesizeConfig
from segsynth.synthesize import synthesize

MIN_WEIGHT = 0.01  # iou signal: a class the model gets right still keeps a sliver of weight (> 0 by the format)


def round_stages(context, r: int) -> list[Stage]:
    """The stages that make round r's data (the arms of round r are trained by run.py after them)."""
    config, out, dataset = context.config, context.out, context.dataset
    previous = config.loop_arm if r == 1 else f"{config.loop_arm}-round{r - 1}"
    signal = out / "loop" / f"round{r}" / "class_stats.json"
    plan = out / "plans" / f"{LOOP_SET.format(r)}.jsonl"
    folder = context.synthetic_set(LOOP_SET.format(r))
    budget = (config.loop_images_per_mask or config.images_per_mask) * len(dataset.split("train"))
    if budget >= ROUND_SEEDS:
        raise SegsynthError(f"closed loop: {budget} images per round would reach the next round's seeds "
                            f"({ROUND_SEEDS} per round); lower loop_images_per_mask")
    reference_stats = out / "class_stats.json"
    _, generator = context.generator_stages()  # trained (or given) before the first sets

    # 1. What the previous round's model still fails.
    if config.loop_signal == "loss":
        make_signal = lambda: compute_class_stats(context.stage_config(
            StatsConfig, "stats", defaults={"size": context.train_settings.eval_size},
            segmenter=str(context.arm_folder(previous, config.seeds[0])), out=str(signal), data=config.data,
            device=config.device))
    else:
        make_signal = lambda: write_iou_signal(signal, [context.arm_folder(previous, seed) / f"metrics_"
                                                        f"{config.eval_split}.json" for seed in config.seeds],
                                               reference_stats, config.eval_split)
    stages = [Stage(f"round {r}: {config.loop_signal} signal of {previous}", make_signal, signal.is_file),
              # 2-3. The re-planned set, with seeds no earlier plan used.
              Stage(f"round {r}: plan", lambda: make_plan(context.stage_config(
                  PlanConfig, "plan", data=config.data, out=str(plan), stats=str(signal), budget=budget,
                  targeted=config.loop_planner in ("targeted", "targeted-crops"),
                  class_crop=config.loop_class_crop if config.loop_planner == "targeted-crops" else 0.0,
                  seed=HARDNESS_FIRST_SEED + r * ROUND_SEEDS)),
                  plan.is_file),
              Stage(f"round {r}: synthesize", lambda: synthesize(context.stage_config(
                  SynthesizeConfig, "synthesize", data=config.data, plan=str(plan), generator=generator,
                  out=str(folder), device=config.device)), lambda: _synthesized(folder, plan))]
    # 4. The filter FreeMask defines: the real-data reference and its class losses.
    if context.arm_table()[config.loop_arm].masks == "filtered":
        stages.append(Stage(f"round {r}: filter", lambda: filter_synthetic(context.stage_config(
            FilterConfig, "filter", synthetic=str(folder), segmenter=str(context.reference_segmenter),
            stats=str(reference_stats), device=config.device)),
            lambda: filtered_done(folder, run_alpha(config), run_filter_rules(config))))
    return stages


def write_iou_signal(path: Path, metrics: list[Path], reference_stats: Path, split: str) -> dict:
    """Class weights 1 - IoU_c / 100 (mean over the seeds' metrics files found), in the class-statistics
    format: pixel counts from the reference statistics, null for classes without training pixels, the mean
    weight for a class no seed could score. The hardness planner then ranks masks by how much of their area
    the model still gets wrong."""
    found = [read_json(file) for file in metrics if file.is_file()]
    if not found:
        raise SegsynthError(f"closed loop: no metrics to take the IoU signal from ({', '.join(map(str, metrics))}); "
                            "the previous round's arm must be trained and evaluated first")
    reference = read_json(reference_stats)
    classes, pixels = reference["classes"], reference["pixels"]
    ious = [[m["per_class"].get(name) for m in found] for name in classes]
    weights = [max(MIN_WEIGHT, 1.0 - float(np.mean([v for v in values if v is not None])) / 100.0)
               if any(v is not None for v in values) else math.nan for values in ious]
    known = [w for w, count in zip(weights, pixels) if count > 0 and math.isfinite(w)]
    fallback = float(np.mean(known)) if known else 1.0
    mean_loss = [None if count == 0 else round(w if math.isfinite(w) else fallback, 6)
                 for w, count in zip(weights, pixels)]
    stats = {"classes": classes, "mean_loss": mean_loss, "pixels": pixels,
             "segmenter": ", ".join(str(file.parent) for file in metrics if file.is_file()), "data": reference.get("data"),
             "split": split, "signal": "iou",
             "note": "mean_loss holds 1 - IoU/100 of the segmenter on the split (mean over seeds), not a loss"}
    write_class_stats(path, stats)
    return stats


def _synthesized(folder: Path, plan: Path) -> bool:
    """Every planned sample is in the set's manifest."""
    if not plan.is_file() or not (folder / "manifest.jsonl").is_file():
        return False
    return len(read_manifest(folder)) == sum(len(entry.seeds) for entry in read_plan(plan))
