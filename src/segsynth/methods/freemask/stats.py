"""Class statistics: the class-wise mean loss L̄_c of a segmenter over real training pixels.

FreeMask uses these numbers twice: the filter ignores a synthetic pixel of
class c whose loss exceeds α·L̄_c, and the hardness of a real mask is the
pixel-weighted mean of L̄_c over its classes. They are computed once from a
`segsynth train` checkpoint, saved as JSON with the pixel counts, and read by
`plan` and `filter` (FreeMask's scripts had them pasted in by hand).

The file format is `segsynth.formats.stats`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segsynth import IGNORE_INDEX
from segsynth.config import save_config
from segsynth.data import open_dataset
from segsynth.data.validate import check_before_compute
from segsynth.distributed import all_reduce_sum, init_distributed, shard
from segsynth.formats.checkpoint import read_checkpoint_meta, resolve_checkpoint
from segsynth.formats.stats import is_class_stats_file, write_class_stats
from segsynth.outputs import claim_file
from segsynth.segmenters import load_checkpoint_for
from segsynth.segmenters.losses import pixel_losses
from segsynth.stage_configs import StatsConfig
from segsynth.training.evaluate import batches_by_size


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
    # 1. Load the segmenter and the real data it was trained on; check before compute.
    info = init_distributed(config.device)
    spec = config.data or read_checkpoint_meta(resolve_checkpoint(config.segmenter))["data"]
    dataset = open_dataset(spec)
    check_before_compute(dataset, [config.split])
    model, _, checkpoint = load_checkpoint_for(config.segmenter, dataset.classes, f"dataset {spec}",
                                               "use a segmenter trained on this dataset")
    out = Path(config.out)
    with claim_file(out, "stats", "class-statistics file", is_class_stats_file, out.with_suffix(".config.yaml"),
                    "StatsConfig", lock=info.is_main):
        return _compute_class_stats(config, info, spec, dataset, model, checkpoint)


def _compute_class_stats(config: StatsConfig, info, spec: str, dataset, model, checkpoint: Path) -> dict:
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
        write_class_stats(config.out, stats)
        save_config(config, Path(config.out).with_suffix(".config.yaml"))
    return stats
