"""SegFormer (Xie et al. 2021) over transformers' SegformerForSemanticSegmentation.

`SegFormerSegmenter` wraps it with segsynth's segmenter interface (see
`segsynth.segmenters`): it owns its normalisation, so a checkpoint is
self-contained, and its loss, so DistributedDataParallel sees it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, SegformerConfig, SegformerForSemanticSegmentation
from transformers.utils import logging as transformers_logging

from segsynth import IGNORE_INDEX
from segsynth.io import SegsynthError
from segsynth.segmenters.losses import weighted_cross_entropy

transformers_logging.disable_progress_bar()  # its own "Loading weights" bars would interleave with ours

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# MiT encoder configs of the SegFormer paper (Xie et al. 2021, Table 6), plus small CPU presets.
SEGFORMER_VARIANTS = {
    "segformer-b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "segformer-b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "segformer-b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
    "segformer-b3": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 18, 3], decoder_hidden_size=768),
    "segformer-b4": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 8, 27, 3], decoder_hidden_size=768),
    "segformer-b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3], decoder_hidden_size=768),
    # CPU presets: b0 widths with fewer blocks, and a minimal model for tests and the quick demo.
    "segformer-small": dict(hidden_sizes=[32, 64, 160, 256], depths=[1, 1, 2, 1], decoder_hidden_size=128),
    "segformer-tiny": dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], decoder_hidden_size=64,
                           num_attention_heads=[1, 1, 2, 4]),
}


class SegFormerSegmenter(nn.Module):
    """transformers' SegformerForSemanticSegmentation with segsynth's interface."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.model.config.num_labels

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                weights: torch.Tensor | None = None, loss=weighted_cross_entropy) -> torch.Tensor:
        logits = self.model(pixel_values=(images - self.mean) / self.std).logits
        if labels is None:
            return logits
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return loss(logits, labels, weights)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        logits = self(images)
        return F.interpolate(logits, size=size or images.shape[-2:], mode="bilinear", align_corners=False)

    def save(self, directory: Path) -> None:
        """config.json + model.safetensors, the transformers layout (loadable by from_pretrained)."""
        self.model.save_pretrained(directory, safe_serialization=True)


def label_info(num_classes: int, classes: list[str] | None) -> dict:
    """The config keys that name the classes (id2label / label2id), shared by every transformers segmenter."""
    id2label = {i: c for i, c in enumerate(classes or [f"class_{i}" for i in range(num_classes)])}
    return dict(num_labels=num_classes, id2label=id2label, label2id={v: k for k, v in id2label.items()})


def create_segformer(name: str, num_classes: int, pretrained: str | None, classes: list[str] | None):
    """A SegFormer of the named variant, from scratch or from `pretrained` (hub id or local folder)."""
    labels = {**label_info(num_classes, classes), "semantic_loss_ignore_index": IGNORE_INDEX}
    if pretrained:
        model = load_pretrained(SegformerForSemanticSegmentation, pretrained, labels)
    else:
        model = SegformerForSemanticSegmentation(SegformerConfig(**SEGFORMER_VARIANTS[name], **labels))
    return SegFormerSegmenter(model)


def load_segformer(checkpoint: Path) -> SegFormerSegmenter:
    """The segmenter of a segsynth checkpoint folder (config.json + model.safetensors)."""
    return SegFormerSegmenter(SegformerForSemanticSegmentation.from_pretrained(checkpoint, use_safetensors=True))


def load_pretrained(model_class, pretrained: str, labels: dict, backbones: dict | None = None):
    """from_pretrained over a hub id or local dir, safetensors only; the head is re-made for our classes.

    The folder's config.json must be of `model_class`'s kind, or of a kind in `backbones` (model_type ->
    builder(that config) -> model: a bare backbone checkpoint wrapped in the segmenter's own head)."""
    if Path(pretrained).exists() and not (Path(pretrained) / "config.json").is_file():
        raise SegsynthError(f"{pretrained}: no config.json; a pretrained model folder needs config.json and model.safetensors")
    expected = model_class.config_class.model_type
    try:
        config = AutoConfig.from_pretrained(pretrained)
    except ValueError as error:  # a config.json transformers cannot read (unknown model_type, bad values)
        raise SegsynthError(f"--pretrained {pretrained}: not a transformers model config ({str(error).splitlines()[0]}); "
                            f"give a {expected} checkpoint (hub id or save_pretrained folder)") from None
    except OSError as error:
        raise _unavailable(pretrained, error) from None
    if config.model_type not in (backbones or {}) and config.model_type != expected:
        kinds = " or ".join([expected, *(backbones or {})])
        raise SegsynthError(f"--pretrained {pretrained}: a {config.model_type!r} model, not a {kinds} one; "
                            f"give a {expected} checkpoint (hub id or save_pretrained folder) for this --model")
    try:
        if config.model_type != expected:
            return backbones[config.model_type](config)
        return model_class.from_pretrained(pretrained, use_safetensors=True, ignore_mismatched_sizes=True, **labels)
    except OSError as error:
        raise _unavailable(pretrained, error) from None


def _unavailable(pretrained: str, error: OSError) -> SegsynthError:
    return SegsynthError(f"cannot load pretrained weights {pretrained!r}: {error}. Give a local folder saved with "
                         "save_pretrained (config.json + model.safetensors) or a hub id on a machine with network access")
