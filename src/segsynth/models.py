"""Segmenters over transformers: `create_segmenter(name, num_classes, pretrained)`.

A segmenter is an `nn.Module` that takes uint8-range RGB images (B, 3, H, W,
float) and owns its normalisation, so a checkpoint is self-contained. It has
two methods the rest of segsynth uses:
  forward(images)                  -> per-pixel class logits at the model's output stride
  forward(images, labels, weights) -> scalar training loss (255 ignored, optional per-pixel weights)
  predict(images, size)            -> logits resized to `size`
The loss lives in forward() so DistributedDataParallel sees it, and so each
architecture keeps its own: Mask2Former's set-prediction loss slots in as
another class with the same methods and one more `SEGMENTERS` row.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segsynth import IGNORE_INDEX
from segsynth.io import SegsynthError, read_json

try:  # transformers' own bars ("Loading weights") would interleave with ours
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass

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
                weights: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model(pixel_values=(images - self.mean) / self.std).logits
        if labels is None:
            return logits
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return weighted_cross_entropy(logits, labels, weights)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        logits = self(images)
        return F.interpolate(logits, size=size or images.shape[-2:], mode="bilinear", align_corners=False)

    def save(self, directory: Path) -> None:
        """config.json + model.safetensors, the transformers layout (loadable by from_pretrained)."""
        self.model.save_pretrained(directory, safe_serialization=True)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over non-ignored pixels, each scaled by its weight when given."""
    per_pixel = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="none")
    valid = (labels != IGNORE_INDEX).to(per_pixel.dtype)
    if weights is not None:
        valid = valid * weights
    # Clamp the denominator: a crop that is all ignore contributes 0, not NaN.
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


def _segformer(name: str, num_classes: int, pretrained: str | None, classes: list[str] | None):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    id2label = {i: c for i, c in enumerate(classes or [f"class_{i}" for i in range(num_classes)])}
    label_info = dict(num_labels=num_classes, id2label=id2label, label2id={v: k for k, v in id2label.items()},
                      semantic_loss_ignore_index=IGNORE_INDEX)
    if pretrained:
        model = load_pretrained(SegformerForSemanticSegmentation, pretrained, label_info)
    else:
        model = SegformerForSemanticSegmentation(SegformerConfig(**SEGFORMER_VARIANTS[name], **label_info))
    return SegFormerSegmenter(model)


# name -> builder(name, num_classes, pretrained, classes). Mask2Former adds its row here.
SEGMENTERS = {name: _segformer for name in SEGFORMER_VARIANTS}


def create_segmenter(name: str, num_classes: int, pretrained: str | None = None,
                     classes: list[str] | None = None) -> nn.Module:
    """Build a segmenter by name; `pretrained` is a hub id or a local transformers folder."""
    if name not in SEGMENTERS:
        raise SegsynthError(f"unknown segmenter {name!r}; options: {', '.join(SEGMENTERS)}")
    return SEGMENTERS[name](name, num_classes, pretrained, classes)


def load_pretrained(model_class, pretrained: str, label_info: dict):
    """from_pretrained over a hub id or local dir, safetensors only; the head is re-made for our classes."""
    if Path(pretrained).exists() and not (Path(pretrained) / "config.json").is_file():
        raise SegsynthError(f"{pretrained}: no config.json; a pretrained model folder needs config.json and model.safetensors")
    try:
        return model_class.from_pretrained(pretrained, use_safetensors=True, ignore_mismatched_sizes=True, **label_info)
    except OSError as error:
        raise SegsynthError(
            f"cannot load pretrained weights {pretrained!r}: {error}. Give a local folder saved with save_pretrained "
            "(config.json + model.safetensors) or a hub id on a machine with network access"
        ) from None


def load_segmenter(checkpoint: str | Path) -> tuple[nn.Module, dict]:
    """Load a segsynth checkpoint folder (safetensors only); returns (model, its segsynth.json)."""
    checkpoint = Path(checkpoint)
    meta_path = checkpoint / "segsynth.json"
    if not meta_path.is_file():
        raise SegsynthError(f"{checkpoint}: not a segsynth checkpoint (no segsynth.json); give a `segsynth train --out` folder or its final/ folder")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str):
        raise SegsynthError(f"{meta_path}: not a segsynth checkpoint description (no \"model\"); "
                            "give a `segsynth train --out` folder, or retrain")
    name = meta["model"]
    if name not in SEGMENTERS:
        raise SegsynthError(f"{meta_path}: unknown segmenter {name!r}; options: {', '.join(SEGMENTERS)}")
    if not isinstance(meta.get("classes"), list):
        raise SegsynthError(f"{meta_path}: no \"classes\" list; give a `segsynth train --out` folder, or retrain")
    if not any((checkpoint / weights).is_file() for weights in ("model.safetensors", "model.safetensors.index.json")):
        raise SegsynthError(f"{checkpoint}: no model.safetensors; segsynth loads weights from safetensors only, never "
                            "from pickle files such as pytorch_model.bin. Give a `segsynth train --out` folder, or retrain")
    from safetensors import SafetensorError
    from transformers import SegformerForSemanticSegmentation

    try:
        model = SegformerForSemanticSegmentation.from_pretrained(checkpoint, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as error:  # a damaged config.json or weights file
        raise SegsynthError(f"{checkpoint}: cannot load the segmenter ({str(error).splitlines()[0]}); the checkpoint "
                            "is damaged: restore it or retrain") from None
    return SegFormerSegmenter(model), meta
