"""Attention capture cost: text -> image generation with cross-attention capture and pseudo-masks vs the same
generation without, same model, batch, steps and guidance; and the memory capture adds.

Two models:
  builtin   the `attention:DIR` generator (the builtin text -> image model the toy run trains: 64x80,
            widths 32/64/128, cross-attention at 16x20 and 8x10), its weights barely trained (speed does not
            depend on them)
  sd        `attention-sd:BASE` on a tiny random Stable Diffusion pipeline (diffusers' own pipeline, 64x64)

"Without" is the generator's plain sampling (builtin: the text generator's denoise + decode; sd: the
StableDiffusionPipeline call); "with" is `generator.run` (capture on the chosen layers, conditional half
only, chunked, plus turning the maps into pseudo-mask, confidence, heat map and raw label).

Each variant runs in its own child process, alternating (without, with, without, with, ...), so each
child's peak resident memory (ru_maxrss) is its own: the memory capture adds is the difference of the
medians of the two variants' peak RSS growth over their warm-up (model loaded, one batch generated).
Images/s are medians over rounds; the ratio is with / without. The per-round figures are in the JSON, so a
disturbed machine shows up as spread.

    python benchmarks/bench_attention_capture.py                     # both models
    python benchmarks/bench_attention_capture.py --models builtin --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOY = "toy:n=16,n_val=4,size=64x80"
PROMPTS = ["a photo of sky, building, road, car", "a photo of sky, road, sidewalk, tree",
           "a photo of building, road, person, pole", "a photo of sky, tree, car, sign"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="builtin,sd", help="comma list: builtin, sd")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per child")
    parser.add_argument("--rounds", type=int, default=3, help="without/with rounds (medians are reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    parser.add_argument("--out", default="results/bench_attention_capture.json")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "VARIANT", "FOLDER"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- the models (built once, in the parent) -------------------------------------------------------------


def build_models(folder: Path, models: list[str], steps: int) -> dict[str, str]:
    specs = {}
    if "builtin" in models:
        from segsynth.generators.builtin_text import train_text_generator
        from segsynth.stage_configs import TrainTextGeneratorConfig

        out = train_text_generator(TrainTextGeneratorConfig(
            data=TOY, out=str(folder / "builtin"), size=[64, 80], channels=[32, 64, 128], layers_per_block=1,
            iterations=1, batch_size=2, warmup=1, log_every=1, sample_steps=steps, device="cpu"))
        specs["builtin"] = f"attention:{out}"
    if "sd" in models:
        from segsynth.generators.testing import save_tiny_controlnet_models

        base, _ = save_tiny_controlnet_models(folder / "sd")
        specs["sd"] = f"attention-sd:{base}"
    return specs


# --- one child: load, warm up, time one variant ----------------------------------------------------------------


def child(model: str, variant: str, spec: str, args) -> dict:
    import torch

    from segsynth.data import open_dataset
    from segsynth.generators import GeneratorSettings, open_generator
    from segsynth.generators.base import Condition, Request

    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = open_dataset(TOY)
    resolutions = {"builtin": [16, 8], "sd": [16]}[model]
    generator = open_generator(spec, GeneratorSettings(
        device="cpu", steps=args.steps, guidance=args.guidance, pseudo_mask="daam",
        pseudo_mask_settings={"resolutions": resolutions}, resolution=[64, 64] if model == "sd" else None))
    generator.check_dataset(dataset.classes, dataset.palette)

    def conditions(batch_index: int):
        requests = [Request(f"b{batch_index}_{i}", "text", 1000 * batch_index + i, prompt=PROMPTS[i % len(PROMPTS)])
                    for i in range(args.batch)]
        return [Condition(r, None, r.prompt) for r in requests]

    def without_capture(prepared):
        if model == "builtin":
            from segsynth.generators.builtin_text.model import decode_images

            return decode_images(generator.text.denoise(prepared))
        seeds = [torch.Generator("cpu").manual_seed(int(s)) for s in prepared.seeds]
        return generator.pipeline(prepared.prompts, height=prepared.size[0], width=prepared.size[1],
                                  num_inference_steps=generator.steps, guidance_scale=generator.guidance,
                                  generator=seeds, output_type="np").images

    def one_batch(batch_index: int):
        prepared = generator.prepare(conditions(batch_index))
        with torch.no_grad():
            return without_capture(prepared) if variant == "without" else generator.run(prepared)

    one_batch(0)  # warm-up: one-off allocations, thread pools
    rss_warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    for index in range(1, args.batches + 1):
        one_batch(index)
    seconds = time.perf_counter() - started
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images_per_s": args.batches * args.batch / seconds, "peak_rss_mb": rss_peak,
            "rss_growth_mb": rss_peak - rss_warm, "torch_threads": torch.get_num_threads()}


def run_child(model: str, variant: str, spec: str, args) -> dict:
    command = [sys.executable, __file__, "--child", model, variant, spec, "--batch", str(args.batch),
               "--steps", str(args.steps), "--guidance", str(args.guidance), "--batches", str(args.batches),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"child {model}/{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        model, variant, spec = args.child
        print(json.dumps(child(model, variant, spec, args)))
        return 0
    from bench_filter import machine_info  # one machine record for every benchmark

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - {"builtin", "sd"})
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; options: builtin, sd")
    result = {"benchmark": "attention_capture", "batch": args.batch, "steps": args.steps, "guidance": args.guidance,
              "batches_per_child": args.batches, "rounds": args.rounds, "machine": machine_info(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        specs = build_models(Path(tmp), models, args.steps)
        for model, spec in specs.items():
            runs = {"without": [], "with": []}
            for _ in range(args.rounds):
                for variant in ("without", "with"):
                    runs[variant].append(run_child(model, variant, spec, args))
            median = {v: {k: statistics.median(r[k] for r in rs) for k in ("images_per_s", "peak_rss_mb", "rss_growth_mb")}
                      for v, rs in runs.items()}
            result["models"][model] = {
                "spec": spec.split(":")[0], "runs": runs, "median": median,
                "ratio_with_to_without": round(median["with"]["images_per_s"] / median["without"]["images_per_s"], 3),
                "capture_extra_peak_mb": round(median["with"]["peak_rss_mb"] - median["without"]["peak_rss_mb"], 1)}
    result["machine"]["load_average_end"] = list(os.getloadavg())
    print(f"attention capture benchmark (batch {args.batch}, {args.steps} steps, guidance {args.guidance}; "
          f"{result['machine']['cores']} cores, load {result['machine']['load_average']})")
    print(f"  {'model':<8} {'without img/s':>13} {'with img/s':>10} {'ratio':>6} {'peak RSS without/with MB':>26}")
    for model, row in result["models"].items():
        m = row["median"]
        print(f"  {model:<8} {m['without']['images_per_s']:>13.2f} {m['with']['images_per_s']:>10.2f} "
              f"{row['ratio_with_to_without']:>6.3f} {m['without']['peak_rss_mb']:>12.0f} / {m['with']['peak_rss_mb']:<10.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
