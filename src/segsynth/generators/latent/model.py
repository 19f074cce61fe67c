"""The latent mask -> image model: a `MaskDenoiser` whose UNet works on the standardised latents of a frozen
autoencoder, and whose mask encoder brings the one-hot mask to the latent grid; the folder it is saved as.

The mask condition: the one-hot mask (classes + ignore, at image resolution) through a patch embedding,
a convolution with kernel and stride = the autoencoder's factor (8). Each latent cell thus sees which
label every one of its 8x8 pixels has, as the pixel generator's 2x2 packing does, so an edge is placed
within the cell and thin classes (poles, signs) are not averaged away; it is the linear map of the
space-to-depth one-hot (64 x (C+1) channels) to `channels[0]`, without materialising those channels.
Concatenated to the noisy latents, it enters the UNet's first convolution; all zeros is "no condition"
(classifier-free guidance), as in the pixel generator.

A trained latent generator is a diffusers-style folder:

    DIR/unet/                  UNet2DModel.save_pretrained (latents + encoded mask in, v out)
    DIR/mask_encoder/          MaskEncoder.save_pretrained
    DIR/scheduler/             the training noise schedule
    DIR/autoencoder/           a copy of the frozen autoencoder (TAESD .pth pair with its licence, or a diffusers
                               autoencoder folder), so the folder samples anywhere without the original path
    DIR/segsynth_generator.json  classes, palette, working size, the latents' per-channel mean and std,
                               the autoencoder's identity, sampling defaults, training statistics
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from segsynth.generators.base import check_model_folder
from segsynth.generators.builtin.model import GENERATOR_FILE, MaskDenoiser, conditioned_unet, sized_for
from segsynth.io import SegsynthError

FORMAT = "segsynth-latent-generator/1"
AUTOENCODER_FOLDER = "autoencoder"
REQUIRED_FILES = (
    GENERATOR_FILE,
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "mask_encoder/config.json",
    "mask_encoder/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
)


class MaskEncoder(ModelMixin, ConfigMixin):
    """(B, C+1, H, W) one-hot mask -> (B, out_channels, H/factor, W/factor): a patch embedding."""

    @register_to_config
    def __init__(self, num_classes: int, factor: int = 8, out_channels: int = 64):
        super().__init__()
        self.embed = nn.Conv2d(num_classes + 1, out_channels, kernel_size=factor, stride=factor)

    def forward(self, one_hot: torch.Tensor) -> torch.Tensor:
        return self.embed(one_hot)


def build_denoiser(latent_size: Sequence[int], latent_channels: int, num_classes: int, factor: int,
                   channels: Sequence[int], layers_per_block: int, attention: bool) -> MaskDenoiser:
    mask_encoder = MaskEncoder(num_classes, factor, channels[0])
    unet = conditioned_unet(latent_size, latent_channels + channels[0], latent_channels, channels, layers_per_block,
                            attention)
    return MaskDenoiser(unet, mask_encoder)


def latent_working_size(values: Sequence[int], factor: int, levels: int) -> tuple[int, int]:
    """(H, W) checked to pass through the autoencoder's downsampling and every UNet downsampling."""
    return sized_for(values, factor * 2 ** (levels - 1),
                     f"the autoencoder's x{factor} and {levels - 1} UNet downsamplings",
                     "192,256 with three levels, 176,240 with two")


def standardise(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Latents -> the model's space: zero mean and unit variance per channel (the noise schedule assumes it)."""
    return (latents - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def unstandardise(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return sample * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)


def check_latent_folder(folder: Path) -> dict:
    """A clear error naming the missing files, before anything is loaded; returns the metadata."""
    meta = check_model_folder(folder, REQUIRED_FILES, GENERATOR_FILE, FORMAT, "latent generator",
                              "train-generator --kind latent")
    if not (Path(folder) / AUTOENCODER_FOLDER).is_dir():
        raise SegsynthError(f"{folder}: not a latent generator, missing {AUTOENCODER_FOLDER}/ (its autoencoder); "
                            "rerun `segsynth train-generator --kind latent`")
    return meta
