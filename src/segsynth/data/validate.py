"""Dataset validation: `segsynth check-data` (full) and the quick check every verb runs.

Opening a dataset already refuses unpaired files and empty splits. Decoding
finds the rest: unreadable files, image/mask size mismatch, labels outside the
class range, colour masks where indices are expected. The quick check decodes
a spread of samples per split so a verb fails in seconds, not hours in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from segsynth import IGNORE_INDEX
from segsynth.data.base import Dataset
from segsynth.io import SegsynthError


@dataclass
class SplitReport:
    name: str
    samples: int
    checked: int
    pixels: np.ndarray  # per class, plus ignore at the end
    sizes: dict = field(default_factory=dict)  # (h, w) -> count
    errors: list[str] = field(default_factory=list)


def check_split(dataset: Dataset, split_name: str, limit: int | None = None, progress: bool = False) -> SplitReport:
    """Decode up to `limit` samples (evenly spread; all when None) and collect every problem found."""
    split = dataset.split(split_name)
    total = len(split)
    indices = range(total) if limit is None or limit >= total else np.linspace(0, total - 1, limit).round().astype(int)
    pixels = np.zeros(dataset.num_classes + 1, np.int64)
    report = SplitReport(split_name, total, 0, pixels)
    for index in tqdm(indices, desc=f"check {split_name}", disable=not progress, leave=False):
        try:
            sample = split[int(index)]
        except SegsynthError as error:
            report.errors.append(str(error))
            continue
        report.checked += 1
        counts = np.bincount(sample.label.ravel(), minlength=256)
        pixels[: dataset.num_classes] += counts[: dataset.num_classes]
        pixels[-1] += counts[IGNORE_INDEX]
        size = sample.label.shape
        report.sizes[size] = report.sizes.get(size, 0) + 1
    return report


def quick_check(dataset: Dataset, splits: list[str] | None = None, per_split: int = 8) -> None:
    """The early check every verb runs before spending compute; raises on the first problem found."""
    for name in splits or list(dataset.splits):
        report = check_split(dataset, name, limit=per_split)
        if report.errors:
            more = f" (and {len(report.errors) - 1} more in the {report.checked + len(report.errors)} checked)" \
                if len(report.errors) > 1 else ""
            raise SegsynthError(f"dataset {dataset.spec}, split {name}: {report.errors[0]}{more}; "
                                f"run `segsynth check-data {dataset.spec}` for the full list")


def format_report(dataset: Dataset, reports: list[SplitReport]) -> str:
    lines = [f"dataset {dataset.spec}: {dataset.num_classes} classes"]
    for report in reports:
        sizes = ", ".join(f"{w}x{h}: {n}" for (h, w), n in sorted(report.sizes.items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"  split {report.name}: {report.samples} samples, {report.checked} decoded, sizes (WxH) {sizes}")
    total = sum(r.pixels for r in reports)
    share = total / max(total.sum(), 1)
    lines.append("  class pixel share (all checked splits):")
    for name, value, count in zip(list(dataset.classes) + ["<ignore>"], share, total):
        bar = "#" * int(round(value * 50))
        lines.append(f"    {name[:20]:20s} {100 * value:6.2f}%  {count:>12d}  {bar}")
    absent = [name for name, count in zip(dataset.classes, total) if count == 0]
    if absent:
        lines.append(f"  classes with no pixels: {', '.join(absent)}")
    errors = [e for r in reports for e in r.errors]
    lines.append(f"  problems: {len(errors)}" + ("" if not errors else ""))
    lines.extend(f"    - {error}" for error in errors[:50])
    return "\n".join(lines)
