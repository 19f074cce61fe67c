"""Text -> mask generators: samples whose picture is a colour-coded mask, decoded to labels in `finish`.

SegGen's MaskSyn models draw label maps in the colours of a palette stored
with the model ("colour_coding" in its metadata: class rows, then the ignore
colour; segsynth.methods.seggen.colour makes and reads them). `run` returns the
drawn picture with no label; `finish` -- in synthesize's writer thread, so it
overlaps the model's next batch -- checks the picture's size and decodes it:

  image   the generated colour map (RGB), what the model drew
  label   nearest palette colour per pixel; too-far pixels and the ignore colour
          -> 255; speckles merged into their surroundings
  extras  {"colour_mask": image}, kept under extras/colour_mask/ by synthesize

Both text -> mask backends (`text2mask:DIR`, the CPU model; `text2mask-sd:DIR`, a
fine-tuned Stable Diffusion) mix this in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segsynth.generators.base import GeneratedSample, Prepared
from segsynth.io import SegsynthError
from segsynth.methods.seggen.colour import check_colour_image, decode_colour_masks


class ColourMaskDecoding:
    """Mixin for a Generator whose `run` returns colour maps (label None); `finish` decodes them."""

    coding_palette: np.ndarray
    max_distance: float
    min_component: int

    def setup_decoding(self, meta: dict, meta_path: Path) -> None:
        """Read the colour coding from a model's metadata, refusing a missing or malformed one."""
        coding = meta.get("colour_coding") or {}
        palette = np.asarray(coding.get("palette", []))
        classes = len(meta.get("classes", []))
        if palette.ndim != 2 or palette.shape != (classes + 1, 3):
            raise SegsynthError(f"{meta_path}: no \"colour_coding\" palette of {classes + 1} colours (classes, then "
                                "ignore); retrain the text -> mask generator with this version")
        self.coding_palette = palette.astype(np.uint8)
        self.max_distance = float(coding["max_distance"])
        self.min_component = int(coding["min_component"])

    def colour_sample(self, picture: np.ndarray, prompt: str, **meta) -> GeneratedSample:
        """What `run` returns for one drawn colour map: the label is left to `finish`."""
        return GeneratedSample(picture, None, extras={"colour_mask": picture}, meta={"prompt": prompt, **meta})

    def finish(self, prepared: Prepared, samples: list[GeneratedSample]) -> list[GeneratedSample]:
        """Check each drawn colour map's size, then decode the batch's maps together (`decode_colour_masks`:
        the same labels as one by one, for fewer numpy calls)."""
        drawn = [sample for sample in samples if sample.label is None]
        for condition, sample in zip(prepared.conditions, samples):
            if sample.label is None:
                check_colour_image(sample.image, prepared.size,
                                   f"{getattr(self, 'name', 'generator')} sample {condition.request.id}")
        labels = decode_colour_masks([sample.image for sample in drawn], self.coding_palette, self.max_distance,
                                     self.min_component)
        for sample, label in zip(drawn, labels):
            sample.label = label
        return samples

    def decoding_identity(self) -> dict:
        return {"palette": self.coding_palette.tolist(), "max_distance": self.max_distance,
                "min_component": self.min_component}
