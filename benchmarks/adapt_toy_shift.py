"""LoRA adaptation on a toy domain shift: does an adapter learned from unlabeled target images move class-prompted
samples to the target domain, and do the classes survive?

Source domain: 16x16 flat red images named "red" and flat blue ones named "blue" (a builtin text generator
trained on them, image-level labels). Target domain: the same two kinds at 30 % brightness (76 instead of 255),
no labels. The generator is adapted (`segsynth adapt`, empty prompt, rank 4, 300 iterations, lr 1e-2) with each
`--preserve-classes` weight, then "a photo of red" / "a photo of blue" are sampled (seed 5) without and with the
adapter, at guidance 1 and 3. Reported per variant: the mean RGB of both samples, their brightness (mean of
each sample's brightest channel; the target domain has 76) and the class margin (red-minus-blue of the red
sample minus that of the blue one; it shrinks when the classes blur together).

    python benchmarks/adapt_toy_shift.py                       # preserve 0, 0.1, 1; results/adapt_toy_shift.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("SEGSYNTH_THREADS", "1")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preserve", default="0,0.1,1", help="comma list of --preserve-classes weights")
    parser.add_argument("--generator-iterations", type=int, default=500)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", default="results/adapt_toy_shift.json")
    return parser.parse_args(argv)


def write_domains(root: Path) -> tuple[str, Path]:
    data, target = root / "data", root / "dusk"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    target.mkdir()
    for i in range(16):
        image = np.zeros((16, 16, 3), np.uint8)
        image[..., 0 if i % 2 == 0 else 2] = 255
        Image.fromarray(image).save(data / "images" / f"{i}.png")
        Image.fromarray(np.full((16, 16), i % 2, np.uint8)).save(data / "masks" / f"{i}.png")
        if i < 8:
            image[image == 255] = 76
            Image.fromarray(image).save(target / f"{i}.png")
    (data / "classes.json").write_text(json.dumps({"classes": ["red", "blue"]}))
    return f"folder:{data}", target


def describe(generator) -> dict:
    red, blue = (sample.image.astype(float).mean((0, 1)) for sample in generator.sample_prompts(
        ["a photo of red", "a photo of blue"], [5, 5]))
    return {"red_rgb": red.round(1).tolist(), "blue_rgb": blue.round(1).tolist(),
            "brightness": round(float((red.max() + blue.max()) / 2), 1),
            "class_margin": round(float((red[0] - red[2]) - (blue[0] - blue[2])), 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from segsynth.generators.adapt import adapt
    from segsynth.generators.base import GeneratorSettings
    from segsynth.generators.builtin_text import BuiltinTextGenerator, TrainTextGeneratorConfig, train_text_generator
    from segsynth.stage_configs import AdaptConfig

    results = {"settings": vars(args), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="adapt-toy-") as work:
        root = Path(work)
        data, target = write_domains(root)
        generator = train_text_generator(TrainTextGeneratorConfig(
            data=data, out=str(root / "g"), size=[16, 16], channels=[32, 64], layers_per_block=1,
            iterations=args.generator_iterations, batch_size=8, lr=1e-3, warmup=10, ema_decay=0.9, log_every=50,
            save_every=10**6, sample_steps=8, device="cpu"))
        for guidance in (1.0, 3.0):
            results["variants"][f"base, guidance {guidance:g}"] = describe(
                BuiltinTextGenerator(generator, GeneratorSettings(guidance=guidance)))
        for weight in (float(w) for w in args.preserve.split(",")):
            started = time.process_time()
            adapter = adapt(AdaptConfig(generator=f"attention:{generator}", images=str(target),
                                        out=str(root / f"a{weight:g}"), iterations=args.iterations, batch_size=8,
                                        lr=args.lr, warmup=5, rank=4, preserve_classes=weight, log_every=50,
                                        device="cpu"))
            cpu = round(time.process_time() - started, 1)
            for guidance in (1.0, 3.0):
                row = describe(BuiltinTextGenerator(generator, GeneratorSettings(guidance=guidance, lora=str(adapter))))
                results["variants"][f"preserve {weight:g}, guidance {guidance:g}"] = {**row, "adapt_cpu_s": cpu}
    print(f"{'variant':28s} {'red sample RGB':>20s} {'blue sample RGB':>20s} {'brightness':>10s} {'margin':>7s}")
    for name, row in results["variants"].items():
        print(f"{name:28s} {str([round(v) for v in row['red_rgb']]):>20s} {str([round(v) for v in row['blue_rgb']]):>20s} "
              f"{row['brightness']:>10.0f} {row['class_margin']:>7.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/adapt_toy_shift.py " +
                                          " ".join(argv or sys.argv[1:]), **results}, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
