"""FreeMask as a method of `segsynth run`: its stages and its seven-arm ablation.

Stages, after the real-only reference segmenter:
  1. class statistics L̄_c from that segmenter
  2. plans: uniform K per mask, and hardness-aware with the same total (and,
     for the targeted arm only, the class-targeted plan with the same total:
     targeted.py)
  3. the mask-to-image generator (given, shipped for toy data, or trained)
  4. synthesize both plans
  5. filter both synthetic sets (loss > α·L̄_c -> ignore)
Arms: real; synthetic-only raw / filtered + hardness; joint raw / filtered /
filtered + hardness; pre-train on filtered + hardness, then fine-tune on real.
Two more arms run only when named: joint on the filtered class-targeted set
(the budget split over classes by L̄_c rather than over masks by hardness),
and copy-paste of the filtered hardness set's pixels of the train section's
paste_classes onto real images (every other pixel of every draw real), with
its control paste-real (the same classes pasted from other real images).
Derived arms (variants.py) vary one setting of these: the filter's alpha and
judge, the synthetic volume K, and the closed loop's rounds (loop.py); their
sets are made here from the sets above (a copy filtered again, a nested
subset), the loop's sets by `round_stages` after each round's training.
"""

from __future__ import annotations

from segsynth.config import load_yaml
from segsynth.formats.checkpoint import resolve_checkpoint
from segsynth.io import SegsynthError
from segsynth.methods.base import Arm, Method, Stage
from segsynth.methods.freemask.filter import filter_synthetic
from segsynth.methods.freemask.loop import round_stages
from segsynth.methods.freemask.stats import compute_class_stats
from segsynth.methods.freemask.variants import (HARDNESS_FIRST_SEED, REFERENCE, derive_set, derived_set_done,
                                                filtered_done, nested_ids, plan_variants, run_alpha,
                                                run_filter_rules)
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
    "joint-filtered-targeted": Arm("joint-filtered-targeted", "joint", ("targeted",), "filtered"),
    "paste-filtered-hardness": Arm("paste-filtered-hardness", "paste", ("hardness",), "filtered"),
    # its control: the same classes pasted from other real images (no synthetic data)
    "paste-real": Arm("paste-real", "paste", (), "raw", train=(("paste_from", "real"),)),
    # both donor pools at once: does the synthetic set add to copy-paste from real images?
    "paste-hardness-and-real": Arm("paste-hardness-and-real", "paste", ("hardness",), "filtered",
                                   train=(("paste_from", "pool+real"),)),
}
# The arms a run trains when none are named: the paper's seven (the targeted and paste arms are ours; each runs
# when named).
MAIN_ARMS = tuple(name for name in ARMS if name not in ("joint-filtered-targeted", "paste-filtered-hardness",
                                                         "paste-real", "paste-hardness-and-real"))
SETS = ("uniform", "hardness", "targeted")
TARGETED_FIRST_SEED = 5_000_000  # the targeted plan's seeds meet neither the uniform plan's nor the hardness plan's


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
            data=config.data, device=config.device)), stats_path.is_file, reads_reference=True),
        Stage("plans", lambda: (
            make_plan(context.stage_config(PlanConfig, "plan", data=config.data, out=str(plans["uniform"]),
                                           uniform=config.images_per_mask, class_crop=0.0)),
            make_plan(context.stage_config(PlanConfig, "plan", data=config.data, out=str(plans["hardness"]),
                                           stats=str(stats_path), budget=total, seed=HARDNESS_FIRST_SEED,
                                           class_crop=0.0))),
              lambda: all(plans[name].is_file() for name in ("uniform", "hardness"))),
    ]
    # The targeted plan only when an arm (or a set derived from it) renders it, so runs without it keep their
    # stages. The `plan` section's nmax caps it as it caps the hardness plan; its class_crop (class-centred
    # crops) is the targeted plan's alone.
    derived = {name: spec for name, spec in plan_variants(config, ARMS)[1].items()
               if any(name in arm.synthetic for arm in arms if arm.round == 0)}
    renders_targeted = any("targeted" in arm.synthetic for arm in arms) or any(
        spec.source == "targeted" for spec in derived.values())
    if config.plan.get("class_crop") and not renders_targeted:
        raise SegsynthError(f"run config plan.class_crop {config.plan['class_crop']}: class-centred crops are the "
                            "targeted plan's, and no arm of this run renders it; add the arm "
                            "joint-filtered-targeted, or remove class_crop (the closed loop's crops are "
                            "loop_planner: targeted-crops with loop_class_crop)")
    if renders_targeted:
        result.append(Stage("plan targeted", lambda: make_plan(context.stage_config(
            PlanConfig, "plan", data=config.data, out=str(plans["targeted"]), stats=str(stats_path),
            targeted=True, budget=total, seed=TARGETED_FIRST_SEED)),
            lambda: _targeted_plan_done(plans["targeted"], config.plan)))

    # 3. The generator.
    generator_stages, generator = context.generator_stages()
    result += generator_stages

    # 4-5. Synthesize and filter each set an arm uses, directly or through a set derived from it (each resumes
    #      on its own). The closed loop's sets are made by `round_stages`, after the arms of the round before.
    first = [arm for arm in arms if arm.round == 0]
    for name in SETS:
        users = [arm for arm in first if name in arm.synthetic]
        subsets = [spec for spec in derived.values() if spec.source == name]
        if not users and not subsets:
            continue
        folder = context.synthetic_set(name)
        result.append(Stage(f"synthesize {name}", lambda f=folder, p=plans[name]: synthesize(context.stage_config(
            SynthesizeConfig, "synthesize", data=config.data, plan=str(p), generator=generator, out=str(f),
            device=config.device))))
        if any(arm.masks == "filtered" for arm in users) or any(
                spec.kind == "subset" and _filtered_users(first, spec.name) for spec in subsets):
            result.append(Stage(f"filter {name}", lambda f=folder: filter_synthetic(context.stage_config(
                FilterConfig, "filter", synthetic=str(f), segmenter=str(segmenter), stats=str(stats_path),
                device=config.device)), lambda f=folder: filtered_done(f, run_alpha(config), run_filter_rules(config)),
                reads_reference=True))

    # 6. Derived sets: copies judged again at another alpha or by another segmenter; nested shares (volume).
    judges = {REFERENCE: (segmenter, stats_path)}
    for judge, folder in config.filter_judges.items():
        if any(spec.judge == judge for spec in derived.values()):
            judges[judge] = (_judge_checkpoint(judge, folder), out / "judges" / judge / "class_stats.json")
            result.append(Stage(f"class statistics ({judge})", lambda j=judges[judge]: compute_class_stats(
                context.stage_config(StatsConfig, "stats", defaults={"size": eval_size}, segmenter=str(j[0]),
                                     out=str(j[1]), data=config.data, device=config.device)), judges[judge][1].is_file))
    for name, spec in derived.items():
        source, folder = context.synthetic_set(spec.source), context.synthetic_set(name)
        if spec.kind == "subset":
            carry = _filtered_users(first, name)
            ids = lambda s=spec: nested_ids(plans[s.source], s.share)
            result.append(Stage(f"subset {name}", lambda s=source, f=folder, i=ids, c=carry: derive_set(s, f, i(), c),
                                lambda s=source, f=folder, i=ids, c=carry: derived_set_done(s, f, i(), c)))
            continue
        judge_segmenter, judge_stats = judges[spec.judge]
        result.append(Stage(f"copy {spec.source} for {name}", lambda s=source, f=folder: derive_set(s, f),
                            lambda s=source, f=folder: derived_set_done(s, f, None, False)))
        result.append(Stage(f"filter {name}", lambda f=folder, s=spec, j=judge_segmenter, js=judge_stats:
                            filter_synthetic(context.stage_config(
                                FilterConfig, "filter", synthetic=str(f), segmenter=str(j), stats=str(js),
                                alpha=s.alpha, device=config.device)),
                            lambda f=folder, s=spec: filtered_done(f, s.alpha, run_filter_rules(config)),
                            reads_reference=spec.judge == REFERENCE))
    return result


def _targeted_plan_done(path, plan_section: dict) -> bool:
    """The targeted plan exists and was made with the run's crop and cap; one made with others is refused (its
    set was rendered from it: re-planning under it would mix two plans' samples in one set)."""
    if not path.is_file():
        return False
    made = load_yaml(path.with_name(path.name + ".config.yaml"))
    wanted = {key: plan_section.get(key, PlanConfig.__dataclass_fields__[key].default) for key in ("class_crop", "nmax")}
    differ = [key for key in wanted if made.get(key) != wanted[key]]
    if differ:
        raise SegsynthError(f"{path}: made with {', '.join(f'{key} {made.get(key)}' for key in differ)}, this run asks "
                            f"for {', '.join(f'{key} {wanted[key]}' for key in differ)}; delete the plan, its "
                            "config and the run's synthetic/targeted folder to plan and render again, or run with "
                            "the plan's settings")
    return True


def _filtered_users(arms: list[Arm], name: str) -> bool:
    return any(name in arm.synthetic and arm.masks == "filtered" for arm in arms)


def _judge_checkpoint(name: str, folder: str):
    """A filter judge's checkpoint, checked before any compute."""
    try:
        return resolve_checkpoint(folder)
    except SegsynthError as error:
        raise SegsynthError(f"filter_judges {name}: {error}") from None


def variants(config) -> dict[str, Arm]:
    """The arms derived from the run's settings (filter sweep, volumes, closed-loop rounds): variants.py."""
    return plan_variants(config, ARMS)[0]


def grids(context) -> list:
    """Per synthetic set: rows of real mask | synthetic image | pixels the filter ignored (red)."""
    return write_set_grids(context, SETS)


FREEMASK = Method("freemask", "FreeMask: images for real masks, pixel filter, hardness-aware re-sampling",
                  ARMS, stages, grids, main_arms=MAIN_ARMS, variants=variants, round_stages=round_stages)
