"""The `segsynth` command: one small function per verb, each a shim over its stage.

Flags are generated from each stage's config dataclass, so the CLI, YAML
configs and the Python API always accept the same keys. The configs live in
`segsynth.stage_configs`, which imports nothing heavy; a verb imports its stage
(torch, transformers, diffusers) only when it runs, so `segsynth --help` and
`segsynth VERB --help` answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from segsynth import __version__
from segsynth.config import add_config_arguments, config_from_args, values_from_args
from segsynth.stage_configs import (AttentionQualityConfig, CaptionConfig, EvalConfig, FilterConfig, MaskQualityConfig,
                                    PlanConfig, RunConfig, StatsConfig, SynthesizeConfig, TrainConfig, TrainGeneratorConfig,
                                    TrainTextGeneratorConfig)
from segsynth.io import SegsynthError, disk_full_error, is_disk_full


def cmd_check_data(args) -> int:
    from segsynth.data import open_dataset
    from segsynth.data.validate import check_split, format_report

    dataset = open_dataset(args.spec)
    limit = None if args.limit <= 0 else args.limit
    reports = [check_split(dataset, name, limit=limit, progress=True) for name in dataset.splits]
    print(format_report(dataset, reports))
    return 1 if any(report.errors for report in reports) else 0


def cmd_train(args) -> int:
    from segsynth.training.loop import train

    checkpoint = train(config_from_args(TrainConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {checkpoint}")
    return 0


def cmd_evaluate(args) -> int:
    from segsynth.training.evaluate import evaluate, format_metrics

    metrics = evaluate(config_from_args(EvalConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_metrics(metrics))
    return 0


def cmd_stats(args) -> int:
    from segsynth.methods.freemask.stats import compute_class_stats

    stats = compute_class_stats(config_from_args(StatsConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        for name, loss, pixels in zip(stats["classes"], stats["mean_loss"], stats["pixels"]):
            print(f"  {name[:20]:20s} mean loss {'n/a' if loss is None else f'{loss:.4f}':>8s}  pixels {pixels}")
    return 0


def cmd_filter(args) -> int:
    from segsynth.methods.freemask.filter import filter_synthetic

    summary = filter_synthetic(config_from_args(FilterConfig, args))
    if "mean_ignored_fraction" in summary:
        print(f"filtered {summary['filtered']} samples ({summary['filtered_now']} now, {summary['seconds']} s); "
              f"mean ignored fraction {summary['mean_ignored_fraction']:.3f}")
        for name, value in summary["mean_ignored_by_class"].items():
            print(f"  {name[:20]:20s} {'n/a' if value != value else f'{100 * value:5.1f}%'} ignored")
    return 0


def cmd_plan(args) -> int:
    from segsynth.formats.plan import read_plan, summarize_plan
    from segsynth.plan import make_plan

    path = make_plan(config_from_args(PlanConfig, args))
    print(summarize_plan(read_plan(path)))
    print(f"written: {path}")
    return 0


def cmd_synthesize(args) -> int:
    from segsynth.synthesize import format_summary, synthesize

    summary = synthesize(config_from_args(SynthesizeConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
    return 0


def cmd_train_generator(args) -> int:
    from segsynth.generators import train_generator_kind

    folder, spec = train_generator_kind(config_from_args(TrainGeneratorConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"generator: {folder} (use it with --generator {spec})")
    return 0


def cmd_train_text_generator(args) -> int:
    from segsynth.generators.builtin_text import train_text_generator

    config = config_from_args(TrainTextGeneratorConfig, args)
    folder = train_text_generator(config)
    use = f"--generator text2mask:{folder}" if config.target == "colour-mask" else f"--generator attention:{folder}"
    print(f"text generator: {folder} (use it with {use})")
    return 0


def cmd_captions(args) -> int:
    from segsynth.methods.seggen.captions import make_captions

    path = make_captions(config_from_args(CaptionConfig, args))
    print(f"captions: {path} (train a text -> mask generator on them with train-text-generator --prompts {path}, "
          f"or plan text requests with plan --captions {path})")
    return 0


def cmd_mask_quality(args) -> int:
    from segsynth.methods.seggen.quality_report import format_report, write_mask_quality

    config = config_from_args(MaskQualityConfig, args)
    report = write_mask_quality(config)
    print(format_report(report, report["classes"]))
    print(f"written: {config.out}/mask_quality.json, mask_quality.md, mask_quality_grid.png")
    return 0


def cmd_attention_quality(args) -> int:
    from segsynth.methods.attn2mask.quality import attention_quality, format_quality

    print(format_quality(attention_quality(config_from_args(AttentionQualityConfig, args))))
    return 0


def cmd_run(args) -> int:
    from segsynth.run import resolve_run_config, run

    run(resolve_run_config(values_from_args(RunConfig, args)))
    return 0


# verb -> (help, config dataclass whose fields become the flags, shim), in pipeline order.
VERBS = {
    "train": ("train a segmenter (recipes: real, synthetic, joint, pretrain-finetune, replace)", TrainConfig, cmd_train),
    "evaluate": ("mIoU of a checkpoint on a dataset split", EvalConfig, cmd_evaluate),
    "stats": ("class-wise mean loss of a real-data segmenter (FreeMask's L̄_c)", StatsConfig, cmd_stats),
    "plan": ("how many synthetic images per real mask (or per caption), with their seeds (plan.jsonl)", PlanConfig,
             cmd_plan),
    "captions": ("a caption per real mask (from the mask, a file or BLIP-2): captions.jsonl (SegGen)", CaptionConfig,
                 cmd_captions),
    "train-generator": ("train a generator: --kind builtin (the CPU mask-to-image diffusion model) or text2mask-sd "
                        "(fine-tune SD / SDXL to draw colour-coded masks from captions: SegGen's text -> mask)",
                        TrainGeneratorConfig, cmd_train_generator),
    "train-text-generator": ("train the builtin text-conditioned diffusion model (--target colour-mask: text -> mask, "
                             "SegGen's MaskSyn; --target image: text -> image)", TrainTextGeneratorConfig,
                             cmd_train_text_generator),
    "synthesize": ("render a plan with a generator into a synthetic folder: dataset", SynthesizeConfig, cmd_synthesize),
    "filter": ("set noisy synthetic pixels to ignore (loss > alpha * L̄_c)", FilterConfig, cmd_filter),
    "mask-quality": ("generated masks vs the real ones, and the alignment of their rendered images (SegGen)",
                     MaskQualityConfig, cmd_mask_quality),
    "attention-quality": ("score attention pseudo-masks of real held-out images against their labels, per recipe",
                          AttentionQualityConfig, cmd_attention_quality),
    "run": ("a method's stages and arms on a dataset (default: FreeMask on the built-in toy data) + table",
            RunConfig, cmd_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segsynth", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"segsynth {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    check = verbs.add_parser("check-data", help="validate a dataset: per-split counts and class-pixel histogram")
    check.add_argument("spec", help="dataset spec, e.g. camvid:PATH, folder:PATH, toy:n=400,size=96")
    check.add_argument("--limit", type=int, default=0, help="decode at most N samples per split (0: all)")
    check.set_defaults(run=cmd_check_data)

    for verb, (help_text, config_class, shim) in VERBS.items():
        sub = verbs.add_parser(verb, help=help_text)
        add_config_arguments(sub, config_class)
        sub.set_defaults(run=shim)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SegsynthError as error:
        print(f"segsynth {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a full disk reported by any writer (OSError, SafetensorError, ...)
        if not is_disk_full(error):
            raise
        print(f"segsynth {args.verb}: error: {disk_full_error(None, error)}", file=sys.stderr)
        return 2
    finally:
        from segsynth.distributed import cleanup

        cleanup()
