"""segsynth: stronger semantic segmentation from diffusion-synthesized training data."""

__version__ = "0.1.0"

IGNORE_INDEX = 255  # the one canonical ignore value inside segsynth
