"""Dataset specs: 'KIND:PATH' (or 'toy[:options]') -> Dataset, through a plain dict.

Any spec may end with sample selection options after a '?', '&' between them, each a list of sample-id
prefixes (a CamVid id starts with its sequence name, a Cityscapes id with its city):

  camvid:PATH?exclude=0001TP          every split without the samples whose id starts with 0001TP
  camvid:PATH?include=0001TP          only those (splits left empty are dropped)
  camvid:PATH?holdout=0001TP          those moved out of their splits into a split of their own, 'holdout'
  camvid:PATH?include=0006R0,0016E5   several prefixes: a sample matching any of them

CamVid's training images come from four sequences, 0001TP filmed at dusk and the others in daylight, so
`?holdout=0001TP` makes a domain-shift experiment of it: train on daylight, evaluate on dusk
(configs/camvid_dusk.yaml).
"""

from __future__ import annotations

from pathlib import Path

from segsynth.data import datasets, synthetic, toy
from segsynth.data.base import Dataset, subset_split
from segsynth.io import SegsynthError

SELECTIONS = ("include", "exclude", "holdout")  # sample selection options (the module docstring)
HOLDOUT = "holdout"

# kind -> opener(argument, spec). File kinds take a path; toy takes options.
DATASET_KINDS = {
    "camvid": lambda arg, spec: datasets.open_camvid(Path(arg), spec),
    "ade20k": lambda arg, spec: datasets.open_ade20k(Path(arg), spec),
    "cityscapes": lambda arg, spec: datasets.open_cityscapes(Path(arg), spec),
    "voc": lambda arg, spec: datasets.open_voc(Path(arg), spec),
    "coco-stuff": lambda arg, spec: datasets.open_coco_stuff(Path(arg), spec),
    "folder": lambda arg, spec: datasets.open_folder(Path(arg), spec),
    "synthetic": lambda arg, spec: synthetic.open_synthetic(Path(arg), spec, filtered=True),
    "synthetic-raw": lambda arg, spec: synthetic.open_synthetic(Path(arg), spec, filtered=False),
    "toy": lambda arg, spec: toy.open_toy(arg, spec),
}


def split_spec(spec: str) -> tuple[str, dict[str, list[str]]]:
    """'KIND:PATH?include=A,B&exclude=C' -> ('KIND:PATH', {'include': ['A', 'B'], 'exclude': ['C']})."""
    base, mark, query = spec.partition("?")
    options: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in query.split("&"))) if mark else ():
        key, equals, value = (s.strip() for s in part.partition("="))
        prefixes = [p.strip() for p in value.split(",") if p.strip()]
        if key not in SELECTIONS or not equals or not prefixes:
            raise SegsynthError(f"dataset spec {spec!r}: option {part!r}: write KEY=PREFIX[,PREFIX...] with KEY one of "
                                f"{', '.join(SELECTIONS)}, e.g. camvid:PATH?exclude=0001TP")
        if key in options:
            raise SegsynthError(f"dataset spec {spec!r}: option {key!r} given twice; list its prefixes once, "
                                "comma-separated")
        options[key] = prefixes
    if mark and not options:
        raise SegsynthError(f"dataset spec {spec!r}: nothing after '?'; give e.g. ?exclude=0001TP, or drop the '?'")
    if "include" in options and "exclude" in options:
        raise SegsynthError(f"dataset spec {spec!r}: give include or exclude, not both")
    return base, options


def base_spec(spec: str) -> str:
    """The spec without its sample selection options (what names the files)."""
    return spec.partition("?")[0]


def open_dataset(spec: str) -> Dataset:
    """Open a dataset named by a spec such as 'camvid:data/camvid', 'folder:my_set' or 'toy:n=400,size=96', with
    optional sample selection options ('camvid:data/camvid?exclude=0001TP': the module docstring)."""
    plain, options = split_spec(spec)
    kind, _, argument = plain.partition(":")
    kind = kind.strip().lower()
    if kind not in DATASET_KINDS:
        raise SegsynthError(
            f"unknown dataset kind {kind!r} in spec {spec!r}; kinds: {', '.join(DATASET_KINDS)} (write KIND:PATH)"
        )
    if kind != "toy" and not argument:
        raise SegsynthError(f"dataset spec {spec!r} needs a path: {kind}:PATH")
    dataset = DATASET_KINDS[kind](argument, spec)
    for name, split in dataset.splits.items():
        if len(split) == 0:
            raise SegsynthError(f"dataset {spec}: split {name!r} is empty; add samples or remove its folder/list")
    return select_samples(dataset, options) if options else dataset


def _matches(sample_id: str, prefixes: list[str]) -> bool:
    return sample_id.startswith(tuple(prefixes))


def select_samples(dataset: Dataset, options: dict[str, list[str]]) -> Dataset:
    """The dataset with the selection options applied (ids matched by prefix); splits left empty are dropped,
    and an option no sample id matches is an error naming the ids there are."""
    every_id = [sample_id for split in dataset.splits.values() for sample_id in split.ids]
    for key, prefixes in options.items():
        unmatched = [prefix for prefix in prefixes if not any(i.startswith(prefix) for i in every_id)]
        if unmatched:
            examples = sorted({i.split("_")[0] for i in every_id})[:8]
            raise SegsynthError(f"dataset {dataset.spec}: no sample id starts with {', '.join(map(repr, unmatched))} "
                                f"({key}); ids start e.g. with {', '.join(examples)}")
    if HOLDOUT in dataset.splits and HOLDOUT in options:
        raise SegsynthError(f"dataset {dataset.spec}: it has a split named {HOLDOUT!r} already; use include/exclude")
    keep, held_out = {}, []  # split name -> [(source split, indices kept)]; the holdout split's parts
    for name, split in dataset.splits.items():
        indices = range(len(split))
        if "include" in options:
            indices = [i for i in indices if _matches(split.ids[i], options["include"])]
        if "exclude" in options:
            indices = [i for i in indices if not _matches(split.ids[i], options["exclude"])]
        if HOLDOUT in options:
            moved = [i for i in indices if _matches(split.ids[i], options[HOLDOUT])]
            held_out += [(name, moved)] if moved else []
            indices = [i for i in indices if not _matches(split.ids[i], options[HOLDOUT])]
        if indices:
            keep[name] = [(name, list(indices))]
    if held_out:
        keep[HOLDOUT] = held_out
    if not keep:
        raise SegsynthError(f"dataset {dataset.spec}: the selection leaves no sample; check the prefixes")
    splits, pairs = {}, {}
    for name, parts in keep.items():
        splits[name] = subset_split(name, [(dataset.splits[source], indices) for source, indices in parts])
        if all(source in dataset.pairs for source, _ in parts):
            pairs[name] = [dataset.pairs[source][i] for source, indices in parts for i in indices]
    return Dataset(spec=dataset.spec, classes=dataset.classes, palette=dataset.palette, splits=splits, pairs=pairs,
                   label_table=dataset.label_table)
