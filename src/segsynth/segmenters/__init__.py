"""Segmenters by name, from one table: `create_segmenter(name, ...)`, `load_segmenter(checkpoint)`.

A segmenter is an `nn.Module` that takes uint8-range RGB images (B, 3, H, W,
float) and owns its normalisation, so a checkpoint is self-contained:

  forward(images)                  -> per-pixel class logits at the model's output stride
  forward(images, labels, weights[, loss]) -> scalar training loss (255 ignored, optional per-pixel
                                   weights; `loss` from segmenters.losses.LOSSES, default weighted CE)
  predict(images, size)            -> logits resized to `size`
  save(directory)                  -> config.json + model.safetensors

The loss lives in forward() so DistributedDataParallel sees it, and so each
architecture keeps its own: SegFormer applies the `loss` it is given to its
logits; Mask2Former (`mask2former.py`) computes its Hungarian-matched set-prediction
loss with the per-pixel weights and takes no other (`SegmenterKind.losses`).
For Mask2Former, forward(images) and predict() return log-probabilities of its
normalised per-pixel class scores, so every stage that reads logits works on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError
from torch import nn

from segsynth.formats.checkpoint import read_checkpoint_meta, resolve_checkpoint
from segsynth.io import SegsynthError
from segsynth.segmenters.mask2former import MASK2FORMER_VARIANTS, create_mask2former, load_mask2former
from segsynth.segmenters.segformer import SEGFORMER_VARIANTS, create_segformer, load_segformer


@dataclass(frozen=True)
class SegmenterKind:
    create: Callable[[str, int, str | None, list[str] | None], nn.Module]  # (name, classes, pretrained, names)
    load: Callable[[Path], nn.Module]  # a checkpoint folder -> the trained segmenter
    losses: tuple[str, ...] | None = None  # the TrainConfig.loss names it trains with (None: every one in LOSSES)


# name -> how to build it and how to load its checkpoints. A new architecture is one more row.
SEGMENTERS = {
    **{name: SegmenterKind(create_segformer, load_segformer) for name in SEGFORMER_VARIANTS},
    # "ce" = its own set-prediction loss, with per-pixel weights; "ce-ignore-unknown" the same with the class term
    # unjudged on ignore pixels (mask2former.py)
    **{name: SegmenterKind(create_mask2former, load_mask2former, losses=("ce", "ce-ignore-unknown"))
       for name in MASK2FORMER_VARIANTS},
}


def segmenter_kind(name: str, where: str = "") -> SegmenterKind:
    if name not in SEGMENTERS:
        raise SegsynthError(f"{where + ': ' if where else ''}unknown segmenter {name!r}; options: {', '.join(SEGMENTERS)}")
    return SEGMENTERS[name]


def create_segmenter(name: str, num_classes: int, pretrained: str | None = None,
                     classes: list[str] | None = None) -> nn.Module:
    """Build a segmenter by name; `pretrained` is a hub id or a local transformers folder."""
    return segmenter_kind(name).create(name, num_classes, pretrained, classes)


def load_segmenter(checkpoint: str | Path) -> tuple[nn.Module, dict]:
    """Load a segsynth checkpoint folder (safetensors only); returns (model, its segsynth.json)."""
    checkpoint = Path(checkpoint)
    meta = read_checkpoint_meta(checkpoint, model_names=list(SEGMENTERS))
    kind = SEGMENTERS[meta["model"]]
    try:
        model = kind.load(checkpoint)
    except (OSError, ValueError, SafetensorError) as error:  # a damaged config.json or weights file
        raise SegsynthError(f"{checkpoint}: cannot load the segmenter ({str(error).splitlines()[0]}); the checkpoint "
                            "is damaged: restore it or retrain") from None
    return model, meta


def load_checkpoint_for(path: str | Path, classes, source: str, fix: str) -> tuple[nn.Module, dict, Path]:
    """Resolve, load and check a checkpoint against the classes of `source` it will be used with
    (evaluate, stats, filter): one error naming both when they differ, ending with `fix`.
    Returns (model, meta, checkpoint folder)."""
    checkpoint = resolve_checkpoint(path)
    model, meta = load_segmenter(checkpoint)
    if list(meta["classes"]) != list(classes):
        raise SegsynthError(f"{checkpoint}: the segmenter has {len(meta['classes'])} classes ({_preview(meta['classes'])}) "
                            f"but {source} has {len(classes)} ({_preview(classes)}); {fix}")
    return model, meta, checkpoint


def _preview(names) -> str:
    names = list(names)
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
