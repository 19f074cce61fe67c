"""LoRA adaptation cost: adapter size against the model it adapts, an adapt iteration against a full training
iteration of the same generator, and sampling with a merged adapter against sampling without.

For the builtin text -> image generator at two sizes (its toy run's, and the CamVid preset's: 96x128, widths
32/64/128, two ResNets per level, 64-wide text encoder), barely trained (speed and size do not depend on the
weights), on toy images of that size:

  adapter bytes / UNet bytes       adapter.safetensors against unet/diffusion_pytorch_model.safetensors
  trainable share                  LoRA parameters / UNet parameters (rank 8 on to_q, to_k, to_v, to_out.0)
  s per adapt iteration            `segsynth adapt` (batch 8), CPU seconds per iteration, one thread
  s per training iteration         `segsynth train-text-generator` (batch 8, UNet + text encoder + EMA), same
  sampling s per image             4 prompts x 12 steps with guidance, without and with the merged adapter

Times are CPU seconds of this process with one torch thread (`time.process_time`), which a busy machine
changes little, and wall seconds beside them. The lead's experiment sizes follow from the CamVid row.

    python benchmarks/bench_adapt.py                 # both sizes, results/bench_adapt.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("SEGSYNTH_THREADS", "1")

SIZES = {
    "toy": dict(size=[64, 80], channels=[32, 64, 128], layers_per_block=1, text_width=64),
    "camvid": dict(size=[96, 128], channels=[32, 64, 128], layers_per_block=2, text_width=64),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="toy,camvid")
    parser.add_argument("--iterations", type=int, default=6, help="timed iterations (after 2 warm-up ones)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default="results/bench_adapt.json")
    return parser.parse_args(argv)


def timed(action) -> tuple[float, float, object]:
    cpu, wall = time.process_time(), time.time()
    result = action()
    return time.process_time() - cpu, time.time() - wall, result


def measure(name: str, settings: dict, args, work: Path) -> dict:
    import torch

    from segsynth.generators.adapt import adapt
    from segsynth.generators.base import GeneratorSettings
    from segsynth.generators.builtin_text import BuiltinTextGenerator, TrainTextGeneratorConfig, train_text_generator
    from segsynth.stage_configs import AdaptConfig

    torch.set_num_threads(1)
    height, width = settings["size"]
    data = f"toy:n=16,n_val=8,size={height}x{width}"
    common = dict(data=data, batch_size=args.batch, warmup=1, log_every=1, save_every=10**6, device="cpu", **settings)
    # a full training iteration: 2 warm-up iterations, then the timed ones (the difference of two runs)
    short = timed(lambda: train_text_generator(TrainTextGeneratorConfig(out=str(work / f"{name}-g2"), iterations=2,
                                                                        **common)))
    full = timed(lambda: train_text_generator(TrainTextGeneratorConfig(
        out=str(work / f"{name}-g"), iterations=2 + args.iterations, **common)))
    generator = work / f"{name}-g"
    adapt_settings = dict(generator=f"attention:{generator}", images=f"{data}?include=toy_val", split="val",
                          batch_size=args.batch, rank=args.rank, warmup=1, log_every=1, device="cpu")
    adapt_short = timed(lambda: adapt(AdaptConfig(out=str(work / f"{name}-a2"), iterations=2, **adapt_settings)))
    adapt_full = timed(lambda: adapt(AdaptConfig(out=str(work / f"{name}-a"), iterations=2 + args.iterations,
                                                 **adapt_settings)))
    adapter = work / f"{name}-a"
    info = json.loads((adapter / "adapter.json").read_text())
    unet_bytes = (generator / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size

    prompts = ["a photo of sky, building, road, car", "a photo of sky, road, sidewalk, tree",
               "a photo of building, road, person, pole", "a photo of sky, tree, car, sign"]
    sampling = {}
    for variant, lora in (("without", None), ("with merged adapter", str(adapter))):
        model = BuiltinTextGenerator(generator, GeneratorSettings(steps=12, lora=lora, device="cpu"))
        model.sample_prompts(prompts[:1], [0])  # warm-up
        cpu, wall, _ = timed(lambda: model.sample_prompts(prompts, [1, 2, 3, 4]))
        sampling[variant] = {"cpu_s_per_image": round(cpu / 4, 4), "wall_s_per_image": round(wall / 4, 4)}
    return {
        "settings": settings, "batch": args.batch, "rank": args.rank,
        "adapter_bytes": info["bytes"], "unet_bytes": unet_bytes, "bytes_ratio": round(info["bytes"] / unet_bytes, 4),
        "lora_parameters": info["lora"]["parameters"], "unet_parameters": info["lora"]["base_parameters"],
        "adapted_layers": info["lora"]["layers"],
        "adapt_cpu_s_per_iteration": round((adapt_full[0] - adapt_short[0]) / args.iterations, 4),
        "adapt_wall_s_per_iteration": round((adapt_full[1] - adapt_short[1]) / args.iterations, 4),
        "train_cpu_s_per_iteration": round((full[0] - short[0]) / args.iterations, 4),
        "train_wall_s_per_iteration": round((full[1] - short[1]) / args.iterations, 4),
        "sampling": sampling,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-adapt-") as work:
        for name in args.sizes.split(","):
            results[name] = measure(name, SIZES[name], args, Path(work))
    print(f"{'size':8s} {'adapter/UNet bytes':>20s} {'LoRA/UNet params':>18s} {'adapt s/it':>11s} "
          f"{'train s/it':>11s} {'sample s/img (plain, adapted)':>30s}")
    for name, row in results.items():
        sampling = row["sampling"]
        print(f"{name:8s} {row['adapter_bytes']:>9d}/{row['unet_bytes']:<10d} "
              f"{row['lora_parameters']:>8d}/{row['unet_parameters']:<9d} {row['adapt_cpu_s_per_iteration']:>11.3f} "
              f"{row['train_cpu_s_per_iteration']:>11.3f} "
              f"{sampling['without']['cpu_s_per_image']:>14.3f}, {sampling['with merged adapter']['cpu_s_per_image']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/bench_adapt.py " + " ".join(argv or sys.argv[1:]),
                                          "cpu_note": "CPU seconds of one process, one torch thread",
                                          "results": results}, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
