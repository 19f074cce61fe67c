"""FreeMask as a method of `segsynth run`: its stages and its seven-arm ablation.

Stages, after the real-only reference segmenter:
  1. class statistics L̄_c from that segmenter
  2. plans: uniform K per mask, and hardness-aware with the same total
  3. the mask-to-image generator (given, shipped for toy data, or trained)
  4. synthesize both plans
  5. filter both synthetic sets (loss > α·L̄_c -> ignore)
Arms: real; synthetic-only raw / filtered + hardness; joint raw / filtered /
filtered + hardness; pre-train on filtered + hardness, then fine-tune on real.
"""

from __future__ import annotations

from segsynth.methods.base import Arm, Method, Stage
from segsynth.methods.freemask.filter import filter_synthetic
from segsynth.methods.freemask.stats import compute_class_stats
from segsynth.plan import make_plan
from segsynth.report import write_set_grids
from segsynth.stage_configs import FilterConfig, PlanConfig, StatsConfig, SynthesizeConfig
from segsynth.synthesize import synthesize

# The seven arms of the FreeMask ablation, in table order.
ARMS = {
    "real": Arm("real", "real"),
    "synthetic-raw-uniform": Arm("synthetic-raw-uniform", "synthetic", ("uniform",), "raw"),
    "synthetic-filtered-hardness": Arm("synthetic-filtered-hardness", "synthetic", ("hardness",), "filtered"),
    "joint-raw-uniform": Arm("joint-raw-uniform", "joint", ("uniform",), "raw"),
    "joint-filtered-uniform": Arm("joint-filtered-uniform", "joint", ("uniform",), "filtered"),
    "joint-filtered-hardness": Arm("joint-filtered-hardness", "joint", ("hardness",), "filtered"),
    "pretrain-finetune-filtered-hardness": Arm("pretrain-finetune-filtered-hardness", "pretrain-finetune",
                                               ("hardness",), "filtered"),
}
SETS = ("uniform", "hardness")
HARDNESS_FIRST_SEED = 10_000_000  # the hardness plan's seeds never meet the uniform plan's


def stages(context, arms: list[Arm]) -> list[Stage]:
    """FreeMask's stages for the arms being trained (sets no arm uses are not made)."""
    config, out, dataset = context.config, context.out, context.dataset
    segmenter = context.reference_segmenter
    stats_path = out / "class_stats.json"
    plans = {name: out / "plans" / f"{name}.jsonl" for name in SETS}
    total = config.images_per_mask * len(dataset.split("train"))
    eval_size = context.train_settings.eval_size

    # 1-2. Class statistics from the real segmenter; plans of equal size.
    result = [
        Stage("class statistics", lambda: compute_class_stats(context.stage_config(
            StatsConfig, "stats", defaults={"size": eval_size}, segmenter=str(segmenter), out=str(stats_path),
            data=config.data, device=config.device)), stats_path.is_file),
        Stage("plans", lambda: (
            make_plan(context.stage_config(PlanConfig, "plan", data=config.data, out=str(plans["uniform"]),
                                           uniform=config.images_per_mask)),
            make_plan(context.stage_config(PlanConfig, "plan", data=config.data, out=str(plans["hardness"]),
                                           stats=str(stats_path), budget=total, seed=HARDNESS_FIRST_SEED))),
              lambda: all(path.is_file() for path in plans.values())),
    ]

    # 3. The generator.
    generator_stages, generator = context.generator_stages()
    result += generator_stages

    # 4-5. Synthesize and filter each set an arm uses (each resumes on its own).
    for name in SETS:
        users = [arm for arm in arms if name in arm.synthetic]
        if not users:
            continue
        folder = context.synthetic_set(name)
        result.append(Stage(f"synthesize {name}", lambda f=folder, p=plans[name]: synthesize(context.stage_config(
            SynthesizeConfig, "synthesize", data=config.data, plan=str(p), generator=generator, out=str(f),
            device=config.device))))
        if any(arm.masks == "filtered" for arm in users):
            result.append(Stage(f"filter {name}", lambda f=folder: filter_synthetic(context.stage_config(
                FilterConfig, "filter", synthetic=str(f), segmenter=str(segmenter), stats=str(stats_path),
                device=config.device))))
    return result


def grids(context) -> list:
    """Per synthetic set: rows of real mask | synthetic image | pixels the filter ignored (red)."""
    return write_set_grids(context, SETS)


FREEMASK = Method("freemask", "FreeMask: images for real masks, pixel filter, hardness-aware re-sampling",
                  ARMS, stages, grids)
