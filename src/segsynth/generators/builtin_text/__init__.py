"""The built-in TEXT-conditioned generator: a small diffusion model trained from scratch on CPU.

The sibling of the mask-conditioned builtin generator, conditioned on a
prompt instead of a mask, for two methods:

* SegGen's text -> mask (Ye et al. 2023, "SegGen: Supercharging Segmentation
  Models with Text2Mask and Mask2Img Synthesis"): trained on (caption,
  colour-coded mask) pairs; its "image" is a colour map to decode.
* Attn2mask / DiffuMask's text -> image (Yoshihashi et al. 2023, "Attention as
  Annotation"; Wu et al. 2023, "DiffuMask"): trained on (class-list prompt,
  photo) pairs with image-level labels only; the cross-attention paid to each
  class word's token becomes that class's pseudo-mask.

It follows Stable Diffusion's conditioning (Rombach et al. 2022): a CLIP text
transformer (tiny, over a word-level vocabulary, so a class word is one token)
whose token states feed a `UNet2DConditionModel` through cross-attention; the
UNet works in pixel space on the 2x2 space-to-depth packed image. Both are
trained jointly with v-prediction, Min-SNR-style loss weights, an EMA and prompt
dropout for classifier-free guidance; sampling uses DPM-Solver++.

A trained generator is a diffusers-style folder:

    DIR/unet/                        UNet2DConditionModel.save_pretrained (EMA weights)
    DIR/text_encoder/                CLIPTextModel.save_pretrained (EMA weights)
    DIR/tokenizer/vocab.json         the word vocabulary and prompt length
    DIR/scheduler/scheduler_config.json   the training noise schedule
    DIR/segsynth_generator.json      classes, palette, size, target, prompts, sampling defaults, training stats
                                     (and for --target colour-mask the colour coding the samples decode by)
    DIR/training_state/              raw weights, EMA, AdamW state and iteration (for --resume)

Modules: tokenizer (WordTokenizer), model (the networks and tensor packing),
train (train_text_generator; its config is stage_configs.TrainTextGeneratorConfig),
sample (BuiltinTextGenerator), text2mask (TextToMaskGenerator, `text2mask:DIR`:
a colour-mask model whose samples are decoded to labels).
"""

from segsynth.generators.builtin_text.sample import BuiltinTextGenerator, check_text_generator_folder
from segsynth.generators.builtin_text.tokenizer import WordTokenizer
from segsynth.generators.builtin_text.train import (
    TrainTextGeneratorConfig,
    class_prompt,
    present_classes,
    target_image,
    train_text_generator,
)

__all__ = ["BuiltinTextGenerator", "TrainTextGeneratorConfig", "WordTokenizer", "check_text_generator_folder",
           "class_prompt", "present_classes", "target_image", "train_text_generator"]
