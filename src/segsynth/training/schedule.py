"""Learning-rate schedules and the divergence check, shared by every training loop (segmenters and
the built-in generators). Each rate is a pure function of the iteration, so a resumed run follows the
same schedule as an uninterrupted one."""

from __future__ import annotations

import math

import torch

from segsynth.io import SegsynthError


def warmup_poly(peak: float, iteration: int, warmup: int, total: int, power: float = 1.0) -> float:
    """Linear warm-up, then poly decay to 0 (the SegFormer schedule)."""
    if iteration < warmup:
        return peak * (iteration + 1) / warmup
    progress = (iteration - warmup) / max(1, total - warmup)
    return peak * (1 - min(progress, 1.0)) ** power


def warmup_cosine(peak: float, iteration: int, warmup: int, progress: float, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay from `peak` to `floor * peak` as `progress` goes 0 -> 1
    (progress may run on wall-clock time when a training has a time budget)."""
    if iteration < warmup:
        return peak * (iteration + 1) / warmup
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def check_finite(loss: torch.Tensor, iteration: int, total: int, lr: float, advice: str = "",
                 saved: str = "", before_raise=None) -> None:
    """Raise one clear error when the loss turns NaN/inf: the iteration (1-based, as logs count), a
    lower learning rate to try, `advice`, and `saved` (what is intact on disk: nothing is written
    after the bad step). `before_raise` runs first (e.g. closing a progress bar, so the error starts
    on a line of its own)."""
    if torch.isfinite(loss):
        return
    if before_raise is not None:
        before_raise()
    message = (f"non-finite loss ({loss.item()}) at iteration {iteration} of {total}: training diverged; "
               f"lower the learning rate (--lr {lr:g} now; try {lr / 10:g}){advice}")
    raise SegsynthError(message + (f"; {saved}" if saved else ""))
