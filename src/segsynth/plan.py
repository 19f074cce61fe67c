"""`segsynth plan`: how many synthetic images to render for each real mask, and with which seeds.

A plan is a JSONL file, one line per real mask of a split, in split order:

    {"id": "0001TP_006690", "seeds": [0, 1]}

optionally with more keys a planner adds (the FreeMask hardness plan adds
"hardness"). Seeds are distinct across the whole plan, so no two synthetic
samples start from the same noise. A planner is a function
(config, dataset, ids) -> (counts per id, extra keys per id); `PLANNERS` maps a
plan mode to it, and `make_plan` does the rest (seeds, writing, the resolved
config beside the plan). The hardness-aware plan (FreeMask: for the mask of
hardness rank r among N, k = min(1 + round(r / N * Nmax), Nmax)) is one more
planner and one more `PlanConfig` field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from segsynth import IGNORE_INDEX
from segsynth.config import field, save_config
from segsynth.data import Dataset, open_dataset
from segsynth.io import SegsynthError, atomic_write_text, read_jsonl


@dataclass
class PlanConfig:
    data: str = field(help="real dataset spec whose masks are planned, e.g. camvid:PATH")
    out: str = field(help="plan file to write (JSONL)")
    split: str = field("train", help="split whose masks are planned")
    uniform: int = field(0, help="uniform plan: K synthetic images for every mask")
    limit: int = field(0, help="plan only the first N masks of the split (0: all), for smoke runs")
    seed: int = field(0, help="first seed; each sample gets the next one, so seeds are distinct")
    hardness: bool = field(False, help="hardness-aware plan (FreeMask); needs --stats")
    stats: str | None = field(None, help="hardness plan: class-stats JSON from `segsynth stats` (selects the hardness plan)")
    nmax: int = field(20, help="hardness plan: the hardest mask gets Nmax images, the easiest 1")
    budget: int = field(0, help="hardness plan: scale k so the plan renders exactly this many images in all")


@dataclass
class PlanEntry:
    id: str
    seeds: list[int]
    extra: dict


Planner = Callable[[PlanConfig, Dataset, list[str]], tuple[list[int], list[dict]]]


def uniform_planner(config: PlanConfig, dataset: Dataset, ids: list[str]) -> tuple[list[int], list[dict]]:
    """K images for every mask."""
    return [config.uniform] * len(ids), [{} for _ in ids]


def mask_hardness(label: np.ndarray, mean_loss: np.ndarray) -> float:
    """FreeMask: Σ_c n_c·L̄_c / Σ_c n_c over the mask's labelled pixels (classes without L̄_c left out)."""
    counts = np.bincount(label[label != IGNORE_INDEX].ravel(), minlength=len(mean_loss))[: len(mean_loss)]
    known = np.isfinite(mean_loss) & (counts > 0)
    return float((counts[known] * mean_loss[known]).sum() / counts[known].sum()) if known.any() else 0.0


def hardness_counts(hardness: list[float], nmax: int, budget: int = 0) -> list[int]:
    """Images per mask from hardness: rank r (1 = easiest) of N gets k = min(1 + round(r/N·Nmax), Nmax).

    With a budget the same ranking gives the shape min(1 + r/N·Nmax, Nmax), scaled so the total is
    exactly `budget` (largest-remainder rounding; ties go to the harder mask).
    """
    n = len(hardness)
    order = sorted(range(n), key=lambda i: (hardness[i], i))  # easiest first, stable on ties
    ranks = np.empty(n, np.int64)
    ranks[order] = np.arange(1, n + 1)
    if budget <= 0:
        return [int(min(1 + math.floor(r / n * nmax + 0.5), nmax)) for r in ranks]
    shape = np.minimum(1 + ranks / n * nmax, nmax).astype(np.float64)
    exact = shape * budget / shape.sum()
    counts = np.floor(exact).astype(np.int64)
    leftover = budget - int(counts.sum())
    by_remainder = sorted(range(n), key=lambda i: (-(exact[i] - counts[i]), -ranks[i]))
    counts[by_remainder[:leftover]] += 1
    return counts.tolist()


def hardness_planner(config: PlanConfig, dataset: Dataset, ids: list[str]) -> tuple[list[int], list[dict]]:
    """FreeMask's hardness-aware plan: harder masks (higher mean class loss) get more images."""
    from segsynth.stats import load_class_stats

    if config.nmax < 1:
        raise SegsynthError(f"--nmax must be >= 1, got {config.nmax}")
    if not config.stats:
        raise SegsynthError("the hardness plan needs --stats FILE (class statistics from `segsynth stats`)")
    mean_loss = load_class_stats(config.stats, dataset.classes)
    split = dataset.split(config.split)
    hardness = [mask_hardness(split.label(split.index_of(i)), mean_loss)
                for i in tqdm(ids, desc="hardness", unit="mask", leave=False)]
    counts = hardness_counts(hardness, config.nmax, config.budget)
    return counts, [{"hardness": round(h, 5)} for h in hardness]


# plan mode -> (is it selected by this config?, planner).
PLANNERS: dict[str, tuple[Callable[[PlanConfig], bool], Planner]] = {
    "uniform": (lambda config: config.uniform > 0, uniform_planner),
    "hardness": (lambda config: config.hardness or config.stats is not None, hardness_planner),
}


def summarize_plan(entries: list[PlanEntry]) -> str:
    """The plan's total and its histogram of images per mask."""
    counts = np.bincount([len(e.seeds) for e in entries])
    lines = [f"plan: {sum(len(e.seeds) for e in entries)} images for {len(entries)} masks; images per mask:"]
    peak = max(counts.max(), 1)
    lines += [f"  k={k:3d}: {n:6d} masks {'#' * int(round(40 * n / peak))}" for k, n in enumerate(counts) if n]
    return "\n".join(lines)


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
    out = Path(config.out)
    lines = [json.dumps({"id": sample_id, "seeds": sample_seeds, **extra})
             for sample_id, sample_seeds, extra in zip(ids, seeds, extras) if sample_seeds]
    atomic_write_text(out, "\n".join(lines) + "\n")
    save_config(config, out.with_name(out.name + ".config.yaml"))
    return out


def assign_seeds(counts: list[int], first_seed: int) -> list[list[int]]:
    """Consecutive seeds: mask i gets counts[i] seeds, none shared with any other mask."""
    seeds, next_seed = [], first_seed
    for count in counts:
        seeds.append(list(range(next_seed, next_seed + count)))
        next_seed += count
    return seeds


def read_plan(path: str | Path) -> list[PlanEntry]:
    """Read and validate a plan file: unique ids, non-empty lists of unique integer seeds."""
    path = Path(path)
    if not path.is_file():
        raise SegsynthError(f"plan file {path} not found; make one with `segsynth plan --data SPEC --uniform K --out {path}`")
    entries, seen = [], set()
    for number, record in enumerate(read_jsonl(path), 1):
        where = f"{path}: entry {number}"
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not record["id"]:
            raise SegsynthError(f"{where}: needs an \"id\" string")
        seeds = record.get("seeds")
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise SegsynthError(f"{where} ({record['id']}): \"seeds\" must be a non-empty list of integers")
        if len(set(seeds)) != len(seeds):
            raise SegsynthError(f"{where} ({record['id']}): repeated seeds {seeds}")
        if record["id"] in seen:
            raise SegsynthError(f"{where}: mask id {record['id']!r} appears twice; merge its seeds into one line")
        seen.add(record["id"])
        entries.append(PlanEntry(record["id"], seeds, {k: v for k, v in record.items() if k not in ("id", "seeds")}))
    if not entries:
        raise SegsynthError(f"plan file {path} is empty")
    return entries
