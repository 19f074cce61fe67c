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

Class-centred crops (`--class-crop F`, the loop's `loop_planner: targeted-crops`).
Spreading images over masks cannot raise a small class above its share inside
the masks that hold it: a synthetic image repeats its mask's class mix (the
loop measured person at 0.73 % of the real pixels and 1.04 % of either plan's).
With crops, each mask's images are split over the classes that earned them
(largest remainder of step 3's per-class shares), and the images class c earned
render the window of F x each side of the mask that holds the most pixels of c
(ties: the window centred nearest the class's centroid), resized to the
generator's working size. The class then covers a larger share of each image,
and shows up larger, than in the whole mask.
"""

from __future__ import annotations

import re

import numpy as np
from tqdm import tqdm

from segsynth import IGNORE_INDEX
from segsynth.data import Dataset
from segsynth.data.base import Split
from segsynth.formats.plan import PlanEntry
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
    # the class that brought each mask most of its images, and every class's share of them, kept in the plan for
    # reading it later (and for class-centred crops)
    fields = [{"targeted": round(float(row.sum()), 4)}
              | ({"target_class": dataset.classes[int(np.argmax(row))],
                  "class_images": {dataset.classes[c]: round(float(row[c]), 4) for c in np.flatnonzero(row > 0)}}
                 if row.sum() > 0 else {}) for row in per_mask_class]
    return counts, fields


def class_window(label: np.ndarray, class_id: int, fraction: float) -> list[int]:
    """[top, left, height, width] of the window of `fraction` x each side of `label` holding the most pixels of
    `class_id`; among equal windows, the one whose centre is nearest the class's centroid."""
    height, width = label.shape[:2]
    window_h, window_w = max(1, int(round(height * fraction))), max(1, int(round(width * fraction)))
    hits = (label == class_id)
    integral = np.pad(hits.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = (integral[window_h:, window_w:] - integral[:-window_h, window_w:]
              - integral[window_h:, :-window_w] + integral[:-window_h, :-window_w])  # [H-h+1, W-w+1]
    tops, lefts = np.nonzero(counts == counts.max())
    if hits.any():
        rows, cols = np.nonzero(hits)
        distance = (tops + window_h / 2 - rows.mean()) ** 2 + (lefts + window_w / 2 - cols.mean()) ** 2
        best = int(np.argmin(distance))
    else:
        best = 0
    return [int(tops[best]), int(lefts[best]), window_h, window_w]


def class_crop_entries(entries: list[PlanEntry], split: Split, classes: list[str], fraction: float) -> list[PlanEntry]:
    """Each targeted mask entry -> one entry per class that earned it images (module docstring), named
    "<mask id>@<class>" (the class name made file-name safe), rendering that class's window of the mask with
    its share of the entry's seeds. `fraction` is in (0, 1] (PlanConfig.class_crop's range)."""
    index = {name: c for c, name in enumerate(classes)}
    result = []
    for entry in tqdm(entries, desc="class crops", unit="mask", leave=False):
        shares = entry.extra.get("class_images") or {}
        if entry.kind != "mask" or not shares or not entry.seeds:
            result.append(entry)
            continue
        names = sorted(shares, key=lambda name: index[name])
        counts = round_to_budget(np.array([shares[name] for name in names]), len(entry.seeds), len(entry.seeds))
        label = split.label(split.index_of(entry.source or entry.id))
        seeds = iter(entry.seeds)
        extra = {key: value for key, value in entry.extra.items() if key != "class_images"}
        for name, count in zip(names, counts):
            if count:
                safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
                result.append(PlanEntry(f"{entry.id}@{safe_name}", [next(seeds) for _ in range(count)],
                                        extra | {"target_class": name}, source=entry.source or entry.id,
                                        crop=class_window(label, index[name], fraction)))
    return result
