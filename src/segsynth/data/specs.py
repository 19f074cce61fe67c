"""Dataset specs: 'KIND:PATH' (or 'toy[:options]') -> Dataset, through a plain dict."""

from __future__ import annotations

from pathlib import Path

from segsynth.data import datasets, synthetic, toy
from segsynth.data.base import Dataset
from segsynth.io import SegsynthError

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


def open_dataset(spec: str) -> Dataset:
    """Open a dataset named by a spec such as 'camvid:data/camvid', 'folder:my_set' or 'toy:n=400,size=96'."""
    kind, _, argument = spec.partition(":")
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
    return dataset
