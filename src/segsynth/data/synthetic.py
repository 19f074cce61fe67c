"""Synthetic sets as datasets: `synthetic:DIR` (filtered masks when present) and `synthetic-raw:DIR`.

A synthetic set is a folder written by `segsynth synthesize`: images/, masks/,
classes.json and manifest.jsonl (one record per finished sample). `segsynth
filter` adds masks_filtered/ and, per record, the filtered mask path and the
fraction ignored per class. The set stays `folder:`-compatible; these readers
add what a folder cannot know: which records are complete, the filtered masks,
and each sample's source mask (for SegGen's replace recipe).
"""

from __future__ import annotations

from pathlib import Path

from segsynth.data import palettes
from segsynth.data.base import Dataset, Pair, file_split, label_table
from segsynth.io import SegsynthError, read_json, read_jsonl, safe_relative_path
from segsynth import IGNORE_INDEX

MANIFEST = "manifest.jsonl"


def manifest_paths(root: Path) -> list[Path]:
    """The manifest, plus per-rank manifests a sharded run may have left unmerged."""
    return [p for p in [root / MANIFEST, *sorted(root.glob("manifest.rank*.jsonl"))] if p.is_file()]


def read_manifest(root: str | Path) -> list[dict]:
    """All complete records of a synthetic set, unique by id, in a stable order."""
    root = Path(root)
    records: dict[str, dict] = {}
    for path in manifest_paths(root):
        for record in read_jsonl(path):
            if "id" not in record or "image" not in record or "mask" not in record:
                raise SegsynthError(f"{path}: record without id/image/mask: {str(record)[:120]}; regenerate the set")
            records[record["id"]] = {**records.get(record["id"], {}), **record}
    return sorted(records.values(), key=lambda r: r["id"])


def read_set_info(root: str | Path) -> dict:
    """A synthetic set's classes.json, checked: a dict with "classes", a non-empty list of names."""
    path = Path(root) / "classes.json"
    if not path.is_file():
        raise SegsynthError(f"{path}: missing; {root} is not a synthetic set (make one with `segsynth synthesize --out DIR`)")
    info = read_json(path)
    classes = info.get("classes") if isinstance(info, dict) else None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise SegsynthError(f"{path}: needs \"classes\": a non-empty list of class names; "
                            "restore the file `segsynth synthesize` wrote, or regenerate the set")
    return info


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
        pairs.append(Pair(record["id"], image, mask))
    if not pairs:
        raise SegsynthError(f"{root}: the manifest lists no finished samples; run or resume `segsynth synthesize`")
    table = label_table(len(classes), ignore_values=(IGNORE_INDEX,))
    dataset = Dataset(spec=spec, classes=tuple(classes), palette=tuple(map(tuple, palette)),
                      splits={"train": file_split("train", pairs, table, classes)}, pairs={"train": pairs},
                      label_table=table)
    return dataset


def sources_of(root: str | Path) -> dict[str, list[str]]:
    """Real mask id -> ids of the synthetic samples rendered from it."""
    by_source: dict[str, list[str]] = {}
    for record in read_manifest(root):
        by_source.setdefault(record.get("source", record["id"]), []).append(record["id"])
    return by_source
