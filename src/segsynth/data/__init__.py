"""Datasets: every one yields (RGB uint8 image, uint8 label map with 255 = ignore)."""

from segsynth.data.base import Dataset, Sample, Split
from segsynth.data.specs import DATASET_KINDS, open_dataset

__all__ = ["DATASET_KINDS", "Dataset", "Sample", "Split", "open_dataset"]
