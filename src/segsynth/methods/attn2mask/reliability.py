"""Reliability-aware training on noisy pseudo masks (BECO-style).

Attention pseudo masks are right in object cores and wrong near edges. BECO
("Boundary-enhanced Co-training for Weakly Supervised Semantic Segmentation",
Rong et al., CVPR 2023), which Attn2mask (arXiv 2309.01369) adopts for
diffusion-synthetic data, trains on the pixels the network itself is most
sure of: for each class the network predicts, the `share` of its pixels with
the largest margin (top-1 minus top-2 softmax probability) are *reliable* and
get plain cross-entropy against the pseudo label; the rest get a down-weighted
cross-entropy (`unreliable_weight`, 0 = dropped) and, optionally, are taught
by a peer network's prediction instead (co-training: call the loss once per
network, each with the other's logits as `peer_logits`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from segsynth import IGNORE_INDEX
from segsynth.io import SegsynthError


def _check(logits: torch.Tensor, labels: torch.Tensor, share: float) -> None:
    if logits.ndim != 4 or labels.ndim != 3 or logits.shape[0] != labels.shape[0] or logits.shape[2:] != labels.shape[1:]:
        raise SegsynthError(f"logits must be (B, C, H, W) and labels (B, H, W) of the same B, H, W; got "
                            f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if not 0.0 <= share <= 1.0:
        raise SegsynthError(f"reliable share must be in [0, 1], got {share}")


@torch.no_grad()
def reliable_pixels(logits: torch.Tensor, labels: torch.Tensor, share: float = 0.5,
                    ignore: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, H, W) bool: per predicted class, over the whole batch, the ceil(share x n) of its n non-ignored pixels
    with the largest margin (top-1 minus top-2 probability). Ignored pixels are never reliable; ties are cut in
    an unspecified order."""
    _check(logits, labels, share)
    probabilities = logits.detach().float().softmax(dim=1)
    top2 = probabilities.topk(min(2, probabilities.shape[1]), dim=1).values
    margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0.0)
    predicted = probabilities.argmax(dim=1)
    valid = labels != ignore
    reliable = torch.zeros_like(valid).flatten()
    margin, predicted, valid = margin.flatten(), predicted.flatten(), valid.flatten()
    for cls in predicted[valid].unique():
        members = torch.nonzero(valid & (predicted == cls)).squeeze(1)
        keep = math.ceil(share * members.numel())
        if keep:
            reliable[members[margin[members].topk(keep).indices]] = True
    return reliable.view(labels.shape)


def reliability_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                     share: float = 0.5, unreliable_weight: float = 0.0, peer_logits: torch.Tensor | None = None,
                     peer_weight: float = 1.0, peer_on_ignored: bool = True,
                     ignore: int = IGNORE_INDEX) -> torch.Tensor:
    """Scalar loss: weighted-mean cross-entropy to `labels` over non-ignored pixels, each pixel weighted by
    `weights` (e.g. the pseudo mask's confidence; default 1) x (1 if reliable else `unreliable_weight`);
    plus, with `peer_logits`, `peer_weight` x the mean cross-entropy to the peer's (detached) argmax over
    the unreliable pixels, including the ignored ones (the pseudo mask's uncertain band) unless
    `peer_on_ignored=False`. With unreliable_weight=1, no weights and no peer it is plain cross-entropy."""
    _check(logits, labels, share)
    reliable = reliable_pixels(logits, labels, share, ignore)
    valid = labels != ignore

    # 1. cross-entropy to the pseudo labels, reliable pixels in full, the rest down-weighted
    per_pixel = F.cross_entropy(logits, labels.long().masked_fill(~valid, 0), reduction="none")
    weight = torch.where(reliable, 1.0, float(unreliable_weight)).to(per_pixel) * valid
    if weights is not None:
        if weights.shape != labels.shape:
            raise SegsynthError(f"pixel weights must be (B, H, W) like the labels, got {tuple(weights.shape)}")
        weight = weight * weights.to(per_pixel)
    total_weight = weight.sum()
    loss = (per_pixel * weight).sum() / total_weight.clamp_min(1e-12) if total_weight > 0 else per_pixel.sum() * 0.0

    # 2. the peer network's prediction where the pseudo labels are not trusted
    if peer_logits is not None:
        if peer_logits.shape != logits.shape:
            raise SegsynthError(f"peer logits {tuple(peer_logits.shape)} must match logits {tuple(logits.shape)}")
        taught = ~reliable & (valid | peer_on_ignored)
        if taught.any():
            peer_target = peer_logits.detach().argmax(dim=1)
            loss = loss + peer_weight * F.cross_entropy(logits, peer_target, reduction="none")[taught].mean()
    return loss


__all__ = ["reliability_loss", "reliable_pixels"]
