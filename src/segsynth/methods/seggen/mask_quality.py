"""How much generated masks look like the real training masks, as a set.

SegGen's MaskSyn (Ye et al., 2023) should draw masks with the layouts of the
training data: the same classes in similar proportions, objects in similar
numbers of pieces, classes that appear together in real scenes appearing
together. These statistics compare a set of generated masks with the real
ones without a model:

* class-pixel frequency: the share of labelled pixels per class in each set,
  compared by KL(real || generated) with additive smoothing (a class the
  generator never draws costs a large but finite amount);
* connected components: per class, the mean number of 8-connected pieces in
  the masks where the class appears (fragmented or merged objects show here);
* co-occurrence: C x C, the fraction of masks in which classes i and j both
  appear (the diagonal is how often each class appears), and the mean
  absolute difference between the real and generated matrices;
* the fraction of generated pixels that are ignore (pixels the colour decoder
  could not read, see colour.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from segsynth import IGNORE_INDEX
from segsynth.io import SegsynthError
from segsynth.methods.seggen.colour import connected_components

SMOOTHING = 1e-6  # added to every class's pixel share before renormalising


def mask_quality(generated: Sequence[np.ndarray], real: Sequence[np.ndarray], num_classes: int) -> dict:
    """Compare generated label maps with real ones (any sizes; 255 = ignore). Returns a JSON-ready dict."""
    sets = {"generated": _set_statistics(generated, num_classes, "generated"),
            "real": _set_statistics(real, num_classes, "real")}
    frequency = {name: stats["pixels"] / max(stats["pixels"].sum(), 1) for name, stats in sets.items()}
    smoothed = {name: (share + SMOOTHING) / (share + SMOOTHING).sum() for name, share in frequency.items()}
    kl = float(np.sum(smoothed["real"] * np.log(smoothed["real"] / smoothed["generated"])))
    cooccurrence = {name: stats["together"] / stats["masks"] for name, stats in sets.items()}
    return {
        "num_generated": sets["generated"]["masks"],
        "num_real": sets["real"]["masks"],
        "class_frequency": {name: share.tolist() for name, share in frequency.items()},
        "kl_real_generated": max(kl, 0.0),  # >= 0 in exact arithmetic; rounding can leave -1e-17
        "components_per_mask": {name: _mean_or_none(stats["pieces"], np.diag(stats["together"]))
                                for name, stats in sets.items()},
        "cooccurrence": {name: matrix.tolist() for name, matrix in cooccurrence.items()},
        "cooccurrence_mean_abs_diff": float(np.abs(cooccurrence["real"] - cooccurrence["generated"]).mean()),
        "ignore_fraction": {name: stats["ignore"] / stats["all_pixels"] for name, stats in sets.items()},
    }


def _set_statistics(masks: Sequence[np.ndarray], num_classes: int, name: str) -> dict:
    if len(masks) == 0:
        raise SegsynthError(f"mask_quality: no {name} masks to compare")
    pixels = np.zeros(num_classes, np.int64)
    pieces = np.zeros(num_classes, np.int64)
    together = np.zeros((num_classes, num_classes), np.int64)
    ignore = all_pixels = 0
    for index, mask in enumerate(masks):
        mask = _checked(mask, num_classes, f"{name} mask {index}")
        counts = np.bincount(mask.ravel(), minlength=256)
        pixels += counts[:num_classes]
        ignore += int(counts[IGNORE_INDEX])
        all_pixels += mask.size
        present = counts[:num_classes] > 0
        together += np.outer(present, present)
        components, count = connected_components(mask, connectivity=8)
        component_class = np.zeros(count, np.int64)
        component_class[components.ravel()] = mask.ravel()
        pieces += np.bincount(component_class, minlength=256)[:num_classes]
    return {"masks": len(masks), "pixels": pixels, "pieces": pieces, "together": together,
            "ignore": ignore, "all_pixels": all_pixels}


def _checked(mask: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise SegsynthError(f"mask_quality: {what} must be an H x W integer label map, got {mask.dtype} {mask.shape}")
    valid = np.zeros(256, bool)
    valid[:num_classes] = valid[IGNORE_INDEX] = True
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise SegsynthError(f"mask_quality: {what} has values {mask.min()}..{mask.max()} outside 0..255")
        mask = mask.astype(np.uint8)
    if not valid[mask].all():
        bad = np.unique(mask[~valid[mask]])[:10].tolist()
        raise SegsynthError(f"mask_quality: {what} has label value(s) {bad}; expected classes 0..{num_classes - 1} "
                            f"and {IGNORE_INDEX} (ignore)")
    return mask


def _mean_or_none(total: np.ndarray, masks_with_class: np.ndarray) -> list[float | None]:
    return [float(t / n) if n else None for t, n in zip(total, masks_with_class)]


def format_mask_quality(report: dict, classes: Sequence[str]) -> str:
    """The report as markdown: a summary, then one table row per class (real vs generated)."""
    if len(classes) != len(report["class_frequency"]["real"]):
        raise SegsynthError(f"format_mask_quality: {len(classes)} class names for a report on "
                            f"{len(report['class_frequency']['real'])} classes")
    lines = [
        f"Generated masks: {report['num_generated']}, real masks: {report['num_real']}",
        "",
        f"- class-pixel frequency KL(real || generated): {report['kl_real_generated']:.4f}",
        f"- co-occurrence mean absolute difference: {report['cooccurrence_mean_abs_diff']:.4f}",
        f"- ignore pixels: {_percent(report['ignore_fraction']['generated'])} generated, "
        f"{_percent(report['ignore_fraction']['real'])} real",
        "",
        "| class | pixels real | pixels generated | in masks real | in masks generated "
        "| pieces per mask real | pieces per mask generated |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    real_presence = np.diag(np.asarray(report["cooccurrence"]["real"]))
    generated_presence = np.diag(np.asarray(report["cooccurrence"]["generated"]))
    for c, name in enumerate(classes):
        lines.append(
            f"| {name} | {_percent(report['class_frequency']['real'][c])} "
            f"| {_percent(report['class_frequency']['generated'][c])} "
            f"| {_percent(real_presence[c])} | {_percent(generated_presence[c])} "
            f"| {_number(report['components_per_mask']['real'][c])} "
            f"| {_number(report['components_per_mask']['generated'][c])} |")
    return "\n".join(lines) + "\n"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
