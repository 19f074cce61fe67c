"""The text-conditioned model: a tiny CLIP text encoder and a cross-attention UNet, in pixel space.

* Text: `transformers.CLIPTextModel` from a small `CLIPTextConfig`, over the
  word-level vocabulary of `tokenizer.py`. Its last hidden states are the
  UNet's `encoder_hidden_states`, exactly as Stable Diffusion uses its CLIP
  text encoder, so code written against this model (attention capture,
  prompt handling) runs unchanged on a GPU user's SD text encoder.
* Image: a diffusers `UNet2DConditionModel` denoising the image packed 2x2 by
  `pixel_unshuffle` (space-to-depth: an HxW RGB image becomes H/2 x W/2 x 12,
  4x fewer positions per convolution and no pixel lost, no autoencoder to
  train first; as the mask-conditioned builtin generator does). The first
  level is a plain ResNet level; every lower-resolution level and the middle
  block are CrossAttn blocks, so the prompt reaches the image only through
  cross-attention over its tokens -- which is what makes the attention paid to
  a class word a map of where that class is drawn (Attn2mask).

Noise schedule: cosine (Nichol & Dhariwal 2021), v-prediction (Salimans & Ho
2022), "trailing" timestep spacing so sampling starts at pure noise.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.utils import logging as transformers_logging

# The same 2x2-packed pixel space and noise schedule as the mask -> image builtin generator.
from segsynth.generators.builtin.model import (PATCH, decode_images, encode_images, training_noise_schedule,
                                               working_size)
from segsynth.generators.builtin_text.tokenizer import SPECIAL_TOKENS
from segsynth.io import SegsynthError

transformers_logging.disable_progress_bar()  # its own "Loading weights" bars would interleave with ours

IMAGE_CHANNELS = 3 * PATCH * PATCH

__all__ = ["IMAGE_CHANNELS", "KEY_CHOICES", "PATCH", "build_text_encoder", "build_unet", "decode_images", "encode_images",
           "encode_text", "key_mask", "training_noise_schedule", "working_size"]


# --- the two networks -----------------------------------------------------------------------


def build_text_encoder(vocab_size: int, max_length: int, hidden_size: int = 64, layers: int = 2,
                       heads: int = 4) -> CLIPTextModel:
    """A tiny CLIP text transformer over the word vocabulary (ids as in tokenizer.SPECIAL_TOKENS)."""
    if hidden_size % heads:
        raise SegsynthError(f"--text-width {hidden_size} must be a multiple of the {heads} attention heads")
    pad, _, bos, eos = range(len(SPECIAL_TOKENS))
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                            projection_dim=hidden_size, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
                            attention_dropout=0.0, dropout=0.0)
    return CLIPTextModel(config)


def build_unet(size: Sequence[int], channels: Sequence[int], layers_per_block: int,
               cross_attention_dim: int) -> UNet2DConditionModel:
    """A small SD-style UNet on the 2x2-packed image; cross-attention at every level but the first."""
    levels = len(channels)
    if levels < 2:
        raise SegsynthError(f"--channels {list(channels)}: give at least two levels (cross-attention works on the lower ones)")
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1)
    up = ["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"]
    groups = 32 if all(c % 32 == 0 for c in channels) else 8
    return UNet2DConditionModel(
        sample_size=(size[0] // PATCH, size[1] // PATCH),
        in_channels=IMAGE_CHANNELS,
        out_channels=IMAGE_CHANNELS,
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=groups,
        cross_attention_dim=cross_attention_dim,
        # diffusers' legacy naming: `attention_head_dim` is the number of heads per level; 32-wide heads
        attention_head_dim=tuple(max(1, c // 32) for c in channels),
        use_linear_projection=True,
        resnet_time_scale_shift="scale_shift",  # AdaGN: the timestep scales and shifts every norm
    )


KEY_CHOICES = ("all", "class-words")


def key_mask(input_ids: torch.Tensor, keys: str, class_token_ids: Sequence[int], bos_id: int) -> torch.Tensor | None:
    """(B, L) 1/0 float: the prompt positions the UNet's cross-attention may attend to (its
    `encoder_attention_mask`), or None for every position (keys 'all').

    keys 'class-words': the class-name tokens and <bos>. Without the other words ("a", "photo", ",", <eos>,
    padding) to spread over, each pixel's attention is a softmax over the classes the prompt names plus
    <bos> as 'none of them' -- a per-pixel class competition, learned from image-level labels alone, which is
    what an attention pseudo-mask reads (the empty prompt keeps <bos> alone)."""
    if keys == "all":
        return None
    if keys != "class-words":
        raise SegsynthError(f"unknown keys {keys!r}; options: {', '.join(KEY_CHOICES)}")
    allowed = torch.tensor(sorted({int(bos_id), *map(int, class_token_ids)}), device=input_ids.device)
    return torch.isin(input_ids, allowed).float()


def encode_text(text_encoder: CLIPTextModel, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> (B, L, width) token states: the UNet's cross-attention keys and values (no attention
    mask, as Stable Diffusion: CLIP's causal mask already keeps padding out of the word states)."""
    return text_encoder(input_ids=input_ids).last_hidden_state
