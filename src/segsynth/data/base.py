"""The dataset abstraction shared by every reader.

A `Dataset` has class names, a palette and named splits. A `Split` is an
indexable sequence of `Sample`s with stable string ids. File-backed splits map
raw label values to canonical ones through a 256-entry lookup table, so one
code path handles CamVid's void=11, ADE20K's reduce-zero-label and plain
255-ignore datasets, and finds out-of-range labels for free.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from segsynth import IGNORE_INDEX
from segsynth.io import SegsynthError

INVALID = -1  # lookup-table value for raw labels a dataset must never contain

# What PIL raises for a file it cannot decode: unknown format, damaged or truncated data, a header
# claiming more pixels than PIL decodes safely (DecompressionBombError), broken headers (struct.error).
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error,
                Image.DecompressionBombError)


@dataclass
class Sample:
    id: str
    image: np.ndarray  # H x W x 3 uint8 RGB
    label: np.ndarray  # H x W uint8, classes 0..C-1, 255 = ignore
    weight: np.ndarray | None = None  # optional H x W float32 per-pixel loss weight


class Split:
    """One split of a dataset: a sequence of samples with unique ids."""

    def __init__(self, name: str, ids: Sequence[str], loader: Callable[[int], Sample],
                 label_loader: Callable[[int], np.ndarray] | None = None):
        self.name = name
        self.ids = list(ids)
        self._loader = loader
        self._label_loader = label_loader
        self._index = {sample_id: i for i, sample_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        return self._loader(index)

    def label(self, index: int) -> np.ndarray:
        """Just the label map (file-backed splits skip decoding the image)."""
        return self._label_loader(index) if self._label_loader else self._loader(index).label

    def index_of(self, sample_id: str) -> int:
        try:
            return self._index[sample_id]
        except KeyError:
            raise SegsynthError(f"split {self.name!r} has no sample with id {sample_id!r}") from None

    def has(self, sample_id: str) -> bool:
        return sample_id in self._index


@dataclass
class Pair:
    """An (image file, mask file) pair of a file-backed split."""

    id: str
    image: Path
    mask: Path | None
    weight: Path | None = None  # optional 8-bit per-pixel weight (value / 255), synthetic sets only


@dataclass
class Dataset:
    spec: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    splits: dict[str, Split]
    # file-backed datasets keep their pairs and lookup table for validation
    pairs: dict[str, list[Pair]] = field(default_factory=dict)
    label_table: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise SegsynthError(
                f"dataset {self.spec} has no split {name!r}; it has: {', '.join(self.splits) or 'none'}"
            )
        return self.splits[name]


def label_table(num_classes: int, ignore_values: Sequence[int] = (IGNORE_INDEX,), shift: int = 0) -> np.ndarray:
    """Raw value -> canonical label. Values 0..C-1 (after `shift`) are classes, `ignore_values` become 255."""
    table = np.full(256, INVALID, dtype=np.int16)
    for raw in range(256):
        label = raw - shift
        if 0 <= label < num_classes:
            table[raw] = label
    for raw in ignore_values:
        table[raw] = IGNORE_INDEX
    return table


def read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except IMAGE_ERRORS as error:
        raise SegsynthError(f"{path}: cannot read image ({error}); replace or remove the file") from None


def read_raw_mask(path: Path) -> np.ndarray:
    """Read an index mask (uint8). Colour masks are refused with the fix."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            array = np.asarray(image)
    except IMAGE_ERRORS as error:
        raise SegsynthError(f"{path}: cannot read mask ({error}); replace or remove the file") from None
    if mode in ("RGB", "RGBA"):
        rgb = array[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise SegsynthError(
                f"{path}: mask is an RGB colour image, but class indices are expected "
                "(a single-channel or palette PNG whose pixel values are class ids); "
                "convert colour masks to index masks with the dataset's palette first"
            )
        array = rgb[..., 0]
    elif array.ndim != 2:
        raise SegsynthError(f"{path}: mask has shape {array.shape}; expected a single-channel index image")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise SegsynthError(f"{path}: mask values exceed 0..255 ({array.min()}..{array.max()}); use 8-bit masks")
        array = array.astype(np.uint8)
    return array


def read_weight(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A per-pixel weight map stored as an 8-bit PNG (value / 255), checked against its mask's size."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except IMAGE_ERRORS as error:
        raise SegsynthError(f"{path}: cannot read weight map ({error}); replace the file or regenerate the set") from None
    if array.shape != tuple(shape):
        raise SegsynthError(f"{path}: weight map is {array.shape[1]}x{array.shape[0]} but its mask is "
                            f"{shape[1]}x{shape[0]} (WxH); regenerate the set")
    return array


def apply_label_table(raw: np.ndarray, table: np.ndarray, path: Path, classes: Sequence[str]) -> np.ndarray:
    label = table[raw]
    if label.min() == INVALID:
        bad = np.unique(raw[label == INVALID])
        raise SegsynthError(
            f"{path}: label value(s) {bad[:10].tolist()} are outside the {len(classes)} classes of this dataset "
            f"(valid: 0..{len(classes) - 1} plus ignore); fix the mask or the dataset's classes.json"
        )
    return label.astype(np.uint8)


def file_split(name: str, pairs: list[Pair], table: np.ndarray, classes: Sequence[str]) -> Split:
    """A split whose samples are read from image/mask files on each access."""

    def load(index: int) -> Sample:
        pair = pairs[index]
        image = read_image(pair.image)
        if pair.mask is None:  # an unlabeled split (e.g. a test split without labels)
            return Sample(pair.id, image, np.full(image.shape[:2], IGNORE_INDEX, np.uint8))
        label = apply_label_table(read_raw_mask(pair.mask), table, pair.mask, classes)
        if label.shape != image.shape[:2]:
            raise SegsynthError(
                f"{pair.mask}: mask is {label.shape[1]}x{label.shape[0]} but its image {pair.image} is "
                f"{image.shape[1]}x{image.shape[0]} (WxH); masks must match their images"
            )
        weight = read_weight(pair.weight, label.shape) if pair.weight is not None else None
        return Sample(pair.id, image, label, weight)

    def load_label(index: int) -> np.ndarray:
        pair = pairs[index]
        if pair.mask is None:
            raise SegsynthError(f"{pair.image}: this split has no masks")
        return apply_label_table(read_raw_mask(pair.mask), table, pair.mask, classes)

    return Split(name, [pair.id for pair in pairs], load, load_label)


def group_by_size(items, size_of) -> list[list]:
    """Items grouped by the (H, W, ...) shape `size_of(item)` returns, in first-seen order: one stacked
    forward pass per group when a batch mixes image sizes (evaluation, statistics, the filter)."""
    groups: dict = {}
    for item in items:
        groups.setdefault(tuple(size_of(item)), []).append(item)
    return list(groups.values())


def subset_split(name: str, parts: Sequence[tuple[Split, Sequence[int]]]) -> Split:
    """A split of chosen samples of other splits, in the order given: [(split, its indices kept), ...]."""
    picks = [(split, int(index)) for split, indices in parts for index in indices]
    return Split(name, [split.ids[index] for split, index in picks], lambda k: picks[k][0][picks[k][1]],
                 lambda k: picks[k][0].label(picks[k][1]))


def concat_splits(name: str, splits: Sequence[Split]) -> Split:
    """One split over several (ids must stay unique across them)."""
    offsets, ids = [], []
    for split in splits:
        offsets.append(len(ids))
        ids.extend(split.ids)
    if len(set(ids)) != len(ids):
        raise SegsynthError(f"split {name}: the same sample id appears in more than one of the combined sets")

    def load(index: int) -> Sample:
        for split, offset in zip(reversed(splits), reversed(offsets)):
            if index >= offset:
                return split[index - offset]
        raise IndexError(index)

    return Split(name, ids, load)
