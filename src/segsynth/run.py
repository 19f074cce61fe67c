"""`segsynth run`: one method's stages and arms on one dataset, and their table.

  1. check the data once
  2. train the real-only reference segmenters (the "real" arm; its first seed also
     scores pixels for the methods that need a real-data segmenter); when no stage still
     to run scores with it, the real arm trains in step 4 beside the others instead
  3. the method's stages (FreeMask: class statistics, plans, generator, synthesis, filter;
     SegGen: captions, text -> mask generator, mask set, MaskSyn and ImgSyn images, mask quality),
     each a `Stage` (name, action, done, reads_reference) from `Method.stages`
  4. every other arm with every seed, each evaluated on the held-out split (`parallel`: N trainings at
     once, in worker processes sharing the cores); arms a method derives from the run's settings
     (`Method.variants`: FreeMask's filter and volume sweeps) are arms like the others
  5. the closed loop (`rounds`): per round, the method's `round_stages`, then that round's arms
  6. results.json, results.md, the printed tables, the method's grids (segsynth.report) and
     report.html (segsynth.html_report, from the files alone)

A method (segsynth.methods) is a plain list of stages and arms; this module
knows no method. `--method all` (methods/compare.py) is one more row of METHODS:
the three methods' arms and stages over one real reference. Every stage writes to its own folder under OUT and is skipped
when its output is already complete, so an interrupted run continues where it
stopped; the checkpoints of every arm stay, for `segsynth evaluate` later.

Config: `RunConfig` (segsynth.stage_configs) holds the run's own keys and one
section per stage; a stage's config is built from its section plus what the
run decides (data, out, seeds, recipe ...). Sizes come from `PRESETS`, by data
kind and preset name; the user's keys override them key by key.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from segsynth.config import build_config, check_values, coerce_values, save_config
from segsynth.data import Dataset, open_dataset
from segsynth.data.toy import TOY_CLASSES
from segsynth.data.validate import check_before_compute
from segsynth.io import SegsynthError, atomic_write_json, read_json
from segsynth.generators import TRAINERS, train_generator_kind
from segsynth.methods.base import Arm, Method, Stage
from segsynth.methods.attn2mask.method import ATTN2MASK
from segsynth.methods.compare import COMPARE
from segsynth.methods.freemask.method import FREEMASK
from segsynth.methods.seggen.method import SEGGEN
from segsynth.html_report import write_report
from segsynth.outputs import claim_folder
from segsynth.report import PARALLEL_MARK, format_tables, write_results
from segsynth.stage_configs import RUN_SECTIONS, ReportConfig, RunConfig, TrainConfig, TrainGeneratorConfig
from segsynth.training.loop import train

TOY_GENERATOR = Path(__file__).parent / "assets" / "toy_generator"
MASK_TO_IMAGE_KINDS = ("builtin", "latent")  # the train-generator kinds a run can render real masks with

# name -> method (methods/base.py). `segsynth run --method NAME`; a new method is one more row.
METHODS = {
    "freemask": FREEMASK,
    "seggen": SEGGEN,
    "attn2mask": ATTN2MASK,
    "all": COMPARE,  # the three above side by side (methods/compare.py)
}

# Sizes by data kind ("toy" for the built-in data, "real" for any other) and preset. Each preset is
# merged over BASE, key by key inside sections, then the method's own `presets` entry; the user's keys
# are merged over the result.
BASE = {
    "images_per_mask": 2, "seeds": [0, 1], "grids": 6,
    "train": {"model": "segformer-tiny", "iterations": 600, "batch_size": 8, "lr": 2e-3, "warmup": 50, "workers": 1},
    "train_generator": {"size": [64, 80], "channels": [32, 64, 128], "layers_per_block": 2, "iterations": 3000,
                        "max_minutes": 3.0, "batch_size": 16},
    "synthesize": {"steps": 12, "batch_size": 16},
    "plan": {"nmax": 20},
    "filter": {"alpha": 1.25},
    "train_text_generator": {"size": [64, 80], "channels": [32, 64, 128], "layers_per_block": 1, "iterations": 3000,
                             "max_minutes": 1.25, "batch_size": 16},
}
PRESETS = {
    ("toy", "default"): {},
    ("toy", "quick"): {"data": "toy:n=120,n_val=40,size=64x80", "seeds": [0], "images_per_mask": 1, "grids": 4,
                       "train": {"iterations": 200}, "synthesize": {"steps": 8},
                       "train_generator": {"max_minutes": 0.75}, "train_text_generator": {"max_minutes": 0.5}},
    # `make demo`: the three methods side by side (--method all) in a few minutes on 2 cores. Against the
    # default: 1 image per real mask instead of 2 (240 per synthetic arm), 300 training iterations instead of
    # 600, 8 denoising steps instead of 12; still 2 seeds, so every arm has a spread.
    ("toy", "demo"): {"seeds": [0, 1], "images_per_mask": 1, "train": {"iterations": 300},
                      "synthesize": {"steps": 8}},
    ("real", "quick"): {"seeds": [0], "images_per_mask": 1,
                        "train": {"model": "segformer-tiny", "iterations": 300, "crop": [128, 160]},
                        "train_generator": {"size": [64, 80], "max_minutes": 3.0},
                        "train_text_generator": {"size": [48, 64], "max_minutes": 3.0}},
    # Trained at the built-in generator's 96x128, so that real and synthetic images are equally sharp
    # (a 96x128 sample blown up to 180x240 is blurry next to a real photo); evaluated at 96x128 too,
    # predictions resized to the full-size labels. 2,000 x 16 = 87 epochs of CamVid per arm.
    ("real", "default"): {"seeds": [0, 1], "images_per_mask": 1,
                          "train": {"model": "segformer-small", "iterations": 2000, "batch_size": 16, "lr": 1e-3,
                                    "warmup": 100, "base_size": [96, 128], "crop": [96, 128], "eval_size": [96, 128]},
                          "train_generator": {"size": [96, 128], "channels": [64, 128, 256], "max_minutes": 20.0,
                                              "iterations": 20000},
                          "synthesize": {"steps": 20},
                          "train_text_generator": {"size": [96, 128], "channels": [32, 64, 128], "layers_per_block": 2,
                                                   "max_minutes": 20.0, "iterations": 20000, "lr": 5e-4,
                                                   "warmup": 100}},
}


def resolve_run_config(values: dict, source: str = "run config") -> RunConfig:
    """Defaults < BASE < preset (toy or real-data variant) < the user's values; sections checked against
    their stage configs, arms against the method's. `source` names where the values came from in errors."""
    check_values(RunConfig, coerce_values(RunConfig, values, source), source)  # the preset and method first
    preset = values.get("preset", "default")
    data = values.get("data") or PRESETS[("toy", preset)].get("data") or RunConfig.data
    kind = "toy" if data.split(":")[0] == "toy" else "real"
    if (kind, preset) not in PRESETS:
        raise SegsynthError(f"preset {preset!r} has no sizes for {kind} data ({data}); options for {kind} data: "
                            f"{', '.join(name for k, name in PRESETS if k == kind)}")
    method = METHODS.get(values.get("method", RunConfig.method))
    method_sizes = method.preset(kind, preset) if method else {}
    merged = _merge(_merge(_merge(BASE, PRESETS[(kind, preset)]), method_sizes), values)
    if values.get("volumes") and "images_per_mask" not in values:  # render once, at the largest volume compared
        merged["images_per_mask"] = max(coerce_values(RunConfig, {"volumes": values["volumes"]}, source)["volumes"])
    if method and method.configure:
        merged = method.configure(merged, values, kind, preset)
    config = build_config(RunConfig, merged, source)
    method = method_of(config)
    if config.per_method and not method.configure:
        raise SegsynthError(f"run config key 'per_method' is for --method all (a member method's own keys); "
                            f"--method {config.method} takes its sections at the top level")
    for section, (stage_config, owned) in RUN_SECTIONS.items():
        check_section(section, getattr(config, section), stage_config, owned, source)
    for member, keys in config.per_method.items():  # sections of one member method (--method all)
        for section in set(keys) & set(RUN_SECTIONS):
            check_section(f"per_method.{member}.{section}", keys[section], *RUN_SECTIONS[section], source)
    config = with_derived_arms(config, method)
    check_pretrain_split(config, method, source)
    check_paste_classes(config, method, source)
    return config


def with_derived_arms(config: RunConfig, method: Method) -> RunConfig:
    """The run's arms: the named ones of the method's table (default: its main arms, or all), then the arms the
    method derives from the run's settings (sweeps, closed-loop rounds). Derived names may be listed too (a saved
    run.config.yaml lists them); they are derived again, so resolving a resolved config changes nothing."""
    sweeps = [key for key in ("filter_alphas", "filter_judges", "volumes", "synthetic_shares", "rounds")
              if getattr(config, key)]
    if sweeps and method.variants is None:
        raise SegsynthError(f"run config key(s) {', '.join(sweeps)}: method {config.method} derives no arms; the "
                            "filter, volume and share sweeps and the closed loop are freemask's (--method freemask)")
    # An arm that needs a run key (e.g. target_images) runs by default only when the key is set, and is refused
    # when named without it.
    unmet = [arm for arm in config.arms if arm in method.arms and method.arms[arm].needs
             and not getattr(config, method.arms[arm].needs)]
    if unmet:
        needs = method.arms[unmet[0]].needs
        raise SegsynthError(f"arm(s) {', '.join(unmet)} of method {config.method} need the run key {needs!r} "
                            f"(--{needs.replace('_', '-')}); give it, or leave the arm(s) out")
    main = list(method.main_arms or method.arms)
    met = [arm for arm in method.arms if method.arms[arm].needs and getattr(config, method.arms[arm].needs)]
    chosen = [arm for arm in config.arms if arm in method.arms] if config.arms else \
        [arm for arm in main if not method.arms[arm].needs or arm in met] + [arm for arm in met if arm not in main]
    derived = method.variants(dataclasses.replace(config, arms=chosen)) if method.variants else {}
    unknown = [arm for arm in config.arms if arm not in method.arms and arm not in derived]
    if unknown:
        raise SegsynthError(f"unknown arm(s) {', '.join(unknown)} for method {config.method}; "
                            f"options: {', '.join([*method.arms, *derived])}")
    return dataclasses.replace(config, arms=chosen + [name for name in derived if name not in chosen])


def check_pretrain_split(config: RunConfig, method: Method, source: str) -> None:
    """pretrain-finetune arms split their iterations by pretrain_fraction: both stages need an iteration."""
    table = method.arm_table(config)
    for name in config.arms:
        if table[name].recipe != "pretrain-finetune":
            continue
        iterations = arm_iterations(config, table[name])
        pretrain = int(round(iterations * config.pretrain_fraction))
        if not 1 <= pretrain <= iterations - 1:
            raise SegsynthError(f"{source}: pretrain_fraction {config.pretrain_fraction} of {name}'s train iterations "
                                f"{iterations} gives {pretrain} pretraining and {iterations - pretrain} fine-tuning "
                                "iterations; each stage of the pretrain-finetune arms needs at least 1: raise train "
                                "iterations or change pretrain_fraction")


def check_paste_classes(config: RunConfig, method: Method, source: str) -> None:
    """A paste arm pastes the train section's paste_classes; without them it would fail only when trained."""
    table = method.arm_table(config)
    pasting = [name for name in config.arms if table[name].recipe == "paste"]
    if pasting and not config.train.get("paste_classes"):
        raise SegsynthError(f"{source}: arm(s) {', '.join(pasting)} paste the train section's paste_classes onto "
                            f"real images, and it names none; add e.g. train: {{paste_classes: [pole, sign]}} "
                            f"(class names of {config.data}), or leave the arm(s) out")


def arm_iterations(config: RunConfig, arm: Arm) -> int:
    """An arm's training iterations: its own (a volume arm scaled with K) or the run's train section's."""
    own = dict(arm.train).get("iterations")
    return int(own if own is not None else
               config.train.get("iterations", TrainConfig.__dataclass_fields__["iterations"].default))


def method_of(config: RunConfig) -> Method:
    if config.method not in METHODS:
        raise SegsynthError(f"unknown method {config.method!r}; options: {', '.join(METHODS)}")
    return METHODS[config.method]


def check_section(section: str, values: dict, stage_config: type, owned: tuple[str, ...],
                  source: str = "run config") -> None:
    """A section may hold its stage config's keys, except those the run sets itself, each in its range."""
    where = f"--{section.replace('_', '-')}" if source == "command line" else f"{source} section {section!r}"
    allowed = [f.name for f in dataclasses.fields(stage_config) if f.name not in owned]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise SegsynthError(f"{where}: unknown key(s) {', '.join(unknown)} "
                            f"(the run sets {', '.join(owned)} itself); valid keys: {', '.join(allowed)}")
    check_values(stage_config, coerce_values(stage_config, values, where), where)


def _merge(base: dict, update: dict) -> dict:
    """`update` over `base`, merging the stage sections key by key."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if key in RUN_SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass
class RunContext:
    """What the method's stages need: the config, the folder, the data, stage configs built from sections."""

    config: RunConfig
    out: Path
    dataset: Dataset
    seconds: dict = field(default_factory=dict)
    pool: object = None  # the training worker processes (config.parallel > 1), started on first use

    def worker_pool(self):
        """`config.parallel` spawned worker processes, each with its share of this process's torch threads (at
        least one), kept for the whole run (a worker pays its imports once). Spawned, not forked: forking a
        process whose OpenMP threads have run can hang the child."""
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            import torch

            threads = max(1, torch.get_num_threads() // self.config.parallel)
            self.pool = ProcessPoolExecutor(max_workers=self.config.parallel, initializer=_quiet_worker,
                                            initargs=(threads,), mp_context=multiprocessing.get_context("spawn"))
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None

    def stage_config(self, cls: type, section: str, defaults: dict | None = None, **run_values):
        """`cls` from `defaults` < the run's section < what the run decides."""
        return build_config(cls, {**(defaults or {}), **getattr(self.config, section), **run_values},
                            f"run config section {section!r}")

    @property
    def train_settings(self) -> TrainConfig:
        return self.stage_config(TrainConfig, "train", data=self.config.data, out=str(self.out))

    @property
    def reference_segmenter(self) -> Path:
        """The first seed's real-only segmenter: it scores synthetic pixels (FreeMask's statistics and filter)."""
        return arm_dir(self.out, "real", self.config.seeds[0])

    def arm_folder(self, arm: str, seed: int) -> Path:
        """Where an arm's training with one seed writes (checkpoint/, metrics_<split>.json)."""
        return arm_dir(self.out, arm, seed)

    def arm_table(self) -> dict[str, Arm]:
        """Every arm of the run by name, the derived ones included."""
        return method_of(self.config).arm_table(self.config)

    def synthetic_set(self, name: str) -> Path:
        return self.out / "synthetic" / name

    def generator_stages(self) -> tuple[list[Stage], str]:
        """The mask-to-image generator the method renders with: given, shipped (toy data), or trained here.
        Returns its stages (none, or the training) and its spec."""
        generator = self.config.generator
        if generator == "auto":
            generator = shipped_toy_generator(self.dataset) or "train"
            if generator != "train":
                say(f"[skip] train generator: using the one shipped for toy data ({generator})")
        if generator != "train":
            return [], generator
        folder = self.out / "generator"
        config = self.stage_config(TrainGeneratorConfig, "train_generator",
                                   defaults={"sample_steps": self.config.synthesize.get("steps", 20)},
                                   data=self.config.data, out=str(folder), resume=True, device=self.config.device)
        if config.kind not in MASK_TO_IMAGE_KINDS:
            raise SegsynthError(f"run config section 'train_generator': kind {config.kind!r} does not render masks; "
                                f"options: {', '.join(MASK_TO_IMAGE_KINDS)}")
        return [Stage("train generator", lambda: train_generator_kind(config), lambda: _generator_finished(folder))], \
            f"{TRAINERS[config.kind][1]}:{folder}"


def run(config: RunConfig) -> dict:
    """Run the method end to end (resumable); returns the results dict also written to OUT/results.json."""
    with claim_folder(config.out, "run", "run.config.yaml", "RunConfig", markers=("results.json",)):
        return _run(config)


def _run(config: RunConfig) -> dict:
    method = method_of(config)
    out = Path(config.out)

    # 1. The data, checked once before any compute, and the method's stage list (making it checks its settings,
    #    such as the files it names): a run refused here leaves no file behind.
    dataset = open_dataset(config.data)
    check_before_compute(dataset, ["train", config.eval_split])
    context = RunContext(config, out, dataset, _read_seconds(out))
    table = method.arm_table(config)
    arms = [table[name] for name in config.arms]
    stages = method.stages(context, arms) if any(arm.synthetic for arm in arms) else []
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "run.config.yaml")
    atomic_write_json(out / "classes.json", {"data": config.data, "classes": list(dataset.classes),  # for reports
                                             "palette": [list(c) for c in dataset.palette], "ignore_index": 255})
    say(f"segsynth run --method {config.method}: {config.data} ({len(dataset.split('train'))} train / "
        f"{len(dataset.split(config.eval_split))} {config.eval_split}), arms: {', '.join(config.arms)}, "
        f"seeds {config.seeds}")
    try:
        # 2. Real-only reference segmenters, first when a stage still to run scores with them. When none does
        #    (a run derived from another one's statistics and filtered sets), they train beside the other arms.
        real_jobs = [(method.arms["real"], seed) for seed in config.seeds]
        other_jobs = [(arm, seed) for arm in arms if arm.name != "real" and arm.round == 0 for seed in config.seeds]
        real_first = not other_jobs or any(stage.reads_reference and not stage.done() for stage in stages)
        if real_first:
            train_arms(context, real_jobs, "real arm")

        # 3. The method's own stages (statistics, plans, generators, synthesis, filters ...).
        for stage in stages:
            _run_stage(context, stage)

        # 4. Every other arm of the first round, every seed.
        train_arms(context, other_jobs if real_first else real_jobs + other_jobs,
                   "other arms" if real_first else "all arms")

        # 5. The closed loop: round r's data from round r-1's models, then round r's arms.
        for r in range(1, config.rounds + 1):
            for stage in method.round_stages(context, r):
                _run_stage(context, stage)
            train_arms(context, [(arm, seed) for arm in arms if arm.round == r for seed in config.seeds],
                       f"round {r} arms")
    finally:
        context.close()

    # 6. Tables, grids and the HTML report (which reads only the files written so far).
    if any(arm.synthetic for arm in arms):
        _run_stage(context, Stage("grids", lambda: method.grids(context)))
    results = write_results(context, method)
    report = write_report(ReportConfig(run=str(out)))
    say(f"\n{format_tables(results)}\n\nresults: {out / 'results.md'}, {out / 'results.json'}; report: {report}")
    return results


def arm_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "arms" / arm / f"seed{seed}"


def train_arm(context: RunContext, arm: Arm, seed: int) -> None:
    """Train one arm with one seed (its recipe and synthetic sets over the run's shared train section)."""
    config = context.config
    folder = arm_dir(context.out, arm.name, seed)
    if (folder / f"metrics_{config.eval_split}.json").is_file():
        return  # finished earlier
    iterations = arm_iterations(config, arm)
    pretrain = int(round(iterations * config.pretrain_fraction)) if arm.recipe == "pretrain-finetune" else 0
    own = {key: value for key, value in arm.train if key != "iterations"}
    if arm.init_from:  # e.g. a closed-loop round that continues the previous round's model of this seed
        own["init_checkpoint"] = str(arm_dir(context.out, arm.init_from, seed))
    train(context.stage_config(
        TrainConfig, "train", defaults={"save_every": max(100, iterations // 4), "log_every": max(10, iterations // 20)},
        **own, data=config.data, out=str(folder), recipe=arm.recipe, synthetic_masks=arm.masks,
        synthetic=[str(context.synthetic_set(name)) for name in arm.synthetic],
        iterations=iterations - pretrain, pretrain_iterations=pretrain, seed=seed, resume=True,
        eval_split=config.eval_split, device=config.device))


def train_arms(context: RunContext, jobs: list[tuple[Arm, int]], group: str) -> None:
    """Train (arm, seed) pairs: one after another, or `config.parallel` at once in worker processes, each
    with its share of the CPU threads. A small segmenter uses two cores poorly (its OpenMP team waits at
    barriers more than it computes), so two one-thread trainings side by side finish sooner than the same two
    run one after the other on two threads; each training's result depends only on its own settings and
    seed (and, by float rounding, its thread count)."""
    names = {(arm.name, seed): f"train {arm.name} seed {seed}" for arm, seed in jobs}
    pending = []
    for arm, seed in jobs:
        if (arm_dir(context.out, arm.name, seed) / f"metrics_{context.config.eval_split}.json").is_file():
            say(f"[skip] {names[(arm.name, seed)]}: already done")
        else:
            pending.append((arm, seed))
    workers = min(max(1, context.config.parallel), len(pending))
    if workers <= 1:
        for arm, seed in pending:
            _run_stage(context, Stage(names[(arm.name, seed)], lambda a=arm, s=seed: train_arm(context, a, s)))
        return
    from concurrent.futures import as_completed

    say(f"[stage] {group}: {len(pending)} trainings, {context.config.parallel} at once")
    started = time.time()
    pool = context.worker_pool()
    futures = {pool.submit(_train_arm_in_worker, context.config, arm.name, seed): (arm.name, seed)
               for arm, seed in pending}
    for future in as_completed(futures):
        seconds = future.result()  # a worker's error is raised here
        name = names[futures[future]]
        context.seconds[name + PARALLEL_MARK] = round(context.seconds.get(name + PARALLEL_MARK, 0.0) + seconds, 1)
        atomic_write_json(context.out / "seconds.json", context.seconds)
        say(f"[done] {name}: {seconds:.0f} s")
    wall = f"{group}: {len(pending)} trainings, {context.config.parallel} at once (wall)"
    context.seconds[wall] = round(context.seconds.get(wall, 0.0) + time.time() - started, 1)
    atomic_write_json(context.out / "seconds.json", context.seconds)


def _quiet_worker(threads: int) -> None:
    """A training worker: its share of the threads, and no progress bars of its own (they would interleave).
    A spawned process inherits "spawn" as its default start method; its trainings' data loader workers are
    forked again, as in a `segsynth train` process (their dataset closures cannot be pickled for spawn)."""
    import multiprocessing
    import os

    import torch

    multiprocessing.set_start_method(None, force=True)  # back to the platform's default (fork on Linux)
    os.environ["TQDM_DISABLE"] = "1"
    torch.set_num_threads(threads)


def _train_arm_in_worker(config: RunConfig, arm_name: str, seed: int) -> float:
    started = time.time()
    context = RunContext(config, Path(config.out), open_dataset(config.data))
    train_arm(context, method_of(config).arm_table(config)[arm_name], seed)
    return time.time() - started


def shipped_toy_generator(dataset) -> str | None:
    """The generator shipped for the toy classes (configs/toy_generator.yaml), if installed."""
    meta = TOY_GENERATOR / "segsynth_generator.json"
    if tuple(dataset.classes) == TOY_CLASSES and meta.is_file():
        return f"builtin:{TOY_GENERATOR}"
    return None


def _generator_finished(folder: Path) -> bool:
    meta = folder / "segsynth_generator.json"
    return meta.is_file() and read_json(meta).get("training", {}).get("finished", False)


def _run_stage(context: RunContext, stage: Stage) -> None:
    """Run one stage (unless done), timing it; seconds add up across resumed runs."""
    if stage.done():
        say(f"[skip] {stage.name}: already done")
        return
    say(f"[stage] {stage.name}")
    started = time.time()
    stage.action()
    context.seconds[stage.name] = round(context.seconds.get(stage.name, 0.0) + time.time() - started, 1)
    atomic_write_json(context.out / "seconds.json", context.seconds)


def _read_seconds(out: Path) -> dict:
    path = out / "seconds.json"
    return read_json(path) if path.is_file() else {}


def say(message: str) -> None:
    tqdm.write(message)
