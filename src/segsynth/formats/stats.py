"""The class-statistics format: FreeMask's class-wise mean loss L̄_c over real training pixels.

    {"classes": [...], "mean_loss": [... or null], "pixels": [...],
     "segmenter": "<checkpoint>", "data": "<spec>", "split": "train"}

`mean_loss[c]` is null for a class without pixels. Written by `segsynth stats`
(methods/freemask/stats.py), read by the hardness plan and the filter.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from segsynth.io import SegsynthError, atomic_write_json, read_json

REQUIRED_KEYS = ("classes", "mean_loss", "pixels")


def write_class_stats(path: str | Path, stats: dict) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in stats]
    if missing:
        raise ValueError(f"class statistics lack {missing}")
    atomic_write_json(path, stats)


def load_class_stats(path: str | Path, classes) -> np.ndarray:
    """Read a class-stats JSON and return mean_loss as an array (NaN where a class had no pixels)."""
    if not Path(path).is_file():
        raise SegsynthError(f"{path}: class-stats file not found; make it with "
                            f"`segsynth stats --segmenter CHECKPOINT --out {path}`")
    stats = read_json(path)
    for key in REQUIRED_KEYS:
        if not isinstance(stats, dict) or key not in stats:
            raise SegsynthError(f"{path}: not a class-stats file (no {key!r}); make one with `segsynth stats`")
    if list(stats["classes"]) != list(classes):
        raise SegsynthError(f"{path}: statistics are for classes {stats['classes'][:4]}..., not this dataset's "
                            f"{list(classes)[:4]}...; compute them with a segmenter trained on this dataset")
    return np.array([math.nan if v is None else float(v) for v in stats["mean_loss"]], np.float64)
