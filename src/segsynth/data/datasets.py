"""Readers for the public dataset layouts and for user folders.

Each `open_<kind>(root, spec)` lists files (cheap: no image is decoded here),
pairs images with masks by stem, and fails early, naming the files, when the
layout is incomplete. Decoding and label checks happen per sample (see
`segsynth.data.base`) and in full in `segsynth check-data`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from segsynth import IGNORE_INDEX
from segsynth.data import palettes
from segsynth.data.base import Dataset, Pair, file_split, label_table
from segsynth.formats.classes import check_class_list, check_ignore_values, check_palette
from segsynth.io import SegsynthError, read_json, read_text, safe_relative_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _require_dir(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        raise SegsynthError(f"{path}: {what} folder not found; {fix}")
    return path


def _files(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES, recursive: bool = False) -> list[Path]:
    """Files whose name ends with one of `suffixes` (case-insensitive; multi-part ones like '_labelTrainIds.png' too)."""
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    endings = tuple(suffix.lower() for suffix in suffixes)
    return sorted(p for p in pattern if p.is_file() and p.name.lower().endswith(endings) and not p.name.startswith("."))


def pair_by_stem(
    image_dir: Path,
    mask_dir: Path | None,
    mask_name: Callable[[Path], str] = lambda image: image.stem + ".png",
    image_stem: Callable[[Path], str] = lambda image: image.stem,
    recursive: bool = False,
    mask_suffixes: Sequence[str] = (".png",),
) -> list[Pair]:
    """Pair every image with its mask; both 'image without mask' and 'mask without image' are errors."""
    images = _files(image_dir, recursive=recursive)
    if mask_dir is None:
        return [Pair(image_stem(p), p, None) for p in images]
    pairs, missing = [], []
    for image in images:
        relative = image.relative_to(image_dir).parent
        mask = mask_dir / relative / mask_name(image)
        (pairs if mask.is_file() else missing).append(Pair(image_stem(image), image, mask))
    # Both sides are mask_dir / relative path (pathlib drops "."), so plain paths compare: no resolve() per file.
    expected = {pair.mask for pair in pairs + missing}
    orphans = [m for m in _files(mask_dir, mask_suffixes, recursive) if m not in expected]
    if missing or orphans:
        shown = [f"image without mask: {p.image} (expected {p.mask})" for p in missing[:5]]
        shown += [f"mask without image: {m}" for m in orphans[:5]]
        raise SegsynthError(
            f"{image_dir} / {mask_dir}: {len(missing)} image(s) have no mask and {len(orphans)} mask(s) have no "
            f"image: {', '.join(shown)}{', ...' if len(missing) + len(orphans) > len(shown) else ''}; "
            "add the missing files or remove the unpaired ones"
        )
    return pairs


def _dataset(spec, classes, palette, split_pairs: dict[str, list[Pair]], table) -> Dataset:
    split_pairs = {name: pairs for name, pairs in split_pairs.items() if pairs is not None}
    splits = {name: file_split(name, pairs, table, classes) for name, pairs in split_pairs.items()}
    return Dataset(spec=spec, classes=tuple(classes), palette=tuple(map(tuple, palette)), splits=splits,
                   pairs=split_pairs, label_table=table)


def open_camvid(root: Path, spec: str) -> Dataset:
    """SegNet CamVid: train/ trainannot/ val/ valannot/ test/ testannot/; label 11 = void."""
    _require_dir(root, "CamVid root", "point camvid:PATH at the folder holding train/ and trainannot/")
    split_pairs = {}
    for split in ("train", "val", "test"):
        if (root / split).is_dir():
            annotations = root / f"{split}annot"
            split_pairs[split] = pair_by_stem(root / split, annotations if annotations.is_dir() else None)
    if "train" not in split_pairs:
        raise SegsynthError(f"{root}: no train/ folder; expected the SegNet CamVid layout (train/, trainannot/, val/, ...)")
    classes, palette = palettes.CAMVID_CLASSES, palettes.CAMVID_PALETTE
    return _dataset(spec, classes, palette, split_pairs, label_table(len(classes), ignore_values=(11, IGNORE_INDEX)))


def open_ade20k(root: Path, spec: str) -> Dataset:
    """ADEChallengeData2016: images/{training,validation}, annotations/...; 0 = other -> ignore (reduce zero label)."""
    _require_dir(root / "images", "ADE20K images", "point ade20k:PATH at ADEChallengeData2016/")
    split_pairs = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        if (root / "images" / folder).is_dir():
            annotations = root / "annotations" / folder
            split_pairs[split] = pair_by_stem(root / "images" / folder, annotations if annotations.is_dir() else None)
    classes, palette = palettes.ADE20K_CLASSES, palettes.ADE20K_PALETTE
    # Raw 0 is "other": ignored; raw 1..150 are classes 0..149 (mmseg's reduce_zero_label).
    return _dataset(spec, classes, palette, split_pairs, label_table(len(classes), ignore_values=(0,), shift=1))


def open_cityscapes(root: Path, spec: str) -> Dataset:
    """Cityscapes: leftImg8bit/{split}/{city}/*_leftImg8bit.png, gtFine/{split}/{city}/*_gtFine_labelTrainIds.png."""
    _require_dir(root / "leftImg8bit", "Cityscapes leftImg8bit", "point cityscapes:PATH at the folder holding leftImg8bit/ and gtFine/")
    split_pairs = {}
    for split in ("train", "val", "test"):
        images = root / "leftImg8bit" / split
        if not images.is_dir():
            continue
        annotations = root / "gtFine" / split
        split_pairs[split] = pair_by_stem(
            images,
            annotations if annotations.is_dir() else None,
            mask_name=lambda p: p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png"),
            image_stem=lambda p: p.name.replace("_leftImg8bit.png", ""),
            recursive=True,
            mask_suffixes=("_labelTrainIds.png",),
        )
    classes, palette = palettes.CITYSCAPES_CLASSES, palettes.CITYSCAPES_PALETTE
    return _dataset(spec, classes, palette, split_pairs, label_table(len(classes)))


def open_voc(root: Path, spec: str) -> Dataset:
    """Pascal VOC 2012: JPEGImages/, SegmentationClass/ (palette PNGs), ImageSets/Segmentation/{train,val}.txt."""
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            root = candidate
            break
    else:
        raise SegsynthError(f"{root}: no JPEGImages/ folder; point voc:PATH at VOCdevkit/VOC2012")
    split_pairs = {}
    for split in ("train", "val", "trainval", "test"):
        list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if list_file.is_file():
            ids = _read_id_list(list_file)
            split_pairs[split] = _pairs_from_ids(ids, root / "JPEGImages", ".jpg", root / "SegmentationClass", list_file)
    if not split_pairs:
        raise SegsynthError(f"{root}/ImageSets/Segmentation: no train.txt or val.txt; the VOC split lists are required")
    classes, palette = palettes.VOC_CLASSES, palettes.VOC_PALETTE
    return _dataset(spec, classes, palette, split_pairs, label_table(len(classes)))


def open_coco_stuff(root: Path, spec: str) -> Dataset:
    """COCO-Stuff 164k, mmseg-converted: images/{train2017,val2017}, annotations/*_labelTrainIds.png (171 classes)."""
    _require_dir(root / "images", "COCO-Stuff images", "point coco-stuff:PATH at the folder holding images/ and annotations/")
    split_pairs = {}
    for split, folder in (("train", "train2017"), ("val", "val2017")):
        if (root / "images" / folder).is_dir():
            annotations = root / "annotations" / folder
            split_pairs[split] = pair_by_stem(
                root / "images" / folder, annotations if annotations.is_dir() else None,
                mask_name=lambda p: p.stem + "_labelTrainIds.png", mask_suffixes=("_labelTrainIds.png",),
            )
    classes, palette = palettes.COCO_STUFF_CLASSES, palettes.COCO_STUFF_PALETTE
    return _dataset(spec, classes, palette, split_pairs, label_table(len(classes)))


def open_folder(root: Path, spec: str) -> Dataset:
    """A user folder: images/, masks/ (same stem), classes.json, optional splits/{train,val,test}.txt."""
    _require_dir(root, "dataset", "point folder:PATH at a folder with images/, masks/ and classes.json")
    info_path = root / "classes.json"
    if not info_path.is_file():
        raise SegsynthError(f"{info_path}: missing; write {{\"classes\": [\"name\", ...]}} (optional \"palette\", \"ignore_index\")")
    info = read_json(info_path)
    if not isinstance(info, dict):
        raise SegsynthError(f"{info_path}: needs \"classes\": a non-empty list of class names, in a JSON object "
                            f"{{\"classes\": [...]}} (got a {type(info).__name__})")
    fix = "fix classes.json"
    classes = check_class_list(info.get("classes"), str(info_path), fix)
    palette = (check_palette(info["palette"], classes, str(info_path), fix) if info.get("palette") is not None
               else palettes.default_palette(len(classes)))
    ignore_values = check_ignore_values(info.get("ignore_index", IGNORE_INDEX), classes, str(info_path), fix)
    mask_dir = safe_relative_path(root, str(info.get("mask_dir", "masks")), f"{info_path}: \"mask_dir\"")
    pairs = pair_by_stem(_require_dir(root / "images", "images", "put the images in images/"),
                         _require_dir(mask_dir, "masks", f"put the index masks in {mask_dir.name}/"))
    by_id = {pair.id: pair for pair in pairs}
    split_pairs = {}
    splits_dir = root / "splits"
    if splits_dir.is_dir():
        for list_file in sorted(splits_dir.glob("*.txt")):
            ids = _read_id_list(list_file)
            unknown = [i for i in ids if i not in by_id]
            if unknown:
                raise SegsynthError(f"{list_file}: ids without an image/mask pair: {unknown[:5]} ({len(unknown)} in all)")
            split_pairs[list_file.stem] = [by_id[i] for i in ids]
    else:
        split_pairs["train"] = pairs  # no splits/: the whole folder is the training split
    table = label_table(len(classes), ignore_values=[v for v in ignore_values] + [IGNORE_INDEX])
    return _dataset(spec, classes, palette[: len(classes)], split_pairs, table)


def _read_id_list(path: Path) -> list[str]:
    return [line.strip() for line in read_text(path, "split list").splitlines() if line.strip()]


def _pairs_from_ids(ids, image_dir: Path, image_suffix: str, mask_dir: Path, list_file: Path) -> list[Pair]:
    pairs, missing = [], []
    for sample_id in ids:
        image, mask = image_dir / f"{sample_id}{image_suffix}", mask_dir / f"{sample_id}.png"
        if not image.is_file():
            missing.append(str(image))
        if not mask.is_file():
            missing.append(str(mask))
        pairs.append(Pair(sample_id, image, mask))
    if missing:
        raise SegsynthError(f"{list_file}: {len(missing)} listed file(s) missing, e.g. {missing[:5]}; fix the list or add the files")
    return pairs
