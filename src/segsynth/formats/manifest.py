"""The synthetic-set format: a folder of samples and the manifest that says which are finished.

    images/<id>.png        the generated image
    masks/<id>.png         its label map (palette PNG of class ids, 255 = ignore)
    weights/<id>.png       optional per-pixel confidence, 8-bit (value / 255), used as loss weight
    extras/<name>/<id>.png optional pictures kept beside a sample (colour-coded mask, attention map)
    classes.json           {"classes": [...], "palette": [...], "ignore_index": 255}
    synthesis.json         what made the set (written by `segsynth synthesize`)
    manifest.jsonl         one record per finished sample

A record, appended only after every file it names is in place:

    {"id": "<entry>_s<seed>", "kind": "mask", "source": "<mask id>" | null, "seed": 42,
     "image": "images/...png", "mask": "masks/...png", "weight": "weights/...png" (optional),
     "extras": {"colour_mask": "extras/colour_mask/...png"} (optional), "prompt": "..." | null,
     "generator": {...}, "steps": 20, "guidance": 2.0, "size": [h, w], "seconds": 0.31, "meta": {...}}

Later stages add fields to a record by appending a record with the same id
(the filter adds "filtered_mask", "ignored_fraction", "ignored"); readers merge
records by id. Torchrun ranks append to manifest.rank<R>.jsonl, merged into
manifest.jsonl by `merge_manifests`. Paths are relative to the folder and may
not leave it.
"""

from __future__ import annotations

import json
from pathlib import Path

from segsynth import IGNORE_INDEX
from segsynth.formats.classes import check_class_list, check_palette
from segsynth.io import SegsynthError, atomic_write_json, atomic_write_text, read_json, read_jsonl

MANIFEST = "manifest.jsonl"
CLASSES_FILE = "classes.json"
# Sub-folders whose files the manifest names; anything in them no record names is an orphan of a kill.
SAMPLE_FOLDERS = ("images", "masks", "weights")
EXTRAS = "extras"


def manifest_paths(root: Path) -> list[Path]:
    """The manifest, plus per-rank manifests a sharded run may have left unmerged."""
    root = Path(root)
    return [p for p in [root / MANIFEST, *sorted(root.glob("manifest.rank*.jsonl"))] if p.is_file()]


def read_records(root: str | Path) -> dict[str, dict]:
    """Records by id from manifest.jsonl and any rank manifests; a later record of an id adds to it."""
    records: dict[str, dict] = {}
    for path in manifest_paths(Path(root)):
        for record in read_jsonl(path):
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                records[record["id"]] = {**records.get(record["id"], {}), **record}
    return records


def read_manifest(root: str | Path) -> list[dict]:
    """All complete records of a synthetic set, unique by id, sorted by id; a record without its
    id, image or mask is an error."""
    root = Path(root)
    for path in manifest_paths(root):
        for record in read_jsonl(path):
            if not isinstance(record, dict) or "id" not in record or "image" not in record or "mask" not in record:
                raise SegsynthError(f"{path}: record without id/image/mask: {str(record)[:120]}; regenerate the set")
    return sorted(read_records(root).values(), key=lambda r: r["id"])


def record_files(record: dict) -> list[str]:
    """Every file (relative path) a record names."""
    files = [record["image"], record["mask"]]
    if record.get("weight"):
        files.append(record["weight"])
    files += list((record.get("extras") or {}).values())
    return files


def sample_record(sample_id: str, files: dict[str, str], **fields) -> dict:
    """A manifest record in the documented key order (files: image, mask, optional weight and extras)."""
    record = {"id": sample_id, **fields, "image": files["image"], "mask": files["mask"]}
    if "weight" in files:
        record["weight"] = files["weight"]
    if files.get("extras"):
        record["extras"] = files["extras"]
    return record


def merge_manifests(root: Path, order: dict[str, int]) -> dict[str, dict]:
    """Merge rank manifests into manifest.jsonl (in `order`), drop records whose files are gone and
    delete every file no record names (a kill's leftovers); returns the kept records by id.

    Order matters for kill-safety: the merged manifest is written (atomically) before the rank
    manifests and files it supersedes are removed."""
    root = Path(root)
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    complete = {sample_id: record for sample_id, record in read_records(root).items()
                if all((root / name).is_file() for name in record_files(record))}
    kept = sorted(complete.values(), key=lambda record: order.get(record["id"], len(order)))
    atomic_write_text(root / MANIFEST, "".join(json.dumps(record) + "\n" for record in kept))
    for rank_manifest in root.glob("manifest.rank*.jsonl"):
        rank_manifest.unlink(missing_ok=True)
    named = {str(Path(name)) for record in kept for name in record_files(record)}
    folders = [root / name for name in SAMPLE_FOLDERS] + sorted((root / EXTRAS).glob("*"))
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.is_file() and str(path.relative_to(root)) not in named:
                path.unlink(missing_ok=True)
    return complete


def write_set_info(root: Path, classes, palette) -> None:
    atomic_write_json(Path(root) / CLASSES_FILE, {"classes": list(classes), "palette": [list(c) for c in palette],
                                                  "ignore_index": IGNORE_INDEX})


def read_set_info(root: str | Path) -> dict:
    """A synthetic set's classes.json, checked: a dict with "classes", a non-empty list of names."""
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        raise SegsynthError(f"{path}: missing; {root} is not a synthetic set (make one with `segsynth synthesize --out DIR`)")
    info = read_json(path)
    fix = "restore the file `segsynth synthesize` wrote, or regenerate the set"
    if not isinstance(info, dict):
        raise SegsynthError(f"{path}: needs \"classes\": a non-empty list of class names; {fix}")
    classes = check_class_list(info.get("classes"), str(path), fix)
    if info.get("palette"):
        check_palette(info["palette"], classes, str(path), fix)
    state = Path(root) / "synthesis.json"
    if state.is_file():  # what synthesize recorded when it made the set
        recorded = read_json(state).get("classes")
        if recorded is not None and list(recorded) != classes:
            raise SegsynthError(f"{path}: classes {classes[:4]}... differ from those {state} recorded "
                                f"({list(recorded)[:4]}...), so the set's label ids are ambiguous; {fix}")
    return info
