"""FreeMask's hardness-aware re-sampling: harder real masks get more synthetic images.

The hardness of a real mask is the pixel-weighted mean of the class-wise mean
loss L̄_c over its classes, Σ_c n_c·L̄_c / Σ_c n_c; ranked easiest first, the
mask at rank r of N gets k = min(1 + round(r/N·Nmax), Nmax) images (Nmax = 20).
`hardness_planner` is the plan mode `segsynth plan --stats FILE` selects.
"""

from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from segsynth import IGNORE_INDEX
from segsynth.data import Dataset
from segsynth.formats.stats import load_class_stats
from segsynth.io import SegsynthError
from segsynth.stage_configs import PlanConfig


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
    if not config.stats:
        raise SegsynthError("the hardness plan needs --stats FILE (class statistics from `segsynth stats`)")
    mean_loss = load_class_stats(config.stats, dataset.classes)
    split = dataset.split(config.split)
    hardness = [mask_hardness(split.label(split.index_of(i)), mean_loss)
                for i in tqdm(ids, desc="hardness", unit="mask", leave=False)]
    counts = hardness_counts(hardness, config.nmax, config.budget)
    return counts, [{"hardness": round(h, 5)} for h in hardness]
