"""A class-targeted plan: split the budget over classes by how badly a model does on them.

FreeMask's hardness plan ranks whole masks by Σ_c n_c·L̄_c / Σ_c n_c, a mean
dominated by the classes that cover most of a mask (road, sky, building). A
class the model fails but that covers 1 % of every mask it appears in (a pole,
a sign) barely moves that mean, so the hardness plan keeps the real data's
class mix round after round; the closed loop measured exactly that
(results/toy_closed_loop.md). This plan targets classes instead:

  1. class c's share of the budget is its weight w_c / Σ w (the weights are the
     class-statistics file's mean_loss: FreeMask's L̄_c, or 1 - IoU_c / 100
     from the closed loop's iou signal); classes no planned mask shows, or
     without statistics, get none;
  2. inside class c its share goes to the masks that show it, in proportion to
     the fraction of the mask the class covers (a mask where the pole is large
     teaches more pole than one where it is a few pixels);
  3. each mask's images are the sum over its classes, capped at Nmax (the
     excess goes to the other masks of the same classes), rounded so the plan
     renders exactly the budget.

Selected by `segsynth plan --stats FILE --targeted` (budget: --budget, default
one image per mask) and by the closed loop's `loop_planner: targeted`.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from segsynth import IGNORE_INDEX
from segsynth.data import Dataset
from segsynth.formats.stats import load_class_stats
from segsynth.io import SegsynthError
from segsynth.stage_configs import PlanConfig


def class_pixel_counts(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Labelled pixels of each class in one mask (ignore left out)."""
    return np.bincount(label[label != IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes]


def targeted_allocation(class_pixels: np.ndarray, weights: np.ndarray, budget: int, nmax: int) -> np.ndarray:
    """Fractional images per mask and class (steps 1-3 before rounding): shape [N, C]; the row sums are
    each mask's images (<= nmax), the whole sums to `budget`.

    class_pixels: [N masks, C classes] labelled pixel counts; weights: [C], NaN or <= 0 for no share.
    """
    n, num_classes = class_pixels.shape
    if budget > n * nmax:
        raise SegsynthError(f"targeted plan: a budget of {budget} images is more than {n} masks x Nmax {nmax}; "
                            "raise --nmax or lower --budget")
    # 1. Each class's share of the budget, over the classes some mask shows.
    totals = class_pixels.sum(axis=1, keepdims=True).astype(np.float64)
    coverage = np.divide(class_pixels, totals, out=np.zeros(class_pixels.shape), where=totals > 0)
    usable = np.nan_to_num(np.asarray(weights, np.float64), nan=0.0).clip(min=0.0) * (coverage.sum(axis=0) > 0)
    if usable.sum() <= 0:
        raise SegsynthError("targeted plan: no class with a positive weight appears in the planned masks; check the "
                            "statistics file's mean_loss (a class-statistics file from `segsynth stats`)")
    class_budget = budget * usable / usable.sum()
    # 2. Inside a class, by the share of each mask it covers.
    per_class = np.divide(coverage, coverage.sum(axis=0, keepdims=True), out=np.zeros(coverage.shape),
                          where=coverage.sum(axis=0, keepdims=True) > 0)
    per_mask_class = per_class * class_budget  # [N, C]
    # 3. Cap at nmax: a capped mask's excess goes back to its classes' other masks (water-filling; at most
    #    N rounds, each caps at least one more mask).
    capped = np.zeros(n, bool)
    allocation = per_mask_class.sum(axis=1)
    for _ in range(n):
        over = allocation > nmax + 1e-9
        if not over.any():
            break
        capped |= over
        excess_by_class = (per_mask_class[over] * (1 - nmax / allocation[over])[:, None]).sum(axis=0)
        per_mask_class[over] *= (nmax / allocation[over])[:, None]
        # spread each class's excess over its uncapped masks; a class with none left spreads over all uncapped
        open_share = per_class * ~capped[:, None]
        room = open_share.sum(axis=0)
        fallback = (~capped).astype(np.float64) / max(1, int((~capped).sum()))
        for c in np.flatnonzero(excess_by_class > 0):
            spread = open_share[:, c] / room[c] if room[c] > 0 else fallback
            per_mask_class[:, c] += excess_by_class[c] * spread
        allocation = per_mask_class.sum(axis=1)
    return per_mask_class


def round_to_budget(allocation: np.ndarray, budget: int, nmax: int) -> list[int]:
    """Largest-remainder rounding of fractional counts to integers summing to `budget`, none above nmax."""
    counts = np.minimum(np.floor(allocation + 1e-9), nmax).astype(np.int64)
    leftover = budget - int(counts.sum())
    remainder = allocation - counts
    order = sorted(range(len(counts)), key=lambda i: (-remainder[i], i))
    for i in order:
        if leftover <= 0:
            break
        if counts[i] < nmax:
            counts[i] += 1
            leftover -= 1
    return counts.tolist()


def targeted_planner(config: PlanConfig, dataset: Dataset, ids: list[str]) -> tuple[list[int], list[dict]]:
    """Class-targeted plan (module docstring): the budget split by class weight, then by class coverage."""
    if not config.stats:
        raise SegsynthError("the targeted plan needs --stats FILE (class statistics from `segsynth stats`, or the "
                            "closed loop's signal file)")
    weights = load_class_stats(config.stats, dataset.classes)
    split = dataset.split(config.split)
    class_pixels = np.stack([class_pixel_counts(split.label(split.index_of(i)), dataset.num_classes)
                             for i in tqdm(ids, desc="class pixels", unit="mask", leave=False)])
    budget = config.budget or len(ids)
    per_mask_class = targeted_allocation(class_pixels, weights, budget, config.nmax)
    counts = round_to_budget(per_mask_class.sum(axis=1), budget, config.nmax)
    # the class that brought each mask most of its images, kept in the plan for reading it later
    fields = [{"targeted": round(float(row.sum()), 4)} | ({"target_class": dataset.classes[int(np.argmax(row))]}
                                                           if row.sum() > 0 else {}) for row in per_mask_class]
    return counts, fields
