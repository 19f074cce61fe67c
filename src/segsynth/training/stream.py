"""The training sample stream: weighted sources drawn by global draw number, decoded samples cached.

The loop knows nothing about recipes: it draws samples from a list of
`Source`s (a split and how many times it repeats per epoch), each sample
optionally carrying a per-pixel weight map, and ignore pixels (255) flow into
the loss. Recipes (training/recipes.py) only decide the sources.

Draw g of a run is a pure function of (seed, g): it picks its sample and its
augmentation, whatever the number of data workers or a resume in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from segsynth.data import Sample, Split
from segsynth.data.transforms import AugmentConfig, augment, resize_pair
from segsynth.distributed import DistInfo
from segsynth.io import SegsynthError


@dataclass
class Source:
    """A training source: one split, repeated `repeat` times per epoch (fractions allowed)."""

    name: str
    split: Split
    repeat: float = 1.0
    # SegGen's replace: draw of item i becomes alternatives[j], j from alternative_index[i], with this probability;
    # without an index (pool), j is any index of `alternatives`.
    alternatives: Split | None = None
    alternative_index: dict[int, list[int]] | None = None
    alternative_probability: float = 0.0
    # Copy-paste: with these class ids, the picked alternative is not a replacement but a donor whose pixels of
    # these classes are pasted over the real sample (image and label), every other real pixel kept.
    paste_classes: tuple[int, ...] = ()


# --- the sample stream --------------------------------------------------------


class SampleStream(TorchDataset):
    """Map-style dataset over global draw numbers g = 0, 1, 2, ...: draw g is a pure function of (seed, g).

    Each epoch lists every source's samples `repeat` times, shuffled with the epoch's seed,
    so sources mix in one stream (FreeMask's repeated-real-plus-synthetic concatenation).
    """

    def __init__(self, sources: list[Source], augment_config: AugmentConfig, seed: int, cache_bytes: int = 0):
        self.sources, self.augment_config, self.seed = sources, augment_config, seed
        self.cache = DecodedCache(cache_bytes)
        self.epoch_items = self._epoch_template()
        if len(self.epoch_items) == 0:
            raise SegsynthError("the training sources hold no samples")
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def _epoch_template(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 7])
        items = []
        for source_index, source in enumerate(self.sources):
            whole, fraction = int(source.repeat), source.repeat - int(source.repeat)
            indices = list(range(len(source.split))) * whole
            if fraction > 0:  # a fixed random subset carries the fractional repeat
                indices += rng.choice(len(source.split), int(round(fraction * len(source.split))), replace=False).tolist()
            items += [(source_index, i) for i in indices]
        return np.asarray(items, dtype=np.int64).reshape(-1, 2)

    def locate(self, draw: int) -> tuple[int, int]:
        epoch, position = divmod(draw, len(self.epoch_items))
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.random.default_rng([self.seed, 11, epoch]).permutation(len(self.epoch_items))
            self._epoch_cache = (epoch, order)
        source_index, item = self.epoch_items[self._epoch_cache[1][position]]
        return int(source_index), int(item)

    def __len__(self) -> int:  # DataLoader needs a length; draws are unbounded
        return 2**62

    def __getitem__(self, draw: int):
        source_index, item = self.locate(draw)
        source = self.sources[source_index]
        rng = np.random.default_rng([self.seed, 13, draw])
        if source.alternative_index is not None:
            choices = source.alternative_index.get(item)
        else:
            choices = range(len(source.alternatives)) if source.alternatives is not None else None
        if choices and rng.random() < source.alternative_probability:
            alternative = choices[int(rng.integers(len(choices)))]
            sample = self.cache.get((source_index, 1, alternative), lambda: source.alternatives[alternative])
            if source.paste_classes:
                real = self.cache.get((source_index, 0, item), lambda: source.split[item])
                sample = paste_pixels(real, sample, source.paste_classes)
        else:
            sample = self.cache.get((source_index, 0, item), lambda: source.split[item])
        image, label, weight = augment(sample.image, sample.label, sample.weight, self.augment_config, rng)
        weight = np.ones(label.shape, np.float32) if weight is None else weight
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(label), torch.from_numpy(weight)


def paste_pixels(target: Sample, donor: Sample, classes: tuple[int, ...]) -> Sample:
    """`target` with the donor's pixels of `classes` pasted at the same place (Copy-Paste, Ghiasi et al. 2021,
    without scale jitter: a street scene's objects belong where they stand). The donor is resized to the target
    first (image bilinear, label nearest); its ignore pixels (255: the filter's) are never pasted, so only pixels
    the filter kept replace real ones. The pasted pixels keep the donor's weight where it has one."""
    height, width = target.label.shape
    image, label, weight = donor.image, donor.label, donor.weight
    if label.shape != (height, width):
        image, label, weight = resize_pair(image, label, weight, (height, width))
    pasted = np.isin(label, np.asarray(classes, dtype=label.dtype))
    new_image, new_label = target.image.copy(), target.label.copy()
    new_image[pasted], new_label[pasted] = image[pasted], label[pasted]
    new_weight = None
    if target.weight is not None or weight is not None:
        new_weight = np.ones((height, width), np.float32) if target.weight is None else target.weight.copy()
        new_weight[pasted] = 1.0 if weight is None else weight[pasted]
    return Sample(f"{target.id}+{donor.id}", new_image, new_label, new_weight)


class DecodedCache:
    """Decoded samples kept in this (worker) process up to a byte budget, so epochs after the first skip
    reading and decoding files: on 2 cores, decoding competes with the model for the same CPU."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used, self.items = budget_bytes, 0, {}

    def get(self, key, load) -> Sample:
        sample = self.items.get(key)
        if sample is not None:
            return sample
        sample = load()
        arrays = [a for a in (sample.image, sample.label, sample.weight) if a is not None]
        size = sum(a.nbytes for a in arrays)
        if self.used + size <= self.budget:
            for array in arrays:
                array.flags.writeable = False  # augmentation must copy, never edit, a cached sample
            self.items[key] = sample
            self.used += size
        return sample


class DrawSampler(torch.utils.data.Sampler):
    """Yields this rank's draw numbers, iteration after iteration, from `start` on."""

    def __init__(self, start: int, iterations: int, batch_size: int, info: DistInfo):
        self.start, self.iterations, self.batch_size, self.info = start, iterations, batch_size, info

    def __iter__(self):
        per_iteration = self.batch_size * self.info.world_size
        for iteration in range(self.start, self.iterations):
            first = iteration * per_iteration + self.info.rank * self.batch_size
            yield list(range(first, first + self.batch_size))

    def __len__(self) -> int:
        return self.iterations - self.start
