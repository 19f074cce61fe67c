"""Each class's share of the labelled pixels: in the real training masks, in the masks a plan renders, and in
synthetic sets before and after the filter.

A plan decides which classes a synthetic set teaches: FreeMask's hardness plan repeats whole masks, so the set
keeps the real data's class mix; the class-targeted plan (`joint-filtered-targeted`) gives the classes with a
high mean loss more of the budget. This table says how far each set moved the mix, and what the filter left of
it (kept pixels: the filtered masks' labels). A plan needs no rendering: its column counts each entry's real
mask (or its crop) once per seed. A trained arm's column (--stream, the arm's folder) counts what its training
stream shows over one epoch of draws, at the real images' size without augmentation: the real repeats and the
synthetic samples of the joint recipe, the real images with pasted pixels of the paste recipe.

    python benchmarks/set_class_mix.py --data camvid:../shared/datasets/camvid \
        --plan hardness=runs/camvid_latent_m2f_targeted/plans/hardness.jsonl \
        --set targeted=runs/camvid_latent_m2f_targeted/synthetic/targeted --out results/camvid_latent_targeted_class_mix
    python benchmarks/set_class_mix.py --data camvid:../shared/datasets/camvid \
        --stream joint=runs/camvid_latent_m2f_targeted/arms/joint-filtered-hardness/seed0 \
        --stream paste=runs/camvid_latent_m2f_paste/arms/paste-filtered-hardness/seed0 --out results/camvid_latent_paste_class_mix

Prints a Markdown table and writes OUT.json and OUT.md (each to a temp name, then renamed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the real dataset spec (its train split is the reference)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--plan", action="append", default=[], metavar="NAME=FILE",
                        help="a plan of mask entries (segsynth plan): the masks it renders, once per seed")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=DIR",
                        help="a synthetic set (segsynth synthesize; filtered ones give the kept column too)")
    parser.add_argument("--stream", action="append", default=[], metavar="NAME=ARM_DIR",
                        help="a trained arm's folder (its config.yaml): one epoch of its training stream")
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md")
    return parser.parse_args(argv)


def shares(counts: np.ndarray) -> list[float]:
    total = counts.sum()
    return [float(c / total) if total else 0.0 for c in counts]


def markdown(report: dict) -> str:
    kinds = ("planned", "raw", "kept", "trained")
    columns = ["real"] + [f"{name} {kind}" for name, entry in report["sets"].items() for kind in kinds if entry.get(kind)]
    lines = ["| class | " + " | ".join(f"{c} %" for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for i, name in enumerate(report["classes"]):
        cells = [report["real"][i]] + [entry[kind][i] for entry in report["sets"].values()
                                       for kind in kinds if entry.get(kind)]
        lines.append(f"| {name} | " + " | ".join(f"{100 * value:.2f}" for value in cells) + " |")
    sizes = ", ".join(f"{name} {entry['samples']}" for name, entry in report["sets"].items())
    return "\n".join(lines) + f"\n\nSamples: real {report['real_samples']}, {sizes}.\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from PIL import Image

    from segsynth.data import open_dataset
    from segsynth.formats.manifest import read_manifest, read_set_info
    from segsynth.formats.plan import read_plan
    from segsynth.io import SegsynthError, atomic_write_json, atomic_write_text
    from segsynth.methods.freemask.targeted import class_pixel_counts

    # 1. The real split's class mix.
    dataset = open_dataset(args.data)
    classes, split = list(dataset.classes), dataset.split(args.split)
    real = sum(class_pixel_counts(split.label(i), len(classes)) for i in range(len(split)))
    report = {"data": args.data, "split": args.split, "classes": classes, "real": shares(real),
              "real_samples": len(split), "sets": {}}

    # 2. Each plan's mix: the real masks (or crops) it renders, once per seed.
    for item in args.plan:
        name, _, path = item.partition("=")
        if not path:
            raise SegsynthError(f"--plan {item}: write NAME=FILE, e.g. --plan hardness=runs/x/plans/hardness.jsonl")
        entries = read_plan(path)
        planned = np.zeros(len(classes), np.int64)
        for entry in entries:
            if entry.kind != "mask":
                raise SegsynthError(f"--plan {item}: entry {entry.id} is a {entry.kind} entry; only mask entries "
                                    "have a mask to count")
            label = split.label(split.index_of(entry.source or entry.id))
            if entry.crop:
                top, left, height, width = entry.crop
                label = label[top:top + height, left:left + width]
            planned += len(entry.seeds) * class_pixel_counts(label, len(classes))
        report["sets"][name] = {"plan": path, "samples": sum(len(entry.seeds) for entry in entries),
                                "planned": shares(planned)}

    # 3. Each set's raw and (when filtered) kept mix.
    for item in args.set:
        name, _, folder = item.partition("=")
        if not folder:
            raise SegsynthError(f"--set {item}: write NAME=DIR, e.g. --set hardness=runs/x/synthetic/hardness")
        folder = Path(folder)
        set_classes = read_set_info(folder)["classes"]
        if set_classes != classes:
            raise SegsynthError(f"--set {item}: {folder / 'classes.json'} has other classes than {args.data}")
        records = read_manifest(folder)
        if not records:
            raise SegsynthError(f"--set {item}: {folder} has no finished samples")
        raw = np.zeros(len(classes), np.int64)
        kept = np.zeros(len(classes), np.int64)
        filtered = all(record.get("filtered_mask") for record in records)
        for record in records:
            raw += class_pixel_counts(np.array(Image.open(folder / record["mask"])), len(classes))
            if filtered:
                kept += class_pixel_counts(np.array(Image.open(folder / record["filtered_mask"])), len(classes))
        report["sets"][name] = {"folder": str(folder), "samples": len(records), "raw": shares(raw),
                                "kept": shares(kept) if filtered else None,
                                "kept_of_raw": [float(k / r) if r else None for k, r in zip(kept, raw)]
                                if filtered else None}
    # 4. Each trained arm's stream: one epoch of draws at the real images' size, no augmentation.
    for item in args.stream:
        name, _, folder = item.partition("=")
        if not folder:
            raise SegsynthError(f"--stream {item}: write NAME=ARM_DIR, e.g. --stream paste=runs/x/arms/paste/seed0")
        report["sets"][name] = stream_mix(Path(folder), dataset, split, len(classes))
    table = markdown(report)
    print(table)
    if args.out:
        atomic_write_json(Path(args.out + ".json"), report)
        atomic_write_text(Path(args.out + ".md"), f"# Class mix of the labelled pixels: real {args.split} split and "
                                                  "synthetic sets (raw masks; kept = after the filter)\n\n" + table)
    return 0


def stream_mix(folder: Path, dataset, split, class_count: int) -> dict:
    from segsynth.config import build_config, load_yaml
    from segsynth.data.transforms import AugmentConfig
    from segsynth.io import SegsynthError
    from segsynth.methods.freemask.targeted import class_pixel_counts
    from segsynth.stage_configs import TrainConfig
    from segsynth.training.recipes import RECIPES
    from segsynth.training.stream import SampleStream

    config_file = folder / "config.yaml"
    if not config_file.is_file():
        raise SegsynthError(f"--stream {folder}: no config.yaml; give a `segsynth train --out` folder")
    config = build_config(TrainConfig, load_yaml(config_file), str(config_file))
    if config.recipe == "pretrain-finetune":
        raise SegsynthError(f"--stream {folder}: a pretrain-finetune arm has two streams; give its pretrain/ folder")
    size = split.label(0).shape
    identity = AugmentConfig(crop=size, base=size, scale_range=(1.0, 1.0), flip=False, photometric=False,
                             cat_max_ratio=1.01)
    stream = SampleStream(RECIPES[config.recipe](config, dataset), identity, seed=config.seed)
    counts = np.zeros(class_count, np.int64)
    for draw in range(len(stream.epoch_items)):
        counts += class_pixel_counts(stream[draw][1].numpy(), class_count)
    return {"arm": str(folder), "recipe": config.recipe, "samples": len(stream.epoch_items),
            "trained": shares(counts)}


if __name__ == "__main__":
    raise SystemExit(main())
