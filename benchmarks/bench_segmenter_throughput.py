"""Segmenter training throughput: images/s of forward + loss + backward + AdamW step, Mask2Former vs SegFormer.

Both models train on the same batches (toy scenes with their label maps, prepared beforehand, so no data
loading is timed) at the same input size, in alternating rounds (A B A B ...) so a change in machine load
falls on both; the figure per model is the median over rounds, the ratio is measured in this one run.
Defaults compare the CPU presets of about the same parameter count (mask2former-small 2.4 M,
segformer-small 2.5 M) at 96x128, the size of the CamVid FreeMask runs.

    python benchmarks/bench_segmenter_throughput.py [--models segformer-small,mask2former-small --size 96x128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_filter import machine_info, report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="segformer-small,mask2former-small", help="two segmenter names, A,B")
    parser.add_argument("--size", default="96x128", help="input HxW")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=8, help="timed iterations per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="results/bench_segmenter_throughput.json")
    args = parser.parse_args()

    from segsynth.data import open_dataset
    from segsynth.segmenters import create_segmenter

    names = args.models.split(",")
    height, width = (int(v) for v in args.size.split("x"))
    dataset = open_dataset(f"toy:n={args.batch * 4},n_val=1,size={height}x{width}")
    split = dataset.split("train")
    batches = []
    for start in range(0, len(split), args.batch):
        samples = [split[i] for i in range(start, start + args.batch)]
        batches.append((torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float(),
                        torch.from_numpy(np.stack([s.label for s in samples])).long(),
                        torch.ones(len(samples), height, width)))

    # 1. Both models and their optimizers, warmed up (first calls at a size build kernels).
    models, optimizers = {}, {}
    for name in names:
        torch.manual_seed(0)
        models[name] = create_segmenter(name, dataset.num_classes).train()
        optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)

    def step(name: str, batch) -> None:
        loss = models[name](*batch)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    for name in names:
        for batch in batches[:2]:
            step(name, batch)

    # 2. Alternating timed rounds.
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            started = time.perf_counter()
            for i in range(args.iterations):
                step(name, batches[i % len(batches)])
            rates[name].append(args.iterations * args.batch / (time.perf_counter() - started))
    load_after = os.getloadavg()

    a, b = names
    median = {name: float(np.median(values)) for name, values in rates.items()}
    result = {
        "benchmark": "segmenter_throughput",
        "model_a": a, "model_b": b,
        "a_images_per_s": round(median[a], 2), "b_images_per_s": round(median[b], 2),
        "ratio": round(median[b] / median[a], 3),  # B's throughput as a share of A's
        "a_parameters": sum(p.numel() for p in models[a].parameters()),
        "b_parameters": sum(p.numel() for p in models[b].parameters()),
        "runs": {name: [round(v, 2) for v in values] for name, values in rates.items()},
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "settings": vars(args), "machine": machine_info(),
    }
    report(result, ["model_a", "model_b", "a_images_per_s", "b_images_per_s", "ratio", "a_parameters",
                    "b_parameters", "load_average_before"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
