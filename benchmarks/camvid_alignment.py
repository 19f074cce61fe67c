"""Mask alignment of a generator, measured as layout-to-image papers (FreestyleNet) do.

A segmenter trained on the real data is run on images generated from the
val masks and scored (mIoU) against those conditioning masks. Beside it:

* the same segmenter on the real val images (the ceiling), and
* the same segmenter on the real val images resized to the generator's
  working size and back (the ceiling at the generator's resolution: what a
  perfect generator at that size would score), which separates what the
  resolution costs from what the generator costs.

Also writes a grid (mask | generated | real) and a JSON + Markdown report.

    python benchmarks/camvid_alignment.py --generator runs/camvid_generator --segmenter runs/camvid_real \
        --data camvid:/work/shared/datasets/camvid --out results/camvid_generator
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", required=True,
                        help="builtin generator folder, or KIND:DIR for another kind (latent:runs/camvid_latent_generator)")
    parser.add_argument("--segmenter", required=True, help="segmenter checkpoint trained on the real data")
    parser.add_argument("--data", default="camvid:/work/shared/datasets/camvid")
    parser.add_argument("--split", default="val")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the generator's)")
    parser.add_argument("--guidance", default="",
                        help="classifier-free guidance scales, comma-separated (a sweep: one synthetic set and one score "
                             "each; needs a generator trained with cond_dropout); default: the generator's own")
    parser.add_argument("--inference-size", default="",
                        help="H,W the segmenter sees every image at (default: the data's native size); give the "
                             "segmenter's training size for one trained at a low resolution")
    parser.add_argument("--curve", action="store_true",
                        help="also score every snapshot the generator's training kept (train-generator --keep-every: "
                             "GEN/snapshots/it<N>): alignment against training iterations from one run")
    parser.add_argument("--strength", type=float, default=None,
                        help="start each image from its mask's own image noised to this share (SDEdit); the "
                             "score then measures what a re-render keeps of the real image, not a drawing from noise")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grid", type=int, default=8, help="rows in the grid image")
    parser.add_argument("--work", default="runs/camvid_alignment", help="folder for the synthetic and resized sets")
    parser.add_argument("--out", default="results/camvid_generator", help="report prefix: OUT.json, OUT.md, OUT_grid.png")
    return parser.parse_args()


def resized_real_set(dataset, split_name: str, size, folder: Path) -> str:
    """The real split at the generator's working size (images: area/bicubic, masks: nearest) as a folder: dataset."""
    from segsynth.generators.base import resize_mask
    from segsynth.io import atomic_write_json, atomic_write_png

    split = dataset.split(split_name)
    for index in range(len(split)):
        sample = split[index]
        image = np.asarray(Image.fromarray(sample.image).resize((size[1], size[0]), Image.BICUBIC, reducing_gap=2.0))
        atomic_write_png(folder / "images" / f"{sample.id}.png", image)
        atomic_write_png(folder / "masks" / f"{sample.id}.png", resize_mask(sample.label, size), dataset.palette)
    atomic_write_json(folder / "classes.json", {"classes": list(dataset.classes), "palette": [list(c) for c in dataset.palette]})
    return f"folder:{folder}"


def grid_image(dataset, split_name: str, synthetic: Path, rows: int, size) -> Image.Image:
    """Rows of (conditioning mask in the dataset palette | generated image | real image), at the working size."""
    split = dataset.split(split_name)
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(dataset.palette)] = np.asarray(dataset.palette, np.uint8)
    records = [json.loads(line) for line in (synthetic / "manifest.jsonl").read_text().splitlines()]
    picks = [records[int(i)] for i in np.linspace(0, len(records) - 1, min(rows, len(records))).round()]
    height, width = size
    canvas = Image.new("RGB", (3 * width + 8, len(picks) * (height + 4)), "white")
    for row, record in enumerate(picks):
        mask = np.asarray(Image.open(synthetic / record["mask"]))
        generated = Image.open(synthetic / record["image"]).convert("RGB")
        real = Image.fromarray(split[split.index_of(record["source"])].image).resize((width, height), Image.BICUBIC)
        top = row * (height + 4)
        canvas.paste(Image.fromarray(palette[mask]), (0, top))
        canvas.paste(generated, (width + 4, top))
        canvas.paste(real, (2 * width + 8, top))
    return canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)


def main() -> int:
    args = parse_args()
    from segsynth.data import open_dataset
    from segsynth.training.evaluate import EvalConfig, evaluate
    from segsynth.generators.builtin import GENERATOR_FILE
    from segsynth.plan import PlanConfig, make_plan
    from segsynth.synthesize import SynthesizeConfig, synthesize

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    dataset = open_dataset(args.data)
    # A bare folder is the builtin pixel generator; "latent:DIR" (or any KIND:DIR) names the kind, split as
    # open_generator splits a spec.
    kind, _, folder = args.generator.partition(":") if ":" in args.generator else ("builtin", "", args.generator)
    meta = json.loads((Path(folder) / GENERATOR_FILE).read_text())
    size = tuple(meta["size"])
    native = dataset.split(args.split)[0].label.shape

    inference = tuple(int(v) for v in args.inference_size.split(",")) if args.inference_size else native
    scales = [float(v) for v in args.guidance.split(",")] if args.guidance else [None]

    # 1. One image per val mask for each guidance scale, timed by synthesize itself.
    plan = make_plan(PlanConfig(data=args.data, out=str(work / "plan.jsonl"), split=args.split, uniform=1, seed=1000))

    def score(data: str, split: str, name: str) -> dict:
        return evaluate(EvalConfig(checkpoint=args.segmenter, data=data, split=split, out=str(work / f"metrics_{name}.json"),
                                   size=list(inference)))

    sweep = []
    for scale in scales:
        tag = "synthetic" if scale is None else f"synthetic_g{scale:g}"
        started = time.time()
        summary = synthesize(SynthesizeConfig(data=args.data, plan=str(plan), generator=f"{kind}:{folder}",
                                              out=str(work / tag), split=args.split, batch_size=args.batch_size,
                                              steps=args.steps, guidance=scale, strength=args.strength))
        synth_wall = time.time() - started
        # 2. The segmenter on generated images (vs their masks).
        sweep.append({"guidance": scale, "folder": tag, "summary": summary, "synthesize_wall_s": round(synth_wall, 1),
                      "generated": score(f"folder:{work / tag}", "train", f"generated_{tag}")})

    # 2b. With --curve, each kept snapshot of the same training at the first guidance scale.
    snapshots = sorted((int(path.name[2:]), path) for path in (Path(folder) / "snapshots").glob("it*")
                       if path.name[2:].isdigit()) if args.curve else []
    if args.curve and not snapshots:
        raise SystemExit(f"--curve: {folder}/snapshots holds no it<N> folder; train with --keep-every N")
    curve = []
    for iterations, path in snapshots:
        tag = f"curve_it{iterations}"
        synthesize(SynthesizeConfig(data=args.data, plan=str(plan), generator=f"{kind}:{path}", out=str(work / tag),
                                    split=args.split, batch_size=args.batch_size, steps=args.steps, guidance=scales[0],
                                    strength=args.strength))
        training = json.loads((path / GENERATOR_FILE).read_text()).get("training", {})
        curve.append({"iterations": iterations, "minutes": training.get("minutes"),
                      "generated": score(f"folder:{work / tag}", "train", f"generated_{tag}")})

    # 3. ... and on real val, and on real val at the working size (the ceilings).
    real = score(args.data, args.split, "real")
    low_res = score(resized_real_set(dataset, args.split, size, work / "real_low_res"), "train", "real_low_res")
    best = max(sweep, key=lambda row: row["generated"]["miou"])
    generated, summary, synth_wall = best["generated"], best["summary"], best["synthesize_wall_s"]

    # 4. Grid (of the best scale) and report.
    grid = grid_image(dataset, args.split, work / best["folder"], args.grid, size)
    grid_path = out.with_name(out.name + "_grid.png")
    grid.save(grid_path)
    training = meta.get("training", {})
    synthetic_records = [json.loads(line) for line in (work / best["folder"] / "manifest.jsonl").read_text().splitlines()]
    report = {
        "generator": str(args.generator), "segmenter": str(args.segmenter), "data": args.data, "split": args.split,
        "working_size": list(size), "native_size": list(native), "parameters": meta.get("parameters"),
        "training": training, "sampling": {"steps": synthetic_records[0]["steps"], "scheduler": synthetic_records[0]["generator"]["scheduler"],
                                           "batch_size": args.batch_size},
        "images": summary["generated"] + summary["already_done"],
        "seconds_per_image": round(1 / summary["images_per_s"], 3) if summary["images_per_s"] else None,
        "model_seconds_per_image": round(float(np.mean([r["seconds"] for r in synthetic_records])), 3),
        "synthesize_wall_s": round(synth_wall, 1),
        "miou_generated_vs_conditioning_masks": round(generated["miou"], 2),
        "miou_real_val": round(real["miou"], 2),
        "miou_real_val_at_working_size": round(low_res["miou"], 2),
        "inference_size": list(inference), "guidance": best["guidance"], "strength": args.strength,
        "alignment": round(generated["miou"] / low_res["miou"], 4) if low_res["miou"] else None,
        "guidance_sweep": [{"guidance": row["guidance"], "miou_generated": round(row["generated"]["miou"], 2),
                            "alignment": round(row["generated"]["miou"] / low_res["miou"], 4) if low_res["miou"] else None,
                            "synthesize_wall_s": row["synthesize_wall_s"]} for row in sweep],
        "curve": [{"iterations": row["iterations"], "minutes": row["minutes"],
                   "miou_generated": round(row["generated"]["miou"], 2),
                   "alignment": round(row["generated"]["miou"] / low_res["miou"], 4) if low_res["miou"] else None,
                   "per_class": {name: _round(row["generated"]["per_class"][name]) for name in dataset.classes}}
                  for row in curve],
        "per_class": {name: {"generated": _round(generated["per_class"][name]), "real": _round(real["per_class"][name]),
                             "real_at_working_size": _round(low_res["per_class"][name])} for name in dataset.classes},
        "grid": str(grid_path), "cores": os.cpu_count(),
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    guided = "" if best["guidance"] is None else f", guidance {best['guidance']:g}"
    if args.strength is not None:
        guided += f", each from its real image noised to strength {args.strength:g}"
    lines = [
        f"# {kind.capitalize()} generator on CamVid: mask alignment", "",
        f"Generator `{folder}`: {meta.get('parameters', 0) / 1e6:.2f} M parameters, working size "
        f"{size[0]}x{size[1]} (H x W), trained {training.get('iterations')} iterations in {training.get('minutes')} min "
        f"on {os.cpu_count()} CPU cores; sampling {report['sampling']['steps']} steps {report['sampling']['scheduler']}, "
        f"{report['seconds_per_image'] or 'n/a (the set was made by an earlier call)'} s/image "
        f"({report['model_seconds_per_image']} s/image in the model).", "",
        f"Segmenter `{args.segmenter}` (trained on real {args.data}), every image seen at {inference[0]}x{inference[1]}, "
        f"mIoU on the {len(synthetic_records)} {args.split} masks:", "",
        "| images | mIoU |", "|---|---|",
        f"| generated from the {args.split} masks (scored against them{guided}) | {report['miou_generated_vs_conditioning_masks']:.2f} |",
        f"| real {args.split} images at {size[0]}x{size[1]} (ceiling at the generator's size) | {report['miou_real_val_at_working_size']:.2f} |",
        f"| real {args.split} images at {native[0]}x{native[1]} (ceiling) | {report['miou_real_val']:.2f} |", "",
        "| class | generated | real at working size | real |", "|---|---|---|---|",
        *[f"| {name} | {_fmt(v['generated'])} | {_fmt(v['real_at_working_size'])} | {_fmt(v['real'])} |"
          for name, v in report["per_class"].items()],
        "", f"Alignment (generated / real at working size): {_percent(report['alignment'])}", "",
        *([] if len(sweep) == 1 else [
            "Guidance sweep (same masks, seeds and steps):", "", "| guidance | mIoU generated | alignment | synthesis s |",
            "|---|---|---|---|",
            *[f"| {row['guidance']:g} | {row['miou_generated']:.2f} | {_percent(row['alignment'])} | {row['synthesize_wall_s']:.0f} |"
              for row in report["guidance_sweep"]], ""]),
        *([] if not curve else [
            f"Alignment against training iterations (snapshots of the same run{guided}; the last row is the final model):",
            "", "| iterations | minutes | mIoU generated | alignment | " + " | ".join(dataset.classes) + " |",
            "|---|---|---|---|" + "---|" * len(dataset.classes),
            *[f"| {row['iterations']} | {row['minutes']} | {row['miou_generated']:.2f} | {_percent(row['alignment'])} | "
              + " | ".join(_fmt(row["per_class"][name]) for name in dataset.classes) + " |"
              for row in report["curve"] if row["iterations"] != training.get("iterations")],
            f"| {training.get('iterations')} | {training.get('minutes')} | "
            f"{report['guidance_sweep'][0]['miou_generated']:.2f} | {_percent(report['guidance_sweep'][0]['alignment'])} | "
            + " | ".join(_fmt(_round(sweep[0]["generated"]["per_class"][name])) for name in dataset.classes)
            + " |", ""]),
        f"Grid (mask | generated | real{guided}): `{grid_path}`", "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _round(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(value, 2)


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
