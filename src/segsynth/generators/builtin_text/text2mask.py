"""`text2mask:DIR`: SegGen's MaskSyn -- a text -> colour-coded mask model whose samples are read back to labels.

A builtin text generator trained with `--target colour-mask` draws label maps
in the colours of its stored palette (segsynth_generator.json, "colour_coding";
SegGen's colour coding, segsynth.methods.seggen.colour). Each sample is

  image   the generated colour map (RGB), what the model drew
  label   its decoding by the stored palette (`generators.colour_decoding`: in
          `finish`, i.e. synthesize's writer thread): nearest palette colour per
          pixel, too-far pixels and the ignore colour -> 255, speckles merged away
  extras  {"colour_mask": image}, kept under extras/colour_mask/ by synthesize
  meta    {"prompt": ...} (and any out-of-vocabulary words)

so `segsynth synthesize` writes a "mask set": a synthetic set whose masks are
the decoded labels. A mask -> image generator then renders it (a uniform plan
over `synthetic-raw:MASKSET`), which is MaskSyn's image set.

A folder trained with `--target image` is refused here: its samples carry no
colour coding (their labels come from attention, a different generator).
"""

from __future__ import annotations

import os
from pathlib import Path

from segsynth.generators.base import GeneratedSample, GeneratorSettings, Prepared
from segsynth.generators.builtin_text.model import decode_images
from segsynth.generators.builtin_text.sample import BuiltinTextGenerator, check_text_generator_folder
from segsynth.generators.builtin_text.train import GENERATOR_FILE
from segsynth.generators.colour_decoding import ColourMaskDecoding
from segsynth.io import SegsynthError, read_json


class TextToMaskGenerator(ColourMaskDecoding, BuiltinTextGenerator):
    """Text -> (colour map, decoded label map) with a colour-mask builtin text generator folder."""

    name = "text2mask"

    def __init__(self, folder: str | os.PathLike, settings: GeneratorSettings | None = None):
        # 1. The folder must hold a colour-mask model with its palette (checked before the networks load).
        folder = Path(folder)
        check_text_generator_folder(folder)
        meta = read_json(folder / GENERATOR_FILE)
        if meta.get("target") != "colour-mask":
            raise SegsynthError(f"{folder / GENERATOR_FILE}: target {meta.get('target')!r}; text2mask:DIR needs a "
                                "text generator trained with --target colour-mask (train-text-generator)")
        self.setup_decoding(meta, folder / GENERATOR_FILE)
        if settings is not None and settings.lora:
            raise SegsynthError("the text2mask generator draws colour-coded masks; a LoRA adapter (--lora) adapts an "
                                "image generator to a domain's photos: leave --lora out")
        # 2. The model itself.
        super().__init__(folder, settings)

    def run(self, prepared: Prepared) -> list[GeneratedSample]:
        """The drawn colour maps; their labels are decoded in `finish` (the writer thread in synthesize)."""
        samples = []
        for picture, prompt in zip(decode_images(self.denoise(prepared)), prepared.prompts):
            _, unknown = self.tokenizer.encode(prompt)
            samples.append(self.colour_sample(picture, prompt, **({"unknown_words": unknown} if unknown else {})))
        return samples

    def identity(self) -> dict:
        return {**super().identity(), "name": self.name, "decoding": self.decoding_identity()}
