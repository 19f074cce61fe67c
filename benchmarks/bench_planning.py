"""Planning: images a hardness plan renders vs FreeMask's render-Nmax-then-pick, for the same final set.

FreeMask rendered Nmax images for every mask and then kept k_r of them; a
hardness plan renders only the k_r. The ratio is the compute a plan needs
relative to render-then-pick (expected about 0.55 at Nmax = 20). Measured on
real class statistics when given (--stats, --data), else on the toy data
with a uniform spread of hardness.

    python benchmarks/bench_planning.py [--data camvid:PATH --stats class_stats.json] [--nmax 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_filter import machine_info, report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="toy:n=400")
    parser.add_argument("--stats", default=None)
    parser.add_argument("--nmax", type=int, default=20)
    parser.add_argument("--out", default="results/bench_planning.json")
    args = parser.parse_args()

    from segsynth.data import open_dataset
    from segsynth.methods.freemask.hardness import hardness_counts, mask_hardness
    from segsynth.formats.stats import load_class_stats

    dataset = open_dataset(args.data)
    split = dataset.split("train")
    if args.stats:
        mean_loss = load_class_stats(args.stats, dataset.classes)
        hardness = [mask_hardness(split.label(i), mean_loss) for i in range(len(split))]
    else:
        hardness = np.random.default_rng(0).random(len(split)).tolist()
    counts = hardness_counts(hardness, args.nmax)
    planned, render_then_pick = sum(counts), args.nmax * len(counts)
    result = {"benchmark": "planning", "masks": len(counts), "nmax": args.nmax, "plan_images": planned,
              "render_then_pick_images": render_then_pick, "ratio": round(planned / render_then_pick, 4),
              "expected": 0.55, "settings": vars(args), "machine": machine_info()}
    report(result, ["masks", "plan_images", "render_then_pick_images", "ratio"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
