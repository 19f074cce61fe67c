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
from segsynth.io import SegsynthError


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


def build_parser() -> argparse.ArgumentParser:
    from segsynth.evaluate import EvalConfig
    from segsynth.train import TrainConfig

    parser = argparse.ArgumentParser(prog="segsynth", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"segsynth {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    check = verbs.add_parser("check-data", help="validate a dataset: per-split counts and class-pixel histogram")
    check.add_argument("spec", help="dataset spec, e.g. camvid:PATH, folder:PATH, toy:n=400,size=96")
    check.add_argument("--limit", type=int, default=0, help="decode at most N samples per split (0: all)")
    check.set_defaults(run=cmd_check_data)

    train = verbs.add_parser("train", help="train a segmenter (recipes: real, ...)")
    add_config_arguments(train, TrainConfig)
    train.set_defaults(run=cmd_train)

    evaluate = verbs.add_parser("evaluate", help="mIoU of a checkpoint on a dataset split")
    add_config_arguments(evaluate, EvalConfig)
    evaluate.set_defaults(run=cmd_evaluate)

    from segsynth.filter import FilterConfig
    from segsynth.stats import StatsConfig

    stats = verbs.add_parser("stats", help="class-wise mean loss of a real-data segmenter (FreeMask's L̄_c)")
    add_config_arguments(stats, StatsConfig)
    stats.set_defaults(run=cmd_stats)

    filter_ = verbs.add_parser("filter", help="set noisy synthetic pixels to ignore (loss > alpha * L̄_c)")
    add_config_arguments(filter_, FilterConfig)
    filter_.set_defaults(run=cmd_filter)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SegsynthError as error:
        print(f"segsynth {args.verb}: error: {error}", file=sys.stderr)
        return 2
    finally:
        from segsynth.distributed import cleanup

        cleanup()
