"""`segsynth plan`: how many samples to make for each entry of a split, and with which seeds.

A planner is a function (config, dataset, ids) -> (counts per id, extra keys
per id); `PLANNERS` maps a plan mode to it, and `make_plan` does the rest:
distinct seeds, the plan file (format: `segsynth.formats.plan`), the resolved
config beside it. Modes: uniform (K per mask, `--uniform K`) and FreeMask's
hardness-aware plan (`--stats FILE`, methods/freemask/hardness.py).
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


# plan mode -> (is it selected by this config?, planner).
PLANNERS: dict[str, tuple[Callable[[PlanConfig], bool], Planner]] = {
    "uniform": (lambda config: config.uniform > 0, uniform_planner),
    "hardness": (lambda config: config.hardness or config.stats is not None, hardness_planner),
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
    out = write_plan(config.out, [PlanEntry(sample_id, sample_seeds, extra)
                                  for sample_id, sample_seeds, extra in zip(ids, seeds, extras)])
    save_config(config, out.with_name(out.name + ".config.yaml"))
    return out
