"""Synthesis throughput: `segsynth synthesize` images/s vs a bare denoising loop, same model, batch and steps.

The bare loop is the floor of what any synthesis engine must spend: the
model(s) and the scheduler called directly on tensors prepared beforehand,
no dataset reads, no PNGs, no manifest. `synthesize` adds all of that plus
mask resizing and conditioning; the target is a ratio >= 0.90, i.e. the
pipeline's own work hides behind the model (loader and writer threads).

Bare and synthesize runs alternate (bare, synth, bare, synth, ..., bare) and
the medians are compared, so drift in machine load shows up as spread in the
per-run figures (all in the JSON) instead of biasing the ratio.
Synthesize images/s is its render phase (as its summary reports: first batch
to last manifest line); the one-off start-up (opening the model, checks,
recovery) is reported separately.

    python benchmarks/bench_synthesis.py                          # builtin generator, 64x64, batch 8, 20 steps
    python benchmarks/bench_synthesis.py --generator controlnet   # tiny SD + ControlNet, 32x32
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_filter import machine_info  # noqa: E402  (one machine record for every benchmark)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", choices=["builtin", "controlnet"], default="builtin")
    parser.add_argument("--size", type=int, default=64, help="working size (square), pixels")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=48, help="images per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="bare/synthesize rounds (medians are reported)")
    parser.add_argument("--channels", default="32,64,128", help="builtin UNet widths")
    parser.add_argument("--out", default="results/bench_synthesis.json")
    return parser.parse_args()


# --- the models ---------------------------------------------------------------------------------


def build_builtin(folder: Path, data: str, args) -> str:
    from segsynth.generators.testing import save_tiny_builtin

    channels = tuple(int(c) for c in args.channels.split(","))
    save_tiny_builtin(folder, data=data, iterations=1, size=(args.size, args.size), channels=channels,
                      sample_steps=args.steps)
    return f"builtin:{folder}"


def build_controlnet(folder: Path) -> tuple[str, str]:
    from segsynth.generators.testing import save_tiny_controlnet_models

    base, controlnet = save_tiny_controlnet_models(folder)
    return f"controlnet:{base}", str(controlnet)


# --- the bare loops -----------------------------------------------------------------------------------


@torch.no_grad()
def bare_builtin_loop(generator, masks: list[np.ndarray], seeds: list[int], batch: int) -> float:
    """The generator's denoiser (UNet2DModel on the mask-conditioned input) + scheduler on prepared conditioning and
    noise; returns images/s."""
    from segsynth.generators.builtin.model import PATCH, encode_masks
    from segsynth.generators.base import initial_noise

    height, width = generator.size
    conditions = [encode_masks(np.stack(masks[i: i + batch]), len(generator.classes)) for i in range(0, len(masks), batch)]
    noises = [initial_noise(seeds[i: i + batch], (3 * PATCH * PATCH, height // PATCH, width // PATCH))
              for i in range(0, len(masks), batch)]
    started = time.perf_counter()
    for condition, noise in zip(conditions, noises):
        scheduler = generator.new_scheduler()
        sample = noise * scheduler.init_noise_sigma
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, timestep)
            predicted = generator.denoiser(model_input, condition, timestep)
            sample = scheduler.step(predicted, timestep, sample).prev_sample
    return len(masks) / (time.perf_counter() - started)


@torch.no_grad()
def bare_controlnet_loop(generator, masks: list[np.ndarray], prompts: list[str], seeds: list[int], batch: int) -> float:
    """ControlNet + UNet + scheduler with classifier-free guidance, then the VAE decode; prompts encoded beforehand."""
    pipe = generator.pipeline
    height, width = masks[0].shape
    prepared = []
    for i in range(0, len(masks), batch):
        chunk = slice(i, i + batch)
        positive, negative = pipe.encode_prompt(prompts[chunk], "cpu", 1, True)
        control = torch.from_numpy(np.stack([generator.colourise(m) for m in masks[chunk]])).permute(0, 3, 1, 2).float() / 255
        shape = (pipe.unet.config.in_channels, height // generator.latent_factor, width // generator.latent_factor)
        latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds[chunk]])
        prepared.append((torch.cat([negative, positive]), torch.cat([control, control]), latents))
    started = time.perf_counter()
    for embeddings, control, latents in prepared:
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(generator.steps)
        latents = latents * scheduler.init_noise_sigma
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
            down, mid = pipe.controlnet(model_input, timestep, encoder_hidden_states=embeddings, controlnet_cond=control,
                                        return_dict=False)
            noise = pipe.unet(model_input, timestep, encoder_hidden_states=embeddings, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample
            uncond, cond = noise.chunk(2)
            latents = scheduler.step(uncond + generator.guidance * (cond - uncond), timestep, latents).prev_sample
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return len(masks) / (time.perf_counter() - started)


def write_folder_dataset(toy, folder: Path) -> str:
    from segsynth.io import atomic_write_json, atomic_write_png

    split = toy.split("train")
    for index in range(len(split)):
        sample = split[index]
        atomic_write_png(folder / "images" / f"{sample.id}.png", sample.image)
        atomic_write_png(folder / "masks" / f"{sample.id}.png", sample.label, toy.palette)
    atomic_write_json(folder / "classes.json", {"classes": list(toy.classes), "palette": [list(c) for c in toy.palette]})
    return f"folder:{folder}"


# --- the run -------------------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from segsynth.data import open_dataset
    from segsynth.generators import GeneratorSettings, open_generator
    from segsynth.generators.base import Request, resize_mask
    from segsynth.plan import PlanConfig, make_plan
    from segsynth.synthesize import SynthesizeConfig, synthesize
    import diffusers

    size = args.size if args.generator == "builtin" else 32
    with tempfile.TemporaryDirectory(prefix="bench-synthesis-") as tmp:
        tmp = Path(tmp)
        # 0. Masks on disk, as real datasets keep them (the toy scenes, written once as a folder: dataset).
        data = write_folder_dataset(open_dataset(f"toy:n={args.images},n_val=4,size={size}"), tmp / "data")
        dataset = open_dataset(data)
        split = dataset.split("train")
        # 1. The model, opened once for the bare loop (synthesize opens its own copy from the same folder).
        extra = {}
        if args.generator == "builtin":
            spec = build_builtin(tmp / "generator", data, args)
            settings = GeneratorSettings(steps=args.steps)
        else:
            spec, controlnet = build_controlnet(tmp / "models")
            extra = {"controlnet": controlnet, "resolution": [size, size]}
            settings = GeneratorSettings(steps=args.steps, controlnet=controlnet, resolution=(size, size))
        generator = open_generator(spec, settings)
        generator.check_dataset(dataset.classes, dataset.palette)

        # 2. Inputs for the bare loop: the same masks, prompts and seeds synthesize will use.
        masks = [resize_mask(split.label(i), (size, size)) for i in range(args.images)]
        prompts = [generator.prompt(Request(f"{split.ids[i]}_s{i}", "mask", i, source=split.ids[i]), split.label(i), dataset.classes)
                   for i in range(args.images)]
        seeds = list(range(args.images))

        def bare(count: int = args.images) -> float:
            if args.generator == "builtin":
                return bare_builtin_loop(generator, masks[:count], seeds[:count], args.batch)
            return bare_controlnet_loop(generator, masks[:count], prompts[:count], seeds[:count], args.batch)

        # 3. Warm up (first calls pay one-off allocation costs), then alternate bare / synthesize rounds and
        #    end with a bare run: load drift from other processes shows as spread, and medians resist it.
        bare(args.batch)
        bare_runs, synth_runs, walls = [], [], []
        plan = make_plan(PlanConfig(data=data, out=str(tmp / "plan.jsonl"), uniform=1))
        for round_index in range(args.rounds):
            bare_runs.append(bare())
            started = time.perf_counter()
            summary = synthesize(SynthesizeConfig(data=data, plan=str(plan), generator=spec, out=str(tmp / f"set{round_index}"),
                                                  batch_size=args.batch, steps=args.steps, progress=False, **extra))
            walls.append(time.perf_counter() - started)
            synth_runs.append(summary["images_per_s"])
        bare_runs.append(bare())

    bare_ips, synth_ips = float(np.median(bare_runs)), float(np.median(synth_runs))
    result = {
        "benchmark": "synthesis", "comparison": "synthesize vs bare denoising loop",
        "generator": args.generator, "size": [size, size], "batch": args.batch, "steps": args.steps,
        "images_per_run": args.images, "rounds": args.rounds, "masks": "toy scenes written as a folder: dataset (PNG on disk)",
        "bare_images_per_s": round(bare_ips, 3), "synthesize_images_per_s": round(synth_ips, 3),
        "ratio": round(synth_ips / bare_ips, 3),
        "bare_runs_images_per_s": [round(v, 3) for v in bare_runs],
        "synthesize_runs_images_per_s": [round(v, 3) for v in synth_runs],
        "synthesize_wall_s_including_startup": [round(v, 2) for v in walls],
        "settings": vars(args), "machine": machine_info(),
    }
    print(f"{'generator':12s} {'size':>7s} {'batch':>5s} {'steps':>5s} {'bare img/s':>10s} {'synth img/s':>11s} {'ratio':>6s}")
    print(f"{args.generator:12s} {size:>3d}x{size:<3d} {args.batch:>5d} {args.steps:>5d} {bare_ips:>10.2f} {synth_ips:>11.2f} "
          f"{result['ratio']:>6.3f}")
    print(f"(medians of {len(bare_runs)} bare runs {result['bare_runs_images_per_s']} and {len(synth_runs)} synthesize runs "
          f"{result['synthesize_runs_images_per_s']} img/s, {args.images} images each; load average "
          f"{os.getloadavg()[0]:.2f}; {os.cpu_count()} cores, torch {torch.__version__}, diffusers {diffusers.__version__})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
