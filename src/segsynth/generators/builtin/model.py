"""The built-in generators' shared pixel space and the mask -> image model: a diffusers `UNet2DModel` on 2x2-packed pixels with the one-hot
mask concatenated, its noise schedule, the tensor conversions, and the folder it is saved as. The
text-conditioned generator (generators/builtin_text) works in the same 2x2-packed pixel space with the
same noise schedule, and imports them from here; the latent generator (generators/latent) is a
`MaskDenoiser` too, with a mask encoder in front of its UNet.

Classifier-free guidance: the "no condition" input is an all-zero mask encoding. A real mask never
encodes to it (every pixel has exactly one channel set, the ignore channel included), so a model trained
with some masks blanked (`cond_dropout`) learns an unconditional mode beside the conditional one."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from segsynth import IGNORE_INDEX
from segsynth.generators.base import check_model_folder
from segsynth.io import SegsynthError

GENERATOR_FILE = "segsynth_generator.json"
FORMAT = "segsynth-builtin-generator/1"
REQUIRED_FILES = (
    GENERATOR_FILE,
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
)
PATCH = 2  # space-to-depth factor


def encode_masks(masks: np.ndarray, num_classes: int) -> torch.Tensor:
    """(B, H, W) uint8 labels -> (B, 4*(C+1), H/2, W/2) float: one-hot plus an ignore channel, patchified."""
    return F.pixel_unshuffle(one_hot_masks(masks, num_classes), PATCH)


def one_hot_masks(masks: np.ndarray, num_classes: int) -> torch.Tensor:
    """(B, H, W) uint8 labels -> (B, C+1, H, W) float: one-hot over the classes plus an ignore channel (255)."""
    labels = torch.from_numpy(np.ascontiguousarray(masks)).long()
    labels = torch.where(labels == IGNORE_INDEX, torch.full_like(labels, num_classes), labels)
    if labels.max() > num_classes:
        raise SegsynthError(f"mask holds label {int(labels.max())} but the generator knows {num_classes} classes")
    return F.one_hot(labels, num_classes + 1).permute(0, 3, 1, 2).float()


def encode_images(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float 0..255 -> (B, 12, H/2, W/2) in [-1, 1]."""
    return F.pixel_unshuffle(images / 127.5 - 1.0, PATCH)


def decode_images(sample: torch.Tensor) -> list[np.ndarray]:
    """Model space -> list of HxWx3 uint8 images."""
    pixels = F.pixel_shuffle(sample.float(), PATCH).clamp(-1, 1)
    pixels = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(pixels)


def working_size(values: Sequence[int], levels: int) -> tuple[int, int]:
    """(H, W) checked to pass through space-to-depth and every UNet downsampling."""
    return sized_for(values, PATCH * 2 ** (levels - 1), f"space-to-depth x{PATCH} and {levels - 1} UNet downsamplings",
                     "96,128")


def sized_for(values: Sequence[int], multiple: int, why: str, example: str) -> tuple[int, int]:
    """`--size` (one value: square) as (H, W), both positive multiples of `multiple` (`why` says which
    downsamplings need that, `example` a size that works)."""
    if len(values) == 1:
        values = [values[0], values[0]]
    if len(values) != 2 or any(v < multiple or v % multiple for v in values):
        raise SegsynthError(f"--size {list(values)}: H and W must be multiples of {multiple} ({why}); e.g. {example}")
    return int(values[0]), int(values[1])


def build_unet(size: Sequence[int], num_classes: int, channels: Sequence[int], layers_per_block: int,
               attention: bool) -> UNet2DModel:
    """The pixel generator's UNet: 2x2-packed RGB plus the packed one-hot mask in, packed RGB out."""
    return conditioned_unet((size[0] // PATCH, size[1] // PATCH),
                            3 * PATCH * PATCH + (num_classes + 1) * PATCH * PATCH, 3 * PATCH * PATCH,
                            channels, layers_per_block, attention)


def conditioned_unet(sample_size: Sequence[int], in_channels: int, out_channels: int, channels: Sequence[int],
                     layers_per_block: int, attention: bool) -> UNet2DModel:
    """A UNet2DModel whose input is the noisy sample with the condition concatenated; self-attention at the
    lowest level when `attention`; AdaGN timestep conditioning."""
    levels = len(channels)
    down = ["DownBlock2D"] * (levels - 1) + ["AttnDownBlock2D" if attention else "DownBlock2D"]
    up = ["AttnUpBlock2D" if attention else "UpBlock2D"] + ["UpBlock2D"] * (levels - 1)
    groups = 32 if all(c % 32 == 0 for c in channels) else 8
    return UNet2DModel(
        sample_size=tuple(sample_size),
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=groups,
        attention_head_dim=32,
        resnet_time_scale_shift="scale_shift",  # AdaGN: the timestep scales and shifts every norm
    )


class MaskDenoiser(nn.Module):
    """The trained networks of a mask-conditioned generator, each saved in the subfolder of its name: `unet`
    denoises the noisy sample with the mask condition concatenated; `mask_encoder` (the latent generator's)
    first brings the one-hot mask to the UNet's grid. `condition` all zeros is "no condition"."""

    def __init__(self, unet: UNet2DModel, mask_encoder: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.mask_encoder = mask_encoder

    def parts(self) -> dict[str, nn.Module]:
        return {name: module for name, module in self.named_children()}

    def forward(self, noisy: torch.Tensor, condition: torch.Tensor, timesteps) -> torch.Tensor:
        if self.mask_encoder is not None:
            condition = self.mask_encoder(condition)
        return self.unet(torch.cat([noisy, condition], dim=1), timesteps).sample

    def guided(self, sample: torch.Tensor, condition: torch.Tensor, timestep, guidance: float) -> torch.Tensor:
        """The prediction at one sampling step; with `guidance` != 1, classifier-free guidance (Ho & Salimans
        2022): unconditional + guidance * (conditional - unconditional), both in one batch."""
        if guidance == 1.0:
            return self(sample, condition, timestep)
        both = self(torch.cat([sample, sample]), torch.cat([condition, torch.zeros_like(condition)]), timestep)
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance * (conditional - unconditional)


def training_noise_schedule() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=False, timestep_spacing="trailing")


def check_generator_folder(folder: Path) -> dict:
    """A clear error naming the missing files, before anything is loaded; returns the metadata."""
    return check_model_folder(folder, REQUIRED_FILES, GENERATOR_FILE, FORMAT, "builtin generator", "train-generator")
