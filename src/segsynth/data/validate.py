"""Dataset validation: `segsynth check-data` (full) and the check every verb runs before compute.

Opening a dataset already refuses unpaired files and empty splits. The check
before compute (`check_before_compute`) then looks at every file of the splits
a verb reads, so a bad file anywhere stops the verb before its first iteration:

* every image: its header opens (format known, size, mode) and, for PNG, every
  chunk's checksum is intact through the end (a truncated or damaged file); a
  JPEG ends with its end-of-image marker; no image is larger than PIL decodes
  safely;
* every mask: decoded (masks are small and compress well), an index mask, the
  size of its image, and every label value valid for the dataset's classes;
* every weight map of a synthetic set: its header, and the size of its mask.

What each file holds is remembered in a per-dataset cache keyed by the file's
path, size and modification time (`SEGSYNTH_CACHE_DIR`, default
~/.cache/segsynth/checks), so a dataset is read once and later runs only stat
its files. Image pixels are not decoded (that costs as much as an epoch); a
spread of samples per split is decoded in full as well.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from segsynth import IGNORE_INDEX
from segsynth.data.base import IMAGE_ERRORS, INVALID, Dataset, Pair, read_raw_mask
from segsynth.data.specs import base_spec
from segsynth.io import SegsynthError, atomic_write_text


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


def check_before_compute(dataset: Dataset, splits: list[str] | None = None, per_split: int = 8,
                         progress: bool = True) -> None:
    """The check every verb runs before spending compute: every file's header (and every mask) of the
    named splits, then a spread of `per_split` samples decoded in full; raises on the first problem."""
    check_files(dataset, splits, progress=progress)
    quick_check(dataset, splits, per_split)


def quick_check(dataset: Dataset, splits: list[str] | None = None, per_split: int = 8) -> None:
    """`per_split` samples of each split (evenly spread) decoded in full; raises on the first problem found."""
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


# --- every file, once: headers and masks, cached by (path, size, mtime) ---------------------------------

MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own limit (~89 megapixels): beyond it decoding is refused
CACHE_FORMAT = "segsynth-file-checks/1"
RGB_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16", "I;16B",
             "I;16L", "RGBX", "RGBa")  # the modes PIL converts to RGB (read_image does)


def cache_dir() -> Path:
    base = os.environ.get("SEGSYNTH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "segsynth")
    return Path(base) / "checks"


def inspect_file(path: Path, kind: str) -> dict:
    """What one file holds, as the cache keeps it: {"size": [W, H], "mode"} (+ "values": the raw label values
    present, for masks), or {"error": message}. `kind` is image, mask or weight."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            info = {"size": [width, height], "mode": image.mode}
            if width * height > MAX_IMAGE_PIXELS:
                return {"error": f"{path}: {kind} is {width}x{height} ({width * height / 1e6:.0f} megapixels), more "
                                 f"than the {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels PIL decodes safely; downscale it"}
            if kind == "image" and image.mode not in RGB_MODES:
                return {"error": f"{path}: image mode {image.mode!r} cannot be read as RGB; convert the file"}
            if kind != "mask" and image.format == "PNG":
                image.verify()  # every chunk's CRC through IEND: catches truncated and damaged files
            elif kind != "mask" and image.format == "JPEG":
                with open(path, "rb") as handle:
                    handle.seek(max(0, os.path.getsize(path) - 4096))
                    if b"\xff\xd9" not in handle.read():
                        raise OSError("no end-of-image marker: the file is truncated")
    except IMAGE_ERRORS as error:
        return {"error": f"{path}: cannot read {kind} ({error}); replace or remove the file"}
    if kind == "mask":
        try:
            array = read_raw_mask(path)  # decodes; refuses colour masks
        except SegsynthError as error:
            return {"error": str(error)}
        info["values"] = np.flatnonzero(np.bincount(array.ravel(), minlength=256)).tolist()
    return info


def pair_problem(pair: Pair, found: dict[Path, dict], table: np.ndarray, classes) -> str | None:
    """The first problem of one (image, mask, weight) pair, from what `inspect_file` found in each."""
    image = found[pair.image]
    if "error" in image:
        return image["error"]
    if pair.mask is None:
        return None
    mask = found[pair.mask]
    if "error" in mask:
        return mask["error"]
    if mask["size"] != image["size"]:
        (mw, mh), (iw, ih) = mask["size"], image["size"]
        return (f"{pair.mask}: mask is {mw}x{mh} but its image {pair.image} is {iw}x{ih} (WxH); masks must match "
                "their images")
    values = np.asarray(mask["values"], np.int64)
    bad = values[table[values] == INVALID]
    if bad.size:
        return (f"{pair.mask}: label value(s) {bad[:10].tolist()} are outside the {len(classes)} classes of this "
                f"dataset (valid: 0..{len(classes) - 1} plus ignore); fix the mask or the dataset's classes.json")
    if pair.weight is not None:
        weight = found[pair.weight]
        if "error" in weight:
            return weight["error"]
        if weight["size"] != mask["size"]:
            return (f"{pair.weight}: weight map is {weight['size'][0]}x{weight['size'][1]} but its mask is "
                    f"{mask['size'][0]}x{mask['size'][1]} (WxH); regenerate the set")
    return None


def check_files(dataset: Dataset, splits: list[str] | None = None, progress: bool = True,
                workers: int | None = None) -> dict[str, list[str]]:
    """Check every file of the named splits (file-backed datasets; the toy set has none), raising on the
    first problem (with how many more there are). Returns {split: []} when all is well; files whose
    path, size and modification time are in the cache are not read again."""
    splits = splits or list(dataset.splits)
    jobs = {}
    for name in splits:
        for pair in dataset.pairs.get(name, []):
            jobs[pair.image] = "image"
            if pair.mask is not None:
                jobs[pair.mask] = "mask"
            if pair.weight is not None:
                jobs[pair.weight] = "weight"
    if not jobs:
        return {name: [] for name in splits}

    # 1. What the cache already knows (same path, size and modification time), and what must be read.
    cache_path = cache_dir() / f"{hashlib.sha1(_dataset_key(dataset).encode()).hexdigest()[:20]}.json"
    cached = _load_cache(cache_path)
    found: dict[Path, dict] = {}
    stamps: dict[str, list] = {}
    todo = []
    for path, kind in jobs.items():
        try:
            stat = path.stat()
        except OSError as error:
            found[path] = {"error": f"{path}: cannot read {kind} ({error.strerror}); replace or remove the file"}
            continue
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino, kind]  # a rewrite or a replace changes one
        stamps[str(path)] = stamp
        entry = cached.get(str(path))
        if entry is not None and entry[:4] == stamp:
            found[path] = entry[4]
        else:
            todo.append((path, kind))

    # 2. Read the rest (PIL and zlib release the GIL while decoding: a few threads share the work).
    if todo:
        workers = workers or max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                        else (os.cpu_count() or 1)))
        bar = tqdm(total=len(todo), desc="check files", unit="file", leave=False,
                   disable=not progress or len(todo) < 500)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for (path, kind), info in zip(todo, pool.map(lambda job: inspect_file(*job), todo, chunksize=32)):
                found[path] = info
                bar.update(1)
        bar.close()
        for path, _ in todo:
            cached[str(path)] = [*stamps[str(path)], found[path]]
        _save_cache(cache_path, cached)

    # 3. Pairs: sizes agree, labels are valid for this dataset's classes.
    problems = {}
    for name in splits:
        problems[name] = [problem for pair in dataset.pairs.get(name, [])
                          if (problem := pair_problem(pair, found, dataset.label_table, dataset.classes))]
        if problems[name]:
            more = f" (and {len(problems[name]) - 1} more)" if len(problems[name]) > 1 else ""
            raise SegsynthError(f"dataset {dataset.spec}, split {name}: {problems[name][0]}{more}; "
                                f"run `segsynth check-data {dataset.spec}` for the full list")
    return problems


def _dataset_key(dataset: Dataset) -> str:
    kind, _, argument = base_spec(dataset.spec).partition(":")
    return f"{kind}:{Path(argument).resolve() if argument else ''}"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["files"] if data.get("format") == CACHE_FORMAT else {}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return {}  # no cache yet, or one from another version: check again


def _save_cache(path: Path, files: dict) -> None:
    try:
        atomic_write_text(path, json.dumps({"format": CACHE_FORMAT, "files": files}, separators=(",", ":")))
    except (OSError, SegsynthError):
        pass  # a read-only home: every run checks again, which is correct, only slower
