"""`TrainConfig.loss`: weighted cross-entropy (default, unchanged) or Attn2mask's reliability-aware loss."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fakes import TINY_TRAIN, TOY_SPEC
from segsynth.io import SegsynthError
from segsynth.methods.attn2mask.reliability import reliability_loss
from segsynth.segmenters import create_segmenter
from segsynth.segmenters.losses import training_loss, weighted_cross_entropy
from segsynth.stage_configs import TrainConfig
from segsynth.training.loop import train


def batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 255
    labels = torch.randint(0, 3, (2, 32, 32), generator=generator)
    labels[0, :4] = 255
    return images, labels, torch.rand(2, 32, 32, generator=generator)


def test_the_default_loss_is_the_weighted_cross_entropy_forward_always_computed():
    torch.manual_seed(0)
    model = create_segmenter("segformer-tiny", 3).eval()  # no dropout: two calls compare
    images, labels, weights = batch()
    config = TrainConfig(data=TOY_SPEC, out="unused")
    assert training_loss(config) is weighted_cross_entropy
    assert torch.equal(model(images, labels, weights), model(images, labels, weights, training_loss(config)))


def test_reliable_loss_uses_the_configured_share_and_weight():
    torch.manual_seed(0)
    model = create_segmenter("segformer-tiny", 3).eval()  # no dropout: two calls compare
    images, labels, weights = batch()
    config = TrainConfig(data=TOY_SPEC, out="unused", loss="reliable", reliable_share=0.3, unreliable_weight=0.1)
    logits = torch.nn.functional.interpolate(model(images), size=(32, 32), mode="bilinear", align_corners=False)
    expected = reliability_loss(logits, labels, weights, share=0.3, unreliable_weight=0.1)
    got = model(images, labels, weights, training_loss(config))
    assert torch.allclose(got, expected) and not torch.allclose(got, weighted_cross_entropy(logits, labels, weights))
    for change, message in (({"loss": "dice"}, r"TrainConfig.loss = 'dice' is unknown: loss must be one of: ce, "
                                                r"ce-ignore-unknown, reliable"),
                            ({"reliable_share": 0.0}, r"reliable_share must be a number in \(0, 1\]"),
                            ({"unreliable_weight": 2.0}, r"unreliable_weight must be a number in \[0, 1\]")):
        with pytest.raises(SegsynthError, match=message):  # refused as the config is made, before any work
            training_loss(replace(config, **change))


def test_training_with_the_reliable_loss_runs_and_differs_from_cross_entropy(tmp_path):
    settings = {**TINY_TRAIN, "iterations": 3, "eval_split": "", "log_every": 1}
    train(TrainConfig(data=TOY_SPEC, out=str(tmp_path / "ce"), **settings))
    train(TrainConfig(data=TOY_SPEC, out=str(tmp_path / "reliable"), loss="reliable", **settings))
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("ce", "reliable")}
    assert len(losses["reliable"]) == 3 and all(value == value for value in losses["reliable"])
    assert losses["ce"][0] != losses["reliable"][0]  # same first batch, same weights: only the loss differs
