"""Class statistics: the class-wise mean loss L̄_c of a segmenter over real training pixels.

FreeMask uses these numbers twice: the filter ignores a synthetic pixel of
class c whose loss exceeds α·L̄_c, and the hardness of a real mask is the
pixel-weighted mean of L̄_c over its classes. They are computed once from a
`segsynth train` checkpoint, saved as JSON with the pixel counts, and read by
`plan` and `filter` (FreeMask's scripts had them pasted in by hand).

File format: {"classes": [...], "mean_loss": [... or null], "pixels": [...],
"segmenter": "<checkpoint>", "data": "<spec>", "split": "train"}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segsynth import IGNORE_INDEX
from segsynth.config import field, save_config
from segsynth.data import open_dataset
from segsynth.data.validate import quick_check
from segsynth.distributed import all_reduce_sum, init_distributed, shard
from segsynth.evaluate import batches_by_size
from segsynth.io import SegsynthError, atomic_write_json, read_json


@dataclass
class StatsConfig:
    segmenter: str = field(help="segmenter checkpoint trained on the real data (a `segsynth train --out` folder)")
    out: str = field(help="class statistics JSON to write")
    data: str | None = field(None, help="real dataset spec (default: the one the segmenter was trained on)")
    split: str = field("train", help="split whose pixels define L̄_c")
    batch_size: int = field(8, help="images per forward pass")
    size: list[int] = field([], help="inference size H,W (default: each image's own); use the size the segmenter "
                                     "sees synthetic images at, so real and synthetic losses compare")
    device: str = field("auto", help="auto, cpu or cuda")


def pixel_losses(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy at label resolution (ignore pixels get 0)."""
    logits = model(images)
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="none")


@torch.no_grad()
def class_loss_sums(model, split, num_classes: int, device, indices, batch_size: int, progress: bool, size=None):
    """Sum of per-pixel loss and pixel count per class over the given samples (images resized to `size`)."""
    loss_sum = np.zeros(num_classes, np.float64)
    pixels = np.zeros(num_classes, np.int64)
    model.eval()
    for group, images in batches_by_size(split, indices, batch_size, device, "class stats", progress):
        labels = torch.from_numpy(np.stack([s.label for s in group])).to(device)
        if size:
            images = F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False)
        losses = pixel_losses(model, images, labels).cpu().numpy().ravel()
        flat = labels.cpu().numpy().ravel()
        valid = flat != IGNORE_INDEX
        loss_sum += np.bincount(flat[valid], weights=losses[valid], minlength=num_classes)[:num_classes]
        pixels += np.bincount(flat[valid], minlength=num_classes)[:num_classes]
    return loss_sum, pixels


def compute_class_stats(config: StatsConfig) -> dict:
    """Run the segmenter over the real split; write and return {classes, mean_loss, pixels, ...}."""
    from segsynth.models import load_segmenter
    from segsynth.train import resolve_checkpoint

    # 1. Load the segmenter and the real data it was trained on; check before compute.
    info = init_distributed(config.device)
    checkpoint = resolve_checkpoint(config.segmenter)
    model, meta = load_segmenter(checkpoint)
    spec = config.data or meta["data"]
    dataset = open_dataset(spec)
    if list(dataset.classes) != list(meta["classes"]):
        raise SegsynthError(f"{checkpoint}: segmenter classes {meta['classes'][:5]}... differ from dataset {spec}'s; "
                            "use a segmenter trained on this dataset")
    quick_check(dataset, [config.split])
    model.to(info.device)

    # 2. Sum loss and pixels per class (sharded over ranks, then reduced).
    split = dataset.split(config.split)
    indices = shard(list(range(len(split))), info.rank, info.world_size)
    loss_sum, pixels = class_loss_sums(model, split, dataset.num_classes, info.device, indices,
                                       config.batch_size, progress=info.is_main, size=config.size or None)
    loss_sum = all_reduce_sum(torch.from_numpy(loss_sum)).numpy()
    pixels = all_reduce_sum(torch.from_numpy(pixels)).numpy()

    # 3. Mean loss per class; classes without pixels have none (null).
    mean_loss = [float(s / n) if n > 0 else None for s, n in zip(loss_sum, pixels)]
    stats = {"classes": list(dataset.classes), "mean_loss": mean_loss, "pixels": pixels.tolist(),
             "segmenter": str(checkpoint), "data": spec, "split": config.split}
    if info.is_main:
        atomic_write_json(config.out, stats)
        save_config(config, Path(config.out).with_suffix(".config.yaml"))
    return stats


def load_class_stats(path: str | Path, classes) -> np.ndarray:
    """Read a class-stats JSON and return mean_loss as an array (NaN where a class had no pixels)."""
    if not Path(path).is_file():
        raise SegsynthError(f"{path}: class-stats file not found; make it with "
                            f"`segsynth stats --segmenter CHECKPOINT --out {path}`")
    stats = read_json(path)
    for key in ("classes", "mean_loss", "pixels"):
        if not isinstance(stats, dict) or key not in stats:
            raise SegsynthError(f"{path}: not a class-stats file (no {key!r}); make one with `segsynth stats`")
    if list(stats["classes"]) != list(classes):
        raise SegsynthError(f"{path}: statistics are for classes {stats['classes'][:4]}..., not this dataset's "
                            f"{list(classes)[:4]}...; compute them with a segmenter trained on this dataset")
    return np.array([math.nan if v is None else float(v) for v in stats["mean_loss"]], np.float64)
