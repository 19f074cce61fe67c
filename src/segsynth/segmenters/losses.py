"""Per-pixel losses every segmenter and stage shares (255 = ignore everywhere)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segsynth import IGNORE_INDEX


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over non-ignored pixels, each scaled by its weight when given."""
    per_pixel = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="none")
    valid = (labels != IGNORE_INDEX).to(per_pixel.dtype)
    if weights is not None:
        valid = valid * weights
    # Clamp the denominator: a crop that is all ignore contributes 0, not NaN.
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


def pixel_losses(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy of a segmenter's logits at label resolution (ignore pixels get 0):
    what FreeMask's class statistics and filter score."""
    logits = model(images)
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="none")
