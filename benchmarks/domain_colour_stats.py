"""How far image sets are from a target domain in colour: mean RGB, luminance, contrast, and the 1-D
Wasserstein distance of each set's luminance histogram to the target set's.

Used for the CamVid daylight -> dusk experiment (results/camvid_dusk.md): did LoRA adaptation move the
generated images towards the dusk images?

    python benchmarks/domain_colour_stats.py --target "dusk=../shared/datasets/camvid/train/0001TP_*.png" \
        --set "daylight=../shared/datasets/camvid/train/0006R0_*.png" \
        --set "no adapter=runs/camvid_dusk/synthetic/attention-band/images/*.png" \
        --set "LoRA=runs/camvid_dusk/synthetic/attention-band-lora/images/*.png" --out results/camvid_dusk_colour_stats.json

Every image is resized to --size (H,W) first, so sets at different resolutions compare alike.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="NAME=GLOB: the target domain's images")
    parser.add_argument("--set", action="append", default=[], help="NAME=GLOB of a set to compare (repeatable)")
    parser.add_argument("--size", default="96,128", help="H,W every image is resized to (default: 96,128)")
    parser.add_argument("--out", required=True, help="JSON report")
    return parser.parse_args()


def named_glob(text: str) -> tuple[str, list[str]]:
    name, sep, pattern = text.partition("=")
    if not sep:
        raise SystemExit(f"{text!r}: give NAME=GLOB, e.g. 'dusk=data/camvid/train/0001TP_*.png'")
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SystemExit(f"{name}: no image matches {pattern!r}; check the path (quote the glob so the shell leaves it)")
    return name, paths


def luminance_of(paths: list[str], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) float RGB at size, and (N, H, W) luminance."""
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize(size[::-1], Image.BILINEAR), dtype=np.float32)
                       for p in paths])
    return images, images @ LUMINANCE


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """W1 of two samples of a scalar: the mean gap between their quantile functions (1,001 quantiles)."""
    q = np.linspace(0, 1, 1001)
    return float(np.abs(np.quantile(a, q) - np.quantile(b, q)).mean())


def main() -> int:
    args = parse_args()
    size = tuple(int(v) for v in args.size.split(","))
    target_name, target_paths = named_glob(args.target)
    report = {"size": list(size), "target": target_name, "sets": {}}
    target_lum = None
    for name, paths in [(target_name, target_paths)] + [named_glob(text) for text in args.set]:
        images, lum = luminance_of(paths, size)
        if target_lum is None:  # the target comes first: every set, itself included, is measured against it
            target_lum = lum
        report["sets"][name] = {
            "images": len(paths), "rgb_mean": [round(float(v), 1) for v in images.mean(axis=(0, 1, 2))],
            "luminance_mean": round(float(lum.mean()), 1),
            "contrast": round(float(lum.std(axis=(1, 2)).mean()), 1),  # std of luminance within an image, averaged
            "luminance_w1_to_target": round(wasserstein_1d(lum.ravel(), target_lum.ravel()), 2)}
        print(f"{name}: {json.dumps(report['sets'][name])}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1) + "\n")
    temporary.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
