"""The class-statistics format: FreeMask's class-wise mean loss L̄_c over real training pixels.

    {"classes": [...], "mean_loss": [... or null], "pixels": [...],
     "segmenter": "<checkpoint>", "data": "<spec>", "split": "train"}

`mean_loss[c]` is null for a class without pixels. Written by `segsynth stats`
(methods/freemask/stats.py), read by the hardness plan and the filter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from segsynth.formats.classes import check_class_list
from segsynth.io import SegsynthError, atomic_write_json, read_json

REQUIRED_KEYS = ("classes", "mean_loss", "pixels")


def write_class_stats(path: str | Path, stats: dict) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in stats]
    if missing:
        raise ValueError(f"class statistics lack {missing}")
    atomic_write_json(path, stats)


def is_class_stats_file(path: str | Path) -> bool:
    """Whether `path` holds class statistics segsynth wrote (what `stats --out` may overwrite)."""
    try:
        stats = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(stats, dict) and all(key in stats for key in REQUIRED_KEYS + ("segmenter", "split"))


def load_class_stats(path: str | Path, classes) -> np.ndarray:
    """Read a class-stats JSON and return mean_loss as an array (NaN where a class had no pixels)."""
    if Path(path).is_dir():
        raise SegsynthError(f"{path}: is a folder, not a class-stats file; give the file `segsynth stats --out` wrote")
    if not Path(path).is_file():
        raise SegsynthError(f"{path}: class-stats file not found; make it with "
                            f"`segsynth stats --segmenter CHECKPOINT --out {path}`")
    stats = read_json(path)
    for key in REQUIRED_KEYS:
        if not isinstance(stats, dict) or key not in stats:
            raise SegsynthError(f"{path}: not a class-stats file (no {key!r}); make one with `segsynth stats`")
    fix = "recompute them with `segsynth stats`"
    check_class_list(stats["classes"], str(path), fix)
    if list(stats["classes"]) != list(classes):
        raise SegsynthError(f"{path}: statistics are for classes {stats['classes'][:4]}..., not this dataset's "
                            f"{list(classes)[:4]}...; compute them with a segmenter trained on this dataset")
    return check_entries(Path(path), stats, fix)


def check_entries(path: Path, stats: dict, fix: str) -> np.ndarray:
    """mean_loss and pixels: one entry per class; a class with pixels has a finite mean loss > 0 (0 would
    make the filter ignore every pixel of it), a class without pixels has null. Returns mean_loss with
    NaN for null."""
    classes, mean_loss, pixels = stats["classes"], stats["mean_loss"], stats["pixels"]
    for key, values in (("mean_loss", mean_loss), ("pixels", pixels)):
        if not isinstance(values, list) or len(values) != len(classes):
            count = len(values) if isinstance(values, list) else "no list of"
            raise SegsynthError(f"{path}: {key!r} has {count} entries for {len(classes)} classes; {fix}")
    for name, loss, count in zip(classes, mean_loss, pixels):
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise SegsynthError(f"{path}: pixels of class {name!r} is {count!r}, not a count >= 0; {fix}")
        if count == 0 and loss is not None:
            raise SegsynthError(f"{path}: class {name!r} has no pixels but a mean loss {loss!r}; {fix}")
        if count > 0 and (loss is None or isinstance(loss, bool) or not isinstance(loss, (int, float))
                          or not math.isfinite(loss) or loss <= 0):
            raise SegsynthError(f"{path}: class {name!r} has {count} pixels but mean loss {loss!r}; a class with "
                                f"pixels needs a finite mean loss > 0 (0 would ignore every pixel of it); {fix}")
    if not any(count > 0 for count in pixels):
        raise SegsynthError(f"{path}: no class has any pixel, so there is no loss to compare with; {fix} on a "
                            "split with labels")
    return np.array([math.nan if v is None else float(v) for v in mean_loss], np.float64)
