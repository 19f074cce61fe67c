"""`segsynth train`: an iteration-based segmenter training loop over weighted sources.

The loop knows nothing about recipes: it draws samples from a list of
`Source`s (a split and how many times it repeats per epoch), each sample
optionally carrying a per-pixel weight map, and ignore pixels (255) flow into
the loss. Recipes (real, synthetic, joint, ...) only decide the sources.

Determinism and resume: the n-th sample drawn in the whole run has its own
seed (it picks the sample and its augmentation), dropout is re-seeded every
iteration, and the learning rate is a pure function of the iteration, so a
run resumed from a checkpoint ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset as TorchDataset
from tqdm import tqdm

from segsynth import __version__
from segsynth.config import field, save_config, to_dict
from segsynth.data import Split, open_dataset
from segsynth.data.transforms import AugmentConfig, augment
from segsynth.data.validate import quick_check
from segsynth.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shard
from segsynth.evaluate import confusion_over_split, metrics_from_confusion
from segsynth.io import (SegsynthError, append_jsonl, atomic_write_json, default_mode, disk_full_error, is_disk_full,
                         read_json, rewind_jsonl)
from segsynth.models import create_segmenter
from segsynth.recipes import RECIPES


@dataclass
class TrainConfig:
    data: str = field(help="real dataset spec, e.g. camvid:PATH, folder:PATH or toy")
    out: str = field(help="output folder: checkpoint/, metrics.jsonl, config.yaml")
    model: str = field("segformer-b0", help="segmenter name (see models.SEGMENTERS)")
    pretrained: str | None = field(None, help="hub id or local folder to initialise from")
    recipe: str = field("real", help="real, synthetic, joint, pretrain-finetune or replace (see segsynth.recipes)")
    synthetic: list[str] = field([], help="synthetic set folder for the synthetic recipes")
    synthetic_masks: str = field("auto", help="auto (filtered when the set has them), filtered or raw")
    replace_probability: float = field(0.6, help="replace recipe: chance a real draw becomes a synthetic one (SegGen)")
    pretrain_iterations: int = field(0, help="pretrain-finetune: synthetic-stage iterations (--iterations is the real stage)")
    init_checkpoint: str | None = field(None, help="start from this segsynth checkpoint's weights")
    iterations: int = field(2000, help="training iterations")
    batch_size: int = field(8, help="images per iteration per process")
    crop: list[int] = field([], help="crop H,W (default: the first training image's size)")
    base_size: list[int] = field([], help="H,W that random resize ratios 0.5-2.0 refer to (default: first image's size)")
    scale_range: list[float] = field([0.5, 2.0], help="random resize ratio range")
    lr: float = field(6e-4, help="peak learning rate (AdamW)")
    weight_decay: float = field(0.01, help="AdamW weight decay")
    warmup: int = field(100, help="linear warm-up iterations")
    poly_power: float = field(1.0, help="poly decay power after warm-up")
    seed: int = field(0, help="run seed")
    cache_gb: float = field(2.0, help="GiB of decoded training samples kept in memory across epochs (0: none)")
    workers: int = field(1, help="data loader worker processes per training process")
    save_every: int = field(500, help="save a resumable checkpoint every N iterations")
    eval_every: int = field(0, help="evaluate on --eval-split every N iterations (0: only at the end)")
    eval_split: str = field("val", help="split evaluated during and after training ('' to skip)")
    eval_size: list[int] = field([], help="inference size H,W for evaluation (default: native)")
    resume: bool = field(False, help="continue from OUT/checkpoint if it exists")
    device: str = field("auto", help="auto, cpu or cuda")
    log_every: int = field(20, help="write a metrics.jsonl line every N iterations")


@dataclass
class Source:
    """A training source: one split, repeated `repeat` times per epoch (fractions allowed)."""

    name: str
    split: Split
    repeat: float = 1.0
    # SegGen's replace: draw of item i becomes alternatives[j], j from alternative_index[i], with this probability.
    alternatives: Split | None = None
    alternative_index: dict[int, list[int]] | None = None
    replace_probability: float = 0.0


# --- the sample stream --------------------------------------------------------


class SampleStream(TorchDataset):
    """Map-style dataset over global draw numbers g = 0, 1, 2, ...: draw g is a pure function of (seed, g).

    Each epoch lists every source's samples `repeat` times, shuffled with the epoch's seed,
    so sources mix in one stream (FreeMask's repeated-real-plus-synthetic concatenation).
    """

    def __init__(self, sources: list[Source], augment_config: AugmentConfig, seed: int, cache_bytes: int = 0):
        self.sources, self.augment_config, self.seed = sources, augment_config, seed
        self.cache = DecodedCache(cache_bytes)
        self.epoch_items = self._epoch_template()
        if len(self.epoch_items) == 0:
            raise SegsynthError("the training sources hold no samples")
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def _epoch_template(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 7])
        items = []
        for source_index, source in enumerate(self.sources):
            whole, fraction = int(source.repeat), source.repeat - int(source.repeat)
            indices = list(range(len(source.split))) * whole
            if fraction > 0:  # a fixed random subset carries the fractional repeat
                indices += rng.choice(len(source.split), int(round(fraction * len(source.split))), replace=False).tolist()
            items += [(source_index, i) for i in indices]
        return np.asarray(items, dtype=np.int64).reshape(-1, 2)

    def locate(self, draw: int) -> tuple[int, int]:
        epoch, position = divmod(draw, len(self.epoch_items))
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.random.default_rng([self.seed, 11, epoch]).permutation(len(self.epoch_items))
            self._epoch_cache = (epoch, order)
        source_index, item = self.epoch_items[self._epoch_cache[1][position]]
        return int(source_index), int(item)

    def __len__(self) -> int:  # DataLoader needs a length; draws are unbounded
        return 2**62

    def __getitem__(self, draw: int):
        source_index, item = self.locate(draw)
        source = self.sources[source_index]
        rng = np.random.default_rng([self.seed, 13, draw])
        choices = source.alternative_index.get(item) if source.alternative_index else None
        if choices and rng.random() < source.replace_probability:
            alternative = choices[int(rng.integers(len(choices)))]
            sample = self.cache.get((source_index, 1, alternative), lambda: source.alternatives[alternative])
        else:
            sample = self.cache.get((source_index, 0, item), lambda: source.split[item])
        image, label, weight = augment(sample.image, sample.label, sample.weight, self.augment_config, rng)
        weight = np.ones(label.shape, np.float32) if weight is None else weight
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(label), torch.from_numpy(weight)


class DecodedCache:
    """Decoded samples kept in this (worker) process up to a byte budget, so epochs after the first skip
    reading and decoding files: on 2 cores, decoding competes with the model for the same CPU."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used, self.items = budget_bytes, 0, {}

    def get(self, key, load) -> Sample:
        sample = self.items.get(key)
        if sample is not None:
            return sample
        sample = load()
        arrays = [a for a in (sample.image, sample.label, sample.weight) if a is not None]
        size = sum(a.nbytes for a in arrays)
        if self.used + size <= self.budget:
            for array in arrays:
                array.flags.writeable = False  # augmentation must copy, never edit, a cached sample
            self.items[key] = sample
            self.used += size
        return sample


class DrawSampler(torch.utils.data.Sampler):
    """Yields this rank's draw numbers, iteration after iteration, from `start` on."""

    def __init__(self, start: int, iterations: int, batch_size: int, info: DistInfo):
        self.start, self.iterations, self.batch_size, self.info = start, iterations, batch_size, info

    def __iter__(self):
        per_iteration = self.batch_size * self.info.world_size
        for iteration in range(self.start, self.iterations):
            first = iteration * per_iteration + self.info.rank * self.batch_size
            yield list(range(first, first + self.batch_size))

    def __len__(self) -> int:
        return self.iterations - self.start


def learning_rate(config: TrainConfig, iteration: int) -> float:
    """Linear warm-up, then poly decay to 0 (the SegFormer schedule)."""
    if iteration < config.warmup:
        return config.lr * (iteration + 1) / config.warmup
    progress = (iteration - config.warmup) / max(1, config.iterations - config.warmup)
    return config.lr * (1 - min(progress, 1.0)) ** config.poly_power


# --- checkpoints -----------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a train --out folder or its checkpoint/ folder; recover from a kill mid-swap."""
    path = Path(path)
    for candidate in (path, path / "checkpoint", path / "checkpoint.old"):
        if (candidate / "segsynth.json").is_file():
            return candidate
    raise SegsynthError(f"{path}: no segsynth checkpoint here (expected segsynth.json in it or in checkpoint/); "
                        "give a `segsynth train --out` folder")


def save_checkpoint(out: Path, model, optimizer, meta: dict) -> Path:
    """Write the whole checkpoint to a temp folder, then swap it in: never a half-written checkpoint."""
    final = out / "checkpoint"
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=out))
    os.chmod(staging, default_mode(directory=True))  # mkdtemp makes 0700; the checkpoint should not be owner-only
    try:
        model.save(staging)
        state = optimizer.state_dict()
        tensors = {f"state.{index}.{key}": value.detach().contiguous() for index, entry in state["state"].items()
                   for key, value in entry.items()}
        groups = [{k: v for k, v in group.items()} for group in state["param_groups"]]
        save_file(tensors, staging / "optimizer.safetensors", metadata={"param_groups": json.dumps(groups)})
        atomic_write_json(staging / "segsynth.json", meta)
    except BaseException as error:  # the previous checkpoint stays; the staging folder goes
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error):
            raise disk_full_error(final, error) from error
        raise
    old = out / "checkpoint.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_optimizer_state(optimizer, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        groups = json.loads(handle.metadata()["param_groups"])
    tensors = load_file(str(path))
    state: dict = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- the loop --------------------------------------------------------------------


def train(config: TrainConfig, sources: list[Source] | None = None) -> Path:
    """Train a segmenter; returns the checkpoint folder. `sources` overrides the recipe (API use)."""
    if config.recipe == "pretrain-finetune" and sources is None:
        return _pretrain_finetune(config)
    return _train_stage(config, sources)


def _pretrain_finetune(config: TrainConfig) -> Path:
    """Stage 1 on the synthetic sets (OUT/pretrain), stage 2 on real data from its weights (OUT)."""
    if config.pretrain_iterations <= 0:
        raise SegsynthError("recipe pretrain-finetune needs --pretrain-iterations N > 0 (the synthetic stage)")
    pretrain = replace(config, recipe="synthetic", iterations=config.pretrain_iterations,
                       out=str(Path(config.out) / "pretrain"), eval_every=0)
    checkpoint = _train_stage(pretrain, None)
    finetune = replace(config, recipe="real", synthetic=[], init_checkpoint=str(checkpoint), pretrain_iterations=0)
    result = _train_stage(finetune, None)
    if init_distributed(config.device).is_main:
        save_config(config, Path(config.out) / "config.yaml")  # the whole recipe, not just stage 2
    return result


def _train_stage(config: TrainConfig, sources: list[Source] | None) -> Path:
    out = Path(config.out)
    info = init_distributed(config.device)

    # 1. Open and check the data before any compute; resolve defaults from the first image.
    dataset = open_dataset(config.data)
    quick_check(dataset, ["train"] + ([config.eval_split] if config.eval_split in dataset.splits else []))
    if config.recipe not in RECIPES:
        raise SegsynthError(f"unknown recipe {config.recipe!r}; options: {', '.join(RECIPES)}")
    if config.synthetic and config.recipe == "real":
        raise SegsynthError("--synthetic was given but --recipe is real; choose synthetic, joint, pretrain-finetune or replace")
    sources = sources or RECIPES[config.recipe](config, dataset)
    first = sources[0].split[0]
    native = list(first.label.shape)
    crop = _size_pair(config.crop or native, "crop")
    base = _size_pair(config.base_size or native, "base_size")
    augment_config = AugmentConfig(crop=crop, base=base, scale_range=tuple(config.scale_range))

    # 2. Model and optimizer; resume state when asked and present.
    torch.manual_seed(config.seed)
    model = create_segmenter(config.model, dataset.num_classes, config.pretrained, list(dataset.classes)).to(info.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = 0
    if config.resume and any((out / name / "segsynth.json").is_file() for name in ("checkpoint", "checkpoint.old")):
        start = _resume(out, model, optimizer, config, dataset)
        if info.is_main:  # lines logged after that checkpoint, before the kill, are logged again from here
            rewind_jsonl(out / "metrics.jsonl", keep=lambda record: record.get("iteration", 0) <= start)
    elif config.init_checkpoint:
        _load_initial_weights(model, config.init_checkpoint, dataset, config.model)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    barrier()
    train_model = model
    if info.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)

    # 3. The stream of samples this rank draws, from the resumed iteration on.
    cache_bytes = int(config.cache_gb * 2**30 / max(config.workers, 1))  # each worker keeps its own
    stream = SampleStream(sources, augment_config, config.seed, cache_bytes)
    loader = DataLoader(
        stream, batch_sampler=DrawSampler(start, config.iterations, config.batch_size, info),
        num_workers=config.workers, persistent_workers=False, pin_memory=info.device.type == "cuda",
        prefetch_factor=4 if config.workers > 0 else None,
    )
    meta = _meta(config, dataset, crop, base)

    # 4. Iterate: forward, loss, backward, step; log, checkpoint and evaluate on schedule.
    images_per_iteration = config.batch_size * info.world_size
    bar = tqdm(total=config.iterations, initial=start, desc="train", unit="it", disable=not info.is_main,
               dynamic_ncols=True, mininterval=1.0)
    window_start, window_images, loss_sum, loss_count = time.time(), 0, 0.0, 0
    started = time.time()
    iteration = start
    model.train()
    for iteration, (images, labels, weights) in enumerate(loader, start):
        torch.manual_seed(config.seed * 1_000_003 + iteration * info.world_size + info.rank)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, iteration)
        images = images.to(info.device, non_blocking=True).float()
        labels = labels.to(info.device, non_blocking=True)
        weights = weights.to(info.device, non_blocking=True)
        loss = train_model(images, labels, weights)
        if not torch.isfinite(loss):
            bar.close()  # so the error starts on a line of its own
            raise SegsynthError(non_finite_loss_message(loss.item(), iteration + 1, config, out))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        loss_sum, loss_count, window_images = loss_sum + loss.item(), loss_count + 1, window_images + images_per_iteration
        done = iteration + 1
        if info.is_main and (done % config.log_every == 0 or done == config.iterations):
            rate = window_images / max(time.time() - window_start, 1e-9)
            record = {"iteration": done, "loss": round(loss_sum / loss_count, 5), "lr": learning_rate(config, iteration),
                      "images_per_s": round(rate, 2), "elapsed_s": round(time.time() - started, 1)}
            append_jsonl(out / "metrics.jsonl", record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{rate:.1f}")
            window_start, window_images, loss_sum, loss_count = time.time(), 0, 0.0, 0
        bar.update(1)
        if done % config.save_every == 0 and done < config.iterations and info.is_main:
            save_checkpoint(out, model, optimizer, {**meta, "state": {"iteration": done, "finished": False}})
        if config.eval_every and done % config.eval_every == 0 and done < config.iterations:
            _evaluate_during_training(model, dataset, config, info, out, done)
            model.train()
    bar.close()

    # 5. Final checkpoint, then the end-of-training evaluation.
    if info.is_main:
        seconds = time.time() - started
        state = {"iteration": config.iterations, "finished": True, "train_seconds": round(seconds, 1),
                 "images_per_s": round((config.iterations - start) * images_per_iteration / max(seconds, 1e-9), 2)}
        save_checkpoint(out, model, optimizer, {**meta, "state": state})
    barrier()
    if config.eval_split and config.eval_split in dataset.splits:
        _evaluate_during_training(model, dataset, config, info, out, config.iterations)
    return out / "checkpoint"


def non_finite_loss_message(value: float, iteration: int, config: TrainConfig, out: Path) -> str:
    """What to do when the loss turns NaN/inf: the iteration (1-based, as metrics.jsonl counts), a lower
    learning rate, and where the last good checkpoint is (nothing is written after the bad step)."""
    message = (f"non-finite loss ({value}) at iteration {iteration} of {config.iterations}: training diverged; "
               f"lower the learning rate (--lr {config.lr:g} now; try {config.lr / 10:g}) or lengthen --warmup, "
               f"and run `segsynth check-data {config.data}`")
    saved = out / "checkpoint" / "segsynth.json"
    if saved.is_file():
        state = read_json(saved).get("state", {})
        message += f"; the last good checkpoint (iteration {state.get('iteration')}) is intact in {saved.parent}"
    else:
        message += f"; no checkpoint was saved in {out}"
    return message


def _evaluate_during_training(model, dataset, config: TrainConfig, info: DistInfo, out: Path, iteration: int) -> dict:
    split = dataset.split(config.eval_split)
    indices = shard(list(range(len(split))), info.rank, info.world_size)
    confusion = confusion_over_split(model, split, dataset.num_classes, info.device, config.eval_size or None,
                                     indices=indices, progress=False)
    confusion = all_reduce_sum(torch.from_numpy(confusion)).numpy()
    metrics = metrics_from_confusion(confusion, dataset.classes)
    if info.is_main:
        append_jsonl(out / "metrics.jsonl", {"iteration": iteration, "split": config.eval_split,
                                            "miou": round(metrics["miou"], 3), "aacc": round(metrics["aacc"], 3)})
        if iteration == config.iterations:
            atomic_write_json(out / f"metrics_{config.eval_split}.json", {**metrics, "split": config.eval_split,
                                                                          "data": config.data, "iteration": iteration})
        tqdm.write(f"[iteration {iteration}] {config.eval_split} mIoU {metrics['miou']:.2f}  aAcc {metrics['aacc']:.2f}")
    return metrics


def _resume(out: Path, model, optimizer, config: TrainConfig, dataset) -> int:
    checkpoint = resolve_checkpoint(out)
    meta = read_json(checkpoint / "segsynth.json")
    if meta.get("model") != config.model or meta.get("classes") != list(dataset.classes):
        raise SegsynthError(f"{checkpoint}: was trained with model {meta.get('model')} on classes {meta.get('classes')}; "
                            f"cannot resume it as {config.model} on {config.data}. Use a new --out")
    saved = {k: v for k, v in meta.get("train_config", {}).items() if k not in ("out", "resume", "iterations", "eval_every", "save_every", "workers", "cache_gb", "device", "log_every")}
    current = {k: v for k, v in to_dict(config).items() if k in saved}
    if saved != current:
        changed = sorted(k for k in saved if saved[k] != current.get(k))
        raise SegsynthError(f"{checkpoint}: settings differ from the run being resumed ({', '.join(changed)}); "
                            "resume with the same settings or use a new --out")
    from segsynth.models import load_segmenter

    loaded, _ = load_segmenter(checkpoint)
    model.load_state_dict(loaded.state_dict())
    load_optimizer_state(optimizer, checkpoint / "optimizer.safetensors")
    return int(meta["state"]["iteration"])


def _load_initial_weights(model, checkpoint: str, dataset, model_name: str) -> None:
    from segsynth.models import load_segmenter

    loaded, meta = load_segmenter(resolve_checkpoint(checkpoint))
    if meta.get("model") != model_name or list(meta["classes"]) != list(dataset.classes):
        raise SegsynthError(f"{checkpoint}: a {meta.get('model')} for classes {meta['classes'][:4]}...; "
                            f"it cannot initialise this run's {model_name} for {dataset.spec} "
                            f"({dataset.num_classes} classes); give a checkpoint trained on this dataset with this "
                            "model, or leave --init-checkpoint out")
    model.load_state_dict(loaded.state_dict())


def _meta(config: TrainConfig, dataset, crop, base) -> dict:
    return {"format": "segsynth-checkpoint/1", "segsynth_version": __version__, "model": config.model,
            "classes": list(dataset.classes), "palette": [list(c) for c in dataset.palette],
            "data": config.data, "train_config": to_dict(config), "crop": list(crop), "base_size": list(base)}


def _size_pair(values, name: str) -> tuple[int, int]:
    if len(values) == 1:
        values = [values[0], values[0]]
    if len(values) != 2 or min(values) < 8:
        raise SegsynthError(f"--{name.replace('_', '-')} takes H,W (or one number for a square), each >= 8; got {values}")
    return int(values[0]), int(values[1])
