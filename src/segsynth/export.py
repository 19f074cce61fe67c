"""`segsynth export`: a dataset or synthetic set in the layouts people train with.

  mmseg   OUT/img_dir/<split>/<id>.png, OUT/ann_dir/<split>/<id>.png (8-bit class ids, 255 = ignore) and
          OUT/segsynth_mmseg.py, a config snippet for mmsegmentation 1.x (BaseSegDataset with the classes and
          palette, reduce_zero_label False, ignore_index 255, train/val dataloaders): what FreeMask users
          train with.
  hf      OUT/<split>/images/<id>.png, OUT/<split>/annotations/<id>.png and OUT/<split>/metadata.jsonl
          (file_name, annotation_file_name, id and the sample's provenance): an imagefolder dataset,
          `datasets.load_dataset("imagefolder", data_dir=OUT)` gives the columns image and annotation (both
          images) and the metadata; splits train / validation / test.

Both carry OUT/classes.json (classes, palette, ignore_index 255), OUT/id2label.json and
OUT/segsynth_export.json (what was exported, from where, how many). Labels are the ones
segsynth trains on: a synthetic set's filtered masks when it has them (ignored pixels 255),
dataset conventions (CamVid's void, ADE20K's reduce-zero-label) already translated to 255.
Per-pixel confidence weights (attention sets) have no place in either format and are not
exported; their ignored pixels are.

A target folder that exists and is not empty is refused unless --overwrite. Everything is
written to a staging folder beside the target and renamed into place (io.staged_swap), so
the target is either the old one or the complete new one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from segsynth import IGNORE_INDEX
from segsynth.data import DATASET_KINDS, Dataset, open_dataset
from segsynth.data.base import Split
from segsynth.data.specs import base_spec
from segsynth.formats.manifest import MANIFEST, read_records
from segsynth.io import SegsynthError, atomic_write_json, atomic_write_text, staged_swap
from segsynth.stage_configs import ExportConfig

FORMATS = ("mmseg", "hf")
SPLIT_NAMES = {"mmseg": {}, "hf": {"val": "validation"}}  # segsynth split -> the format's name for it
MMSEG_SNIPPET = "segsynth_mmseg.py"


def export(config: ExportConfig) -> dict:
    """Write `config.data` in `config.format` to `config.out`; returns what was written."""
    # 1. Everything is checked before anything is written.
    if config.format not in FORMATS:
        raise SegsynthError(f"--format {config.format!r}: options: {', '.join(FORMATS)}")
    if not 0.0 <= config.val_fraction < 1.0:
        raise SegsynthError(f"--val-fraction {config.val_fraction}: give a share from 0 up to (not including) 1")
    target = Path(config.out)
    if target.exists() and not target.is_dir():
        raise SegsynthError(f"{target}: exists and is a file; give a folder for --out")
    if target.is_dir() and any(target.iterdir()) and not config.overwrite:
        raise SegsynthError(f"{target}: exists and is not empty; choose a new --out folder, or give --overwrite to "
                            "replace it")
    spec = dataset_spec(config.data)
    dataset = open_dataset(spec)
    splits = choose_splits(dataset, config)
    records = _provenance(spec)
    split, indices = next(iter(splits.values()))
    size = split.label(indices[0]).shape  # the snippet's crop size

    # 2. Write into a staging folder beside the target, then swap it in whole.
    counts = {}
    with staged_swap(target.parent, [target.name], what=f"{target.name}.export") as staging:
        folder = staging / target.name
        for name, (split, indices) in splits.items():
            counts[name] = write_split(folder, config.format, name, split, indices, records, dataset)
        write_metadata(folder, target, config, spec, dataset, counts, size)
    return {"data": spec, "format": config.format, "out": str(target), "splits": counts}


def dataset_spec(data: str) -> str:
    """A folder written by `segsynth synthesize` -> synthetic:DIR (filtered masks when present); a folder with
    images/, masks/ and classes.json -> folder:DIR; anything else is a dataset spec as it stands."""
    path = Path(data)
    if data.partition(":")[0].strip().lower() in DATASET_KINDS or not path.is_dir():
        return data  # a spec (open_dataset names what is wrong with it)
    if (path / MANIFEST).is_file():
        return f"synthetic:{data}"
    if (path / "classes.json").is_file() and (path / "images").is_dir():
        return f"folder:{data}"
    raise SegsynthError(f"{data}: a folder that is neither a synthetic set (no {MANIFEST}) nor a folder: dataset "
                        "(images/, masks/, classes.json); give a dataset spec such as camvid:PATH")


def choose_splits(dataset: Dataset, config: ExportConfig) -> dict[str, tuple[Split, list[int]]]:
    """Split name -> (split, the indices exported). Data with a train split only (a synthetic set) gets a
    val split of every k-th sample (k = 1 / val_fraction, at most the sample count), the rest stays train."""
    names = list(config.splits or dataset.splits)
    unknown = [name for name in names if name not in dataset.splits]
    if unknown:
        raise SegsynthError(f"--splits {', '.join(unknown)}: {dataset.spec} has {', '.join(dataset.splits)}")
    chosen = {name: (dataset.splits[name], list(range(len(dataset.splits[name])))) for name in names}
    if list(dataset.splits) == ["train"] and not config.splits and config.val_fraction > 0:
        split = dataset.splits["train"]
        every = max(2, min(round(1 / config.val_fraction), len(split)))  # at least one val sample
        chosen = {"train": (split, [i for i in range(len(split)) if i % every != every - 1]),
                  "val": (split, [i for i in range(len(split)) if i % every == every - 1])}
    if config.limit > 0:
        chosen = {name: (split, indices[: config.limit]) for name, (split, indices) in chosen.items()}
    return {name: value for name, value in chosen.items() if value[1]}


def _provenance(spec: str) -> dict[str, dict]:
    """For a synthetic set: per sample id, where it came from (kept in the hf metadata)."""
    kind, _, path = base_spec(spec).partition(":")
    if kind not in ("synthetic", "synthetic-raw"):
        return {}
    result = {}
    for sample_id, record in read_records(path).items():
        source = (record.get("meta") or {}).get("source") or {}
        result[sample_id] = {"source": record.get("source"), "seed": record.get("seed"),
                             "prompt": source.get("prompt") or record.get("prompt"),
                             "generator": (record.get("generator") or {}).get("name"),
                             "ignored_fraction": record.get("ignored_fraction")}
    return result


def file_stem(sample_id: str) -> str:
    """A sample id as a file name (ids of nested datasets may hold '/')."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", sample_id)


def write_split(folder: Path, kind: str, name: str, split: Split, indices: list[int], records: dict,
                dataset: Dataset) -> int:
    """Every sample of one split: the image as RGB PNG, the label map as 8-bit PNG (255 = ignore)."""
    out_name = SPLIT_NAMES[kind].get(name, name)
    if kind == "mmseg":
        image_dir, label_dir = folder / "img_dir" / out_name, folder / "ann_dir" / out_name
    else:
        image_dir, label_dir = folder / out_name / "images", folder / out_name / "annotations"
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    metadata, seen = [], set()
    for index in tqdm(indices, desc=f"export {name}", unit="img", dynamic_ncols=True):
        sample = split[index]
        stem = file_stem(sample.id)
        if stem in seen:
            raise SegsynthError(f"{dataset.spec}: two samples of split {name!r} give the file name {stem}.png; "
                                "rename one of them")
        seen.add(stem)
        Image.fromarray(np.asarray(sample.image, np.uint8)).save(image_dir / f"{stem}.png", compress_level=1)
        Image.fromarray(np.asarray(sample.label, np.uint8), mode="L").save(label_dir / f"{stem}.png", compress_level=1)
        if kind == "hf":
            metadata.append({"file_name": f"images/{stem}.png", "annotation_file_name": f"annotations/{stem}.png",
                             "id": sample.id, **records.get(sample.id, {})})
    if kind == "hf":
        atomic_write_text(folder / out_name / "metadata.jsonl", "".join(json.dumps(m) + "\n" for m in metadata))
    return len(indices)


def write_metadata(folder: Path, target: Path, config: ExportConfig, spec: str, dataset: Dataset,
                   counts: dict[str, int], size: tuple[int, int]) -> None:
    classes = list(dataset.classes)
    palette = [list(map(int, colour)) for colour in dataset.palette[: len(classes)]]
    atomic_write_json(folder / "classes.json", {"classes": classes, "palette": palette, "ignore_index": IGNORE_INDEX})
    atomic_write_json(folder / "id2label.json", {str(i): name for i, name in enumerate(classes)})
    atomic_write_json(folder / "segsynth_export.json", {"data": spec, "format": config.format, "splits": counts,
                                                        "ignore_index": IGNORE_INDEX, "reduce_zero_label": False})
    if config.format == "mmseg":
        atomic_write_text(folder / MMSEG_SNIPPET, mmseg_snippet(target.resolve(), classes, palette, counts, size))


def mmseg_snippet(root: Path, classes: list[str], palette: list[list[int]], counts: dict[str, int],
                  size: tuple[int, int]) -> str:
    """An mmsegmentation 1.x config fragment for the exported folder (paste it into a config, or _base_ it)."""
    first = next(iter(counts))
    height, width = size
    val = "val" if "val" in counts else first
    lines = [
        "# mmsegmentation 1.x: the dataset `segsynth export --format mmseg` wrote to this folder.",
        "# Paste into your config (or list this file in _base_). Labels: class ids 0..N-1, 255 = ignore,",
        "# reduce_zero_label False (segsynth already moved any 'other'/void value to 255).",
        f"# splits: {', '.join(f'{name} {count}' for name, count in counts.items())}",
        "dataset_type = 'BaseSegDataset'",
        f"data_root = {str(root)!r}",
        f"num_classes = {len(classes)}",
        f"metainfo = dict(classes={tuple(classes)!r}, palette={palette!r})",
        f"crop_size = ({height}, {width})",
        "train_pipeline = [",
        "    dict(type='LoadImageFromFile'),",
        "    dict(type='LoadAnnotations', reduce_zero_label=False),",
        f"    dict(type='RandomResize', scale=({2 * width}, {height}), ratio_range=(0.5, 2.0), keep_ratio=True),",
        "    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),",
        "    dict(type='RandomFlip', prob=0.5),",
        "    dict(type='PhotoMetricDistortion'),",
        "    dict(type='PackSegInputs'),",
        "]",
        "test_pipeline = [",
        "    dict(type='LoadImageFromFile'),",
        f"    dict(type='Resize', scale=({2 * width}, {height}), keep_ratio=True),",
        "    dict(type='LoadAnnotations', reduce_zero_label=False),",
        "    dict(type='PackSegInputs'),",
        "]",
    ]
    for loader, split, pipeline, sampler in (("train_dataloader", "train" if "train" in counts else first,
                                              "train_pipeline", "dict(type='InfiniteSampler', shuffle=True)"),
                                             ("val_dataloader", val, "test_pipeline",
                                              "dict(type='DefaultSampler', shuffle=False)")):
        lines += [
            f"{loader} = dict(",
            f"    batch_size={8 if loader == 'train_dataloader' else 1}, num_workers=4, persistent_workers=True,",
            f"    sampler={sampler},",
            "    dataset=dict(type=dataset_type, data_root=data_root, metainfo=metainfo, img_suffix='.png',",
            "                 seg_map_suffix='.png', reduce_zero_label=False, ignore_index=255,",
            f"                 data_prefix=dict(img_path='img_dir/{split}', seg_map_path='ann_dir/{split}'),",
            f"                 pipeline={pipeline}))",
        ]
    lines += [
        "test_dataloader = val_dataloader",
        "val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])",
        "test_evaluator = val_evaluator",
        "# and in the model: decode_head=dict(num_classes=num_classes, ignore_index=255, ...)",
        "",
    ]
    return "\n".join(lines)
