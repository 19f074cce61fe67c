"""Shared test helpers: small fake dataset trees of every supported layout, built in tmp dirs.

Every tree uses H=32, W=48 images (non-square, so a W/H swap shows up) and masks
whose raw values are known, so tests can assert the label mapping exactly.
The builders are plain functions (importable as `conftest.build_*` from tests)
wrapped in fixtures; a test that needs a broken tree builds a good one and breaks it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

H, W = 32, 48
REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Tests never reach the network: a pretrained name that is not a local folder must fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a busy 2-core box two threads per process
# thrash (a 4-iteration run: 1.7 s with one thread, 8 s with two). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The check before compute caches what it read of each dataset file; tests keep that cache to themselves.
os.environ.setdefault("SEGSYNTH_CACHE_DIR", tempfile.mkdtemp(prefix="segsynth-test-cache-"))


# --- file writers --------------------------------------------------------------


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """A random RGB image, saved as PNG or JPEG by suffix; returns what was written."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(array).save(path, quality=95)
    else:
        Image.fromarray(array).save(path)
    return array


def write_mask(path: Path, array: np.ndarray, palette=None) -> None:
    """An index mask: mode L, or mode P with `palette` (a list of (r, g, b))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, np.uint8), mode="L")
    if palette is not None:
        image = image.convert("P")
        flat = [v for colour in palette for v in colour]
        image.putpalette(flat + [0] * (768 - len(flat)))
    image.save(path)


def stripes(values, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """Vertical bands cycling through `values` (every value appears when len(values) <= W)."""
    values = np.asarray(values, np.uint8)
    columns = values[(np.arange(size[1]) * len(values)) // size[1]]
    return np.broadcast_to(columns, size).copy()


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


# --- layout builders -----------------------------------------------------------
# Each returns the dataset root. RAW_* are the raw mask values written, EXPECTED_* what the reader must yield.

CAMVID_RAW = list(range(12))  # 0..10 classes, 11 = void
CAMVID_COUNTS = {"train": 3, "val": 2, "test": 2}


def build_camvid(root: Path) -> Path:
    for split, count in CAMVID_COUNTS.items():
        for i in range(count):
            name = f"0001TP_{split}_{i:03d}.png"
            write_image(root / split / name, seed=i)
            write_mask(root / f"{split}annot" / name, stripes(CAMVID_RAW))
    return root


ADE_RAW = [0, 1, 2, 75, 150]  # 0 = other -> 255, k -> k - 1
ADE_COUNTS = {"train": 3, "val": 2}


def build_ade20k(root: Path) -> Path:
    for split, folder in (("train", "training"), ("val", "validation")):
        for i in range(ADE_COUNTS[split]):
            stem = f"ADE_{folder}_{i + 1:08d}"
            write_image(root / "images" / folder / f"{stem}.jpg", seed=i)
            write_mask(root / "annotations" / folder / f"{stem}.png", stripes(ADE_RAW))
    return root


CITYSCAPES_RAW = [0, 7, 18, 255]
CITYSCAPES_FILES = {
    "train": [("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019"), ("bochum", "bochum_000000_000313")],
    "val": [("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000000_000019")],
}


def build_cityscapes(root: Path) -> Path:
    for split, files in CITYSCAPES_FILES.items():
        for i, (city, stem) in enumerate(files):
            write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed=i)
            gt = root / "gtFine" / split / city
            write_mask(gt / f"{stem}_gtFine_labelTrainIds.png", stripes(CITYSCAPES_RAW))
            # The other gtFine files of the real release sit beside the train-id masks and must be ignored.
            write_mask(gt / f"{stem}_gtFine_labelIds.png", stripes([7, 26, 33]))
            write_mask(gt / f"{stem}_gtFine_color.png", stripes([0, 1]))
            write_json(gt / f"{stem}_gtFine_polygons.json", {"objects": []})
    return root


VOC_IDS = {"train": ["2007_000032", "2007_000039", "2008_000008"], "val": ["2007_000033", "2009_000123"]}
VOC_RAW = [0, 1, 15, 20]


def voc_mask() -> np.ndarray:
    """Class stripes with the 255 'void' border VOC draws around every object."""
    mask = stripes(VOC_RAW)
    mask[:2, :], mask[-2:, :], mask[:, :2], mask[:, -2:] = 255, 255, 255, 255
    return mask


def build_voc(base: Path) -> Path:
    """Writes base/VOCdevkit/VOC2012 and returns `base` (the reader finds VOCdevkit/VOC2012 inside)."""
    from segsynth.data.palettes import VOC_PALETTE

    root = base / "VOCdevkit" / "VOC2012"
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split, ids in VOC_IDS.items():
        for i, sample_id in enumerate(ids):
            write_image(root / "JPEGImages" / f"{sample_id}.jpg", seed=i)
            write_mask(root / "SegmentationClass" / f"{sample_id}.png", voc_mask(), palette=VOC_PALETTE)
        (lists / f"{split}.txt").write_text("\n".join(ids) + "\n")
    write_image(root / "JPEGImages" / "2012_999999.jpg")  # detection-only image: in no segmentation list
    return base


COCO_RAW = [0, 91, 170, 255]
COCO_COUNTS = {"train": 3, "val": 2}


def build_coco_stuff(root: Path) -> Path:
    for split, folder in (("train", "train2017"), ("val", "val2017")):
        for i in range(COCO_COUNTS[split]):
            stem = f"{i + 9:012d}"
            write_image(root / "images" / folder / f"{stem}.jpg", seed=i)
            write_mask(root / "annotations" / folder / f"{stem}_labelTrainIds.png", stripes(COCO_RAW))
    return root


FOLDER_CLASSES = ["background", "cat", "dog"]
FOLDER_RAW = [0, 1, 2, 255]


def build_folder(root: Path, splits: dict[str, list[str]] | None = None, n: int = 5, classes=FOLDER_CLASSES,
                 **info) -> Path:
    for i in range(n):
        write_image(root / "images" / f"img_{i}.png", seed=i)
        write_mask(root / "masks" / f"img_{i}.png", stripes(FOLDER_RAW))
    write_json(root / "classes.json", {"classes": list(classes), **info})
    if splits is not None:
        (root / "splits").mkdir()
        for name, ids in splits.items():
            (root / "splits" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


FOLDER_SPLITS = {"train": ["img_0", "img_1", "img_2"], "val": ["img_3", "img_4"]}


# --- a tiny training run shared by tests ---------------------------------------

TINY_TRAIN = dict(model="segformer-tiny", iterations=4, batch_size=2, workers=0, save_every=2, warmup=2,
                  log_every=1, device="cpu")
TOY_SPEC = "toy:n=8,n_val=4,size=32"


def subprocess_env() -> dict:
    """For tests that start the CLI: one thread per process (identical arithmetic across runs, gentle on a
    shared 2-core machine), no progress bars, and this checkout's sources."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
            "PYTHONPATH": str(REPO / "src")}


# `segsynth run --method all` in a few seconds (tests/conftest.py::compare_run).
TINY_COMPARE = dict(
    method="all", data="toy:n=8,n_val=4,size=32x40", seeds=[0, 1], generator="train", images_per_mask=1, grids=2,
    device="cpu",
    train=dict(iterations=4, batch_size=4, warmup=1, workers=0),
    train_generator=dict(size=[32, 40], channels=[32, 64], layers_per_block=1, iterations=2, max_minutes=0.0,
                         batch_size=4),
    train_text_generator=dict(size=[32, 40], channels=[32, 64], layers_per_block=1, text_width=32, iterations=2,
                              max_minutes=0.0, batch_size=4, warmup=1),
    synthesize=dict(steps=2, batch_size=8))
