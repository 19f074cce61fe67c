"""Attention maps -> pseudo label map + confidence map (DiffuMask, Dataset Diffusion, DAAM, Attn2mask).

Input: per class, the mean cross-attention of the class word's tokens at one or
more UNet resolutions (`AttentionCapture.cross_attention(sample, groups=...)`),
and optionally the mean self-attention at one resolution. Steps:

  1. resize every chosen resolution's maps to a working grid (the
     self-attention grid when refining, else the output size), bilinear or
     bicubic; with normalise_at='each-resolution' scale each to [0, 1] there
  2. average the resolutions
  3. refine (refine_power k > 0): scores <- SA^k . scores, SA the row-stochastic
     self-attention (query pixel -> key pixels): each pixel takes the scores of
     the pixels it attends to, k times over, which snaps blobs to object edges.
     Applied as k products with the (pixels x classes) map, never forming SA^k.
  4. resize to the output size; with normalise_at='combined' scale each class
     to [0, 1] now (per-class max, or min-max); clamp to [0, 1]
  5. label: the class with the highest score, or background where that score
     is below `background_threshold`; pixels whose top score lies in
     `uncertain_band` [low, high) become 255 (ignore)

Confidence, per `confidence`:
  'score'   a class pixel's top normalised score; a background pixel's
            1 - top score (how far no class reaches)
  'margin'  distance to the decision, scaled to [0, 1]: a class pixel's
            (top - max(second, threshold)) / (1 - threshold); a background
            pixel's (threshold - top) / threshold
  'none'    1 everywhere: no per-pixel weighting (attention generators then write no weight map)
Ignore (uncertain-band) pixels get confidence 0.

Recipes (`PRESETS`, plain dicts of config values):
  diffumask          DiffuMask (Wu et al., ICCV 2023, Stable_Diffusion/parallel_generate_VOC_Attention_*.py):
                     16/32/64 cross-attention averaged over steps, layers and heads, each resolution
                     bicubic-upsampled and divided by its max, the three averaged, threshold 0.5.
  dataset-diffusion  Dataset Diffusion (Nguyen et al., NeurIPS 2023, gen_data.py): 16x16 cross-attention
                     bicubic to 32x32, refined by the 32x32 self-attention to the 4th power, min-max
                     per class, class where the max >= 0.6, ignore in [0.5, 0.6), background below.
  daam               DAAM (Tang et al., ACL 2023, daam/trace.py + heatmap.py): maps summed over steps,
                     bicubic-upsampled, 8x8 skipped, min-max normalised; the paper's threshold 0.4.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segsynth import IGNORE_INDEX
from segsynth.config import build_config
from segsynth.io import SegsynthError
from segsynth.stage_configs import PseudoMaskConfig  # the config lives with the stage configs (no torch)
from segsynth.training.evaluate import confusion_matrix, metrics_from_confusion

# name -> config values. Each cites its recipe; see the module docstring for the details.
PRESETS = {
    # DiffuMask (arXiv 2303.11681): 16/32/64, each upsampled and divided by its max, averaged, > 0.5.
    "diffumask": dict(resolutions=[16, 32, 64], refine_power=0, normalisation="max", normalise_at="each-resolution",
                      upsampling="bicubic", background_threshold=0.5, uncertain_band=[]),
    # Dataset Diffusion (arXiv 2309.14303): SA(32)^4 . CA(16), min-max, class >= 0.6, ignore [0.5, 0.6).
    "dataset-diffusion": dict(resolutions=[16], refine_power=4, self_attention_resolution=32,
                              normalisation="min-max", normalise_at="combined", upsampling="bicubic",
                              background_threshold=0.6, uncertain_band=[0.5, 0.6]),
    # DAAM (arXiv 2210.04885): all steps, 16/32/64 (8x8 skipped), bicubic, min-max, threshold 0.4.
    "daam": dict(resolutions=[16, 32, 64], refine_power=0, normalisation="min-max", normalise_at="combined",
                 upsampling="bicubic", background_threshold=0.4, uncertain_band=[]),
}


def preset_config(name: str, **overrides) -> PseudoMaskConfig:
    """The PseudoMaskConfig of a named recipe, with any field overridden."""
    if name not in PRESETS:
        raise SegsynthError(f"unknown pseudo-mask preset {name!r}; options: {', '.join(PRESETS)}")
    config = build_config(PseudoMaskConfig, {**PRESETS[name], **overrides}, source=f"pseudo-mask preset {name!r}")
    check_config(config)
    return config


def check_config(config: PseudoMaskConfig) -> None:
    """Refuse settings that contradict each other (each field's own range is checked as the config is made)."""
    band = config.uncertain_band
    if band and (len(band) != 2 or not 0.0 <= band[0] < band[1] <= 1.0):
        raise SegsynthError(f"pseudo-mask uncertain_band must be [] or [low, high] with 0 <= low < high <= 1, got {band}")
    if config.steps and (len(config.steps) != 2 or not 0 <= config.steps[0] < config.steps[1]):
        raise SegsynthError(f"pseudo-mask steps must be [] or [start, stop] with 0 <= start < stop, got {config.steps}")


def capture_settings(config: PseudoMaskConfig) -> dict:
    """The AttentionCapture keyword arguments this config needs: resolutions, self_resolutions, steps."""
    check_config(config)
    return dict(resolutions=tuple(config.resolutions),
                self_resolutions=(config.self_attention_resolution,) if config.refine_power else (),
                steps=tuple(config.steps) if config.steps else None)


# --- scores -------------------------------------------------------------------------


def _resize(maps: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[None], size=tuple(size), mode=mode, align_corners=False)[0]


def _normalise(maps: torch.Tensor, how: str) -> torch.Tensor:
    """Scale each class map (C, H, W) to [0, 1]; a map with no range becomes 0 (the class is nowhere)."""
    flat = maps.flatten(1)
    high = flat.max(dim=1).values[:, None, None]
    if how == "max":
        return torch.where(high > 0, maps / high.clamp_min(1e-12), torch.zeros_like(maps))
    low = flat.min(dim=1).values[:, None, None]
    spread = high - low
    return torch.where(spread > 0, (maps - low) / spread.clamp_min(1e-12), torch.zeros_like(maps))


def _refine(scores: torch.Tensor, self_attention: torch.Tensor, power: int) -> torch.Tensor:
    classes, height, width = scores.shape
    affinity = self_attention.reshape(height * width, height * width).to(scores)
    flat = scores.reshape(classes, height * width).T  # pixels x classes
    for _ in range(power):
        flat = affinity @ flat
    return flat.T.reshape(classes, height, width)


def class_scores(cross: Mapping[int, torch.Tensor], self_attention, config: PseudoMaskConfig,
                 out_size: Sequence[int]) -> torch.Tensor:
    """(C, H, W) float32 per-class scores in [0, 1] at `out_size` (steps 1-4 of the module docstring).

    cross: {resolution: (C, h, w)} per-class attention; self_attention: None, an (h, w, h, w) map, or
    {resolution: (h, w, h, w)} (`AttentionCapture.self_attention`), needed when refine_power > 0.
    """
    check_config(config)
    out_size = (int(out_size[0]), int(out_size[1]))
    missing = [r for r in config.resolutions if r not in cross]
    if missing:
        raise SegsynthError(f"pseudo mask needs cross-attention at resolution(s) {missing}; captured: "
                            f"{sorted(cross)} (capture them: AttentionCapture(resolutions=...))")
    maps = [torch.as_tensor(cross[r]).float() for r in config.resolutions]
    counts = {m.shape[0] for m in maps}
    if len(counts) != 1 or maps[0].ndim != 3:
        raise SegsynthError(f"cross-attention maps must be (classes, h, w) with one class count for every "
                            f"resolution, got shapes {[tuple(m.shape) for m in maps]}")

    # 1. the working grid, resize, optional per-resolution scaling
    refine = None
    if config.refine_power:
        refine = self_attention
        if isinstance(self_attention, Mapping):
            if config.self_attention_resolution not in self_attention:
                raise SegsynthError(f"refinement needs self-attention at resolution {config.self_attention_resolution}; "
                                    f"captured: {sorted(self_attention)}")
            refine = self_attention[config.self_attention_resolution]
        if refine is None:
            raise SegsynthError("refine_power > 0 needs the self-attention map; capture it with "
                                "AttentionCapture(self_resolutions=...) or set refine_power=0")
        refine = torch.as_tensor(refine).float()
        if refine.ndim != 4 or tuple(refine.shape[:2]) != tuple(refine.shape[2:]):
            raise SegsynthError(f"self-attention must be (h, w, h, w), got {tuple(refine.shape)}")
    grid = tuple(refine.shape[:2]) if refine is not None else out_size
    maps = [_resize(m, grid, config.upsampling) for m in maps]
    if config.normalise_at == "each-resolution":
        maps = [_normalise(m, config.normalisation) for m in maps]

    # 2.-4. average, refine, resize, scale
    scores = torch.stack(maps).mean(0)
    if refine is not None:
        scores = _refine(scores, refine, config.refine_power)
    scores = _resize(scores, out_size, config.upsampling)
    if config.normalise_at == "combined":
        scores = _normalise(scores, config.normalisation)
    return scores.clamp(0.0, 1.0)


def scores_to_mask(scores: torch.Tensor, config: PseudoMaskConfig, class_ids: Sequence[int],
                   background_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(label HxW uint8, confidence HxW float32 in [0, 1]) from (C, H, W) scores (step 5 of the module docstring)."""
    check_config(config)
    scores = torch.as_tensor(scores).float()
    if scores.shape[0] != len(class_ids):
        raise SegsynthError(f"{scores.shape[0]} class maps but {len(class_ids)} class ids")
    bad = [c for c in class_ids if not 0 <= int(c) < IGNORE_INDEX]
    if bad or not 0 <= int(background_id) <= IGNORE_INDEX:
        raise SegsynthError(f"class ids must be in 0..{IGNORE_INDEX - 1} ({IGNORE_INDEX} is ignore), got "
                            f"{bad or [background_id]}")
    # A dataset without a background class labels no-class pixels ignore (255): they are not known to be
    # anything, so they get confidence 0 too.
    background_ignored = int(background_id) == IGNORE_INDEX
    threshold = config.background_threshold
    height, width = scores.shape[1:]
    if scores.shape[0] == 0:  # no class in the prompt: all background, and sure of it
        sure = 0.0 if background_ignored else 1.0
        return np.full((height, width), background_id, np.uint8), np.full((height, width), sure, np.float32)

    # 1. winner and runner-up
    ranked = scores.topk(min(2, scores.shape[0]), dim=0)
    top, winner = ranked.values[0], ranked.indices[0]
    second = ranked.values[1] if scores.shape[0] > 1 else torch.zeros_like(top)
    is_class = top >= threshold

    # 2. labels
    ids = torch.tensor([int(c) for c in class_ids], dtype=torch.uint8)
    label = torch.where(is_class, ids[winner], torch.full_like(winner, background_id, dtype=torch.uint8))
    uncertain = torch.zeros_like(is_class)
    if config.uncertain_band:
        low, high = config.uncertain_band
        uncertain = (top >= low) & (top < high)
        label = torch.where(uncertain, torch.full_like(label, IGNORE_INDEX), label)

    # 3. confidence
    if config.confidence == "none":
        confidence = torch.ones_like(top)
    elif config.confidence == "score":
        confidence = torch.where(is_class, top, 1.0 - top)
    else:
        class_margin = (top - torch.maximum(second, torch.full_like(top, threshold))) / max(1.0 - threshold, 1e-12)
        background_margin = (threshold - top) / max(threshold, 1e-12)
        confidence = torch.where(is_class, class_margin, background_margin)
    unknown = uncertain | (~is_class if background_ignored else torch.zeros_like(is_class))
    confidence = torch.where(unknown, torch.zeros_like(confidence), confidence).clamp(0.0, 1.0)
    return label.numpy().astype(np.uint8), confidence.numpy().astype(np.float32)


def attention_to_mask(cross: Mapping[int, torch.Tensor], self_attention, config: PseudoMaskConfig,
                      out_size: Sequence[int], class_ids: Sequence[int],
                      background_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-class attention maps -> (label HxW uint8 with 255 = uncertain, confidence HxW float32 in [0, 1]).

    cross: {resolution: (C, h, w)}, row c the attention of class `class_ids[c]`'s word (its tokens averaged);
    self_attention: see `class_scores`; out_size: (H, W) of the image; pixels with no class get `background_id`
    (255 for datasets without a background class: ignored, confidence 0).
    """
    scores = class_scores(cross, self_attention, config, out_size)
    return scores_to_mask(scores.cpu(), config, class_ids, background_id)


# --- scoring against true labels ------------------------------------------------------


def score_pseudo_masks(predictions, labels, num_classes: int) -> tuple[float, np.ndarray]:
    """(mIoU in %, per-class IoU in % with NaN for classes in neither) of pseudo masks against true labels.

    `predictions` / `labels`: one HxW array each, or lists of them (one confusion matrix over all, as
    `segsynth evaluate`). Pixels ignored in the labels and pixels the pseudo mask left uncertain (255) are
    skipped, so this scores the pixels the mask commits to; its coverage is `(prediction != 255).mean()`.
    """

    if isinstance(predictions, np.ndarray) and predictions.ndim == 2:
        predictions, labels = [predictions], [labels]
    if len(predictions) != len(labels):
        raise SegsynthError(f"{len(predictions)} pseudo masks but {len(labels)} labels")
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for prediction, label in zip(predictions, labels):
        prediction, label = np.asarray(prediction), np.asarray(label)
        if prediction.shape != label.shape:
            raise SegsynthError(f"pseudo mask of shape {prediction.shape} against a label of shape {label.shape}")
        label = np.where(prediction == IGNORE_INDEX, IGNORE_INDEX, label)
        out_of_range = np.unique(np.concatenate([prediction[label != IGNORE_INDEX], label[label != IGNORE_INDEX]]))
        out_of_range = out_of_range[out_of_range >= num_classes]
        if out_of_range.size:
            raise SegsynthError(f"class id(s) {out_of_range.tolist()} are not below num_classes={num_classes}")
        confusion += confusion_matrix(prediction, label, num_classes)
    metrics = metrics_from_confusion(confusion, list(range(num_classes)))
    return metrics["miou"], np.array([metrics["per_class"][c] for c in range(num_classes)])


__all__ = ["PRESETS", "PseudoMaskConfig", "attention_to_mask", "capture_settings", "check_config", "class_scores",
           "preset_config", "score_pseudo_masks", "scores_to_mask"]
