"""`segsynth attention-quality`: how good are a generator's attention pseudo-masks, recipe by recipe?

Synthetic images have no true labels, so the pseudo-masks are scored where
labels exist: on real held-out images. Each image is brought to the
generator's working size and noised to one timestep t (seeded noise); the UNet
runs once on it with the image's class prompt ("a photo of road, car": its
image-level labels, the classes covering at least 0.5% of it, as in training);
the cross-attention to each class word (and the self-attention, for recipes
that refine with it) is captured once and turned into a pseudo-mask by every
recipe; each is scored against the real label (mIoU per class, as
`segsynth evaluate`, over the pixels the mask commits to) with its coverage
(the share of labelled pixels it does not leave ignore). This is the
"attention on real images" check of DiffuMask / Dataset Diffusion ablations.

Writes OUT/attention_quality.json and OUT/attention_quality.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segsynth import IGNORE_INDEX
from segsynth.config import save_config
from segsynth.cpu import thread_governor
from segsynth.data import open_dataset
from segsynth.data.validate import check_before_compute
from segsynth.generators import GeneratorSettings, open_generator
from segsynth.generators.base import Request
from segsynth.io import SegsynthError, atomic_write_json, atomic_write_text
from segsynth.methods.attn2mask.pseudo_mask import class_scores, preset_config, score_pseudo_masks, scores_to_mask
from segsynth.outputs import claim_folder
from segsynth.stage_configs import AttentionQualityConfig


def attention_quality(config: AttentionQualityConfig) -> dict:
    """Score every recipe's pseudo-masks on `config.split`; returns the results also written to OUT."""
    with claim_folder(config.out, "attention-quality", "attention_quality.config.yaml", "AttentionQualityConfig",
                      markers=("attention_quality.json",)):
        return _attention_quality(config)


def _attention_quality(config: AttentionQualityConfig) -> dict:
    from segsynth.generators.builtin_text.train import class_prompt, present_classes

    # 1. Data, recipes and generator, checked before any compute.
    dataset = open_dataset(config.data)
    split = dataset.split(config.split)
    check_before_compute(dataset, [config.split])
    recipes = {name: preset_config(name, **config.pseudo_mask_settings) for name in config.presets}
    generator = open_generator(config.generator, GeneratorSettings(
        pseudo_mask=config.presets[0], pseudo_mask_settings=dict(config.pseudo_mask_settings), dtype=config.dtype,
        device=config.device))
    if not hasattr(generator, "attention_of_image"):
        raise SegsynthError(f"generator {config.generator} has no attention to score; use attention:DIR or "
                            "attention-sd:BASE")
    generator.check_dataset(dataset.classes, dataset.palette)
    resolutions = sorted({r for recipe in recipes.values() for r in recipe.resolutions})
    self_resolutions = sorted({recipe.self_attention_resolution for recipe in recipes.values() if recipe.refine_power})

    # 2. One noised UNet pass per image; every recipe reads the same maps.
    count = len(split) if not config.limit else min(config.limit, len(split))
    predictions: dict[str, list[np.ndarray]] = {name: [] for name in recipes}
    labels, skipped = [], []
    for index in range(count):
        thread_governor().tick()
        sample = split[index]
        names = [dataset.classes[c] for c in present_classes(sample.label, dataset.num_classes)]
        if not names:
            skipped.append(sample.id)
            continue
        request = Request(f"{sample.id}_s{config.seed + index}", "text", config.seed + index, prompt=class_prompt(names),
                          class_words=tuple((name, (name,)) for name in names))
        class_ids, cross, self_attention = generator.attention_of_image(
            sample.image, request, config.timestep, config.seed + index, resolutions, self_resolutions)
        labels.append(sample.label)
        for name, recipe in recipes.items():
            scores = class_scores(cross, self_attention, recipe, sample.label.shape).cpu()
            prediction, _ = scores_to_mask(scores, recipe, class_ids, generator.background_id)
            predictions[name].append(prediction)
    if not labels:
        raise SegsynthError(f"{config.data} split {config.split}: no image with a labelled class to score")

    # 3. Scores per recipe, written as JSON and a markdown table.
    labelled = [label != IGNORE_INDEX for label in labels]
    results = {"generator": generator.identity(), "data": config.data, "split": config.split, "images": len(labels),
               "skipped": skipped, "timestep": config.timestep, "seed": config.seed, "classes": list(dataset.classes),
               "recipes": {}}
    for name, recipe in recipes.items():
        miou, per_class = score_pseudo_masks(predictions[name], labels, dataset.num_classes)
        covered = sum(int(((p != IGNORE_INDEX) & m).sum()) for p, m in zip(predictions[name], labelled))
        results["recipes"][name] = {
            "miou": round(float(miou), 2), "coverage": round(covered / max(1, sum(int(m.sum()) for m in labelled)), 4),
            "per_class": {c: (None if np.isnan(v) else round(float(v), 2)) for c, v in zip(dataset.classes, per_class)},
            "settings": {key: value for key, value in vars(recipe).items()}}
    out = Path(config.out)
    atomic_write_json(out / "attention_quality.json", results)
    atomic_write_text(out / "attention_quality.md", format_quality(results) + "\n")
    save_config(config, out / "attention_quality.config.yaml")
    return results


def format_quality(results: dict) -> str:
    """A markdown table: recipes as rows, mIoU, coverage and per-class IoU as columns."""
    classes = results["classes"]
    lines = [f"attention pseudo-masks on {results['data']} {results['split']} ({results['images']} images, "
             f"timestep {results['timestep']}): IoU % over the pixels each mask labels", "",
             "| recipe | mIoU | coverage | " + " | ".join(classes) + " |",
             "|---|---:|---:|" + "---:|" * len(classes)]
    for name, row in results["recipes"].items():
        cells = ["n/a" if row["per_class"][c] is None else f"{row['per_class'][c]:.1f}" for c in classes]
        lines.append(f"| {name} | {row['miou']:.1f} | {100 * row['coverage']:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["attention_quality", "format_quality"]
