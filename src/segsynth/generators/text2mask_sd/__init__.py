"""SegGen's Text2Mask on a GPU: a diffusers text-to-image model fine-tuned to draw colour-coded masks.

    segsynth captions --data SPEC --out runs/captions                  # or a BLIP-2 / your own captions file
    segsynth train-generator --kind text2mask-sd --data SPEC --base stabilityai/stable-diffusion-xl-base-1.0 \
        --prompts runs/captions/captions.jsonl --size 768,768 [--lora-rank 64] --out runs/text2mask-sd
    segsynth plan --data SPEC --captions runs/captions/captions.jsonl --per-caption 10 --out masks.jsonl
    segsynth synthesize --data SPEC --plan masks.jsonl --generator text2mask-sd:runs/text2mask-sd --out runs/masks

Modules: model (the base model's parts, loaded one by one from a hub id or
folder, and the prompt encoding of its pipeline), train (train_text2mask_sd: the
fine-tuning loop, resumable, torchrun-ready), sample (SDTextToMaskGenerator,
`text2mask-sd:DIR`: captions -> colour maps -> labels).

A trained model is a complete diffusers pipeline folder (safetensors; the UNet
with any LoRA merged in) plus:

    DIR/segsynth_generator.json     classes, colour coding (palette, decoding distance), size, SDXL or not,
                                    the base's identity, sampling defaults, training stats
    DIR/training_state/             trained weights, EMA, AdamW state, iteration (for --resume)
    DIR/train_log.jsonl, DIR/train_generator.config.yaml
"""

from segsynth.generators.text2mask_sd.train import FORMAT, GENERATOR_FILE, train_text2mask_sd

__all__ = ["FORMAT", "GENERATOR_FILE", "train_text2mask_sd"]
