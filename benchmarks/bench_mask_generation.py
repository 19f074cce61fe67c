"""Mask generation throughput: `segsynth synthesize` with a text -> mask generator vs its bare denoising loop.

SegGen's MaskSyn draws colour-coded masks from captions and decodes them to
labels (nearest palette colour, speckle removal). The bare loop is the floor any
engine must spend: the text encoder once per batch, then the UNet (with
classifier-free guidance, as the generator samples) and the scheduler over the
steps, and the conversion to pictures (the SD VAE decode) -- no decoding to
labels, no PNGs, no manifest. `synthesize` adds all of those; the target is a
ratio >= 0.90, i.e. the decoding and writing hide behind the model (the
generator decodes in `finish`, which synthesize runs in its writer thread).

Rows (both are run unless --rows says otherwise):
  text2mask      the built-in CPU text -> mask model at the toy preset's size and widths
                 (32x40, channels 32,64, 1 layer per block), its default 3.0 guidance; by default
                 barely trained (its pictures are noise: the worst case for speckle removal), or
                 --text2mask-dir a trained one (e.g. a toy run's OUT/text2mask)
  text2mask-sd   a tiny random SD 1.x (tests' components, 32x32 pictures) fine-tuned 2 iterations

Bare and synthesize runs alternate (bare, synth, bare, ..., bare); each synthesize
run is divided by the mean of the bare runs on either side of it and the median of
those paired ratios is reported (the machine is shared: load drifts between rounds),
with every run's figure in the JSON. The decoding cost per mask is also timed
on its own, on the pictures the generator drew.

    python benchmarks/bench_mask_generation.py [--rows text2mask,text2mask-sd] [--text2mask-dir DIR]
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

DATA = "toy:n={n},n_val=4,size=64x80"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="text2mask,text2mask-sd", help="comma-separated: text2mask, text2mask-sd")
    parser.add_argument("--text2mask-dir", default=None, help="a trained text2mask:DIR folder for the first row")
    parser.add_argument("--batch", type=int, default=16, help="masks per model call (the toy run's batch)")
    parser.add_argument("--steps", type=int, default=12, help="denoising steps (the toy run's)")
    parser.add_argument("--images", type=int, default=64, help="masks per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="bare/synthesize rounds (medians are reported)")
    parser.add_argument("--out", default="results/bench_mask_generation.json")
    return parser.parse_args()


# --- the models -----------------------------------------------------------------------------------------------


def build_text2mask(folder: Path, data: str, captions: Path, args) -> str:
    if args.text2mask_dir:
        return f"text2mask:{args.text2mask_dir}"
    from segsynth.generators.builtin_text import train_text_generator
    from segsynth.stage_configs import TrainTextGeneratorConfig

    train_text_generator(TrainTextGeneratorConfig(
        data=data, out=str(folder), target="colour-mask", prompts=str(captions), size=[32, 40], channels=[32, 64],
        layers_per_block=1, iterations=2, batch_size=4, warmup=1, log_every=1, sample_steps=args.steps,
        decode_max_distance=100.0, device="cpu"))
    return f"text2mask:{folder}"


def build_text2mask_sd(folder: Path, data: str, captions: Path, args) -> str:
    from segsynth.generators import train_generator_kind
    from segsynth.generators.testing import save_tiny_sd
    from segsynth.stage_configs import TrainGeneratorConfig

    base = save_tiny_sd(folder)
    _, spec = train_generator_kind(TrainGeneratorConfig(
        data=data, out=str(folder / "model"), kind="text2mask-sd", base=str(base), prompts=str(captions),
        iterations=2, batch_size=2, warmup=1, log_every=1, sample_steps=args.steps, device="cpu"))
    return spec


# --- the bare loops ---------------------------------------------------------------------------------------------


@torch.no_grad()
def bare_text2mask(generator, prompts: list[str], seeds: list[int], batch: int) -> float:
    """Text encoder, then UNet (guided) + scheduler over the steps, then pictures; inputs tokenized beforehand."""
    from segsynth.generators.base import initial_noise
    from segsynth.generators.builtin_text.model import IMAGE_CHANNELS, PATCH, decode_images, encode_text

    height, width = generator.size
    batches = [(generator.tokenizer(prompts[i: i + batch]),
                initial_noise(seeds[i: i + batch], (IMAGE_CHANNELS, height // PATCH, width // PATCH)))
               for i in range(0, len(prompts), batch)]
    uncond_ids = generator.tokenizer([generator.negative_prompt])
    started = time.perf_counter()
    for ids, noise in batches:
        conditional = encode_text(generator.text_encoder, ids)
        unconditional = encode_text(generator.text_encoder, uncond_ids)
        states = torch.cat([unconditional.expand(len(ids), -1, -1), conditional])
        scheduler = generator.new_scheduler()
        sample = noise * scheduler.init_noise_sigma
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, timestep)
            uncond, cond = generator.unet(torch.cat([model_input, model_input]), timestep,
                                          encoder_hidden_states=states).sample.chunk(2)
            sample = scheduler.step(uncond + generator.guidance * (cond - uncond), timestep, sample).prev_sample
        decode_images(sample)
    return len(prompts) / (time.perf_counter() - started)


@torch.no_grad()
def bare_text2mask_sd(generator, prompts: list[str], seeds: list[int], batch: int) -> float:
    """Prompt encoding, then UNet (guided) + scheduler over the steps, then the VAE decode."""
    pipe = generator.pipeline
    height, width = generator.size
    shape = (generator.latent_channels, height // generator.latent_factor, width // generator.latent_factor)
    batches = [(prompts[i: i + batch], torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                                                    for s in seeds[i: i + batch]]))
               for i in range(0, len(prompts), batch)]
    started = time.perf_counter()
    for chunk, latents in batches:
        positive, negative = pipe.encode_prompt(chunk, "cpu", 1, True)
        embeddings = torch.cat([negative, positive])
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(generator.steps)
        latents = latents * scheduler.init_noise_sigma
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
            uncond, cond = pipe.unet(model_input, timestep, encoder_hidden_states=embeddings).sample.chunk(2)
            latents = scheduler.step(uncond + generator.guidance * (cond - uncond), timestep, latents).prev_sample
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return len(prompts) / (time.perf_counter() - started)


# --- one row ------------------------------------------------------------------------------------------------------


def measure(row: str, tmp: Path, data: str, captions: Path, plan: Path, prompts, seeds, args) -> dict:
    from segsynth.generators import GeneratorSettings, open_generator
    from segsynth.methods.seggen.colour import decode_colour_mask
    from segsynth.synthesize import SynthesizeConfig, synthesize

    build, bare_loop = {"text2mask": (build_text2mask, bare_text2mask),
                        "text2mask-sd": (build_text2mask_sd, bare_text2mask_sd)}[row]
    spec = build(tmp / row, data, captions, args)
    generator = open_generator(spec, GeneratorSettings(steps=args.steps))

    def bare() -> float:
        return bare_loop(generator, prompts, seeds, args.batch)

    # Warm up (one-off allocation costs), then alternate and end with a bare run.
    bare_loop(generator, prompts[: args.batch], seeds[: args.batch], args.batch)
    bare_runs, synth_runs, walls = [], [], []
    for round_index in range(args.rounds):
        bare_runs.append(bare())
        started = time.perf_counter()
        summary = synthesize(SynthesizeConfig(data=data, plan=str(plan), generator=spec, out=str(tmp / f"{row}-set{round_index}"),
                                              batch_size=args.batch, steps=args.steps, progress=False))
        walls.append(time.perf_counter() - started)
        synth_runs.append(summary["images_per_s"])
    bare_runs.append(bare())

    # The decoding alone, on the pictures the generator drew (the last set).
    from PIL import Image

    from segsynth.formats.manifest import read_manifest

    last = tmp / f"{row}-set{args.rounds - 1}"
    pictures = [np.asarray(Image.open(last / record["image"]).convert("RGB")) for record in read_manifest(last)]
    started = time.perf_counter()
    labels = [decode_colour_mask(p, generator.coding_palette, generator.max_distance, generator.min_component)
              for p in pictures]
    decode_ms = (time.perf_counter() - started) / len(pictures) * 1000
    ignored = float(np.mean([np.mean(label == 255) for label in labels]))

    bare_ips, synth_ips = float(np.median(bare_runs)), float(np.median(synth_runs))
    # Each synthesize run against the mean of the bare runs just before and after it: load drift between
    # rounds cancels; the median of these is the ratio reported.
    paired = [synth / ((bare_runs[i] + bare_runs[i + 1]) / 2) for i, synth in enumerate(synth_runs)]
    return {"row": row, "generator": generator.identity()["name"], "size": list(generator.size),
            "guidance": generator.guidance, "trained_dir": args.text2mask_dir if row == "text2mask" else None,
            "bare_images_per_s": round(bare_ips, 3), "synthesize_images_per_s": round(synth_ips, 3),
            "ratio": round(float(np.median(paired)), 3), "paired_ratios": [round(v, 3) for v in paired],
            "ratio_of_medians": round(synth_ips / bare_ips, 3),
            "bare_runs_images_per_s": [round(v, 3) for v in bare_runs],
            "synthesize_runs_images_per_s": [round(v, 3) for v in synth_runs],
            "synthesize_wall_s_including_startup": [round(v, 2) for v in walls],
            "decode_ms_per_mask": round(decode_ms, 3), "bare_ms_per_mask": round(1000 / bare_ips, 3),
            "decoded_ignore_fraction": round(ignored, 4)}


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from segsynth.formats.plan import PlanEntry, write_plan
    from segsynth.io import atomic_write_text
    from segsynth.data import open_dataset
    from segsynth.methods.seggen.captions import caption_from_mask

    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = sorted(set(rows) - {"text2mask", "text2mask-sd"})
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; options: text2mask, text2mask-sd")
    data = DATA.format(n=max(args.images, 8))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-mask-generation-") as tmp:
        tmp = Path(tmp)
        # Captions of the toy masks (as `segsynth captions` writes them), one text request per caption.
        dataset = open_dataset(data)
        split = dataset.split("train")
        every = [caption_from_mask(split.label(i), dataset.classes) for i in range(len(split))]
        prompts = every[: args.images]
        captions = tmp / "captions.jsonl"
        atomic_write_text(captions, "".join(json.dumps({"id": sample_id, "caption": caption}) + "\n"
                                            for sample_id, caption in zip(split.ids, every)))
        seeds = list(range(args.images))
        plan = write_plan(tmp / "masks.jsonl", [PlanEntry(f"caption{i}", [seeds[i]], kind="text", prompt=prompts[i])
                                                for i in range(args.images)])
        for row in rows:
            results.append(measure(row, tmp, data, captions, plan, prompts, seeds, args))

    result = {"benchmark": "mask_generation", "comparison": "synthesize (generation + decoding + writing) vs bare "
              "denoising loop, same model, batch and steps", "batch": args.batch, "steps": args.steps,
              "images_per_run": args.images, "rounds": args.rounds, "rows": results,
              "ratio": min(r["ratio"] for r in results), "settings": vars(args), "machine": machine_info()}
    print(f"{'row':14s} {'size':>7s} {'batch':>5s} {'steps':>5s} {'bare img/s':>10s} {'synth img/s':>11s} {'ratio':>6s} "
          f"{'decode ms':>9s} {'bare ms':>8s}")
    for r in results:
        print(f"{r['row']:14s} {r['size'][0]:>3d}x{r['size'][1]:<3d} {args.batch:>5d} {args.steps:>5d} "
              f"{r['bare_images_per_s']:>10.2f} {r['synthesize_images_per_s']:>11.2f} {r['ratio']:>6.3f} "
              f"{r['decode_ms_per_mask']:>9.2f} {r['bare_ms_per_mask']:>8.2f}")
    print(f"(ratio: median of {args.rounds} synthesize runs each over the mean of the bare runs before and after it; "
          f"{args.images} masks per run; load "
          f"average {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
