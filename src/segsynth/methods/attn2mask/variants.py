"""A second labelling of a synthetic set's images, without rendering them again.

An attention generator keeps, beside each sample's pseudo-mask, the plain one
(extras/raw_label: no uncertain band, no threshold without a background class).
`derive_label_set` makes a synthetic set of the same images labelled by such an
extra, with no weight maps, so an ablation compares labellings of identical
images at the cost of one render. Images are hard links where the file system
allows (copies otherwise); the set is an ordinary synthetic set (formats/manifest.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


from segsynth.data.base import read_raw_mask
from segsynth.formats.manifest import MANIFEST, read_manifest, read_set_info, sample_record, write_set_info
from segsynth.io import (SegsynthError, atomic_write_json, atomic_write_png, atomic_write_text, link_or_copy,
                         read_json, safe_relative_path)

# Record keys that describe the source's own files and are not carried over.
_FILE_KEYS = ("id", "image", "mask", "weight", "extras", "filtered_mask")


def derive_label_set(source: str | os.PathLike, out: str | os.PathLike, extra: str = "raw_label") -> dict:
    """Write OUT: SOURCE's images with SOURCE's `extra` label maps as masks and no weights; returns its summary."""
    source, out = Path(source), Path(out)
    records = read_manifest(source)
    if not records:
        raise SegsynthError(f"{source}: no finished samples to relabel; run `segsynth synthesize` first")
    missing = [record["id"] for record in records if extra not in (record.get("extras") or {})]
    if missing:
        raise SegsynthError(f"{source}: {len(missing)} sample(s) have no {extra!r} extra (e.g. {missing[:3]}); "
                            "make the set with an attention generator (attention:DIR or attention-sd:BASE)")
    info = read_set_info(source)
    out.mkdir(parents=True, exist_ok=True)
    write_set_info(out, info["classes"], info.get("palette") or [])
    lines = []
    for record in records:
        name = Path(record["image"]).name
        files = {"image": f"images/{name}", "mask": f"masks/{name}"}
        link_or_copy(source / record["image"], out / files["image"])
        label = read_raw_mask(safe_relative_path(source, record["extras"][extra], f"manifest {extra} of {record['id']}"))
        atomic_write_png(out / files["mask"], label, info.get("palette"))
        fields = {key: value for key, value in record.items() if key not in _FILE_KEYS}
        lines.append(json.dumps(sample_record(record["id"], files, **fields)) + "\n")
    summary = {"derived_from": str(source), "labels": f"extras/{extra}", "samples": len(lines)}
    state = source / "synthesis.json"
    if state.is_file():
        atomic_write_json(out / "synthesis.json", {**read_json(state), **summary})
    atomic_write_json(out / "summary.json", {**(read_json(source / "summary.json") if (source / "summary.json").is_file()
                                                else {}), **summary})
    atomic_write_text(out / MANIFEST, "".join(lines))  # last: its presence means the set is complete
    return summary


__all__ = ["derive_label_set"]
