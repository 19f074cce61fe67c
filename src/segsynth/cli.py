"""The `segsynth` command: one small function per verb, each a shim over its stage.

Flags are generated from each stage's config dataclass, so the CLI, YAML
configs and the Python API always accept the same keys.
"""

from __future__ import annotations

import argparse
import os
import sys

from segsynth import __version__
from segsynth.config import add_config_arguments, config_from_args
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
    from segsynth.train import TrainConfig, train

    checkpoint = train(config_from_args(TrainConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {checkpoint}")
    return 0


def cmd_evaluate(args) -> int:
    from segsynth.evaluate import EvalConfig, evaluate, format_metrics

    metrics = evaluate(config_from_args(EvalConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_metrics(metrics))
    return 0


def cmd_stats(args) -> int:
    from segsynth.stats import StatsConfig, compute_class_stats

    stats = compute_class_stats(config_from_args(StatsConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        for name, loss, pixels in zip(stats["classes"], stats["mean_loss"], stats["pixels"]):
            print(f"  {name[:20]:20s} mean loss {'n/a' if loss is None else f'{loss:.4f}':>8s}  pixels {pixels}")
    return 0


def cmd_filter(args) -> int:
    from segsynth.filter import FilterConfig, filter_synthetic

    summary = filter_synthetic(config_from_args(FilterConfig, args))
    if "mean_ignored_fraction" in summary:
        print(f"filtered {summary['filtered']} samples ({summary['filtered_now']} now, {summary['seconds']} s); "
              f"mean ignored fraction {summary['mean_ignored_fraction']:.3f}")
        for name, value in summary["mean_ignored_by_class"].items():
            print(f"  {name[:20]:20s} {'n/a' if value != value else f'{100 * value:5.1f}%'} ignored")
    return 0


def cmd_plan(args) -> int:
    from segsynth.plan import PlanConfig, make_plan

    from segsynth.plan import read_plan, summarize_plan

    path = make_plan(config_from_args(PlanConfig, args))
    print(summarize_plan(read_plan(path)))
    print(f"written: {path}")
    return 0


def cmd_synthesize(args) -> int:
    from segsynth.synthesize import SynthesizeConfig, format_summary, synthesize

    summary = synthesize(config_from_args(SynthesizeConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
    return 0


def cmd_train_generator(args) -> int:
    from segsynth.generators.builtin import TrainGeneratorConfig, train_generator

    folder = train_generator(config_from_args(TrainGeneratorConfig, args))
    print(f"generator: {folder} (use it with --generator builtin:{folder})")
    return 0


def cmd_run(args) -> int:
    import dataclasses

    from segsynth.config import load_yaml
    from segsynth.run import RunConfig, resolve_run_config, run

    values = load_yaml(args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
                   if getattr(args, f.name, None) is not None})
    run(resolve_run_config(values))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from segsynth.evaluate import EvalConfig
    from segsynth.filter import FilterConfig
    from segsynth.generators.builtin import TrainGeneratorConfig
    from segsynth.plan import PlanConfig
    from segsynth.run import RunConfig
    from segsynth.stats import StatsConfig
    from segsynth.synthesize import SynthesizeConfig
    from segsynth.train import TrainConfig

    # verb -> (help, config dataclass whose fields become the flags, shim), in pipeline order.
    verbs_table = {
        "train": ("train a segmenter (recipes: real, synthetic, joint, pretrain-finetune, replace)", TrainConfig, cmd_train),
        "evaluate": ("mIoU of a checkpoint on a dataset split", EvalConfig, cmd_evaluate),
        "stats": ("class-wise mean loss of a real-data segmenter (FreeMask's L̄_c)", StatsConfig, cmd_stats),
        "plan": ("how many synthetic images per real mask, with their seeds (plan.jsonl)", PlanConfig, cmd_plan),
        "train-generator": ("train the builtin mask-to-image diffusion model", TrainGeneratorConfig, cmd_train_generator),
        "synthesize": ("render a plan with a generator into a synthetic folder: dataset", SynthesizeConfig, cmd_synthesize),
        "filter": ("set noisy synthetic pixels to ignore (loss > alpha * L̄_c)", FilterConfig, cmd_filter),
        "run": ("the whole method on a dataset (default: the built-in toy data) + ablation table", RunConfig, cmd_run),
    }

    parser = argparse.ArgumentParser(prog="segsynth", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"segsynth {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    check = verbs.add_parser("check-data", help="validate a dataset: per-split counts and class-pixel histogram")
    check.add_argument("spec", help="dataset spec, e.g. camvid:PATH, folder:PATH, toy:n=400,size=96")
    check.add_argument("--limit", type=int, default=0, help="decode at most N samples per split (0: all)")
    check.set_defaults(run=cmd_check_data)

    for verb, (help_text, config_class, shim) in verbs_table.items():
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
