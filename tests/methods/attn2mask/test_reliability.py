"""Reliable-pixel selection and the reliability-aware loss (BECO-style)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segsynth.io import SegsynthError
from segsynth.methods.attn2mask.reliability import reliability_loss, reliable_pixels


def logits_with_margins(class0_probabilities):
    """Two-class logits (1, 2, 1, N) whose class-0 probability per pixel is given: margin = |2p - 1|."""
    p = torch.tensor(class0_probabilities)
    return torch.stack([p, 1 - p]).log()[None, :, None, :]


def test_top_share_by_margin_per_predicted_class():
    # Predicted class 0 at margins 0.9, 0.1, 0.5; class 1 at margins 0.3, 0.8, 0.2; one ignored pixel (margin 1).
    logits = logits_with_margins([0.95, 0.55, 0.75, 0.35, 0.1, 0.4, 0.9999])
    labels = torch.tensor([[[0, 0, 0, 1, 1, 1, 255]]])
    reliable = reliable_pixels(logits, labels, share=0.5)  # ceil(0.5 x 3) = 2 per class
    assert reliable.tolist() == [[[True, False, True, True, True, False, False]]]
    assert reliable_pixels(logits, labels, share=0.0).sum() == 0
    assert reliable_pixels(logits, labels, share=1.0).tolist() == [[[True] * 6 + [False]]]
    # Ranking is over the batch: the same pixels split over two images give the same answer.
    batch = torch.cat([logits[..., :3], logits[..., 3:6]])
    assert reliable_pixels(batch, torch.cat([labels[..., :3], labels[..., 3:6]])).flatten().tolist() == \
        [True, False, True, True, True, False]


def random_case(seed=0, classes=4):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 6, 5, generator=generator, requires_grad=True)
    labels = torch.randint(0, classes, (2, 6, 5), generator=generator)
    labels[0, :2] = 255
    return logits, labels


def test_unreliable_weight_one_is_plain_cross_entropy():
    logits, labels = random_case()
    torch.testing.assert_close(reliability_loss(logits, labels, unreliable_weight=1.0),
                               F.cross_entropy(logits, labels, ignore_index=255))


def test_reliable_only_and_pixel_weights():
    logits, labels = random_case(seed=1)
    reliable = reliable_pixels(logits, labels, share=0.5)
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    torch.testing.assert_close(reliability_loss(logits, labels, share=0.5), per_pixel[reliable].mean())
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2))
    expected = (per_pixel * weights * reliable).sum() / (weights * reliable).sum()
    torch.testing.assert_close(reliability_loss(logits, labels, weights=weights), expected)
    half = torch.where(reliable, 1.0, 0.5) * (labels != 255)
    torch.testing.assert_close(reliability_loss(logits, labels, unreliable_weight=0.5),
                               (per_pixel * half).sum() / half.sum())


def test_peer_teaches_the_unreliable_pixels():
    logits, labels = random_case(seed=3)
    peer = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4), requires_grad=True)
    reliable = reliable_pixels(logits, labels)
    to_peer = F.cross_entropy(logits, peer.argmax(1), reduction="none")
    base = reliability_loss(logits, labels)
    torch.testing.assert_close(reliability_loss(logits, labels, peer_logits=peer, peer_weight=0.3),
                               base + 0.3 * to_peer[~reliable].mean())
    known = ~reliable & (labels != 255)
    torch.testing.assert_close(reliability_loss(logits, labels, peer_logits=peer, peer_on_ignored=False),
                               base + to_peer[known].mean())


def test_gradients_flow_only_where_the_loss_looks():
    logits, labels = random_case(seed=5)
    peer = torch.randn(logits.shape, requires_grad=True)
    reliability_loss(logits, labels).backward()
    reliable = reliable_pixels(logits, labels)
    gradient = logits.grad.abs().sum(1)
    assert (gradient[reliable] > 0).all() and (gradient[~reliable] == 0).all()
    logits.grad = None
    reliability_loss(logits, labels, peer_logits=peer).backward()
    assert (logits.grad.abs().sum(1) > 0).all()  # the peer reaches the unreliable and ignored pixels
    assert peer.grad is None  # the peer's prediction is a target, not trained through this loss


def test_bad_shapes_and_share_are_refused():
    logits, labels = random_case()
    with pytest.raises(SegsynthError, match=r"\(B, C, H, W\)"):
        reliability_loss(logits, labels[:, :3])
    with pytest.raises(SegsynthError, match="share"):
        reliable_pixels(logits, labels, share=1.5)
    with pytest.raises(SegsynthError, match="peer logits"):
        reliability_loss(logits, labels, peer_logits=logits[:, :2])
