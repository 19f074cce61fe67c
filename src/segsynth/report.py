"""A run's results: per-arm mIoU (mean and spread over seeds), per-class IoU, seconds per stage, grids.

Reads only files: each arm's metrics_<split>.json, each synthetic set's
summary.json and manifest, seconds.json; writes results.json and results.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segsynth.config import to_dict
from segsynth.formats.manifest import read_manifest
from segsynth.io import atomic_write_json, atomic_write_png, atomic_write_text, read_json

PARALLEL_MARK = " (parallel)"  # a stage that ran beside others: its group's wall time is counted, not its own


def collect_results(context, method) -> dict:
    """Per arm: mIoU per seed, mean and spread (max - min), per-class IoU averaged over seeds."""
    config, out, classes = context.config, context.out, list(context.dataset.classes)
    arms = {}
    for arm_name in config.arms:
        folders = [out / "arms" / arm_name / f"seed{seed}" for seed in config.seeds]
        per_seed, per_class = {}, []
        for seed, folder in zip(config.seeds, folders):
            path = folder / f"metrics_{config.eval_split}.json"
            if path.is_file():
                metrics = read_json(path)
                per_seed[str(seed)] = round(metrics["miou"], 2)
                per_class.append([metrics["per_class"][c] for c in classes])
        values = list(per_seed.values())
        arms[arm_name] = {
            "miou": per_seed,
            "mean": round(float(np.mean(values)), 2) if values else None,
            "spread": round(float(np.max(values) - np.min(values)), 2) if values else None,
            "per_class": {c: (round(float(np.nanmean(col)), 2) if np.isfinite(col).any() else None)
                          for c, col in zip(classes, np.array(per_class, dtype=float).T)} if per_class else {},
            "checkpoints": [str(folder / "checkpoint") for folder in folders],
        }
    synthetic = {}
    for folder in sorted((out / "synthetic").glob("*")):
        if (folder / "summary.json").is_file():
            synthetic[folder.name] = read_json(folder / "summary.json")
    train = context.train_settings
    return {"method": method.name, "data": config.data, "eval_split": config.eval_split, "seeds": config.seeds,
            "model": train.model, "iterations": train.iterations, "arms": arms, "synthetic": synthetic,
            "seconds": context.seconds,
            # stages that ran side by side count once, by the wall time of their group
            "total_seconds": round(sum(v for k, v in context.seconds.items() if not k.endswith(PARALLEL_MARK)), 1),
            "config": to_dict(config)}


def format_table(results: dict) -> str:
    real = results["arms"].get("real", {}).get("mean")
    lines = ["| arm | mIoU mean | spread | per seed | vs real |", "|---|---|---|---|---|"]
    for name, arm in results["arms"].items():
        mean = arm["mean"]
        delta = "" if mean is None or real is None or name == "real" else f"{mean - real:+.2f}"
        seeds = ", ".join(f"{v:.2f}" for v in arm["miou"].values())
        spread = arm["spread"]
        lines.append(f"| {name} | {'-' if mean is None else f'{mean:.2f}'} | "
                     f"{'-' if spread is None else f'{spread:.2f}'} | {seeds} | {delta} |")
    return "\n".join(lines)


def write_results(context, method) -> dict:
    """results.json and results.md in the run folder; returns the results."""
    results = collect_results(context, method)
    atomic_write_json(context.out / "results.json", results)
    classes = list(context.dataset.classes)
    per_class = ["| arm | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for name, arm in results["arms"].items():
        per_class.append(f"| {name} | " + " | ".join(
            "-" if arm["per_class"].get(c) is None else f"{arm['per_class'][c]:.1f}" for c in classes) + " |")
    stage_lines = [f"| {name} | {value:.0f} |" for name, value in results["seconds"].items()]
    text = (f"# segsynth run: {results['data']}\n\nmethod `{results['method']}`; val split: `{results['eval_split']}`; "
            f"seeds {results['seeds']}; segmenter {results['model']}, {results['iterations']} iterations per arm.\n\n"
            f"## mIoU per arm\n\n{format_table(results)}\n\n## Per-class IoU (mean over seeds)\n\n" + "\n".join(per_class) +
            "\n\n## Seconds per stage\n\n| stage | s |\n|---|---|\n" + "\n".join(stage_lines) +
            f"\n\nTotal: {results['total_seconds']:.0f} s"
            + (" (stages marked (parallel) ran side by side; their group's wall time is counted).\n"
               if any(k.endswith(PARALLEL_MARK) for k in results["seconds"]) else ".\n"))
    atomic_write_text(context.out / "results.md", text)
    return results


def write_synthetic_grid(root: Path, path: Path, palette, rows: int) -> Path | None:
    """Rows of mask | synthetic image | pixels the filter ignored (red), the most-filtered samples first
    (what was thrown away is the interesting part); None when the set has no samples."""
    if not root.is_dir():
        return None
    records = read_manifest(root)
    if not records:
        return None
    colours = np.array(list(palette) + [(0, 0, 0)] * (256 - len(palette)), np.uint8)
    colours[255] = (0, 0, 0)
    records.sort(key=lambda r: -r.get("ignored_fraction", 0.0))
    tiles = []
    for record in records[:rows]:
        image = np.array(Image.open(root / record["image"]).convert("RGB"))
        mask = np.array(Image.open(root / record["mask"]))
        shown = image.copy()
        if record.get("filtered_mask"):
            filtered = np.array(Image.open(root / record["filtered_mask"]))
            ignored = (filtered == 255) & (mask != 255)
            shown[ignored] = (0.35 * shown[ignored] + 0.65 * np.array([255, 0, 0])).astype(np.uint8)
        tiles.append(np.concatenate([colours[mask], image, shown], axis=1))
    grid = np.concatenate(tiles, axis=0)
    scale = max(1, 256 // grid.shape[1] + 1) if grid.shape[1] < 512 else 1
    big = np.asarray(Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST))
    atomic_write_png(path, big)
    return path


def write_set_grids(context, names, write_grid=None) -> list[Path]:
    """One grid per synthetic set of the run (OUT/grids/<name>.png) by `write_grid(root, path, palette, rows)`
    (default: `write_synthetic_grid`); sets without samples are skipped. Returns the grids written."""
    write_grid = write_grid or write_synthetic_grid
    written = []
    for name in names:
        path = write_grid(context.synthetic_set(name), context.out / "grids" / f"{name}.png",
                          context.dataset.palette, context.config.grids)
        if path is not None:
            written.append(path)
    return written
