"""A run's results: per-arm mIoU (mean and spread over seeds), per-class IoU, seconds per stage, grids.

Reads only files: each arm's metrics_<split>.json, each synthetic set's
summary.json and manifest, seconds.json; writes results.json and results.md.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from segsynth.config import to_dict
from segsynth.data.base import read_image, read_raw_mask
from segsynth.formats.manifest import MANIFEST, read_manifest
from segsynth.formats.plan import read_plan
from segsynth.io import atomic_write_json, atomic_write_png, atomic_write_text, read_json, safe_relative_path


def summarize_seeds(metrics_by_seed: dict, classes) -> dict:
    """One arm's metrics files ({seed: metrics}) -> mIoU per seed, mean, spread (max - min), per-class IoU
    averaged over the seeds (None for a class no seed could score)."""
    per_seed = {str(seed): round(m["miou"], 2) for seed, m in metrics_by_seed.items()}
    per_class = [[math.nan if m["per_class"].get(c) is None else m["per_class"][c] for c in classes]
                 for m in metrics_by_seed.values()]
    values = list(per_seed.values())
    return {
        "miou": per_seed,
        "mean": round(float(np.mean(values)), 2) if values else None,
        "spread": round(float(np.max(values) - np.min(values)), 2) if values else None,
        "per_class": {c: (round(float(np.nanmean(col)), 2) if np.isfinite(col).any() else None)
                      for c, col in zip(classes, np.array(per_class, dtype=float).T)} if per_class else {},
    }


def paired_with_real(arm_miou: dict, real_miou: dict) -> dict | None:
    """An arm against real-only seed by seed: a seed fixes the segmenter's initialisation (and the augmentation
    draws), so the difference at the same seed removes the part of the seed-to-seed spread the two arms share.
    -> per-seed differences over the seeds both arms have, their mean and how many are above zero; None when
    they share no seed."""
    shared = [seed for seed in arm_miou if seed in real_miou]
    if not shared:
        return None
    differences = {seed: round(arm_miou[seed] - real_miou[seed], 2) for seed in shared}
    return {"per_seed": differences, "mean": round(float(np.mean(list(differences.values()))), 2),
            "above": sum(value > 0 for value in differences.values()), "seeds": len(shared)}


def format_paired(paired: dict | None) -> str:
    """"3/3 (+0.87 to +2.91)": seeds above their real-only seed, out of the seeds both have, and the range."""
    if not paired:
        return ""
    values = list(paired["per_seed"].values())
    spread = f"{values[0]:+.2f}" if len(values) == 1 else f"{min(values):+.2f} to {max(values):+.2f}"
    return f"{paired['above']}/{paired['seeds']} ({spread})"


def plan_change(plan: Path, previous: Path) -> dict | None:
    """How far a re-plan moved from the plan before it: `moved` counts the images it gives a mask (or a crop
    of one) beyond what the previous plan gave that mask, out of its `planned` images. A closed-loop round whose
    signal ranks the masks as the previous model did moves few, and is then a second rendering of the same plan
    more than a steered one. None when either plan file is missing."""
    if not (plan.is_file() and previous.is_file()):
        return None

    def images_per_mask(path: Path) -> Counter:
        counts = Counter()
        for entry in read_plan(path):
            counts[(entry.source or entry.id, tuple(entry.crop or ()))] += len(entry.seeds)
        return counts

    now, before = images_per_mask(plan), images_per_mask(previous)
    return {"moved": sum(max(0, n - before.get(key, 0)) for key, n in now.items()), "planned": sum(now.values())}


PARALLEL_MARK = " (parallel)"  # a stage that ran beside others: its group's wall time is counted, not its own


def collect_results(context, method) -> dict:
    """Per arm: mIoU per seed, mean and spread (max - min), per-class IoU averaged over seeds, the method it
    belongs to, the synthetic samples it trains on and its training seconds."""
    config, out, classes = context.config, context.out, list(context.dataset.classes)
    table = method.arm_table(config)
    default_iterations = context.train_settings.iterations
    arms = {}
    for arm_name in config.arms:
        folders = [out / "arms" / arm_name / f"seed{seed}" for seed in config.seeds]
        metrics = {seed: read_json(folder / f"metrics_{config.eval_split}.json") for seed, folder in
                   zip(config.seeds, folders) if (folder / f"metrics_{config.eval_split}.json").is_file()}
        arm = table[arm_name]
        records = [record for name in arm.synthetic if context.synthetic_set(name).is_dir()
                   for record in read_manifest(context.synthetic_set(name))]
        ignored = [record["ignored_fraction"] for record in records if "ignored_fraction" in record]
        tags = dict(arm.tags)
        signal = tags.get("signal_file")
        arms[arm_name] = {
            "method": arm.method or method.name,
            **summarize_seeds(metrics, classes),
            "synthetic_sets": list(arm.synthetic),
            "synthetic_images": len(records),
            # the share of synthetic pixels the filter set to ignore (mean over samples), for filtered arms
            "ignored_fraction": round(float(np.mean(ignored)), 4) if arm.masks == "filtered" and ignored else None,
            # a closed-loop round: the class weights that planned its data (the planner's class-stats file)
            "signal": read_json(out / signal)["mean_loss"] if signal and (out / signal).is_file() else None,
            "plan_change": plan_change(out / tags["plan_file"], out / tags["previous_plan_file"])
            if "plan_file" in tags else None,
            # A training that ran beside others (`parallel`) is recorded under its name + PARALLEL_MARK: its
            # own seconds, not its group's wall time.
            "train_seconds": round(sum(context.seconds.get(f"train {arm_name} seed {seed}{mark}", 0.0)
                                       for seed in config.seeds for mark in ("", PARALLEL_MARK)), 1),
            "checkpoints": [str(folder / "checkpoint") for folder in folders],
            "iterations": int(dict(arm.train).get("iterations", default_iterations)),
            "round": arm.round,
            "variant": {key: value for key, value in arm.tags},  # what a derived arm varies (sweep tables)
        }
    real = arms.get("real")
    for arm_name, arm in arms.items():
        arm["vs_real_paired"] = None if real is None or arm_name == "real" else paired_with_real(arm["miou"],
                                                                                                   real["miou"])
    synthetic = {}
    for folder in sorted((out / "synthetic").glob("*")):
        if (folder / "summary.json").is_file():
            synthetic[folder.name] = read_json(folder / "summary.json")
    train = context.train_settings
    return {"method": method.name, "data": config.data, "eval_split": config.eval_split, "seeds": config.seeds,
            "model": train.model, "iterations": train.iterations, "batch_size": train.batch_size,
            "images_per_mask": config.images_per_mask, "classes": classes,
            "palette": [list(colour) for colour in context.dataset.palette], "arms": arms, "synthetic": synthetic,
            "seconds": context.seconds, # stages that ran side by side count once, by the wall time of their group
            "total_seconds": round(sum(v for k, v in context.seconds.items() if not k.endswith(PARALLEL_MARK)), 1),
            "config": to_dict(config)}


def format_table(results: dict) -> str:
    """mIoU per arm: mean, spread and seeds, the difference to real, the synthetic samples it trained on."""
    real = results["arms"].get("real", {}).get("mean")
    lines = ["| arm | mIoU mean | spread | per seed | vs real | seeds above real | synthetic images | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, arm in results["arms"].items():
        mean = arm["mean"]
        delta = "" if mean is None or real is None or name == "real" else f"{mean - real:+.2f}"
        seeds = ", ".join(f"{v:.2f}" for v in arm["miou"].values())
        spread = arm["spread"]
        lines.append(f"| {name} | {'-' if mean is None else f'{mean:.2f}'} | "
                     f"{'-' if spread is None else f'{spread:.2f}'} | {seeds} | {delta} | "
                     f"{format_paired(arm.get('vs_real_paired'))} | "
                     f"{arm.get('synthetic_images', 0)} | {arm.get('train_seconds', 0):.0f} |")
    return "\n".join(lines)


def format_per_class(results: dict) -> str:
    """Per-class IoU (mean over seeds), one row per arm."""
    classes = results.get("classes") or list(next(iter(results["arms"].values()), {}).get("per_class", {}))
    lines = ["| arm | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for name, arm in results["arms"].items():
        lines.append(f"| {name} | {_per_class_cells(arm, classes)} |")
    return "\n".join(lines)


def _per_class_cells(arm: dict, classes: list[str]) -> str:
    """An arm's per-class IoU as table cells, "-" for a class no seed scored."""
    return " | ".join("-" if arm["per_class"].get(c) is None else f"{arm['per_class'][c]:.1f}" for c in classes)


def format_seconds(results: dict) -> str:
    lines = ["| stage | s |", "|---|---|"] + [f"| {name} | {value:.0f} |" for name, value in results["seconds"].items()]
    parallel = any(name.endswith(PARALLEL_MARK) for name in results["seconds"])
    return "\n".join(lines) + f"\n\nTotal: {results['total_seconds']:.0f} s" + (
        " (stages marked (parallel) ran side by side; their group's wall time is counted)." if parallel else ".")


def sweep_rows(results: dict, sweep: str) -> dict[str, list[tuple[str, dict]]]:
    """Arms of one sweep ("filter", "volume", "share", "loop") grouped by the arm they vary, that arm first:
    {varied arm: [(arm name, its variant fields), ...]}; the varied arm's own fields are filled in from its
    variants' (base_alpha, base_k, round 0)."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, arm in results["arms"].items():
        variant = arm.get("variant") or {}
        if variant.get("sweep") == sweep:
            groups.setdefault(variant["of"], []).append((name, variant))
    for origin, rows in groups.items():
        first = rows[0][1]
        own = {"filter": {"alpha": first.get("base_alpha"), "judge": "reference"},
               "volume": {"k": first.get("base_k"), "iterations": first.get("base_iterations")},
               "share": {"share": first.get("base_share")},
               "loop": {"round": 0, "signal": "-"}}[sweep]
        if origin in results["arms"]:
            rows.insert(0, (origin, {"sweep": sweep, "of": origin, **own}))
        if sweep == "loop":
            rows.sort(key=lambda row: row[1]["round"])
        elif sweep == "volume":
            rows.sort(key=lambda row: row[1]["k"] or 0)
        elif sweep == "share":
            rows.sort(key=lambda row: row[1]["share"] or 0)
    return groups


def _value(arm: dict, key: str = "mean") -> str:
    return "-" if arm.get(key) is None else f"{arm[key]:.2f}"


def format_sweeps(results: dict) -> str:
    """The sweeps' own tables (empty when the run has none): filter settings, synthetic volume and share, and the
    closed loop with the per-class IoU of every round."""
    arms, classes, parts = results["arms"], results.get("classes") or [], []
    for origin, rows in sweep_rows(results, "filter").items():
        lines = [f"Filter settings of {origin} (alpha 0: no filter; judge: the segmenter whose loss the filter "
                 "compares):", "", "| arm | alpha | judge | synthetic pixels ignored | mIoU | spread | vs "
                 f"{origin} |", "|---|---|---|---|---|---|---|"]
        for name, variant in rows:
            arm = arms[name]
            delta = "" if name == origin or arm["mean"] is None or arms[origin]["mean"] is None else \
                f"{arm['mean'] - arms[origin]['mean']:+.2f}"
            ignored = arm.get("ignored_fraction")
            lines.append(f"| {name} | {variant.get('alpha', 0) or 'off'} | {variant.get('judge')} | "
                         f"{'-' if ignored is None else f'{100 * ignored:.1f} %'} | {_value(arm)} | "
                         f"{_value(arm, 'spread')} | {delta} |")
        parts.append("\n".join(lines))
    for origin, rows in sweep_rows(results, "volume").items():
        scaled = any(row[1].get("iterations_rule") == "scaled" for row in rows)
        lines = [f"Synthetic volume of {origin} (K images per real mask, nested subsets of one set; iterations "
                 f"{'scaled with K (volume_iterations: scaled)' if scaled else 'the same for every K'}):", "",
                 "| arm | K | synthetic images | iterations | mIoU | spread |", "|---|---|---|---|---|---|"]
        for name, variant in rows:
            arm = arms[name]
            lines.append(f"| {name} | {variant.get('k')} | {arm.get('synthetic_images', 0)} | "
                         f"{arm.get('iterations', '-')} | {_value(arm)} | {_value(arm, 'spread')} |")
        parts.append("\n".join(lines))
    for origin, rows in sweep_rows(results, "share").items():
        real = arms.get("real", {}).get("mean")
        lines = [f"Synthetic share of {origin} (the share of training draws from its synthetic sets; "
                 f"{origin} itself: joint, half; the others: the replace recipe from the pool of its sets):", "",
                 "| arm | synthetic share | mIoU | spread | vs real | " + " | ".join(classes) + " |",
                 "|---|---|---|---|---|" + "---|" * len(classes)]
        for name, variant in rows:
            arm = arms[name]
            delta = "" if real is None or arm["mean"] is None else f"{arm['mean'] - real:+.2f}"
            lines.append(f"| {name} | {variant.get('share'):g} | {_value(arm)} | {_value(arm, 'spread')} | {delta} | "
                         f"{_per_class_cells(arm, classes)} |")
        parts.append("\n".join(lines))
    for origin, rows in sweep_rows(results, "loop").items():
        first = rows[-1][1]
        lines = [f"Closed loop of {origin} (signal {first.get('signal')}, planner {first.get('planner', 'hardness')}, "
                 f"init {first.get('init')}, sets "
                 f"{first.get('sets')}): mIoU and per-class IoU per round", "",
                 "| round | arm | synthetic images | re-planned images | mIoU | spread | vs round 0 | " +
                 " | ".join(classes) + " |", "|---|---|---|---|---|---|---|" + "---|" * len(classes)]
        start = arms[rows[0][0]]["mean"]
        for name, variant in rows:
            arm = arms[name]
            delta = "" if variant["round"] == 0 or arm["mean"] is None or start is None else \
                f"{arm['mean'] - start:+.2f}"
            change = arm.get("plan_change")
            moved = f"{change['moved']} of {change['planned']}" if change else ""
            lines.append(f"| {variant['round']} | {name} | {arm.get('synthetic_images', 0)} | {moved} | {_value(arm)} | "
                         f"{_value(arm, 'spread')} | {delta} | {_per_class_cells(arm, classes)} |")
        signals = [(variant["round"], arm_signal) for name, variant in rows
                   if (arm_signal := arms[name].get("signal"))]
        if signals:
            lines += ["", "The class weights that planned each round (loss: L̄_c of the round before's model; "
                      "iou: 1 - IoU/100):", "", "| round | " + " | ".join(classes) + " |",
                      "|---|" + "---|" * len(classes)]
            lines += [f"| {r} | " + " | ".join("-" if w is None else f"{w:.3f}" for w in weights) + " |"
                      for r, weights in signals]
        if any(arms[name].get("plan_change") for name, _ in rows):
            lines += ["", "Re-planned images: those a round's plan gives a mask beyond what the plan before it gave "
                      "that mask (round 1: the first set's plan). Few means the signal ranked the masks as before, "
                      "so the round rendered the same plan again."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def format_tables(results: dict) -> str:
    """What `segsynth run` prints at its end: mIoU per arm, per-class IoU, the sweeps, seconds per stage."""
    sweeps = format_sweeps(results)
    return (f"mIoU per arm ({results['eval_split']}, seeds {results['seeds']}, {results['model']}, "
            f"{results['iterations']} iterations):\n{format_table(results)}\n\nper-class IoU (mean over seeds):\n"
            f"{format_per_class(results)}\n\n" + (f"{sweeps}\n\n" if sweeps else "") +
            f"seconds per stage:\n{format_seconds(results)}")


def write_results(context, method) -> dict:
    """results.json and results.md in the run folder; returns the results."""
    results = collect_results(context, method)
    atomic_write_json(context.out / "results.json", results)
    sweeps = format_sweeps(results)
    text = (f"# segsynth run: {results['data']}\n\nmethod `{results['method']}`; val split: `{results['eval_split']}`; "
            f"seeds {results['seeds']}; segmenter {results['model']}, {results['iterations']} iterations per arm; "
            f"{results['images_per_mask']} synthetic image(s) per real mask.\n\n"
            f"## mIoU per arm\n\n{format_table(results)}\n\n## Per-class IoU (mean over seeds)\n\n"
            f"{format_per_class(results)}\n\n" + (f"## Sweeps\n\n{sweeps}\n\n" if sweeps else "") +
            f"## Seconds per stage\n\n{format_seconds(results)}\n")
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
        image = read_image(safe_relative_path(root, record["image"], f"{MANIFEST} image of {record['id']}"))
        mask = read_raw_mask(safe_relative_path(root, record["mask"], f"{MANIFEST} mask of {record['id']}"))
        shown = image.copy()
        if record.get("filtered_mask"):
            filtered = read_raw_mask(safe_relative_path(root, record["filtered_mask"],
                                                        f"{MANIFEST} filtered_mask of {record['id']}"))
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
