"""Training input throughput: images/s with the real data pipeline vs the same loop on tensors in memory.

`segsynth train` decodes, augments and collates in DataLoader workers while
the model trains; the bare loop trains the same model with the same optimizer
on batches prepared beforehand. Target ratio >= 0.90 on 2 cores. Reported for
the whole run (the first epoch decodes every sample) and after the first epoch
(the decoded-sample cache serves them; only augmentation is left).

    python benchmarks/bench_train_input.py [--data camvid:../shared/datasets/camvid --iterations 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_filter import machine_info, report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="toy:n=200,n_val=8,size=96x128")
    parser.add_argument("--model", default="segformer-small")
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default="results/bench_train_input.json")
    args = parser.parse_args()

    from segsynth.data import open_dataset
    from segsynth.io import read_jsonl
    from segsynth.data.transforms import AugmentConfig
    from segsynth.segmenters import create_segmenter
    from segsynth.training.loop import SampleStream, Source, TrainConfig, train

    dataset = open_dataset(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        # 1. The real pipeline: `train` for N iterations; its own images/s excludes start-up.
        epoch_iterations = -(-len(dataset.split("train")) // args.batch)
        window = max(1, min(epoch_iterations, args.iterations // 10))
        steady_runs: list[float] = []

        def pipeline() -> float:
            """Whole-run images/s; also keeps the rate after the first epoch (windows that start
            past it), when the decoded-sample cache serves every sample."""
            out = Path(tmp) / f"run{time.time_ns()}"
            train(TrainConfig(data=args.data, out=str(out), model=args.model, iterations=args.iterations,
                              batch_size=args.batch, workers=args.workers, eval_split="", device="cpu",
                              log_every=window, warmup=1, save_every=10**9))
            windows = [r for r in read_jsonl(out / "metrics.jsonl") if "images_per_s" in r
                       and r["iteration"] - window >= epoch_iterations]
            if windows:
                images = len(windows) * window * args.batch
                steady_runs.append(images / sum(window * args.batch / r["images_per_s"] for r in windows))
            return json.loads((out / "checkpoint" / "segsynth.json").read_text())["state"]["images_per_s"]

        # 2. The bare loop: same model, optimizer and batch shapes, batches made beforehand.
        native = dataset.split("train")[0].label.shape
        stream = SampleStream([Source("real", dataset.split("train"))], AugmentConfig(crop=native, base=native), 0)
        batches = []
        for i in range(args.iterations):
            items = [stream[i * args.batch + j] for j in range(args.batch)]
            batches.append([torch.stack([item[k] for item in items]) for k in range(3)])

        def bare() -> float:
            torch.manual_seed(0)
            model = create_segmenter(args.model, dataset.num_classes)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            model.train()
            started = time.perf_counter()
            for images, labels, weights in batches:
                loss = model(images.float(), labels, weights)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            return args.iterations * args.batch / (time.perf_counter() - started)

        bare_runs, pipeline_runs = [bare()], []
        for _ in range(2):
            pipeline_runs.append(pipeline())
            bare_runs.append(bare())

    result = {
        "benchmark": "train_input", "pipeline_images_per_s": round(float(np.median(pipeline_runs)), 2),
        "bare_images_per_s": round(float(np.median(bare_runs)), 2),
        "ratio": round(float(np.median(pipeline_runs) / np.median(bare_runs)), 3), "target": 0.90,
        "after_first_epoch_images_per_s": round(float(np.median(steady_runs)), 2) if steady_runs else None,
        "after_first_epoch_ratio": round(float(np.median(steady_runs) / np.median(bare_runs)), 3) if steady_runs else None,
        "first_epoch_iterations": epoch_iterations,
        "runs": {"pipeline": pipeline_runs, "after_first_epoch": [round(v, 2) for v in steady_runs],
                 "bare": [round(v, 2) for v in bare_runs]},
        "settings": vars(args), "machine": machine_info(),
    }
    report(result, ["pipeline_images_per_s", "bare_images_per_s", "ratio", "after_first_epoch_ratio"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
