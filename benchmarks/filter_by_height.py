"""Where inside each object the filter ignores a class's synthetic pixels: its upper half or its lower half.

For a filtered synthetic set, every connected region of a class in a raw mask is split at its own middle row;
the table gives, per class, the share of the upper half's and of the lower half's pixels the filter set to
ignore. It answers whether the filter drops one part of a compound class (issue 15: CamVid's bicyclist is a
rider over a bicycle under one label; the filter ignores the rendered riders' bodies far more than their
bicycles), and `--grid` shows the samples with the most pixels of one class: the image, the class's raw mask
over it, and the kept (green) / ignored (red) pixels.

    python benchmarks/filter_by_height.py --synthetic runs/camvid_latent_m2f_longgen/synthetic/hardness \
        --grid bicyclist --out results/camvid_latent_longgen_filter_by_height

Prints a Markdown table and writes OUT.json, OUT.md and, with --grid, OUT_grid.png (each to a temp name, then
renamed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", required=True, help="a filtered synthetic set (segsynth filter)")
    parser.add_argument("--grid", default="", help="class name: a grid of the samples with most of its pixels")
    parser.add_argument("--grid-rows", type=int, default=6)
    parser.add_argument("--out", default="", help="write OUT.json, OUT.md (and OUT_grid.png)")
    return parser.parse_args(argv)


def ignored_by_half(raw: np.ndarray, filtered: np.ndarray, class_index: int) -> np.ndarray:
    """[[upper ignored, upper pixels], [lower ignored, lower pixels]] of one class in one mask: each
    connected region (8-connected) is split at the middle row of its own extent, the middle row going down."""
    from scipy import ndimage

    regions, _ = ndimage.label(raw == class_index, structure=np.ones((3, 3)))
    # each pixel's own region's middle row (index 0, the background, is never read)
    middles = np.array([0.0] + [(box[0].start + box[0].stop - 1) / 2 for box in ndimage.find_objects(regions)])
    inside = regions > 0
    upper = inside & (np.arange(raw.shape[0])[:, None] < middles[regions])
    ignored = filtered != class_index
    return np.array([[(part & ignored).sum(), part.sum()] for part in (upper, inside & ~upper)], dtype=np.int64)


def markdown(report: dict) -> str:
    lines = ["| class | pixels | ignored, upper half | ignored, lower half |", "|---|---|---|---|"]
    for name, row in report["classes"].items():
        if row["pixels"]:
            lines.append(f"| {name} | {row['pixels']} | {100 * row['upper']:.1f} % | {100 * row['lower']:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from PIL import Image

    from segsynth.formats.manifest import read_manifest, read_set_info
    from segsynth.io import SegsynthError, atomic_write_json, atomic_write_png, atomic_write_text

    # 1. The set, its classes, and the filtered samples.
    folder = Path(args.synthetic)
    classes = read_set_info(folder)["classes"]
    if args.grid and args.grid not in classes:
        raise SegsynthError(f"--grid {args.grid}: not a class of {folder / 'classes.json'} ({', '.join(classes)})")
    records = [record for record in read_manifest(folder) if record.get("filtered_mask")]
    if not records:
        raise SegsynthError(f"{folder}: no filtered samples; run `segsynth filter --synthetic {folder}` first")

    # 2. Ignored shares per class and half, over every sample.
    totals = np.zeros((len(classes), 2, 2), dtype=np.int64)
    by_class_pixels = []
    for record in records:
        raw = np.array(Image.open(folder / record["mask"]))
        filtered = np.array(Image.open(folder / record["filtered_mask"]))
        for index in np.unique(raw):
            if index < len(classes):
                totals[index] += ignored_by_half(raw, filtered, int(index))
        if args.grid:
            by_class_pixels.append((int((raw == classes.index(args.grid)).sum()), record["id"], record))
    report = {"synthetic": str(folder), "samples": len(records), "classes": {
        name: {"pixels": int(totals[i, :, 1].sum()),
               "upper": float(totals[i, 0, 0] / totals[i, 0, 1]) if totals[i, 0, 1] else None,
               "lower": float(totals[i, 1, 0] / totals[i, 1, 1]) if totals[i, 1, 1] else None}
        for i, name in enumerate(classes)}}
    table = markdown(report)
    print(table)

    # 3. The grid: image | the class over it (magenta) | kept (green) and ignored (red) pixels of the class.
    tiles = []
    if args.grid:
        index = classes.index(args.grid)
        for _, _, record in sorted(by_class_pixels, key=lambda item: (-item[0], item[1]))[: args.grid_rows]:
            image = np.array(Image.open(folder / record["image"]).convert("RGB"))
            raw = np.array(Image.open(folder / record["mask"]).resize(image.shape[1::-1], Image.NEAREST))
            filtered = np.array(Image.open(folder / record["filtered_mask"]).resize(image.shape[1::-1], Image.NEAREST))
            over = image.copy()
            over[raw == index] = (over[raw == index] // 2 + np.array([127, 0, 127])).astype(np.uint8)
            verdict = np.zeros_like(image)
            verdict[(raw == index) & (filtered == index)] = [0, 255, 0]
            verdict[(raw == index) & (filtered != index)] = [255, 0, 0]
            tiles.append(np.concatenate([image, over, verdict], axis=1))
    if args.out:
        atomic_write_json(Path(args.out + ".json"), report)
        atomic_write_text(Path(args.out + ".md"), f"# Where the filter ignores each class's pixels, upper and lower "
                                                  f"half of each object ({folder})\n\n" + table)
        if tiles:
            atomic_write_png(Path(args.out + "_grid.png"), np.concatenate(tiles, axis=0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
