"""Scaling: synthesis and training images/s with 1 and 2 torchrun processes on this machine.

Each configuration runs the real CLI under `torchrun --standalone --nproc-per-node N` with
OMP_NUM_THREADS = cores / N, so every run uses all cores once: the figure is what sharding
buys over intra-op threads, not what extra cores buy. On a 2-core machine the ideal is at
most 2x, and near 1x is expected when one process already keeps both cores busy.

Synthesis images/s comes from the synthesize summary (render phase, all ranks); training
images/s from the final checkpoint's state (all ranks, warm-up excluded by a skipped first
segment: two runs of different length, the difference timed).

    python benchmarks/bench_scaling.py [--images 64 --iterations 60 --size 64x80]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_filter import machine_info, report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="synthetic images per run")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=60, help="training iterations per run (batch 8 in all)")
    parser.add_argument("--size", default="64x80")
    parser.add_argument("--model", default="segformer-small")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--out", default="results/bench_scaling.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    counts = [int(n) for n in args.processes.split(",")]
    data = f"toy:n={args.images},n_val=8,size={args.size}"

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. Shared inputs: a tiny generator at the data's size and a plan with one image per mask.
        from segsynth.generators.testing import save_tiny_builtin
        from segsynth.plan import PlanConfig, make_plan

        height, width = (int(v) for v in args.size.split("x"))
        save_tiny_builtin(tmp / "generator", data=data, iterations=1, size=(height, width), channels=(32, 64, 128),
                          sample_steps=args.steps)
        make_plan(PlanConfig(data=data, out=str(tmp / "plan.jsonl"), uniform=1))

        synthesis, training = {}, {}
        for n in counts:
            # 2. Synthesis: images/s of the render phase as the summary line reports it.
            out = _torchrun(n, cores, ["synthesize", "--data", data, "--plan", str(tmp / "plan.jsonl"),
                                       "--generator", f"builtin:{tmp / 'generator'}", "--out", str(tmp / f"syn{n}"),
                                       "--steps", str(args.steps), "--batch-size", "8", "--no-progress"])
            synthesis[n] = float(re.search(r"\(([\d.]+) images/s", out).group(1))
            # 3. Training: a short and a long run; images/s of the extra iterations (start-up cancels).
            seconds = {}
            for iterations in (args.iterations // 3, args.iterations):
                folder = tmp / f"train{n}_{iterations}"
                started = time.time()
                _torchrun(n, cores, ["train", "--data", data, "--out", str(folder), "--model", args.model,
                                     "--iterations", str(iterations), "--batch-size", "8", "--workers", "1",
                                     "--eval-split=", "--save-every", "100000", "--device", "cpu"])
                seconds[iterations] = time.time() - started
            extra = args.iterations - args.iterations // 3
            # --batch-size is per process: an iteration of N processes trains on 8 * N images.
            training[n] = 8 * n * extra / max(seconds[args.iterations] - seconds[args.iterations // 3], 1e-9)

    result = {
        "benchmark": "scaling",
        "synthesis_images_per_s": {str(n): round(v, 2) for n, v in synthesis.items()},
        "training_images_per_s": {str(n): round(v, 2) for n, v in training.items()},
        "synthesis_speedup_2_vs_1": round(synthesis[2] / synthesis[1], 3) if {1, 2} <= set(synthesis) else None,
        "training_speedup_2_vs_1": round(training[2] / training[1], 3) if {1, 2} <= set(training) else None,
        "ideal_speedup_bound": min(2, cores),
        "settings": {**vars(args), "threads_per_process": {str(n): max(1, cores // n) for n in counts}},
        "machine": machine_info(),
    }
    report(result, ["synthesis_images_per_s", "training_images_per_s", "synthesis_speedup_2_vs_1",
                    "training_speedup_2_vs_1"], args.out)
    return 0


def _torchrun(processes: int, cores: int, argv: list[str]) -> str:
    threads = str(max(1, cores // processes))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "segsynth", *argv]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


if __name__ == "__main__":
    raise SystemExit(main())
