"""Build synthetic sets by hand (no generator) for filter and recipe tests.

A set made here has exactly the layout `segsynth synthesize` writes: images/,
masks/, classes.json and manifest.jsonl records with id, source, seed, image, mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segsynth.io import append_jsonl, atomic_write_json, atomic_write_png


def write_synthetic_set(root: Path, dataset, split: str = "train", copies: int = 1, corrupt=None) -> Path:
    """One sample per (real mask, copy); `corrupt(i, image, label, other)` may alter the image and
    return a boolean map of the pixels it made wrong (saved as truth/<id>.png)."""
    source = dataset.split(split)
    atomic_write_json(root / "classes.json", {"classes": list(dataset.classes),
                                              "palette": [list(c) for c in dataset.palette]})
    for i in range(len(source)):
        sample = source[i]
        for seed in range(copies):
            image = sample.image.copy()
            sample_id = f"{sample.id}_s{seed}"
            if corrupt is not None:
                wrong = corrupt(i, image, sample.label, source[(i + 1) % len(source)])
                atomic_write_png(root / "truth" / f"{sample_id}.png", wrong.astype(np.uint8))
            atomic_write_png(root / "images" / f"{sample_id}.png", image)
            atomic_write_png(root / "masks" / f"{sample_id}.png", sample.label)
            append_jsonl(root / "manifest.jsonl", {"id": sample_id, "source": sample.id, "seed": seed,
                                                   "image": f"images/{sample_id}.png", "mask": f"masks/{sample_id}.png"})
    return root


def images(out) -> dict[str, np.ndarray]:
    """A synthetic set's images by id, as int16 RGB arrays (for pixel comparisons)."""
    return {p.stem: np.asarray(Image.open(p).convert("RGB"), np.int16) for p in sorted((Path(out) / "images").glob("*.png"))}


def assert_same_pixels(a: dict, b: dict) -> None:
    """Every image agrees within 1/255 mean absolute difference (1 grey level on the 0..255 scale)."""
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).mean()) for k in a)
    assert worst <= 1.0, f"images differ by {worst:.3f} grey levels on average"
