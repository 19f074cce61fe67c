"""Training recipes: which sources the training loop draws from.

  real               the real training split
  synthetic          the synthetic sets only
  joint              real repeated to match the synthetic count, one shuffled stream (FreeMask)
  pretrain-finetune  a synthetic stage, then a real stage (train.py runs the two stages)
  replace            each real draw replaced by a synthetic sample with probability p
                     (SegGen, p = 0.6): one of the same real mask (--replace-from
                     same-mask), or any sample of the synthetic sets, uniformly
                     (--replace-from pool: SegGen's MaskSyn masks have no real twin)
  paste              every draw real; with probability p the filter-kept pixels of
                     --paste-classes from a synthetic sample are pasted over it
                     (copy-paste: synthetic data teaches only those classes); the
                     donor from --paste-from pool, same-mask, real (the control) or
                     pool+real (synthetic and real donors together)
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
    pool, index = synthetic_alternatives(config, real, config.replace_from, "--replace-from")
    return [Source("real+replace", real.split("train"), 1.0, alternatives=pool, alternative_index=index,
                   alternative_probability=config.replace_probability)]


def paste_sources(config, real: Dataset):
    """Copy-paste: every draw is a real sample; with probability p, the pixels of --paste-classes that the
    filter kept in a synthetic sample (of the same real mask, or any: --paste-from) are pasted over it. The
    synthetic set then teaches only the classes pasted, and every other pixel of every draw stays real, where
    the joint recipe shows each real image half as often and the generator's large classes as well.
    --paste-from real takes the donors from the real training split instead: copy-paste without synthetic data,
    the control that tells the synthetic pixels' share of a gain from the augmentation's; pool+real draws each
    donor uniformly from the synthetic samples and the real training images together, so that the synthetic
    set is measured as an addition to copy-paste from real images rather than against it."""
    classes = paste_class_ids(config, real)
    if config.paste_from == "real":
        if config.synthetic:
            raise SegsynthError("--paste-from real pastes pixels of other real training images; it reads no "
                                "--synthetic set: drop --synthetic, or paste from it with --paste-from pool")
        pool, index = real.split("train"), None
    elif config.paste_from == "pool+real":
        if not config.synthetic:
            raise SegsynthError("--paste-from pool+real draws donors from the --synthetic sets and the real "
                                "training images; name a set with --synthetic DIR, or use --paste-from real")
        synthetic_pool, _ = synthetic_alternatives(config, real, "pool", "--paste-from")
        real_split = real.split("train")
        # Synthetic ids may repeat real ones (a sample named after its mask): the real donors get their own ids.
        real_donors = Split("real donors", [f"real:{sample_id}" for sample_id in real_split.ids], real_split.__getitem__)
        pool, index = concat_splits("synthetic and real donors", [synthetic_pool, real_donors]), None
    else:
        pool, index = synthetic_alternatives(config, real, config.paste_from, "--paste-from")
    return [Source("real+paste", real.split("train"), 1.0, alternatives=pool, alternative_index=index,
                   alternative_probability=config.paste_probability, paste_classes=classes)]


def paste_class_ids(config, real: Dataset) -> tuple[int, ...]:
    names = list(real.classes)
    if not config.paste_classes:
        raise SegsynthError(f"recipe paste needs --paste-classes NAME (once per class), the classes whose synthetic pixels "
                            f"are pasted onto real images; {real.spec}'s classes: {', '.join(names)}")
    unknown = [name for name in config.paste_classes if name not in names]
    if unknown:
        raise SegsynthError(f"--paste-classes: {', '.join(unknown)} not a class of {real.spec}; "
                            f"options: {', '.join(names)}")
    return tuple(names.index(name) for name in config.paste_classes)


def synthetic_alternatives(config, real: Dataset, mode: str, option: str) -> tuple[Split, dict[int, list[int]] | None]:
    """The pooled synthetic samples, and for `same-mask` the pool indices made from each real training mask
    (None for `pool`: any pooled sample may be drawn)."""
    sets = open_synthetic_sets(config, real)
    pool: Split = concat_splits("synthetic", [s.split("train") for s in sets])
    if mode == "pool":
        return pool, None
    real_split = real.split("train")
    alternatives: dict[int, list[int]] = {}
    offset = 0
    for folder, dataset in zip(config.synthetic, sets):
        for index, record in enumerate(read_manifest(folder)):
            source = record.get("source")
            if source is not None and real_split.has(source):
                alternatives.setdefault(real_split.index_of(source), []).append(offset + index)
        offset += len(dataset.split("train"))
    if not alternatives:
        raise SegsynthError(f"no synthetic sample names a real training mask as its source; {config.recipe} "
                            f"{mode} needs sets made by `segsynth synthesize` from this dataset, or {option} pool")
    return pool, alternatives


# recipe name -> builder(config, real dataset) -> sources. pretrain-finetune runs
# `synthetic` then `real` as two stages (see train.train).
RECIPES = {
    "real": real_sources,
    "synthetic": synthetic_sources,
    "joint": joint_sources,
    "pretrain-finetune": synthetic_sources,
    "replace": replace_sources,
    "paste": paste_sources,
}
