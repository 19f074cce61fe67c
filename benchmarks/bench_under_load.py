"""Throughput under load: each stage's compute alone, next to one busy process, and two side by side.

Three workloads, each the compute of a stage as segsynth runs it (with `thread_governor().tick()` per
step, so the load-aware thread count is what is measured):

    train     a segmenter training step (forward, loss, backward, AdamW): `segsynth train`
    forward   the segmenter's per-pixel losses in inference mode on a batch: `segsynth filter`/`stats`
    sample    one denoising call of the shipped builtin generator on a batch: `segsynth synthesize`

Each workload runs in its own worker process (imports, model and batch made once), timed in windows:

    alone     the baseline, repeated until the last three windows agree within --spread (else the
              result is marked invalid: the machine was disturbed); the external load (CPU time of
              processes other than this benchmark's) is measured over the same windows and must stay
              under --max-external cores
    busy      next to one busy single-threaded python loop (started first, as a user's job would be)
    pair      two workers of the workload side by side, timed over the same window; the lower rate counts

and each loaded figure is a ratio to the same run's baseline. Targets: busy >= 0.4, pair >= 0.35.
`--compare` repeats busy and pair with the thread count fixed at the core count (torch's default, what
segsynth did before), to show what the load-aware count changes. A loaded window starts after a
warm-up long enough for the governor to re-measure twice (it moves only on two agreeing measurements).

    python benchmarks/bench_under_load.py [--workloads train,forward,sample] [--window 3] [--compare]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUSY_LOOP = "while True: pass"
WORKLOADS = ("train", "forward", "sample")


# --- the worker: one workload, timed on command -------------------------------------------------------


def build(workload: str, size: tuple[int, int], batch: int):
    """(step, images per step) for a workload: the compute of one stage step, nothing else."""
    import numpy as np
    import torch

    from segsynth.data import open_dataset

    torch.manual_seed(0)
    dataset = open_dataset(f"toy:n={batch},n_val=1,size={size[0]}x{size[1]}")
    split = dataset.split("train")
    samples = [split[i] for i in range(batch)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float()
    labels = torch.from_numpy(np.stack([s.label for s in samples]))
    if workload in ("train", "forward"):
        from segsynth.segmenters import create_segmenter
        from segsynth.segmenters.losses import pixel_losses, weighted_cross_entropy

        model = create_segmenter("segformer-small", dataset.num_classes)
        if workload == "forward":
            model.eval()

            def step():
                with torch.inference_mode():
                    pixel_losses(model, images, labels)
            return step, batch
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        weights = torch.ones(labels.shape)
        model.train()

        def step():
            loss = model(images, labels, weights, weighted_cross_entropy)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step, batch
    from segsynth.generators.base import Condition, GeneratorSettings, Request, resize_mask
    from segsynth.generators.builtin.sample import BuiltinGenerator

    generator = BuiltinGenerator(REPO / "src" / "segsynth" / "assets" / "toy_generator",
                                 GeneratorSettings(steps=1, device="cpu"))
    conditions = [Condition(Request(f"s{i}", "mask", i, source=s.id), resize_mask(s.label, generator.size), "")
                  for i, s in enumerate(samples)]
    prepared = generator.prepare(conditions)
    return (lambda: generator.render(prepared)), batch


def worker(workload: str, size: tuple[int, int], batch: int) -> int:
    """Build the workload, then answer commands on stdin: `run S` / `warm S` (step for S seconds, report
    the rate) and `threads auto|N` (the governor segsynth uses, or a count fixed at N)."""
    import torch

    from segsynth.cpu import reset_thread_governor, thread_governor

    step, per_step = build(workload, size, batch)
    governor = thread_governor()
    for _ in range(2):  # warm-up: kernels for these shapes
        governor.tick()
        step()
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    maximum = torch.get_num_threads()
    for line in sys.stdin:
        command, seconds = line.split()
        if command == "threads":
            os.environ["SEGSYNTH_THREADS"] = seconds
            torch.set_num_threads(maximum)
            reset_thread_governor()
            governor = thread_governor()
            print(json.dumps({"threads": seconds}), flush=True)
            continue
        images, counts, started = 0, [], time.perf_counter()
        while time.perf_counter() - started < float(seconds):
            counts.append(governor.tick())
            step()
            images += per_step
        elapsed = time.perf_counter() - started
        print(json.dumps({"command": command, "rate": images / elapsed, "seconds": elapsed,
                          "threads": sorted(set(counts)), "last_threads": counts[-1]}), flush=True)
    return 0


# --- the parent: conditions, baseline checks, ratios -------------------------------------------------


class Worker:
    def __init__(self, workload: str, args):
        env = {key: value for key, value in os.environ.items()
               if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SEGSYNTH_THREADS")}  # as a user runs segsynth
        env.update(PYTHONPATH=str(REPO / "src"), TQDM_DISABLE="1")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", workload, "--size", args.size, "--batch", str(args.batch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = None

    def wait_ready(self) -> dict:
        if self.ready is None:
            self.ready = json.loads(self.process.stdout.readline())
        return self.ready

    def set_threads(self, setting: str) -> None:
        self.send("threads", setting)
        self.result()

    def send(self, command: str, seconds) -> None:
        self.process.stdin.write(f"{command} {seconds}\n")
        self.process.stdin.flush()

    def result(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("benchmark worker died")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def timed(workers: list[Worker], seconds: float, warm: float = 0.0) -> list[dict]:
    """All workers warm up together, then run one timed window together; their results."""
    if warm:
        for w in workers:
            w.send("warm", warm)
        for w in workers:
            w.result()
    for w in workers:
        w.send("run", seconds)
    return [w.result() for w in workers]


def baseline(worker: Worker, args, meter) -> dict:
    """Alone, repeated until the last three windows agree within args.spread (at most args.max_repeats)."""
    rates, external = [], []
    while len(rates) < args.max_repeats:
        meter.others(min_window=0.0)
        rates.append(timed([worker], args.window)[0]["rate"])
        external.append(meter.others(min_window=0.0) or 0.0)
        if len(rates) >= 3:
            last = rates[-3:]
            if (max(last) - min(last)) / statistics.median(last) <= args.spread:
                break
    last = rates[-3:]
    spread = (max(last) - min(last)) / statistics.median(last)
    load = statistics.mean(external[-3:])
    problems = []
    if spread > args.spread:
        problems.append(f"baseline spread {spread:.2f} > {args.spread}")
    if load > args.max_external:
        problems.append(f"external load {load:.2f} cores > {args.max_external}")
    return {"rate": round(statistics.median(last), 3), "windows": [round(r, 3) for r in rates],
            "spread": round(spread, 3), "external_load_cores": round(load, 3), "valid": not problems,
            "problems": problems}


def loaded(first: Worker, second: Worker, args, warm: float) -> dict:
    """Busy (next to one busy loop started first) and pair (both workers at once) rates."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        result = timed([first], args.window, warm=warm)[0]
    finally:
        busy.kill()
        busy.wait()
    pair = timed([first, second], args.window, warm=warm)
    return {"busy": {"rate": round(result["rate"], 3), "threads": result["threads"]},
            "pair": {"rates": [round(r["rate"], 3) for r in pair], "threads": [r["threads"] for r in pair]}}


def measure(workload: str, args, meter, cores: int) -> dict:
    """Baseline, then busy and pair with the load-aware count, then (args.compare) with `cores` fixed threads."""
    first, second = Worker(workload, args), Worker(workload, args)
    try:
        ready = first.wait_ready()
        second.wait_ready()
        out = {"threads_alone": ready["threads"], "baseline": baseline(first, args, meter),
               **loaded(first, second, args, args.warm)}
        if args.compare:
            for w in (first, second):
                w.set_threads(str(cores))
            out["fixed"] = loaded(first, second, args, 1.0)
        return out
    finally:
        first.close()
        second.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--size", default="96x128", help="HxW of the batch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=float, default=2.5, help="seconds per timed window")
    parser.add_argument("--warm", type=float, default=3.5,
                        help="seconds before a loaded window (the governor re-measures every second and moves on two "
                             "agreeing measurements)")
    parser.add_argument("--spread", type=float, default=0.10, help="largest (max-min)/median of the last 3 baselines")
    parser.add_argument("--max-repeats", type=int, default=6)
    parser.add_argument("--max-external", type=float, default=0.3, help="most cores other processes may use")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="also busy and pair with threads fixed at the core count (the old default)")
    parser.add_argument("--out", default="results/bench_under_load.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.worker:
        return worker(args.worker, size, args.batch)

    sys.path.insert(0, str(REPO / "src"))
    from segsynth.cpu_load import CpuMeter, usable_cores

    started = time.time()
    meter = CpuMeter()  # counts this benchmark's children as its own: what remains is external load
    cores = usable_cores()
    results, rows = {}, []
    for workload in args.workloads.split(","):
        entry = measure(workload, args, meter, cores)
        base = entry["baseline"]
        for name, figures in [("auto", entry)] + ([("fixed", entry["fixed"])] if args.compare else []):
            busy_ratio = figures["busy"]["rate"] / base["rate"]
            pair_ratio = min(figures["pair"]["rates"]) / base["rate"]
            figures["busy_ratio"] = round(busy_ratio, 3) if base["valid"] else None
            figures["pair_ratio"] = round(pair_ratio, 3) if base["valid"] else None
            figures["unchecked_ratios"] = [round(busy_ratio, 3), round(pair_ratio, 3)]
            rows.append((workload, name, base["rate"], figures["busy"]["rate"], busy_ratio, min(figures["pair"]["rates"]),
                         pair_ratio, figures["busy"]["threads"], figures["pair"]["threads"], base["valid"]))
        entry["passes"] = (bool(base["valid"]) and entry["busy_ratio"] >= 0.4 and entry["pair_ratio"] >= 0.35)
        results[workload] = entry

    print(f"under-load benchmark: {cores} usable cores, batch {args.batch} at {args.size}, {args.window} s windows "
          f"(targets: busy >= 0.4, pair >= 0.35 of alone)")
    print(f"{'workload':8s} {'threads':7s} {'alone/s':>8s} {'busy/s':>8s} {'ratio':>6s} {'pair/s':>8s} {'ratio':>6s}  "
          "threads busy / pair   baseline")
    for workload, name, alone, busy, busy_ratio, pair, pair_ratio, busy_threads, pair_threads, valid in rows:
        print(f"{workload:8s} {name:7s} {alone:8.2f} {busy:8.2f} {busy_ratio:6.2f} {pair:8.2f} {pair_ratio:6.2f}  "
              f"{busy_threads} / {pair_threads}   {'ok' if valid else 'DISTURBED: ratios invalid'}")
    for workload, entry in results.items():
        if not entry["baseline"]["valid"]:
            print(f"  {workload}: baseline invalid ({'; '.join(entry['baseline']['problems'])}); rerun on a quiet machine")
    import torch

    summary = {"benchmark": "under_load", "cores": cores, "settings": vars(args), "results": results,
               "all_valid": all(entry["baseline"]["valid"] for entry in results.values()),
               "all_pass": all(entry["passes"] for entry in results.values()),
               "seconds": round(time.time() - started, 1),
               "machine": {"cores": os.cpu_count(), "usable_cores": cores, "torch": torch.__version__,
                           "load_average_at_end": list(os.getloadavg())}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"all valid: {summary['all_valid']}, all pass: {summary['all_pass']} ({summary['seconds']} s); "
          f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
