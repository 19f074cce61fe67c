"""Per-pixel losses every segmenter and stage shares (255 = ignore everywhere).

Training losses are `(logits at label size, labels, weights or None) -> scalar`; `LOSSES` maps
`TrainConfig.loss` to a builder of one from the config, and the segmenter's forward applies it (so
DistributedDataParallel still sees the loss inside forward).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from segsynth import IGNORE_INDEX
from segsynth.io import SegsynthError


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over non-ignored pixels, each scaled by its weight when given."""
    per_pixel = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="none")
    valid = (labels != IGNORE_INDEX).to(per_pixel.dtype)
    if weights is not None:
        valid = valid * weights
    # Clamp the denominator: a crop that is all ignore contributes 0, not NaN.
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


def ignore_unknown_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """`--loss ce-ignore-unknown`. Per pixel it is `weighted_cross_entropy` itself (an ignore pixel carries no
    loss either way); a set-prediction segmenter that receives it (Mask2Former) also leaves its class term
    unjudged on ignore pixels: a query whose mask lies there is not told "no object" (segmenters/mask2former.py).
    Where the filter or `drop_classes` ignores every pixel of a class, the reference set loss says the class is
    absent from an image that shows it; this loss says nothing about it."""
    return weighted_cross_entropy(logits, labels, weights)


def pixel_losses(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy of a segmenter's prediction at label resolution (ignore pixels get 0):
    what FreeMask's class statistics and filter score. SegFormer: its logits, resized bilinearly;
    Mask2Former: its normalised semantic scores (segmenters/mask2former.py says how)."""
    logits = model.predict(images, size=tuple(labels.shape[-2:]))
    return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="none")


def _reliable(config):
    """Attn2mask's reliability-aware loss (methods/attn2mask/reliability.py) with the config's share and weight."""
    from segsynth.methods.attn2mask.reliability import reliability_loss

    share, unreliable_weight = float(config.reliable_share), float(config.unreliable_weight)
    if not 0.0 < share <= 1.0:
        raise SegsynthError(f"--reliable-share must be in (0, 1], got {share}")
    if not 0.0 <= unreliable_weight <= 1.0:
        raise SegsynthError(f"--unreliable-weight must be in [0, 1], got {unreliable_weight}")
    return functools.partial(reliability_loss, share=share, unreliable_weight=unreliable_weight)


# TrainConfig.loss -> builder(config) -> loss(logits, labels, weights). A new loss is one more row.
LOSSES = {
    "ce": lambda config: weighted_cross_entropy,
    "ce-ignore-unknown": lambda config: ignore_unknown_cross_entropy,
    "reliable": _reliable,
}


def training_loss(config):
    """The loss function `config.loss` names (a TrainConfig), or an error listing the options; refused
    before any compute when `config.model` trains with a loss of its own (segmenters.SEGMENTERS)."""
    from segsynth.segmenters import segmenter_kind  # the table imports the architectures, which import this module

    if config.loss not in LOSSES:
        raise SegsynthError(f"unknown --loss {config.loss!r}; options: {', '.join(LOSSES)}")
    allowed = segmenter_kind(config.model, "--model").losses
    if allowed is not None and config.loss not in allowed:
        raise SegsynthError(f"--loss {config.loss} needs a segmenter with per-pixel logits; {config.model} trains with "
                            f"its own set-prediction loss (--loss {' / '.join(allowed)}, per-pixel weights kept). "
                            "Use a segformer-* --model for this loss")
    return LOSSES[config.loss](config)
