"""`segsynth run`: the whole FreeMask method on one dataset, and its ablation table.

  1. train real-only segmenters (arm 1; its first seed also scores pixels for the filter)
  2. class statistics L̄_c from that segmenter
  3. plans: uniform K per mask, and hardness-aware with the same total (FreeMask)
  4. train the built-in generator (or use --generator)
  5. synthesize both plans
  6. filter both synthetic sets
  7. train every arm with every seed, each evaluated on the held-out split
  8. results.json, results.md, the printed table and visual grids

Every stage writes to its own folder under OUT and is skipped when its output
is already complete, so an interrupted run continues where it stopped; the
checkpoints of every arm stay, for `segsynth evaluate` on any split later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segsynth.config import build_config, field, save_config, to_dict
from segsynth.data import open_dataset
from segsynth.data.validate import quick_check
from segsynth.io import SegsynthError, atomic_write_json, atomic_write_png, atomic_write_text, read_json

TOY_SPEC = "toy:n=240,n_val=80,size=64x80"


@dataclass(frozen=True)
class Arm:
    name: str
    recipe: str
    synthetic: str | None  # "uniform" or "hardness": which synthetic set
    masks: str  # raw or filtered


# The seven arms of the FreeMask ablation (issue 4), in table order.
ARMS = {
    "real": Arm("real", "real", None, "raw"),
    "synthetic-raw-uniform": Arm("synthetic-raw-uniform", "synthetic", "uniform", "raw"),
    "synthetic-filtered-hardness": Arm("synthetic-filtered-hardness", "synthetic", "hardness", "filtered"),
    "joint-raw-uniform": Arm("joint-raw-uniform", "joint", "uniform", "raw"),
    "joint-filtered-uniform": Arm("joint-filtered-uniform", "joint", "uniform", "filtered"),
    "joint-filtered-hardness": Arm("joint-filtered-hardness", "joint", "hardness", "filtered"),
    "pretrain-finetune-filtered-hardness": Arm("pretrain-finetune-filtered-hardness", "pretrain-finetune", "hardness", "filtered"),
}


@dataclass
class RunConfig:
    data: str = field(TOY_SPEC, help="dataset spec (default: the embedded toy dataset)")
    out: str = field("runs/segsynth", help="output folder")
    preset: str = field("default", help="quick or default (sizes below; any flag overrides the preset)")
    arms: list[str] = field(list(ARMS), help="arms to run")
    seeds: list[int] = field([0, 1], help="training seeds per arm")
    eval_split: str = field("val", help="held-out split every arm is evaluated on")
    # segmenter training (the same for every arm)
    model: str = field("segformer-tiny", help="segmenter")
    iterations: int = field(600, help="training iterations of every arm (pretrain-finetune splits them)")
    batch_size: int = field(8, help="images per iteration")
    crop: list[int] = field([], help="crop H,W (default: the images' size)")
    base_size: list[int] = field([], help="H,W the random resize 0.5-2.0 refers to (default: the images' size)")
    eval_size: list[int] = field([], help="inference size H,W for evaluation and class statistics (default: native)")
    lr: float = field(2e-3, help="peak learning rate")
    warmup: int = field(50, help="warm-up iterations")
    workers: int = field(1, help="data-loading workers")
    pretrain_fraction: float = field(0.5, help="pretrain-finetune: share of the iterations spent on synthetic data")
    # synthetic data
    uniform_k: int = field(2, help="uniform plan: images per mask; the hardness plan gets the same total")
    nmax: int = field(20, help="hardness plan: Nmax (k shape before scaling to the total)")
    alpha: float = field(1.25, help="filter: ignore pixels with loss > alpha * L̄_c")
    generator: str = field("auto", help="auto (the shipped toy generator on toy data, else train one), train, "
                                        "or a generator spec such as builtin:DIR")
    generator_size: list[int] = field([64, 80], help="built-in generator working size H,W")
    generator_channels: list[int] = field([32, 64, 128], help="built-in generator UNet widths")
    generator_iterations: int = field(3000, help="built-in generator training iterations")
    generator_minutes: float = field(3.0, help="stop generator training after this many minutes (0: no limit)")
    generator_batch_size: int = field(16, help="generator training batch size")
    steps: int = field(12, help="denoising steps per synthetic image")
    synth_batch_size: int = field(16, help="masks per generator call")
    grids: int = field(6, help="rows in each visual grid")
    device: str = field("auto", help="auto, cpu or cuda")


# Sizes per preset; flags and --config override them. "default" on real data
# (anything but toy) is the CamVid-sized ablation, documented in README.
PRESETS = {
    "quick": dict(data="toy:n=120,n_val=40,size=64x80", seeds=[0], iterations=200, uniform_k=1, steps=8, grids=4,
                  generator_minutes=0.75),
    "default": dict(),
}
REAL_DATA_PRESETS = {
    "quick": dict(model="segformer-tiny", iterations=300, seeds=[0], uniform_k=1, generator_size=[64, 80],
                  generator_minutes=3.0, crop=[128, 160]),
    # Trained at the built-in generator's 96x128, so that real and synthetic images are equally sharp
    # (a 96x128 sample blown up to 180x240 is blurry next to a real photo); evaluated at 96x128 too,
    # predictions resized to the full-size labels. 2,000 x 16 = 87 epochs of CamVid per arm.
    "default": dict(model="segformer-small", iterations=2000, batch_size=16, lr=1e-3, warmup=100, seeds=[0, 1],
                    uniform_k=1, base_size=[96, 128], crop=[96, 128], eval_size=[96, 128], generator_size=[96, 128],
                    generator_channels=[64, 128, 256], generator_minutes=20.0, generator_iterations=20000, steps=20),
}


def resolve_run_config(values: dict) -> RunConfig:
    """Defaults < preset (toy or real-data variant) < the user's values."""
    preset = values.get("preset", "default")
    if preset not in PRESETS:
        raise SegsynthError(f"unknown preset {preset!r}; options: {', '.join(PRESETS)}")
    data = values.get("data") or PRESETS[preset].get("data", TOY_SPEC)
    table = PRESETS if data.split(":")[0] == "toy" else REAL_DATA_PRESETS
    merged = {**table[preset], **values}
    config = build_config(RunConfig, merged, "run config")
    unknown = [arm for arm in config.arms if arm not in ARMS]
    if unknown:
        raise SegsynthError(f"unknown arm(s) {', '.join(unknown)}; options: {', '.join(ARMS)}")
    return config


def run(config: RunConfig) -> dict:
    """Run the method end to end (resumable); returns the results dict also written to OUT/results.json."""
    from segsynth.filter import FilterConfig, filter_synthetic
    from segsynth.generators.builtin import TrainGeneratorConfig, train_generator
    from segsynth.plan import PlanConfig, make_plan
    from segsynth.stats import StatsConfig, compute_class_stats
    from segsynth.synthesize import SynthesizeConfig, synthesize

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "run.config.yaml")
    seconds: dict = _read_seconds(out)

    # 0. The data, checked once before any compute.
    dataset = open_dataset(config.data)
    quick_check(dataset, ["train", config.eval_split])
    needs_synthetic = any(ARMS[a].synthetic for a in config.arms)
    _say(f"segsynth run: {config.data} ({len(dataset.split('train'))} train / "
         f"{len(dataset.split(config.eval_split))} {config.eval_split}), arms: {', '.join(config.arms)}, seeds {config.seeds}")

    # 1. Real-only segmenters; the first seed's one scores synthetic pixels.
    for seed in config.seeds:
        _stage(seconds, out, f"train real seed {seed}", lambda s=seed: _train_arm(config, ARMS["real"], s, out))
    segmenter = _arm_dir(out, "real", config.seeds[0])
    if not needs_synthetic:
        return _finish(config, out, dataset, seconds)

    # 2. Class statistics from the real segmenter.
    stats_path = out / "class_stats.json"
    _stage(seconds, out, "class statistics", lambda: compute_class_stats(
        StatsConfig(segmenter=str(segmenter), out=str(stats_path), data=config.data, size=config.eval_size,
                    device=config.device)),
        done=stats_path.is_file())

    # 3. Plans: uniform K, and hardness-aware with the same total.
    total = config.uniform_k * len(dataset.split("train"))
    plans = {"uniform": out / "plans" / "uniform.jsonl", "hardness": out / "plans" / "hardness.jsonl"}
    _stage(seconds, out, "plans", lambda: (
        make_plan(PlanConfig(data=config.data, out=str(plans["uniform"]), uniform=config.uniform_k)),
        make_plan(PlanConfig(data=config.data, out=str(plans["hardness"]), stats=str(stats_path), nmax=config.nmax,
                             budget=total, seed=10_000_000))),
        done=all(p.is_file() for p in plans.values()))

    # 4. The generator: given, shipped (toy), or the built-in one trained here.
    generator = config.generator
    if generator == "auto":
        generator = shipped_toy_generator(dataset) or "train"
        if generator != "train":
            _say(f"[skip] train generator: using the one shipped for toy data ({generator})")
    if generator == "train":
        generator_dir = out / "generator"
        _stage(seconds, out, "train generator", lambda: train_generator(TrainGeneratorConfig(
            data=config.data, out=str(generator_dir), size=config.generator_size, channels=config.generator_channels,
            iterations=config.generator_iterations, max_minutes=config.generator_minutes,
            batch_size=config.generator_batch_size, sample_steps=config.steps, device=config.device)),
            done=_generator_finished(generator_dir))
        generator = f"builtin:{generator_dir}"

    # 5-6. Synthesize and filter both sets (each resumes on its own).
    for name in ("uniform", "hardness"):
        if not any(ARMS[a].synthetic == name for a in config.arms):
            continue
        folder = out / "synthetic" / name
        _stage(seconds, out, f"synthesize {name}", lambda f=folder, p=plans[name]: synthesize(SynthesizeConfig(
            data=config.data, plan=str(p), generator=generator, out=str(f), steps=config.steps,
            batch_size=config.synth_batch_size, device=config.device)))
        if any(ARMS[a].synthetic == name and ARMS[a].masks == "filtered" for a in config.arms):
            _stage(seconds, out, f"filter {name}", lambda f=folder: filter_synthetic(FilterConfig(
                synthetic=str(f), segmenter=str(segmenter), stats=str(stats_path), alpha=config.alpha,
                device=config.device)))

    # 7. Every other arm, every seed.
    for arm_name in config.arms:
        if arm_name == "real":
            continue
        for seed in config.seeds:
            _stage(seconds, out, f"train {arm_name} seed {seed}",
                   lambda a=ARMS[arm_name], s=seed: _train_arm(config, a, s, out))

    # 8. Tables and grids.
    _stage(seconds, out, "grids", lambda: write_grids(out, dataset, config.grids))
    return _finish(config, out, dataset, seconds)


# --- stages -------------------------------------------------------------------------


TOY_GENERATOR = Path(__file__).parent / "assets" / "toy_generator"


def shipped_toy_generator(dataset) -> str | None:
    """The generator shipped for the toy classes (configs/toy_generator.yaml), if installed."""
    from segsynth.data.toy import TOY_CLASSES

    meta = TOY_GENERATOR / "segsynth_generator.json"
    if tuple(dataset.classes) == TOY_CLASSES and meta.is_file():
        return f"builtin:{TOY_GENERATOR}"
    return None


def _arm_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "arms" / arm / f"seed{seed}"


def _train_arm(config: RunConfig, arm: Arm, seed: int, out: Path):
    from segsynth.train import TrainConfig, train

    folder = _arm_dir(out, arm.name, seed)
    if (folder / f"metrics_{config.eval_split}.json").is_file():
        return  # finished earlier
    pretrain = int(round(config.iterations * config.pretrain_fraction)) if arm.recipe == "pretrain-finetune" else 0
    train_config = TrainConfig(
        data=config.data, out=str(folder), model=config.model, recipe=arm.recipe,
        synthetic=[str(out / "synthetic" / arm.synthetic)] if arm.synthetic else [],
        synthetic_masks=arm.masks, iterations=config.iterations - pretrain, pretrain_iterations=pretrain,
        batch_size=config.batch_size, crop=config.crop, base_size=config.base_size, eval_size=config.eval_size,
        lr=config.lr, warmup=config.warmup, seed=seed,
        workers=config.workers, eval_split=config.eval_split, save_every=max(100, config.iterations // 4),
        resume=True, device=config.device, log_every=max(10, config.iterations // 20))
    train(train_config)


def _generator_finished(folder: Path) -> bool:
    meta = folder / "segsynth_generator.json"
    return meta.is_file() and read_json(meta).get("training", {}).get("finished", False)


def _stage(seconds: dict, out: Path, name: str, action, done: bool = False) -> None:
    """Run one stage (unless done), timing it; seconds add up across resumed runs."""
    if done:
        _say(f"[skip] {name}: already done")
        return
    _say(f"[stage] {name}")
    started = time.time()
    action()
    seconds[name] = round(seconds.get(name, 0.0) + time.time() - started, 1)
    atomic_write_json(out / "seconds.json", seconds)


def _read_seconds(out: Path) -> dict:
    path = out / "seconds.json"
    return read_json(path) if path.is_file() else {}


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)


# --- results ---------------------------------------------------------------------------


def collect_results(config: RunConfig, out: Path, dataset, seconds: dict) -> dict:
    """Per arm: mIoU per seed, mean and spread (max - min), per-class IoU averaged over seeds."""
    arms = {}
    for arm_name in config.arms:
        per_seed, per_class = {}, []
        for seed in config.seeds:
            path = _arm_dir(out, arm_name, seed) / f"metrics_{config.eval_split}.json"
            if path.is_file():
                metrics = read_json(path)
                per_seed[str(seed)] = round(metrics["miou"], 2)
                per_class.append([metrics["per_class"][c] for c in dataset.classes])
        values = list(per_seed.values())
        arms[arm_name] = {
            "miou": per_seed,
            "mean": round(float(np.mean(values)), 2) if values else None,
            "spread": round(float(np.max(values) - np.min(values)), 2) if values else None,
            "per_class": {c: (round(float(np.nanmean(col)), 2) if np.isfinite(col).any() else None)
                          for c, col in zip(dataset.classes, np.array(per_class, dtype=float).T)} if per_class else {},
            "checkpoints": [str(_arm_dir(out, arm_name, s) / "checkpoint") for s in config.seeds],
        }
    synthetic = {}
    for name in ("uniform", "hardness"):
        summary = out / "synthetic" / name / "summary.json"
        if summary.is_file():
            synthetic[name] = read_json(summary)
    return {"data": config.data, "eval_split": config.eval_split, "seeds": config.seeds, "model": config.model,
            "iterations": config.iterations, "arms": arms, "synthetic": synthetic, "seconds": seconds,
            "total_seconds": round(sum(seconds.values()), 1), "config": to_dict(config)}


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


def _finish(config: RunConfig, out: Path, dataset, seconds: dict) -> dict:
    results = collect_results(config, out, dataset, seconds)
    atomic_write_json(out / "results.json", results)
    classes = list(dataset.classes)
    per_class = ["| arm | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for name, arm in results["arms"].items():
        per_class.append(f"| {name} | " + " | ".join(
            "-" if arm["per_class"].get(c) is None else f"{arm['per_class'][c]:.1f}" for c in classes) + " |")
    stage_lines = [f"| {name} | {value:.0f} |" for name, value in seconds.items()]
    text = (f"# segsynth run: {config.data}\n\nval split: `{config.eval_split}`; seeds {config.seeds}; "
            f"segmenter {config.model}, {config.iterations} iterations per arm.\n\n## mIoU per arm\n\n"
            f"{format_table(results)}\n\n## Per-class IoU (mean over seeds)\n\n" + "\n".join(per_class) +
            "\n\n## Seconds per stage\n\n| stage | s |\n|---|---|\n" + "\n".join(stage_lines) +
            f"\n\nTotal: {results['total_seconds']:.0f} s.\n")
    atomic_write_text(out / "results.md", text)
    _say("\n" + format_table(results) + f"\n\nresults: {out / 'results.md'}, {out / 'results.json'}")
    return results


def write_grids(out: Path, dataset, rows: int) -> list[Path]:
    """Per synthetic set: rows of real mask | synthetic image | pixels the filter ignored (red)."""
    from PIL import Image

    from segsynth.data.synthetic import read_manifest

    palette = np.array(list(dataset.palette) + [(0, 0, 0)] * (256 - len(dataset.palette)), np.uint8)
    palette[255] = (0, 0, 0)
    written = []
    for name in ("uniform", "hardness"):
        root = out / "synthetic" / name
        if not root.is_dir():
            continue
        records = [r for r in read_manifest(root)]
        if not records:
            continue
        # the most-filtered samples first: what was thrown away is the interesting part
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
            tiles.append(np.concatenate([palette[mask], image, shown], axis=1))
        grid = np.concatenate(tiles, axis=0)
        scale = max(1, 256 // grid.shape[1] + 1) if grid.shape[1] < 512 else 1
        path = out / "grids" / f"{name}.png"
        big = np.asarray(Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST))
        atomic_write_png(path, big)
        written.append(path)
    return written
