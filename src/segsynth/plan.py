"""`segsynth plan`: how many samples to make for each entry of a split, and with which seeds.

A planner is a function (config, dataset, ids) -> (counts per id, entry keys
per id); `PLANNERS` maps a plan mode to it, and `make_plan` does the rest:
distinct seeds, the plan file (format: `segsynth.formats.plan`), the resolved
config beside it. Entry keys are the plan format's (`kind`, `prompt`,
`class_words`, and `id` when the entry is not named by its mask id) plus any
extra key a planner records. Modes: uniform (K per mask, `--uniform K`),
FreeMask's hardness-aware plan (`--stats FILE`, methods/freemask/hardness.py), the class-targeted plan
(`--stats FILE --targeted`, methods/freemask/targeted.py; with `--class-crop F`, class-centred crops)
and the text plan (`--captions FILE --per-caption N`: one text entry per
caption, for a text -> mask generator such as SegGen's MaskSyn) and text entries from
each real image's class set (`--class-prompts N`, Attn2mask; with `--augment-prompts` one entry per
sample, its prompt drawn from templates and each class's synonyms, hyponyms and listed words).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from segsynth.config import save_config
from segsynth.data import Dataset, open_dataset
from segsynth.formats.plan import PlanEntry, assign_seeds, read_plan, write_plan
from segsynth.generators.builtin_text.train import class_prompt, present_classes
from segsynth.io import SegsynthError
from segsynth.methods.attn2mask.prompts import PromptAugmenter
from segsynth.methods.freemask.hardness import hardness_planner
from segsynth.methods.freemask.targeted import class_crop_entries, targeted_planner
from segsynth.methods.seggen.captions import read_captions
from segsynth.outputs import claim_file
from segsynth.stage_configs import PlanConfig

Planner = Callable[[PlanConfig, Dataset, list[str]], tuple[list[int], list[dict]]]


def uniform_planner(config: PlanConfig, dataset: Dataset, ids: list[str]) -> tuple[list[int], list[dict]]:
    """K images for every mask."""
    return [config.uniform] * len(ids), [{} for _ in ids]


def text_planner(config: PlanConfig, dataset: Dataset, ids: list[str]) -> tuple[list[int], list[dict]]:
    """One text entry per caption of the planned masks, `--per-caption` seeds each; named by its mask id made
    file-name safe. Masks without a caption get none."""
    if config.per_caption < 1:
        raise SegsynthError(f"--captions needs --per-caption N >= 1 (samples per caption), got {config.per_caption}")
    captions = read_captions(config.captions, dataset.split(config.split).ids)
    if not any(sample_id in captions for sample_id in ids):
        raise SegsynthError(f"captions file {config.captions}: captions none of the {len(ids)} planned masks of "
                            f"split {config.split!r}")
    names = safe_ids(ids)
    counts = [config.per_caption if sample_id in captions else 0 for sample_id in ids]
    fields = [{"id": name, "kind": "text", "prompt": captions.get(sample_id, "")} for sample_id, name in zip(ids, names)]
    return counts, fields


def safe_ids(ids: list[str]) -> list[str]:
    """Ids that can name files: characters other than letters, digits, '.', '_' and '-' become '_', no leading
    '.', and a name made twice gets a counter."""
    names, taken = [], set()
    for sample_id in ids:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id).lstrip(".") or "entry"
        candidate, number = name, 1
        while candidate in taken:
            number += 1
            candidate = f"{name}-{number}"
        taken.add(candidate)
        names.append(candidate)
    return names


def class_prompt_planner(config: PlanConfig, dataset: Dataset, ids: list[str]) -> tuple[list[int], list[dict]]:
    """Text entries for text -> image generators (Attn2mask, DiffuMask): N images for each real image's set
    of classes, prompted as the builtin text generator was trained ('a photo of road, car': the classes
    covering at least 0.5% of the image, in class order). Only which classes are present is read from a
    label, so the plan repeats the real data's class combinations and their frequencies, and the budget
    matches a uniform plan of N per mask. Each class word is the class name itself."""
    split = dataset.split(config.split)
    extras = []
    for sample_id in ids:
        names = [dataset.classes[c] for c in present_classes(split.label(split.index_of(sample_id)), dataset.num_classes)]
        extras.append({"kind": "text", "prompt": class_prompt(names), "class_words": {name: [name] for name in names}})
    keep = [1 if extra["class_words"] else 0 for extra in extras]  # an all-ignore label names no class
    return [config.class_prompts * k for k in keep], extras


# plan mode -> (the flags that select it, is it selected by this config?, planner).
PLANNERS: dict[str, tuple[str, Callable[[PlanConfig], bool], Planner]] = {
    "uniform": ("--uniform K", lambda config: config.uniform > 0, uniform_planner),
    "hardness": ("--stats FILE", lambda config: (config.hardness or config.stats is not None) and not config.targeted,
                 hardness_planner),
    "targeted": ("--stats FILE --targeted", lambda config: config.targeted, targeted_planner),
    "text": ("--captions FILE --per-caption N", lambda config: config.captions is not None, text_planner),
    "class-prompts": ("--class-prompts N", lambda config: config.class_prompts > 0, class_prompt_planner),
}


def make_plan(config: PlanConfig) -> Path:
    """Write the plan file for `config`; returns its path."""
    out = Path(config.out)
    with claim_file(out, "plan", "plan file", is_plan_file, out.with_name(out.name + ".config.yaml"), "PlanConfig"):
        return _make_plan(config)


def is_plan_file(path: Path) -> bool:
    """Whether `path` reads as a plan (what `plan --out` may overwrite)."""
    try:
        read_plan(path)
    except SegsynthError:
        return False
    return True


def _make_plan(config: PlanConfig) -> Path:
    # 1. Exactly one plan mode, and a readable split.
    chosen = [name for name, (_, selected, _) in PLANNERS.items() if selected(config)]
    if len(chosen) != 1:
        modes = ", ".join(flags for flags, _, _ in PLANNERS.values())
        raise SegsynthError(f"choose exactly one plan mode ({modes}); got {', '.join(chosen) or 'none'} (e.g. --uniform 2)")
    if config.class_crop and chosen != ["targeted"]:
        raise SegsynthError("--class-crop renders the classes a targeted plan aims at: use it with --stats FILE "
                            "--targeted")
    if config.augment_prompts and chosen != ["class-prompts"]:
        raise SegsynthError("--augment-prompts varies class prompts: use it with --class-prompts N (text -> image "
                            "generators with attention labels)")
    dataset = open_dataset(config.data)
    # the words file is checked here, before any label is read
    augmenter = PromptAugmenter(dataset.classes, config.prompt_augmentation) if config.augment_prompts else None
    ids = list(dataset.split(config.split).ids)
    if config.limit:
        ids = ids[: config.limit]

    # 2. Counts per mask from the planner, then distinct seeds in plan order.
    counts, fields = PLANNERS[chosen[0]][2](config, dataset, ids)
    seeds = assign_seeds(counts, config.seed)

    # 3. With prompt augmentation, one entry per sample, each its own prompt.
    entries = [plan_entry(sample_id, sample_seeds, entry_fields)
               for sample_id, sample_seeds, entry_fields in zip(ids, seeds, fields)]
    if augmenter is not None:
        entries = augment_entries(entries, augmenter)
    # ... and with class-centred crops, one entry per (mask, class it was planned for).
    if config.class_crop:
        entries = class_crop_entries(entries, dataset.split(config.split), list(dataset.classes), config.class_crop)

    # 4. Write the plan atomically, the resolved config beside it.
    out = write_plan(config.out, entries)
    save_config(config, out.with_name(out.name + ".config.yaml"))
    return out


def augment_entries(entries: list[PlanEntry], augmenter: PromptAugmenter) -> list[PlanEntry]:
    """Prompt augmentation (methods/attn2mask/prompts.py): each class-prompt entry becomes one entry per seed,
    named `<id>_a<j>`, whose prompt is drawn from the templates and its classes' words with the sample's
    seed as the key; its class_words name the words drawn. The seeds (and so the initial noise) stay."""
    augmented = []
    for entry in entries:
        for index, seed in enumerate(entry.seeds):
            prompt, class_words = augmenter.prompt(list(entry.class_words), seed)
            augmented.append(PlanEntry(f"{entry.id}_a{index}", [seed], dict(entry.extra), "text", prompt, class_words))
    return augmented


def plan_entry(sample_id: str, seeds: list[int], fields: dict) -> PlanEntry:
    """A plan entry from a planner's keys: the format's own keys become fields, the rest stay extra."""
    fields = dict(fields)
    known = {key: fields.pop(key) for key in ("kind", "prompt", "class_words") if key in fields}
    return PlanEntry(fields.pop("id", sample_id), seeds, fields, **known)
