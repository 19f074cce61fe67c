"""`segsynth evaluate`: mIoU from one confusion matrix over a whole split.

As mmseg's IoUMetric: per-class intersection and union are summed over every
image of the split, then IoU = I / U per class; a class absent from both the
predictions and the labels has no IoU (NaN) and is left out of the mean.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from segsynth import IGNORE_INDEX
from segsynth.config import save_config
from segsynth.cpu import thread_governor
from segsynth.data import open_dataset
from segsynth.data.base import group_by_size
from segsynth.data.validate import check_before_compute
from segsynth.distributed import all_reduce_sum, init_distributed, shard
from segsynth.io import atomic_write_json
from segsynth.outputs import claim_file
from segsynth.segmenters import load_checkpoint_for
from segsynth.stage_configs import EvalConfig




def confusion_matrix(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """C x C counts, rows = ground truth, columns = prediction; ignore pixels skipped."""
    valid = label != IGNORE_INDEX
    index = label[valid].astype(np.int64) * num_classes + prediction[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(confusion: np.ndarray, classes) -> dict:
    confusion = confusion.astype(np.float64)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
        accuracy = np.where(confusion.sum(1) > 0, intersection / confusion.sum(1), np.nan)
    total = confusion.sum()
    return {
        "miou": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else math.nan,
        "aacc": float(intersection.sum() / total * 100) if total else math.nan,
        "macc": float(np.nanmean(accuracy) * 100) if np.isfinite(accuracy).any() else math.nan,
        "per_class": {name: float(value * 100) for name, value in zip(classes, iou)},
        "pixels": int(total),
    }


def batches_by_size(split, indices, batch_size: int, device, desc: str, progress: bool):
    """Yield (samples, images tensor B x 3 x H x W) with images of one size per batch, with a progress bar."""
    indices = list(range(len(split))) if indices is None else list(indices)
    bar = tqdm(total=len(indices), desc=desc, disable=not progress, leave=False, unit="img")
    for start in range(0, len(indices), batch_size):
        thread_governor().tick()  # load-aware thread count (segsynth.cpu), set in the thread that runs the model
        samples = [split[i] for i in indices[start: start + batch_size]]
        for group in group_by_size(samples, lambda sample: sample.image.shape):
            yield group, torch.from_numpy(np.stack([s.image for s in group])).permute(0, 3, 1, 2).float().to(device)
        bar.update(len(samples))
    bar.close()


@torch.no_grad()
def confusion_over_split(model, split, num_classes: int, device, size=None, batch_size: int = 8,
                         indices=None, progress: bool = True) -> np.ndarray:
    """Whole-image inference (optionally at `size`), logits resized back to each label's size."""
    model.eval()
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for group, images in batches_by_size(split, indices, batch_size, device, f"evaluate {split.name}", progress):
        if size:
            images = F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False)
        prediction = model.predict(images, size=group[0].label.shape).argmax(1).cpu().numpy()
        for sample, predicted in zip(group, prediction):
            confusion += confusion_matrix(predicted, sample.label, num_classes)
    return confusion


def evaluate(config: EvalConfig) -> dict:
    """Evaluate a checkpoint on one split; writes and returns the metrics dict."""
    # 1. Open and check everything before any compute.
    info = init_distributed(config.device)
    dataset = open_dataset(config.data)
    split = dataset.split(config.split)
    check_before_compute(dataset, [config.split])
    model, meta, checkpoint = load_checkpoint_for(config.checkpoint, dataset.classes, f"dataset {config.data}",
                                                  "evaluate on the dataset the model was trained for")
    out = Path(config.out) if config.out else checkpoint.parent / f"metrics_{config.split}.json"
    with claim_file(out, "evaluate", "metrics file", is_metrics_file, out.with_name(out.stem + ".config.yaml"),
                    "EvalConfig", lock=info.is_main):
        return _evaluate(config, info, dataset, split, model, checkpoint, out)


def is_metrics_file(path: Path) -> bool:
    """Whether `path` holds metrics segsynth wrote (what `evaluate --out` may overwrite)."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and {"miou", "aacc", "split"} <= set(metrics)


def _evaluate(config: EvalConfig, info, dataset, split, model, checkpoint: Path, out: Path) -> dict:
    model.to(info.device)

    # 2. Each rank takes a shard of the split; confusion matrices are summed.
    started = time.time()
    indices = shard(list(range(len(split))), info.rank, info.world_size)
    confusion = confusion_over_split(model, split, dataset.num_classes, info.device, config.size or None,
                                     config.batch_size, indices, progress=info.is_main)
    confusion = all_reduce_sum(torch.from_numpy(confusion)).numpy()
    metrics = metrics_from_confusion(confusion, dataset.classes)
    metrics.update(split=config.split, data=config.data, checkpoint=str(checkpoint), images=len(split),
                   seconds=round(time.time() - started, 2))

    # 3. Write the metrics and the resolved config beside them.
    if info.is_main:
        atomic_write_json(out, metrics)
        save_config(config, out.with_name(out.stem + ".config.yaml"))
    return metrics


def format_metrics(metrics: dict) -> str:
    lines = [f"mIoU {metrics['miou']:.2f}  aAcc {metrics['aacc']:.2f}  mAcc {metrics['macc']:.2f}"]
    for name, value in metrics["per_class"].items():
        lines.append(f"  {name[:20]:20s} {'  n/a' if math.isnan(value) else f'{value:6.2f}'}")
    return "\n".join(lines)
