"""Filter throughput: `segsynth filter` images/s vs a bare segmenter forward on the same images in memory.

The bare loop is the floor: the segmenter called (default threads) on batches
already decoded and stacked as tensors. `filter` adds PNG decoding, the
per-pixel loss, the threshold, per-class statistics (all in its scoring lanes)
and writing the filtered masks (in a writer thread). Target ratio >= 0.85.

    python benchmarks/bench_filter.py [--images 512 --size 96x128 --batch 8 --model segformer-small]
    python benchmarks/bench_filter.py --model segformer-b0 --size 192x256 --images 512 \
        --out results/bench_filter_b0_192x256.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", default="96x128")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default="segformer-small")
    parser.add_argument("--rounds", type=int, default=4, help="filter runs, each followed by a bare run (medians)")
    parser.add_argument("--lanes", type=int, default=0, help="filter lanes (0: auto)")
    parser.add_argument("--out", default="results/bench_filter.json")
    args = parser.parse_args()

    from segsynth.data import open_dataset
    from segsynth.methods.freemask.filter import FilterConfig, filter_synthetic
    from segsynth.training.loop import TrainConfig, train
    from synthetic_sets import write_synthetic_set

    spec = f"toy:n={args.images},n_val=8,size={args.size}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. A segmenter (one iteration: speed does not depend on its accuracy) and a synthetic set.
        train(TrainConfig(data=spec, out=str(tmp / "seg"), model=args.model, iterations=1, batch_size=2,
                          workers=0, eval_split="", device="cpu"))
        dataset = open_dataset(spec)
        root = write_synthetic_set(tmp / "syn", dataset)
        from segsynth.segmenters import load_segmenter
        from segsynth.methods.freemask.stats import StatsConfig, compute_class_stats

        compute_class_stats(StatsConfig(segmenter=str(tmp / "seg"), out=str(tmp / "stats.json"), device="cpu"))
        model, _ = load_segmenter(tmp / "seg" / "checkpoint")
        model.eval()
        split = dataset.split("train")
        batches = [torch.from_numpy(np.stack([split[i].image for i in range(s, min(s + args.batch, len(split)))]))
                   .permute(0, 3, 1, 2).float() for s in range(0, len(split), args.batch)]

        def bare() -> float:
            started = time.perf_counter()
            with torch.no_grad():
                for batch in batches:
                    model(batch)
            return len(split) / (time.perf_counter() - started)

        choices: list[dict] = []  # what the filter's lane probe chose, per run

        def filtered() -> float:
            shutil.rmtree(root / "masks_filtered", ignore_errors=True)  # start from an unfiltered set each time
            # The lane choice (filter.lanes.rank0.json) is kept: the warm-up run pays for the probe once,
            # as a long run does; its one-off cost is reported on its own as lane_probe_seconds.
            for leftover in [root / "filter.json", *root.glob("filter.rank*.jsonl")]:
                leftover.unlink(missing_ok=True)
            summary = filter_synthetic(FilterConfig(synthetic=str(root), segmenter=str(tmp / "seg"),
                                                    stats=str(tmp / "stats.json"), batch_size=args.batch,
                                                    lanes=args.lanes, device="cpu"))
            choices.append({key: summary[key] for key in ("lanes", "threads_per_lane", "lane_probe", "lane_probe_seconds")})
            return summary["filtered_now"] / summary["seconds"]

        # 2. Warm up both, then alternate bare / filter / bare so drift shows as spread, not bias.
        bare(), filtered()
        bare_runs, filter_runs = [bare()], []
        for _ in range(args.rounds):
            filter_runs.append(filtered())
            bare_runs.append(bare())

    result = {
        "benchmark": "filter", "filter_images_per_s": round(float(np.median(filter_runs)), 2),
        "bare_forward_images_per_s": round(float(np.median(bare_runs)), 2),
        "ratio": round(float(np.median(filter_runs) / np.median(bare_runs)), 3), "target": 0.85,
        "lanes": choices[-1]["lanes"], "lane_probe_seconds": choices[0]["lane_probe_seconds"],
        "runs": {"filter": [round(v, 2) for v in filter_runs], "bare": [round(v, 2) for v in bare_runs]},
        "lane_choices": choices, "settings": vars(args), "machine": machine_info(),
    }
    report(result, ["filter_images_per_s", "bare_forward_images_per_s", "ratio", "lanes", "lane_probe_seconds"], args.out)
    return 0


def machine_info() -> dict:
    import diffusers
    import transformers

    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "load_average": list(os.getloadavg())}


def report(result: dict, keys: list[str], out: str) -> None:
    width = max(len(k) for k in keys)
    print(f"{result['benchmark']} benchmark ({result['machine']['cores']} cores, torch {result['machine']['torch']})")
    for key in keys:
        print(f"  {key:<{width}}  {result[key]}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    raise SystemExit(main())
