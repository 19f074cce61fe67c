"""Captions for the real masks: the text side of SegGen's text -> mask training pairs.

SegGen (Ye et al., 2023) trains MaskSyn, a text -> mask diffusion model, on
(caption, colour-coded mask) pairs; the captions come from BLIP-2 run on the
real images. At synthesis time new captions prompt new masks. Here a caption
for each real mask comes from one of three captioners:

  mask        written from the mask itself (`caption_from_mask`): which
              classes, how large, where, and how many separate pieces, e.g.
              "road across the bottom, buildings on the left, sky at the top,
              two cars in the middle". Needs no model, deterministic.
  file        a user's captions file (JSON {id: text} or JSONL), validated
              against the split's ids.
  HUB_ID/DIR  BLIP-2 (transformers' Blip2ForConditionalGeneration and its
              processor) captioning the real images, as in the paper.

`make_captions` writes captions.jsonl ({"id", "caption"} per line) and the
resolved config beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from segsynth import IGNORE_INDEX
from segsynth.config import save_config
from segsynth.data import open_dataset
from segsynth.data.base import Split
from segsynth.data.validate import check_before_compute
from segsynth.generators.base import resolve_device, resolve_dtype
from segsynth.io import SegsynthError, append_jsonl, atomic_write_text, read_jsonl, rewind_jsonl
from segsynth.methods.seggen.colour import connected_components
from segsynth.outputs import claim_folder
from segsynth.stage_configs import CaptionConfig

CAPTIONS_FILE = "captions.jsonl"
CONFIG_FILE = "captions.config.yaml"
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}  # five and more pieces are "several"
IRREGULAR_PLURALS = {"person": "people", "man": "men", "woman": "women", "child": "children", "foot": "feet",
                     "mouse": "mice", "leaf": "leaves", "shelf": "shelves", "knife": "knives", "sheep": "sheep",
                     "fish": "fish", "deer": "deer", "bicycle": "bicycles"}
# Stuff classes of the supported datasets: named without a count or a plural ("two skies" is not English).
MASS_NOUNS = {"sky", "road", "grass", "water", "sand", "snow", "sidewalk", "pavement", "floor", "ceiling", "wall",
              "terrain", "vegetation", "earth", "field", "sea", "river", "ground", "dirt", "gravel", "mud", "fog",
              "background", "void", "foliage"}
SHOWN_UNKNOWN_IDS = 5


# --- captions from masks ------------------------------------------------------------


def caption_from_mask(label: np.ndarray, classes: Sequence[str], ignore: int = IGNORE_INDEX,
                      min_fraction: float = 0.01, min_instance_fraction: float = 0.002,
                      across_fraction: float = 0.8, small_fraction: float = 0.05) -> str:
    """A plain-English description of a label map: classes by area, each with how large, where and how many.

    1. classes covering at least `min_fraction` of the pixels, largest first (the largest class present when
       none is that large; "an unlabelled scene" when every pixel is ignore);
    2. where: "across the top/middle/bottom" when the class touches at least `across_fraction` of the columns,
       "down the left/centre/right" for the rows likewise, else the 3x3 cell of its pixel centroid
       ("at the top left", "on the right", "in the middle", ...);
    3. how many: its 8-connected pieces of at least `min_instance_fraction` of the image, as "two cars" ...
       "several cars" (stuff such as sky or road is never counted);
    4. how large: besides the order, classes under `small_fraction` of the image are "small".
    """
    label = np.asarray(label)
    height, width = label.shape
    total = label.size
    areas = np.bincount(label.ravel(), minlength=256)[: len(classes)]
    if ignore < len(classes):  # a dataset whose ignore value is also a class id: never name it
        areas[ignore] = 0
    named = [c for c in np.argsort(-areas, kind="stable") if areas[c] >= max(min_fraction * total, 1)]
    if not named:
        if not areas.any():
            return "an unlabelled scene"
        named = [int(np.argmax(areas))]
    components, count = connected_components(label, connectivity=8)
    sizes = np.bincount(components.ravel(), minlength=count)
    component_class = np.zeros(count, np.int64)
    component_class[components.ravel()] = label.ravel()
    phrases = []
    for c in named:
        rows, columns = np.nonzero(label == c)
        pieces = int(((component_class == c) & (sizes >= min_instance_fraction * total)).sum())
        where = _where(rows, columns, height, width, across_fraction)
        size = "small " if areas[c] < small_fraction * total else ""
        phrases.append(f"{_counted(classes[c], max(pieces, 1), size)} {where}")
    return ", ".join(phrases)


def _where(rows: np.ndarray, columns: np.ndarray, height: int, width: int, across_fraction: float) -> str:
    vertical = ("top", "middle", "bottom")[_third(rows.mean() + 0.5, height)]
    horizontal = ("left", "centre", "right")[_third(columns.mean() + 0.5, width)]
    if len(np.unique(columns)) >= across_fraction * width:
        return f"across the {vertical}"
    if len(np.unique(rows)) >= across_fraction * height:
        return f"down the {'middle' if horizontal == 'centre' else horizontal}"
    if vertical == "middle":
        return {"left": "on the left", "centre": "in the middle", "right": "on the right"}[horizontal]
    return f"at the {vertical}" if horizontal == "centre" else f"at the {vertical} {horizontal}"


def _third(position: float, extent: int) -> int:
    return min(2, int(3 * position / extent))


def _counted(name: str, pieces: int, size: str) -> str:
    words = " ".join(name.replace("_", " ").replace("-", " ").split())
    if pieces < 2 or words.split()[0] in MASS_NOUNS:
        return size + words
    return f"{COUNT_WORDS.get(pieces, 'several')} {size}{pluralise(words)}"


def pluralise(name: str) -> str:
    """English plural of a class name: the head noun changes ("chest of drawers" -> "chests of drawers")."""
    head, of, rest = name.partition(" of ")
    words = head.split(" ")
    last = words[-1]
    if last in IRREGULAR_PLURALS:
        plural = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        plural = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return " ".join(words[:-1] + [plural]) + of + rest


# --- captions files ----------------------------------------------------------------------


def read_captions(path: str | Path, ids: Iterable[str] | None) -> dict[str, str]:
    """Captions by mask id from JSON ({id: text}) or JSONL ({"id": ..., "caption" or "text": ...} per line).

    Refused, with the file and line: bytes that are not UTF-8, malformed JSON, a record without an id or
    text, an empty caption, an id given twice, and (when `ids` is given) ids that are not among `ids`.
    """
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise SegsynthError(f"captions file {path}: name it .json (one object {{id: caption}}) or .jsonl "
                            "(one {\"id\": ..., \"caption\": ...} per line)")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SegsynthError(f"captions file {path}: file not found") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise SegsynthError(f"captions file {path}:{line}: not UTF-8 text (byte {error.start}); "
                            "save the file as UTF-8") from None
    entries = _read_jsonl_captions(path, text) if path.suffix == ".jsonl" else _read_json_captions(path, text)
    captions: dict[str, str] = {}
    for key, caption, line in entries:
        if not caption.strip():
            raise SegsynthError(f"captions file {path}:{line}: the caption of {key!r} is empty")
        captions[key] = caption
    if ids is not None:
        known = set(ids)
        unknown = [(key, line) for key, _, line in entries if key not in known]
        if unknown:
            shown = ", ".join(f"{key!r} (line {line})" for key, line in unknown[:SHOWN_UNKNOWN_IDS])
            more = f" and {len(unknown) - SHOWN_UNKNOWN_IDS} more" if len(unknown) > SHOWN_UNKNOWN_IDS else ""
            raise SegsynthError(f"captions file {path}: {len(unknown)} id(s) are not masks of this split: "
                                f"{shown}{more}; captions are keyed by the split's mask ids "
                                f"(e.g. {next(iter(sorted(known)), 'none')!r})")
    return captions


def _read_jsonl_captions(path: Path, text: str) -> list[tuple[str, str, int]]:
    entries, first_line = [], {}
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SegsynthError(f"captions file {path}:{line_number}: not valid JSON ({error.msg})") from None
        caption = record.get("caption", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not isinstance(caption, str):
            raise SegsynthError(f"captions file {path}:{line_number}: each line must be an object with an "
                                "\"id\" string and a \"caption\" (or \"text\") string")
        key = record["id"]
        if key in first_line:
            raise SegsynthError(f"captions file {path}:{line_number}: id {key!r} already has a caption "
                                f"(line {first_line[key]})")
        first_line[key] = line_number
        entries.append((key, caption, line_number))
    return entries


def _read_json_captions(path: Path, text: str) -> list[tuple[str, str, int]]:
    def refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
        keys = [key for key, _ in pairs]
        repeated = next((key for key in keys if keys.count(key) > 1), None)
        if repeated is not None:
            raise SegsynthError(f"captions file {path}:{_line_of(text, repeated)}: id {repeated!r} appears twice")
        return dict(pairs)

    try:
        captions = json.loads(text, object_pairs_hook=refuse_duplicates)
    except json.JSONDecodeError as error:
        raise SegsynthError(f"captions file {path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(captions, dict):
        raise SegsynthError(f"captions file {path}: must be one JSON object {{mask id: caption}}, "
                            f"got {type(captions).__name__}")
    entries = []
    for key, caption in captions.items():
        if not isinstance(caption, str):
            raise SegsynthError(f"captions file {path}:{_line_of(text, key)}: the caption of {key!r} must be a "
                                f"string, got {json.dumps(caption)[:40]}")
        entries.append((key, caption, _line_of(text, key)))
    return entries


def _line_of(text: str, key: str) -> int | str:
    """The line where `"key"` first appears as written (a key spelled with escapes gets '?')."""
    for spelling in (json.dumps(key, ensure_ascii=False), json.dumps(key)):
        at = text.find(spelling)
        if at >= 0:
            return text.count("\n", 0, at) + 1
    return "?"


def write_captions(path: str | Path, captions: Mapping[str, str]) -> None:
    """Write captions as JSONL, one {"id", "caption"} per line in the mapping's order, atomically."""
    lines = (json.dumps({"id": key, "caption": caption}, ensure_ascii=False) + "\n" for key, caption in captions.items())
    atomic_write_text(path, "".join(lines))


# --- the stage ------------------------------------------------------------------------------------


def make_captions(config: CaptionConfig) -> Path:
    """Caption every mask of a split; returns the captions.jsonl written (with the resolved config beside it)."""
    with claim_folder(config.out, "captions", CONFIG_FILE, "CaptionConfig",
                      markers=(CAPTIONS_FILE, CAPTIONS_FILE + ".partial")):
        return _make_captions(config)


def _make_captions(config: CaptionConfig) -> Path:
    # 1. check the arguments before any work
    if config.captioner == "file" and not config.captions:
        raise SegsynthError("--captioner file needs --captions FILE (JSON {mask id: caption} or JSONL)")
    if config.captions and config.captioner != "file":
        raise SegsynthError(f"--captions is only read with --captioner file (the captioner is {config.captioner!r}); "
                            "drop one of them")
    if config.captioner not in CAPTIONERS:
        check_blip2_location(config.captioner)
    dataset = open_dataset(config.data)
    split = dataset.split(config.split)
    check_before_compute(dataset, [config.split])
    out = Path(config.out)
    # 2. caption
    captioner = CAPTIONERS.get(config.captioner, captions_from_blip2)
    captions = captioner(config, split, dataset.classes)
    # 3. write the captions and the config that made them
    path = out / CAPTIONS_FILE
    write_captions(path, captions)
    save_config(config, out / CONFIG_FILE)
    return path


def captions_from_masks(config: CaptionConfig, split: Split, classes: Sequence[str]) -> dict[str, str]:
    return {split.ids[i]: caption_from_mask(split.label(i), classes, min_fraction=config.min_fraction)
            for i in range(len(split))}


def captions_from_file(config: CaptionConfig, split: Split, classes: Sequence[str]) -> dict[str, str]:
    given = read_captions(config.captions, split.ids)
    missing = [sample_id for sample_id in split.ids if sample_id not in given]
    if missing:
        raise SegsynthError(f"captions file {config.captions}: no caption for {len(missing)} of the "
                            f"{len(split)} masks of split {split.name!r} (e.g. {', '.join(missing[:3])}); "
                            "caption every mask, or use --captioner mask")
    return {sample_id: given[sample_id] for sample_id in split.ids}


def captions_from_blip2(config: CaptionConfig, split: Split, classes: Sequence[str]) -> dict[str, str]:
    """BLIP-2 captions of the real images (SegGen's captioner), resumable after a kill.

    Finished batches are appended to captions.jsonl.partial, whose first line names the captioner, data and
    split; a rerun with the same ones skips the captions already there. An empty caption falls back to the
    mask caption (and is reported).
    """
    import torch  # only the BLIP-2 path needs it; captions from masks stay light

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    processor, model = load_blip2(config.captioner, device, dtype)
    # 1. resume: keep the captions of a previous run of the same captioner on the same split
    partial = Path(config.out) / (CAPTIONS_FILE + ".partial")
    header = {"captioner": config.captioner, "data": config.data, "split": config.split,
              "max_new_tokens": config.max_new_tokens}
    records = list(read_jsonl(partial)) if partial.is_file() else []
    if not records or records[0] != {"header": header}:
        partial.unlink(missing_ok=True)
        append_jsonl(partial, {"header": header})
        records = []
    else:
        rewind_jsonl(partial)  # drops a line torn by a kill before appending after it
    done = {r["id"]: r["caption"] for r in records[1:] if isinstance(r, dict) and "id" in r}
    # 2. caption the rest, a batch at a time
    todo = [i for i, sample_id in enumerate(split.ids) if sample_id not in done]
    empty = []
    for start in range(0, len(todo), config.batch_size):
        batch = todo[start:start + config.batch_size]
        inputs = processor(images=[split[i].image for i in batch], return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            tokens = model.generate(**inputs, max_new_tokens=config.max_new_tokens, do_sample=False)
        for i, text in zip(batch, processor.batch_decode(tokens, skip_special_tokens=True)):
            text = " ".join(text.split())
            if not text:
                empty.append(split.ids[i])
                text = caption_from_mask(split.label(i), classes, min_fraction=config.min_fraction)
            append_jsonl(partial, {"id": split.ids[i], "caption": text})
            done[split.ids[i]] = text
    if empty:
        print(f"BLIP-2 gave {len(empty)} empty caption(s) (e.g. {empty[0]}); those masks got mask captions",
              file=sys.stderr)
    captions = {sample_id: done[sample_id] for sample_id in split.ids}
    partial.unlink(missing_ok=True)  # make_captions writes the finished file next
    return captions


def check_blip2_location(source: str) -> None:
    """A captioner that looks like a path must be a model folder: from_pretrained would try it as a hub id."""
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise SegsynthError(f"--captioner {source}: not {' or '.join(CAPTIONERS)}, and not a folder holding a "
                            "BLIP-2 model (config.json and the processor files, as save_pretrained writes them)")


def load_blip2(source: str, device, dtype):
    """BLIP-2's processor and model from a hub id or a local folder (the same from_pretrained calls either way)."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    try:
        processor = AutoProcessor.from_pretrained(source)
        model = Blip2ForConditionalGeneration.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, KeyError) as error:
        raise SegsynthError(f"--captioner {source!r} is not {' or '.join(CAPTIONERS)}, and loading it as a BLIP-2 "
                            f"model (hub id or folder) failed: {str(error).splitlines()[0]}") from None
    return processor, model.to(device).eval()


# Captioner name -> captions(config, split, classes); any other name is a BLIP-2 hub id or folder.
CAPTIONERS = {"mask": captions_from_masks, "file": captions_from_file}
