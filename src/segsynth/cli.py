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

from segsynth import __version__, cpu_load  # noqa: F401  (cpu_load starts its CPU meter now, before torch loads)
from segsynth.config import add_config_arguments, config_from_args, values_from_args
from segsynth.stage_configs import (AdaptConfig, AttentionQualityConfig, CaptionConfig, EvalConfig, ExportConfig,
                                    FilterConfig, MaskQualityConfig, PlanConfig, PromptsConfig, ReportConfig, RunConfig,
                                    StatsConfig, SynthesizeConfig, TrainConfig, TrainGeneratorConfig,
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


def cmd_prompts(args) -> int:
    from segsynth.methods.attn2mask.prompts import format_prompt_lists, prompt_lists

    config = config_from_args(PromptsConfig, args)
    print(format_prompt_lists(prompt_lists(config)))
    if config.out:
        print(f"written: {config.out}")
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


def cmd_adapt(args) -> int:
    from segsynth.generators.adapt import adapt

    config = config_from_args(AdaptConfig, args)
    folder = adapt(config)
    print(f"LoRA adapter: {folder} (use it with segsynth synthesize --generator {config.generator} --lora {folder})")
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

    source = f"config file {args.config}" if args.config else "command line"
    run(resolve_run_config(values_from_args(RunConfig, args), source))
    return 0


def cmd_report(args) -> int:
    from segsynth.html_report import write_report

    print(f"report: {write_report(config_from_args(ReportConfig, args))}")
    return 0


def cmd_export(args) -> int:
    from segsynth.export import export

    summary = export(config_from_args(ExportConfig, args))
    counts = ", ".join(f"{split} {count}" for split, count in summary["splits"].items())
    print(f"exported {summary['data']} as {summary['format']} to {summary['out']} ({counts})")
    return 0


# verb -> (help, config dataclass whose fields become the flags, shim), in pipeline order.
# Fields named in POSITIONAL are positional arguments of their verb (`segsynth report RUN`).
POSITIONAL = {"report": ("run",), "export": ("data",)}
VERBS = {
    "train": ("train a segmenter (recipes: real, synthetic, joint, pretrain-finetune, replace)", TrainConfig, cmd_train),
    "evaluate": ("mIoU of a checkpoint on a dataset split", EvalConfig, cmd_evaluate),
    "stats": ("class-wise mean loss of a real-data segmenter (FreeMask's L̄_c)", StatsConfig, cmd_stats),
    "plan": ("how many synthetic images per real mask (or per caption), with their seeds (plan.jsonl)", PlanConfig,
             cmd_plan),
    "prompts": ("the words and prompts each class gets under prompt augmentation (templates, WordNet synonyms "
                "and hyponyms, a --words file): segsynth plan --class-prompts N --augment-prompts", PromptsConfig,
                cmd_prompts),
    "captions": ("a caption per real mask (from the mask, a file or BLIP-2): captions.jsonl (SegGen)", CaptionConfig,
                 cmd_captions),
    "train-generator": ("train a generator: --kind builtin (the CPU mask-to-image diffusion model) or text2mask-sd "
                        "(fine-tune SD / SDXL to draw colour-coded masks from captions: SegGen's text -> mask)",
                        TrainGeneratorConfig, cmd_train_generator),
    "train-text-generator": ("train the builtin text-conditioned diffusion model (--target colour-mask: text -> mask, "
                             "SegGen's MaskSyn; --target image: text -> image)", TrainTextGeneratorConfig,
                             cmd_train_text_generator),
    "adapt": ("a LoRA adapter that moves a generator's images towards a target domain, learned from unlabeled "
              "images of it (Attn2mask's domain adaptation); load it with synthesize --lora", AdaptConfig, cmd_adapt),
    "synthesize": ("render a plan with a generator into a synthetic folder: dataset", SynthesizeConfig, cmd_synthesize),
    "filter": ("set noisy synthetic pixels to ignore (loss > alpha * L̄_c)", FilterConfig, cmd_filter),
    "mask-quality": ("generated masks vs the real ones, and the alignment of their rendered images (SegGen)",
                     MaskQualityConfig, cmd_mask_quality),
    "attention-quality": ("score attention pseudo-masks of real held-out images against their labels, per recipe",
                          AttentionQualityConfig, cmd_attention_quality),
    "run": ("a method's stages and arms on a dataset (default: FreeMask on the built-in toy data; --method all: the "
            "three side by side) + table + report.html", RunConfig, cmd_run),
    "report": ("one self-contained HTML page for a run folder (tables, charts, galleries; opens from disk)",
               ReportConfig, cmd_report),
    "export": ("a dataset or synthetic set in the layouts people train with: mmseg (img_dir/ann_dir + config "
               "snippet) or hf (imagefolder for datasets.load_dataset)", ExportConfig, cmd_export),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segsynth", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"segsynth {__version__}")
    parser.add_argument("--threads", default=None, metavar="N|auto",
                        help="torch threads per process: auto (default: the cores other processes leave free, "
                             "re-measured while a stage runs) or a fixed N (also SEGSYNTH_THREADS)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    check = verbs.add_parser("check-data", help="validate a dataset: per-split counts and class-pixel histogram")
    check.add_argument("spec", help="dataset spec, e.g. camvid:PATH, folder:PATH, toy:n=400,size=96")
    check.add_argument("--limit", type=int, default=0, help="decode at most N samples per split (0: all)")
    check.set_defaults(shim=cmd_check_data)

    for verb, (help_text, config_class, shim) in VERBS.items():
        sub = verbs.add_parser(verb, help=help_text)
        add_config_arguments(sub, config_class, POSITIONAL.get(verb, ()))
        sub.set_defaults(shim=shim)  # not "run": a config field may be named so (report RUN)
    return parser


# Exit codes (README "Exit codes", docs/bad_input.md): 0 done; 1 `check-data` found problems in samples;
# 2 bad input (a one-line `segsynth VERB: error: ...`, or argparse's usage error); 3 a bug in segsynth
# (the traceback is printed: please report it); 130 interrupted (Ctrl-C).
EXIT_OK, EXIT_PROBLEMS_FOUND, EXIT_BAD_INPUT, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# OSErrors that name a path the user gave (or a file under it) and mean "this path cannot be used".
PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def main(argv: list[str] | None = None) -> int:
    """Run one verb. Every exception ends here as exactly one of: a SegsynthError (bad input, one line,
    exit 2), an OSError naming a path (bad input: the path cannot be used, exit 2), a full disk (exit 2),
    Ctrl-C (exit 130), or anything else: a bug, printed with its traceback (exit 3)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads != "auto" and not (args.threads.isdigit() and 1 <= int(args.threads) <= 1024):
            return _bad_input(args.verb, f"--threads {args.threads} is unknown: threads must be auto or an integer "
                                         "in 1..1024")
        os.environ["SEGSYNTH_THREADS"] = args.threads
    try:
        return args.shim(args)
    except SegsynthError as error:
        return _bad_input(args.verb, one_line(str(error)))
    except KeyboardInterrupt:
        print(f"segsynth {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a full disk reported by any writer (OSError, SafetensorError, ...)
        if is_disk_full(error):
            return _bad_input(args.verb, str(disk_full_error(None, error)))
        if isinstance(error, PATH_ERRORS) and getattr(error, "filename", None):
            return _bad_input(args.verb, f"{error.filename}: {error.strerror or error}; check the path and its "
                                         "permissions")
        import traceback

        traceback.print_exc()
        print(f"segsynth {args.verb}: internal error: {type(error).__name__}: {one_line(str(error))}; this is a bug "
              "in segsynth, not in your input: please report it with the traceback above", file=sys.stderr)
        return EXIT_BUG
    finally:
        from segsynth.distributed import cleanup

        cleanup()


def _bad_input(verb: str, message: str) -> int:
    _close_progress_bars()
    print(f"segsynth {verb}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _close_progress_bars() -> None:
    """A progress bar still open when a stage stops would share the error's line: close them first."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def one_line(message: str) -> str:
    """An error message on one line. A SegsynthError raised in a DataLoader worker comes back wrapped in
    the worker's traceback ("Caught SegsynthError in DataLoader worker process 0. Original Traceback
    ..."): its own message is the traceback's last line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Traceback" in message:
        last = lines[-1]
        return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") and ": " in last else last
    return " ".join(lines)
