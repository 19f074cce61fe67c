"""The three methods side by side: `segsynth run --method all`.

One dataset, one segmenter and training schedule (the run's `train` section),
the same seeds and the same synthetic budget (images_per_mask x N real masks
for every arm that trains on synthetic data) for the main arms of FreeMask,
SegGen and Attn2mask / DiffuMask, in one table. The real-only reference is
trained once (run.py trains the "real" arm of every seed before any method
stage) and serves every member: FreeMask's statistics and filter, SegGen's
mask quality, the "vs real" column.

Each member method runs its own stages, unchanged, on a copy of the run config
whose generator sections are the member's own (`RunConfig.per_method`, filled
in by `configure` from the member's presets, this method's preset and the
user's keys, in that order). Stage names get the member's name in front
("seggen: synthesize masks"). Members write to disjoint folders: their
synthetic sets, plans and generators have different names, except the
mask -> image generator a real-data run trains, which FreeMask and SegGen
share (the second finds it done).

Arms are "<member>-<arm>", e.g. "freemask-joint-filtered-hardness"; any arm of
any member can be named with --arms; by default MAIN_ARMS run.
"""

from __future__ import annotations

import dataclasses

from segsynth.io import SegsynthError
from segsynth.methods.attn2mask.method import ATTN2MASK
from segsynth.methods.base import Arm, Method, Stage
from segsynth.methods.freemask.method import FREEMASK
from segsynth.methods.seggen.method import SEGGEN
from segsynth.stage_configs import RUN_SECTIONS

MEMBERS = {"freemask": FREEMASK, "seggen": SEGGEN, "attn2mask": ATTN2MASK}

# compare arm name -> (member name, the member's arm name); "real" is everyone's reference.
ORIGIN: dict[str, tuple[str, str]] = {}
ARMS = {"real": Arm("real", "real", method="shared")}
for _member_name, _member in MEMBERS.items():
    for _arm in _member.arms.values():
        if _arm.name != "real":
            ARMS[f"{_member_name}-{_arm.name}"] = dataclasses.replace(_arm, name=f"{_member_name}-{_arm.name}",
                                                                          method=_member_name)
            ORIGIN[f"{_member_name}-{_arm.name}"] = (_member_name, _arm.name)

# Each method's headline arm(s): FreeMask's filtered + hardness data alone and joint with real, SegGen's
# MaskSyn + ImgSyn replacing real draws, Attn2mask's attention pseudo-masks with the reliability loss.
MAIN_ARMS = ("real", "freemask-synthetic-filtered-hardness", "freemask-joint-filtered-hardness",
             "seggen-masksyn+imgsyn-replace", "attn2mask-synthetic-attention-reliable",
             "attn2mask-synthetic-attention-reliable-lora")  # the last only with target_images (Arm.needs)

# What a member may have of its own: its generator and every stage section but `train` (all arms train the
# same segmenter with the same schedule; an arm's own training keys, such as Attn2mask's loss, are in its Arm).
MEMBER_SECTIONS = tuple(section for section in RUN_SECTIONS if section != "train")
MEMBER_KEYS = ("generator", *MEMBER_SECTIONS)
MASK_TO_IMAGE = ("freemask", "seggen")  # members whose generator key is a mask -> image generator


def member_of(arm_name: str) -> str | None:
    """The member method an arm of this method belongs to (None for the shared real arm)."""
    return ORIGIN[arm_name][0] if arm_name in ORIGIN else None


def configure(merged: dict, values: dict, kind: str, preset: str) -> dict:
    """Fill in `per_method`: for each member, its sections = the member's own preset < this method's preset
    per_method < the user's shared sections < the user's per_method (the shared sections stay under them)."""
    given = values.get("per_method") or {}
    if not isinstance(given, dict) or not all(isinstance(v, dict) or v is None for v in given.values()):
        raise SegsynthError("run config key 'per_method' must map member methods to their keys, e.g. "
                            "{seggen: {train_text_generator: {max_minutes: 2}}}")
    unknown = sorted(set(given) - set(MEMBERS))
    if unknown:
        raise SegsynthError(f"run config per_method: unknown method(s) {', '.join(unknown)}; options: "
                            f"{', '.join(MEMBERS)}")
    ours = COMPARE.presets.get((kind, preset), {}).get("per_method", {})
    per_method = {}
    for name, member in MEMBERS.items():
        own = given.get(name) or {}
        wrong = sorted(set(own) - set(MEMBER_KEYS))
        if wrong:
            raise SegsynthError(f"run config per_method.{name}: unknown key(s) {', '.join(wrong)} (every arm trains "
                                f"the same segmenter: give train keys at the top level); valid keys: "
                                f"{', '.join(MEMBER_KEYS)}")
        sizes = member.preset(kind, preset)
        entry = {}
        for section in MEMBER_SECTIONS:
            layers = [sizes.get(section), ours.get(name, {}).get(section), values.get(section), own.get(section)]
            merged_section = {key: value for layer in layers if isinstance(layer, dict) for key, value in layer.items()}
            if merged_section:
                entry[section] = merged_section
        if own.get("generator"):
            entry["generator"] = own["generator"]
        per_method[name] = entry
    return {**merged, "per_method": per_method}


def member_config(config, name: str):
    """The run config member `name` sees: its own sections over the shared ones, its generator, its arms."""
    own = config.per_method.get(name, {})
    sections = {section: {**getattr(config, section), **own.get(section, {})} for section in MEMBER_SECTIONS}
    arms = [ORIGIN[arm][1] for arm in config.arms if member_of(arm) == name]
    return dataclasses.replace(config, method=name, generator=own.get("generator") or _generator_for(name, config),
                               arms=["real", *arms], **sections)


def _generator_for(name: str, config) -> str:
    """The shared `generator` key names one generator; a member that cannot use it trains (or finds) its own."""
    generator = config.generator
    if generator in ("auto", "train"):
        return generator
    text_to_image = generator.startswith(("attention:", "attention-sd:"))
    return generator if text_to_image == (name not in MASK_TO_IMAGE) else "auto"


def _members(context, arms: list[Arm]):
    """(member name, member, context with the member's config, the member's own arms) for each member with an arm."""
    for name, member in MEMBERS.items():
        own = [member.arms[ORIGIN[arm.name][1]] for arm in arms if member_of(arm.name) == name]
        if own:
            yield name, member, dataclasses.replace(context, config=member_config(context.config, name)), own


def stages(context, arms: list[Arm]) -> list[Stage]:
    """Every member's stages for its arms, in member order, each named after its member."""
    result = []
    for name, member, member_context, own in _members(context, arms):
        if any(arm.synthetic for arm in own):
            result += [dataclasses.replace(stage, name=f"{name}: {stage.name}")
                       for stage in member.stages(member_context, own)]
    return result


def grids(context) -> list:
    """Every member's grids (they write to OUT/grids/<set>.png, names that do not collide)."""
    arms = [ARMS[name] for name in context.config.arms]
    return [path for _, member, member_context, own in _members(context, arms) if any(arm.synthetic for arm in own)
            for path in member.grids(member_context)]


# Sizes over run.PRESETS for the comparison. The toy "demo" preset (make demo) gives each text generator
# 45 s of training instead of 60-75 s (the comparison has two of them) and the attention generator 6 denoising
# steps instead of 8: its capture of every step's attention makes it the slowest sampler of the run (about
# 1 image/s against 4-7 for the others on a busy 2-core machine), and its toy images stay noise either way.
PRESETS = {
    ("toy", "demo"): {"per_method": {"seggen": {"train_text_generator": {"max_minutes": 0.75}},
                                     "attn2mask": {"train_text_generator": {"max_minutes": 0.75},
                                                   "synthesize": {"steps": 6}}}},
}

COMPARE = Method("all", "FreeMask, SegGen and Attn2mask side by side: one segmenter, schedule, seeds and budget",
                 ARMS, stages, grids, PRESETS, main_arms=MAIN_ARMS, configure=configure)
