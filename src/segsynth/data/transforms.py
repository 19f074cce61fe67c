"""Paired image/mask augmentation, as the SegFormer recipe: the same geometry
for image, label and weight map; photometric jitter on the image only.

Randomness comes from a numpy Generator the caller seeds per sample, so a
sample's augmentation depends on its own seed, never on worker or batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from segsynth import IGNORE_INDEX


@dataclass(frozen=True)
class AugmentConfig:
    crop: tuple[int, int]  # (height, width)
    base: tuple[int, int]  # (height, width) the scale range is relative to
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    photometric: bool = True
    cat_max_ratio: float = 0.75  # re-draw crops dominated by one class (mmseg's default)


def resize_pair(image, label, weight, size_hw):
    height, width = size_hw
    image = np.array(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    label = np.array(Image.fromarray(label).resize((width, height), Image.NEAREST))
    if weight is not None:
        weight = np.asarray(Image.fromarray(weight, mode="F").resize((width, height), Image.NEAREST))
    return image, label, weight


def augment(image: np.ndarray, label: np.ndarray, weight: np.ndarray | None, config: AugmentConfig,
            rng: np.random.Generator):
    """Random resize (ratio of `base`), random crop (padded with ignore), flip, photometric distortion."""
    # 1. Random resize, keeping the aspect ratio, to base * U(scale_range).
    ratio = rng.uniform(*config.scale_range)
    scale = min(config.base[0] * ratio / image.shape[0], config.base[1] * ratio / image.shape[1])
    size = (max(1, int(image.shape[0] * scale + 0.5)), max(1, int(image.shape[1] * scale + 0.5)))
    image, label, weight = resize_pair(image, label, weight, size)

    # 2. Random crop; a few re-draws when one class fills the crop.
    crop_h, crop_w = config.crop
    for _ in range(10):
        top = int(rng.integers(0, max(image.shape[0] - crop_h, 0) + 1))
        left = int(rng.integers(0, max(image.shape[1] - crop_w, 0) + 1))
        window = label[top: top + crop_h, left: left + crop_w]
        counts = np.bincount(window[window != IGNORE_INDEX].ravel(), minlength=1)
        if len(counts) > 1 and counts.max() / max(counts.sum(), 1) < config.cat_max_ratio:
            break
    image = image[top: top + crop_h, left: left + crop_w]
    label = label[top: top + crop_h, left: left + crop_w]
    weight = None if weight is None else weight[top: top + crop_h, left: left + crop_w]

    # 3. Pad to the crop size (image with 0, label with ignore).
    pad_h, pad_w = crop_h - image.shape[0], crop_w - image.shape[1]
    if pad_h > 0 or pad_w > 0:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
        if weight is not None:
            weight = np.pad(weight, ((0, pad_h), (0, pad_w)))

    # 4. Horizontal flip.
    if config.flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
        weight = None if weight is None else weight[:, ::-1]

    # 5. Photometric distortion: brightness, contrast, saturation, hue (each with probability 1/2).
    if config.photometric:
        image = photometric_distortion(image, rng)
    return np.ascontiguousarray(image), np.ascontiguousarray(label), (
        None if weight is None else np.ascontiguousarray(weight, dtype=np.float32))


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = image.astype(np.float32)
    if rng.random() < 0.5:
        out += rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast_first and contrast is not None:
        out *= contrast
    if rng.random() < 0.5 or rng.random() < 0.5:
        hsv = np.asarray(Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
        if rng.random() < 0.5:
            hsv[..., 1] *= rng.uniform(0.5, 1.5)
        if rng.random() < 0.5:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18) * 255 / 180) % 256
        out = np.asarray(Image.fromarray(np.clip(hsv, 0, 255).astype(np.uint8), mode="HSV").convert("RGB")).astype(np.float32)
    if not contrast_first and contrast is not None:
        out *= contrast
    return np.clip(out, 0, 255).astype(np.uint8)
