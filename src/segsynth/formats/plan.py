"""The plan format: a JSONL file of entries, each expanding to one generator request per seed.

    {"id": "0001TP_006690", "seeds": [0, 1]}                                      a mask of the plan's dataset
    {"id": "0001TP_006690", "seeds": [0, 1], "prompt": "road across the bottom"}  the same, with a caption
    {"id": "street-3", "kind": "text", "seeds": [7], "prompt": "a photo of a road and a car",
     "class_words": {"road": ["road"], "car": ["car"]}}                            a text request
    {"id": "free", "kind": "none", "seeds": [8, 9]}                                 unconditional
    {"id": "0001TP_006690@pole", "source": "0001TP_006690", "crop": [40, 60, 108, 144], "seeds": [3]}
                                                    a crop [top, left, height, width] of a mask (class-centred crops)

`kind` defaults to "mask", whose `id` names the mask (a real mask, or one a
text -> mask stage generated, in whatever dataset the plan is rendered from),
unless `source` names it: then `id` only names the entry, so one mask can have
several entries (e.g. crops of it). `crop` renders that window of the mask,
in its own pixels, instead of the whole mask; the sample's label is the crop.
Seeds are distinct across the plan, so no two samples start from the same
noise; sample `i` of an entry is named "<id>_s<seed>". Any other key a planner
adds (FreeMask's "hardness") is kept in `PlanEntry.extra`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from segsynth.generators.base import REQUEST_KINDS, Request
from segsynth.io import SegsynthError, atomic_write_text, read_jsonl

_KNOWN_KEYS = ("id", "seeds", "kind", "prompt", "class_words", "source", "crop")
MAX_SEED = 2**32 - 1


@dataclass
class PlanEntry:
    id: str
    seeds: list[int]
    extra: dict = field(default_factory=dict)
    kind: str = "mask"
    prompt: str = ""
    class_words: dict[str, list[str]] = field(default_factory=dict)
    source: str | None = None  # kind "mask": the mask id when it is not `id`
    crop: list[int] | None = None  # kind "mask": [top, left, height, width] of the mask to render

    def to_json(self) -> dict:
        record: dict = {"id": self.id, "seeds": self.seeds}
        if self.source is not None:
            record["source"] = self.source
        if self.crop is not None:
            record["crop"] = list(self.crop)
        if self.kind != "mask":
            record["kind"] = self.kind
        if self.prompt:
            record["prompt"] = self.prompt
        if self.class_words:
            record["class_words"] = self.class_words
        return {**record, **self.extra}


def write_plan(path: str | Path, entries: list[PlanEntry]) -> Path:
    """Write a plan atomically (entries without seeds are left out)."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(entry.to_json()) + "\n" for entry in entries if entry.seeds))
    return path


def read_plan(path: str | Path) -> list[PlanEntry]:
    """Read and validate a plan file: unique ids, non-empty lists of unique integer seeds, known kinds."""
    path = Path(path)
    if path.is_dir():
        raise SegsynthError(f"plan file {path}: is a folder, not a plan file; give the file `segsynth plan --out` wrote")
    if not path.is_file():
        raise SegsynthError(f"plan file {path} not found; make one with `segsynth plan --data SPEC --uniform K --out {path}`")
    entries, seen = [], set()
    for number, record in enumerate(read_jsonl(path), 1):
        where = f"{path}: entry {number}"
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not record["id"]:
            raise SegsynthError(f"{where}: needs an \"id\" string")
        seeds = record.get("seeds")
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise SegsynthError(f"{where} ({record['id']}): \"seeds\" must be a non-empty list of integers")
        if not all(0 <= s <= MAX_SEED for s in seeds):
            bad = next(s for s in seeds if not 0 <= s <= MAX_SEED)
            raise SegsynthError(f"{where} ({record['id']}): seed {bad} is outside 0..{MAX_SEED} (the 32-bit seeds numpy and "
                                "torch take); make the plan with `segsynth plan --seed N`")
        if len(set(seeds)) != len(seeds):
            raise SegsynthError(f"{where} ({record['id']}): repeated seeds {seeds}")
        if record["id"] in seen:
            raise SegsynthError(f"{where}: id {record['id']!r} appears twice; merge its seeds into one line")
        kind = record.get("kind", "mask")
        if kind not in REQUEST_KINDS:
            raise SegsynthError(f"{where} ({record['id']}): unknown kind {kind!r}; options: {', '.join(REQUEST_KINDS)}")
        prompt = record.get("prompt") or ""
        if not isinstance(prompt, str):
            raise SegsynthError(f"{where} ({record['id']}): \"prompt\" must be a string")
        if kind == "text" and not prompt.strip():
            raise SegsynthError(f"{where} ({record['id']}): a text entry needs a non-empty \"prompt\"")
        class_words = record.get("class_words") or {}
        if not isinstance(class_words, dict) or not all(
                isinstance(words, list) and all(isinstance(w, str) for w in words) for words in class_words.values()):
            raise SegsynthError(f"{where} ({record['id']}): \"class_words\" must map class names to lists of words")
        source, crop = _mask_window(record, kind, where)
        seen.add(record["id"])
        extra = {k: v for k, v in record.items() if k not in _KNOWN_KEYS}
        entries.append(PlanEntry(record["id"], seeds, extra, kind, prompt, class_words, source, crop))
    if not entries:
        raise SegsynthError(f"plan file {path} is empty")
    return entries


def _mask_window(record: dict, kind: str, where: str) -> tuple[str | None, list[int] | None]:
    """An entry's "source" (the mask id, when not its own id) and "crop" ([top, left, height, width]), checked."""
    source, crop = record.get("source"), record.get("crop")
    if (source is not None or crop is not None) and kind != "mask":
        raise SegsynthError(f"{where} ({record['id']}): \"source\" and \"crop\" belong to mask entries, not kind {kind!r}")
    if source is not None and (not isinstance(source, str) or not source):
        raise SegsynthError(f"{where} ({record['id']}): \"source\" must name a mask id (a non-empty string)")
    if crop is not None:
        if (not isinstance(crop, list) or len(crop) != 4
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in crop)
                or crop[0] < 0 or crop[1] < 0 or crop[2] < 1 or crop[3] < 1):
            raise SegsynthError(f"{where} ({record['id']}): \"crop\" must be [top, left, height, width] in the mask's "
                                f"pixels (integers, top/left >= 0, height/width >= 1); got {crop!r}")
    return source, crop


def plan_requests(entries: list[PlanEntry], plan_path: str | Path) -> list[Request]:
    """Entries -> one request per seed, in plan order; ids must be usable as file names and distinct."""
    unsafe = [entry.id for entry in entries if entry.id.startswith(".") or "/" in entry.id or "\\" in entry.id]
    if unsafe:
        raise SegsynthError(f"{plan_path}: id(s) {unsafe[:5]} cannot name files (leading '.', or a path separator)")
    requests = [Request(f"{entry.id}_s{seed}", entry.kind, int(seed),
                        source=(entry.source or entry.id) if entry.kind == "mask" else None, prompt=entry.prompt,
                        class_words=tuple((name, tuple(words)) for name, words in entry.class_words.items()),
                        crop=tuple(entry.crop) if entry.crop else None)
                for entry in entries for seed in entry.seeds]
    ids = [request.id for request in requests]
    if len(set(ids)) != len(ids):
        counts: dict[str, int] = {}
        for sample_id in ids:
            counts[sample_id] = counts.get(sample_id, 0) + 1
        clash = sorted(i for i, n in counts.items() if n > 1)[:5]
        raise SegsynthError(f"{plan_path}: sample names collide ({clash}); mask ids ending in _s<N> clash with seeds")
    return requests


def assign_seeds(counts: list[int], first_seed: int) -> list[list[int]]:
    """Consecutive seeds: entry i gets counts[i] seeds, none shared with any other entry."""
    seeds, next_seed = [], first_seed
    for count in counts:
        seeds.append(list(range(next_seed, next_seed + count)))
        next_seed += count
    return seeds


def summarize_plan(entries: list[PlanEntry]) -> str:
    """The plan's total and its histogram of samples per entry."""
    counts: dict[int, int] = {}
    for entry in entries:
        counts[len(entry.seeds)] = counts.get(len(entry.seeds), 0) + 1
    lines = [f"plan: {sum(len(e.seeds) for e in entries)} images for {len(entries)} entries; images per entry:"]
    peak = max(counts.values(), default=1)
    lines += [f"  k={k:3d}: {n:6d} entries {'#' * int(round(40 * n / peak))}" for k, n in sorted(counts.items())]
    return "\n".join(lines)
