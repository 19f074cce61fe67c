"""`segsynth plan`: how many samples to make for each entry of a split, and with which seeds.

A planner is a function (config, dataset, ids) -> (counts per id, extra keys
per id); `PLANNERS` maps a plan mode to it, and `make_plan` does the rest:
distinct seeds, the plan file (format: `segsynth.formats.plan`), the resolved
config beside it. Modes: uniform (K per mask, `--uniform K`), FreeMask's
hardness-aware plan (`--stats FILE`, methods/freemask/hardness.py) and text
entries from each real image's class set (`--class-prompts N`, Attn2mask).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from segsynth.config import save_config
from segsynth.data import Dataset, open_dataset
from segsynth.formats.plan import PlanEntry, assign_seeds, write_plan
from segsynth.io import SegsynthError
from segsynth.methods.freemask.hardness import hardness_planner
from segsynth.stage_configs import PlanConfig

Planner = Callable[[PlanConfig, Dataset, list[str]], tuple[list[int], list[dict]]]


def uniform_planner(config: PlanConfig, dataset: Dataset, ids: list[str]) -> tuple[list[int], list[dict]]:
    """K images for every mask."""
    return [config.uniform] * len(ids), [{} for _ in ids]


def class_prompt_planner(config: PlanConfig, dataset: Dataset, ids: list[str]) -> tuple[list[int], list[dict]]:
    """Text entries for text -> image generators (Attn2mask, DiffuMask): N images for each real image's set
    of classes, prompted as the builtin text generator was trained ('a photo of road, car': the classes
    covering at least 0.5% of the image, in class order). Only which classes are present is read from a
    label, so the plan repeats the real data's class combinations and their frequencies, and the budget
    matches a uniform plan of N per mask. Each class word is the class name itself."""
    from segsynth.generators.builtin_text.train import class_prompt, present_classes

    split = dataset.split(config.split)
    extras = []
    for sample_id in ids:
        names = [dataset.classes[c] for c in present_classes(split.label(split.index_of(sample_id)), dataset.num_classes)]
        extras.append({"kind": "text", "prompt": class_prompt(names), "class_words": {name: [name] for name in names}})
    keep = [1 if extra["class_words"] else 0 for extra in extras]  # an all-ignore label names no class
    return [config.class_prompts * k for k in keep], extras


# plan mode -> (is it selected by this config?, planner).
PLANNERS: dict[str, tuple[Callable[[PlanConfig], bool], Planner]] = {
    "uniform": (lambda config: config.uniform > 0, uniform_planner),
    "hardness": (lambda config: config.hardness or config.stats is not None, hardness_planner),
    "class-prompts": (lambda config: config.class_prompts > 0, class_prompt_planner),
}


def make_plan(config: PlanConfig) -> Path:
    """Write the plan file for `config`; returns its path."""
    # 1. Exactly one plan mode, and a readable split.
    chosen = [name for name, (selected, _) in PLANNERS.items() if selected(config)]
    if len(chosen) != 1:
        raise SegsynthError(f"choose exactly one plan mode ({', '.join('--' + n for n in PLANNERS)}); got "
                            f"{', '.join(chosen) or 'none'} (e.g. --uniform 2)")
    if config.limit < 0:
        raise SegsynthError(f"--limit must be >= 0, got {config.limit}")
    dataset = open_dataset(config.data)
    ids = list(dataset.split(config.split).ids)
    if config.limit:
        ids = ids[: config.limit]

    # 2. Counts per mask from the planner, then distinct seeds in plan order.
    counts, extras = PLANNERS[chosen[0]][1](config, dataset, ids)
    seeds = assign_seeds(counts, config.seed)

    # 3. Write the plan atomically, the resolved config beside it.
    out = write_plan(config.out, [_entry(sample_id, sample_seeds, extra)
                                  for sample_id, sample_seeds, extra in zip(ids, seeds, extras)])
    save_config(config, out.with_name(out.name + ".config.yaml"))
    return out


def _entry(sample_id: str, seeds: list[int], extra: dict) -> PlanEntry:
    """A plan entry; a planner's "kind", "prompt" and "class_words" keys are the entry's own fields."""
    extra = dict(extra)
    return PlanEntry(sample_id, seeds, extra, kind=extra.pop("kind", "mask"), prompt=extra.pop("prompt", ""),
                     class_words=extra.pop("class_words", {}))
