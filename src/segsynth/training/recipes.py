"""Training recipes: which sources the training loop draws from.

  real               the real training split
  synthetic          the synthetic sets only
  joint              real repeated to match the synthetic count, one shuffled stream (FreeMask)
  pretrain-finetune  a synthetic stage, then a real stage (train.py runs the two stages)
  replace            each real draw replaced by a synthetic sample with probability p
                     (SegGen, p = 0.6): one of the same real mask (--replace-from
                     same-mask), or any sample of the synthetic sets, uniformly
                     (--replace-from pool: SegGen's MaskSyn masks have no real twin)
Synthetic sets are read with their filtered masks when they have them
(`--synthetic-masks auto`), so filter-ignored pixels reach the loss as 255.
"""

from __future__ import annotations

from pathlib import Path

from segsynth.data.base import Dataset, Split, concat_splits
from segsynth.data.synthetic import open_synthetic
from segsynth.formats.manifest import read_manifest
from segsynth.io import SegsynthError
from segsynth.training.stream import Source



def open_synthetic_sets(config, real: Dataset) -> list[Dataset]:
    """Open every --synthetic folder with the chosen masks, checking it matches the real classes."""
    if not config.synthetic:
        raise SegsynthError(f"recipe {config.recipe!r} needs at least one --synthetic DIR")
    sets = []
    for folder in config.synthetic:
        filtered_available = any(r.get("filtered_mask") for r in read_manifest(folder))
        if config.synthetic_masks == "filtered" and not filtered_available:
            raise SegsynthError(f"{folder}: not filtered yet; run `segsynth filter --synthetic {folder} ...` "
                                "or train with --synthetic-masks raw")
        use_filtered = config.synthetic_masks != "raw" and filtered_available
        if use_filtered:
            check_not_all_ignored(Path(folder))
        dataset = open_synthetic(Path(folder), f"synthetic:{folder}", filtered=use_filtered)
        if list(dataset.classes) != list(real.classes):
            raise SegsynthError(f"{folder}/classes.json: classes differ from {real.spec}'s; "
                                "use a synthetic set made from this dataset")
        sets.append(dataset)
    return sets


def check_not_all_ignored(folder: Path) -> None:
    """A filtered set whose every sample the filter set entirely to ignore teaches nothing (alpha too small)."""
    fractions = [r.get("ignored_fraction") for r in read_manifest(folder) if r.get("filtered_mask")]
    if fractions and all(fraction is not None and fraction >= 1.0 for fraction in fractions):
        raise SegsynthError(f"{folder}: the filter set every pixel of all {len(fractions)} filtered samples to ignore, "
                            "so training on them would learn nothing; refilter with a larger --alpha (FreeMask uses "
                            "1.25; see filter.json for the one used), or train with --synthetic-masks raw")


def real_sources(config, real: Dataset):
    return [Source("real", real.split("train"), 1.0)]


def synthetic_sources(config, real: Dataset):
    return [Source(f"synthetic:{folder}", s.split("train"), 1.0) for folder, s in
            zip(config.synthetic, open_synthetic_sets(config, real))]


def joint_sources(config, real: Dataset):
    """FreeMask's joint training: real repeated so it matches the synthetic count, all in one stream."""
    synthetic = synthetic_sources(config, real)
    real_split = real.split("train")
    total = sum(len(source.split) for source in synthetic)
    return [Source("real", real_split, max(1.0, total / len(real_split))), *synthetic]


def replace_sources(config, real: Dataset):
    """SegGen: a real draw becomes a synthetic sample with probability p -- of the same real mask (same-mask),
    or drawn uniformly from every synthetic sample (pool)."""
    sets = open_synthetic_sets(config, real)
    pool: Split = concat_splits("synthetic", [s.split("train") for s in sets])
    real_split = real.split("train")
    if config.replace_from == "pool":  # no index: every draw may become any pooled sample (training/stream.py)
        return [Source("real+replace", real_split, 1.0, alternatives=pool, replace_probability=config.replace_probability)]
    alternatives: dict[int, list[int]] = {}
    offset = 0
    for folder, dataset in zip(config.synthetic, sets):
        for index, record in enumerate(read_manifest(folder)):
            source = record.get("source")
            if source is not None and real_split.has(source):
                alternatives.setdefault(real_split.index_of(source), []).append(offset + index)
        offset += len(dataset.split("train"))
    if not alternatives:
        raise SegsynthError("no synthetic sample names a real training mask as its source; the replace recipe "
                            "needs sets made by `segsynth synthesize` from this dataset, or --replace-from pool")
    return [Source("real+replace", real_split, 1.0, alternatives=pool, alternative_index=alternatives,
                   replace_probability=config.replace_probability)]


# recipe name -> builder(config, real dataset) -> sources. pretrain-finetune runs
# `synthetic` then `real` as two stages (see train.train).
RECIPES = {
    "real": real_sources,
    "synthetic": synthetic_sources,
    "joint": joint_sources,
    "pretrain-finetune": synthetic_sources,
    "replace": replace_sources,
}
