"""Synthetic sets as datasets: `synthetic:DIR` (filtered masks when present) and `synthetic-raw:DIR`.

A synthetic set is a folder written by `segsynth synthesize` (format:
`segsynth.formats.manifest`). `segsynth filter` adds masks_filtered/ and, per
record, the filtered mask path and the fraction ignored per class. The set
stays `folder:`-compatible; these readers add what a folder cannot know: which
records are complete, the filtered masks and the per-pixel weight maps.
"""

from __future__ import annotations

from pathlib import Path

from segsynth import IGNORE_INDEX
from segsynth.data import palettes
from segsynth.data.base import Dataset, Pair, file_split, label_table
from segsynth.formats.manifest import MANIFEST, manifest_paths, read_manifest, read_set_info
from segsynth.io import SegsynthError, safe_relative_path


def open_synthetic(root: Path, spec: str, filtered: bool = True) -> Dataset:
    root = Path(root)
    if not (root / "classes.json").is_file() or not manifest_paths(root):
        raise SegsynthError(f"{root}: not a synthetic set (needs classes.json and {MANIFEST}); "
                            "make one with `segsynth synthesize --out DIR`")
    info = read_set_info(root)
    classes = info["classes"]
    palette = info.get("palette") or palettes.default_palette(len(classes))
    pairs = []
    for record in read_manifest(root):
        mask_key = "filtered_mask" if filtered and record.get("filtered_mask") else "mask"
        image = safe_relative_path(root, record["image"], f"{MANIFEST} image of {record['id']}")
        mask = safe_relative_path(root, record[mask_key], f"{MANIFEST} {mask_key} of {record['id']}")
        weight = (safe_relative_path(root, record["weight"], f"{MANIFEST} weight of {record['id']}")
                  if record.get("weight") else None)
        pairs.append(Pair(record["id"], image, mask, weight))
    if not pairs:
        raise SegsynthError(f"{root}: the manifest lists no finished samples; run or resume `segsynth synthesize`")
    table = label_table(len(classes), ignore_values=(IGNORE_INDEX,))
    dataset = Dataset(spec=spec, classes=tuple(classes), palette=tuple(map(tuple, palette)),
                      splits={"train": file_split("train", pairs, table, classes)}, pairs={"train": pairs},
                      label_table=table)
    return dataset
