"""The iteration loop the single-process diffusion trainers share: the mask -> image generators
(generators/builtin, and generators/latent through `train_denoiser`), the builtin text generator
(generators/builtin_text) and `segsynth adapt`'s LoRA (generators/adapt.py). The text2mask-sd trainer, whose
processes agree on a shared clock and batch reader, keeps its own.

Each trainer builds its networks, its batches and its saving; `run_iterations` runs the iterations:

  1. the learning rate, a function of the iteration and the progress (`warmup_cosine`);
  2. the trainer's loss on the iteration's batch, and the divergence check (nothing is written after a bad step);
  3. an optimizer step with the gradients clipped at norm 1 (through a grad scaler under fp16), then the EMA
     update (where the trainer keeps an EMA);
  4. a train_log.jsonl line every `log_every` iterations, a save every `save_every` (and a kept snapshot every
     `keep_every`), and the final save.

Progress runs on iterations, or on training time when `max_minutes` is set. The time budget counts the training
time of every session of a run (the seconds a resumed run had trained before count too), so a killed training
resumed ends where the uninterrupted one would have, with the learning rate following one schedule; a run that
spent its budget trains further only with a larger --max-minutes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from segsynth.cpu import thread_governor
from segsynth.generators.base import duration_text
from segsynth.io import append_jsonl, rewind_jsonl
from segsynth.training.schedule import check_finite, warmup_cosine

LOG_FILE = "train_log.jsonl"


@dataclass
class TrainingParts:
    """What a trainer hands the loop."""

    name: str  # the verb, for the progress bar and messages ("train-generator")
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: EMAModel | None
    batch_loss: Callable[[int], torch.Tensor]  # iteration -> the loss on that iteration's batch
    save: Callable[[dict], None]  # the training statistics -> the model and its training state, swapped in whole
    saved_note: Callable[[], str]  # what is intact on disk, for the divergence error
    keep: Callable[[int], None] | None = None  # iteration -> keep a copy of the model just saved (a snapshot)
    peak_lr: float | None = None  # the schedule's peak learning rate; default: config.lr
    scaler: torch.amp.GradScaler | None = None  # fp16 autocast's loss scaling


def start_log(out: Path, start: int) -> Path:
    """OUT/train_log.jsonl: rewound to the resumed iteration (lines logged after the save, before the kill, are
    logged again), or started afresh."""
    log_path = out / LOG_FILE
    if start:
        rewind_jsonl(log_path, keep=lambda record: record.get("iteration", 0) <= start)
    else:
        log_path.unlink(missing_ok=True)
    return log_path


def budget_spent(config, seconds_before: float) -> bool:
    """Whether a resumed run already trained for its whole --max-minutes."""
    return config.max_minutes > 0 and seconds_before >= config.max_minutes * 60.0


def run_iterations(config, out: Path, parts: TrainingParts, start: int, seconds_before: float) -> None:
    """Iterations `start` .. config.iterations (or until the time budget is spent), then the final save.
    `config` gives iterations, max_minutes, lr (unless `parts.peak_lr`), warmup, batch_size, log_every,
    save_every (and keep_every)."""
    if start >= config.iterations:
        tqdm.write(f"{out}: already trained for {start} iterations (--iterations {config.iterations}); nothing to do")
        return
    if budget_spent(config, seconds_before):
        tqdm.write(f"{out}: already trained for its --max-minutes {config.max_minutes:g} ({start} iterations); "
                   "give a larger --max-minutes to train it further")
        return
    log_path = start_log(out, start)
    keep_every = getattr(config, "keep_every", 0) if parts.keep is not None else 0
    peak_lr = parts.peak_lr if parts.peak_lr is not None else config.lr
    budget = config.max_minutes * 60.0
    started, loss_sum, loss_count, smoothed, timer_start = time.time(), 0.0, 0, None, None
    bar = tqdm(total=config.iterations, initial=start, desc=parts.name, unit="it", dynamic_ncols=True, mininterval=1.0)
    completed, out_of_time = start, False
    for iteration in range(start, config.iterations):
        thread_governor().tick()  # load-aware thread count (segsynth.cpu)

        # 1. The learning rate: the schedule runs on iterations, or on training time when that ends it first.
        progress = iteration / config.iterations
        if budget > 0:
            progress = max(progress, (seconds_before + time.time() - started) / budget)
            if progress >= 1.0:
                out_of_time = True
                break
        for group in parts.optimizer.param_groups:
            group["lr"] = warmup_cosine(peak_lr, iteration, config.warmup, progress)

        # 2. The loss, checked before anything changes.
        loss = parts.batch_loss(iteration)
        check_finite(loss.detach(), iteration + 1, config.iterations, peak_lr, saved=parts.saved_note(),
                     before_raise=bar.close)

        # 3. The step.
        _step(parts, loss)

        # 4. Log, save, keep.
        value = loss.item()
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        loss_sum, loss_count = loss_sum + value, loss_count + 1
        completed = done = iteration + 1
        timer_start = _report_speed(parts.name, done - start, config, start, seconds_before, timer_start)
        if done % config.log_every == 0:
            elapsed = time.time() - started
            append_jsonl(log_path, {"iteration": done, "loss": round(loss_sum / loss_count, 5),
                                    "lr": parts.optimizer.param_groups[0]["lr"],
                                    "elapsed_s": round(seconds_before + elapsed, 1),
                                    "images_per_s": round((done - start) * config.batch_size / elapsed, 2)})
            loss_sum, loss_count = 0.0, 0
            bar.set_postfix(loss=f"{smoothed:.4f}")
        bar.update(1)
        if done % config.save_every == 0 and done < config.iterations:
            parts.save(training_stats(config, done, start, seconds_before, started, smoothed, finished=False))
            if keep_every and done % keep_every == 0:
                parts.keep(done)
    bar.close()

    # 5. The final model with its training state. A run that spent its --max-minutes is finished too (its schedule
    #    was shortened to end there); --resume with a larger --max-minutes continues it.
    stats = training_stats(config, completed, start, seconds_before, started, smoothed,
                           finished=completed >= config.iterations or out_of_time)
    stats["stopped_by"] = "max_minutes" if out_of_time else "iterations"
    parts.save(stats)
    if keep_every and completed % keep_every == 0:
        parts.keep(completed)


def _step(parts: TrainingParts, loss: torch.Tensor) -> None:
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.scaler is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parts.parameters, 1.0)
        parts.optimizer.step()
    else:
        parts.scaler.scale(loss).backward()
        parts.scaler.unscale_(parts.optimizer)
        torch.nn.utils.clip_grad_norm_(parts.parameters, 1.0)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    if parts.ema is not None:
        parts.ema.step(parts.parameters)


def training_stats(config, done: int, start: int, seconds_before: float, started: float, smoothed_loss,
                   finished: bool) -> dict:
    """The "training" entry of a generator's metadata; images_per_s is this session's speed."""
    seconds = seconds_before + time.time() - started
    return {"iterations": done, "finished": finished, "resumed_at": start or None, "seconds": round(seconds, 1),
            "minutes": round(seconds / 60, 2), "images_seen": done * config.batch_size,
            "images_per_s": round((done - start) * config.batch_size / max(time.time() - started, 1e-9), 2),
            "loss": None if smoothed_loss is None else round(smoothed_loss, 5)}


def _report_speed(name: str, done_here: int, config, start: int, seconds_before: float,
                  timer_start: float | None) -> float | None:
    """After the first few iterations (the first one, slow with one-off setup, is not counted), say how long
    the whole run will take: the iterations left, or what is left of the --max-minutes budget if that ends it
    first."""
    if done_here == 1:
        return time.time()
    if done_here == 4 and timer_start is not None:
        per_iteration = (time.time() - timer_start) / 3
        left = config.iterations - start - 4
        seconds = per_iteration * left
        line = f"{name}: {per_iteration:.3g} s/iteration; about {duration_text(seconds)} for the {left} iterations left"
        budget_left = config.max_minutes * 60 - seconds_before
        if config.max_minutes and seconds > budget_left:
            line += (f"; --max-minutes {config.max_minutes:g} ends it after about "
                     f"{max(0, int(budget_left / per_iteration))} of them")
        tqdm.write(line)
    return timer_start
