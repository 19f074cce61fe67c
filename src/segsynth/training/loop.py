"""`segsynth train`: an iteration-based segmenter training loop over weighted sources.

Read it in one sitting: open and check the data, build the model and the
optimizer (or resume them), draw samples from the recipe's sources
(training/stream.py), step, log, checkpoint (formats/checkpoint.py) and
evaluate (training/evaluate.py).

Determinism and resume: the n-th sample drawn in the whole run has its own
seed (it picks the sample and its augmentation), dropout is re-seeded every
iteration, and the learning rate is a pure function of the iteration, so a
run resumed from a checkpoint ends where an uninterrupted run ends.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from segsynth import IGNORE_INDEX
from segsynth.config import save_config, to_dict
from segsynth.cpu import thread_governor
from segsynth.data import open_dataset
from segsynth.data.transforms import AugmentConfig
from segsynth.data.validate import check_before_compute
from segsynth.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, is_main_process, shard
from segsynth.formats.checkpoint import (checkpoint_meta, has_checkpoint, load_optimizer_state, resolve_checkpoint,
                                         save_checkpoint)
from segsynth.io import SegsynthError, append_jsonl, atomic_write_json, read_json, rewind_jsonl
from segsynth.outputs import claim_folder
from segsynth.segmenters import create_segmenter, load_segmenter
from segsynth.segmenters.losses import training_loss
from segsynth.stage_configs import TrainConfig
from segsynth.training.evaluate import confusion_over_split, metrics_from_confusion
from segsynth.training.recipes import RECIPES
from segsynth.training.schedule import check_finite, warmup_poly
from segsynth.training.stream import DrawSampler, SampleStream, Source


def learning_rate(config: TrainConfig, iteration: int) -> float:
    """Linear warm-up, then poly decay to 0 (the SegFormer schedule)."""
    return warmup_poly(config.lr, iteration, config.warmup, config.iterations, config.poly_power)


# --- the loop --------------------------------------------------------------------


def train(config: TrainConfig, sources: list[Source] | None = None) -> Path:
    """Train a segmenter; returns the checkpoint folder. `sources` overrides the recipe (API use)."""
    with claim_folder(config.out, "train", "config.yaml", "TrainConfig", lock=is_main_process(),
                      markers=("checkpoint/segsynth.json", "checkpoint.old/segsynth.json", "metrics.jsonl",
                               "pretrain/config.yaml")):  # a pretrain-finetune run killed while pretraining
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
    check_before_compute(dataset, ["train"] + ([config.eval_split] if config.eval_split in dataset.splits else []))
    if config.recipe not in RECIPES:
        raise SegsynthError(f"unknown recipe {config.recipe!r}; options: {', '.join(RECIPES)}")
    if config.synthetic and config.recipe == "real":
        raise SegsynthError("--synthetic was given but --recipe is real; choose synthetic, joint, pretrain-finetune, replace or paste")
    criterion = training_loss(config)
    sources = sources or RECIPES[config.recipe](config, dataset)
    first = sources[0].split[0]
    native = list(first.label.shape)
    crop = _size_pair(config.crop or native)
    base = _size_pair(config.base_size or native)
    augment_config = AugmentConfig(crop=crop, base=base, scale_range=tuple(config.scale_range))

    # 2. Model and optimizer; resume state when asked and present.
    torch.manual_seed(config.seed)
    model = create_segmenter(config.model, dataset.num_classes, config.pretrained, list(dataset.classes)).to(info.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = 0
    if config.resume and has_checkpoint(out):
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
    meta = checkpoint_meta(config.model, dataset, config.data, to_dict(config), crop=list(crop), base_size=list(base))

    # 4. Iterate: forward, loss, backward, step; log, checkpoint and evaluate on schedule.
    images_per_iteration = config.batch_size * info.world_size
    bar = tqdm(total=config.iterations, initial=start, desc="train", unit="it", disable=not info.is_main,
               dynamic_ncols=True, mininterval=1.0)
    window_start, window_images, loss_sum, loss_count = time.time(), 0, 0.0, 0
    window_labelled, window_first = 0, start  # pixels with a label and a weight > 0, since window_first
    started = time.time()
    iteration = start
    model.train()
    for iteration, (images, labels, weights) in enumerate(loader, start):
        thread_governor().tick()  # load-aware thread count (segsynth.cpu)
        torch.manual_seed(config.seed * 1_000_003 + iteration * info.world_size + info.rank)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, iteration)
        images = images.to(info.device, non_blocking=True).float()
        labels = labels.to(info.device, non_blocking=True)
        weights = weights.to(info.device, non_blocking=True)
        loss = train_model(images, labels, weights, criterion)
        check_finite(loss, iteration + 1, config.iterations, config.lr,
                     f" or lengthen --warmup, and run `segsynth check-data {config.data}`", _saved_note(out), bar.close)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        loss_sum, loss_count, window_images = loss_sum + loss.item(), loss_count + 1, window_images + images_per_iteration
        window_labelled += int(((labels != IGNORE_INDEX) & (weights > 0)).sum())
        done = iteration + 1
        if done % config.log_every == 0 or done == config.iterations:
            _check_learning_signal(window_labelled, window_first, done, config, out, bar.close)
            window_labelled, window_first = 0, done
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


def _check_learning_signal(labelled: int, first: int, done: int, config: TrainConfig, out: Path,
                           before_raising=lambda: None) -> None:
    """Refuse to go on when no pixel of a whole log window had a label (and a weight): the loss is 0, nothing
    is learned, and a run that "succeeds" would save an untrained checkpoint."""
    if int(all_reduce_sum(torch.tensor([labelled], dtype=torch.int64))[0]) > 0:
        return
    before_raising()
    raise SegsynthError(f"no labelled pixel in iterations {first + 1}..{done}: every pixel drawn was ignore (255) or "
                        f"had weight 0, so the loss is 0 and nothing is learned; check the masks (`segsynth check-data "
                        f"{config.data}`) and, for filtered synthetic sets, the filter's ignored fractions (refilter "
                        f"with a larger --alpha, or train with --synthetic-masks raw); {_saved_note(out)}")


def _saved_note(out: Path) -> str:
    """What a diverged run leaves intact: the last good checkpoint, or nothing."""
    saved = out / "checkpoint" / "segsynth.json"
    if saved.is_file():
        return f"the last good checkpoint (iteration {read_json(saved).get('state', {}).get('iteration')}) is intact in {saved.parent}"
    return f"no checkpoint was saved in {out}"


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
    loaded, _ = load_segmenter(checkpoint)
    model.load_state_dict(loaded.state_dict())
    load_optimizer_state(optimizer, checkpoint / "optimizer.safetensors")
    return int(meta["state"]["iteration"])


def _load_initial_weights(model, checkpoint: str, dataset, model_name: str) -> None:
    loaded, meta = load_segmenter(resolve_checkpoint(checkpoint))
    if meta.get("model") != model_name or list(meta["classes"]) != list(dataset.classes):
        raise SegsynthError(f"{checkpoint}: a {meta.get('model')} for classes {meta['classes'][:4]}...; "
                            f"it cannot initialise this run's {model_name} for {dataset.spec} "
                            f"({dataset.num_classes} classes); give a checkpoint trained on this dataset with this "
                            "model, or leave --init-checkpoint out")
    model.load_state_dict(loaded.state_dict())


def _size_pair(values) -> tuple[int, int]:
    """H,W from one number (a square) or two (their range is checked with the config: stage_configs.CROP)."""
    if len(values) == 1:
        values = [values[0], values[0]]
    return int(values[0]), int(values[1])
