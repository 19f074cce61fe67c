"""The built-in generators' shared pixel space and the mask -> image model: a diffusers `UNet2DModel` on 2x2-packed pixels with the one-hot
mask concatenated, its noise schedule, the tensor conversions, and the folder it is saved as. The
text-conditioned generator (generators/builtin_text) works in the same 2x2-packed pixel space with the
same noise schedule, and imports them from here."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

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
    labels = torch.from_numpy(np.ascontiguousarray(masks)).long()
    labels = torch.where(labels == IGNORE_INDEX, torch.full_like(labels, num_classes), labels)
    if labels.max() > num_classes:
        raise SegsynthError(f"mask holds label {int(labels.max())} but the generator knows {num_classes} classes")
    one_hot = F.one_hot(labels, num_classes + 1).permute(0, 3, 1, 2).float()
    return F.pixel_unshuffle(one_hot, PATCH)


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
    if len(values) == 1:
        values = [values[0], values[0]]
    multiple = PATCH * 2 ** (levels - 1)
    if len(values) != 2 or any(v < multiple or v % multiple for v in values):
        raise SegsynthError(f"--size {list(values)}: H and W must be multiples of {multiple} "
                            f"(space-to-depth x{PATCH} and {levels - 1} UNet downsamplings); e.g. 96,128")
    return int(values[0]), int(values[1])


def build_unet(size: Sequence[int], num_classes: int, channels: Sequence[int], layers_per_block: int,
               attention: bool) -> UNet2DModel:
    levels = len(channels)
    down = ["DownBlock2D"] * (levels - 1) + ["AttnDownBlock2D" if attention else "DownBlock2D"]
    up = ["AttnUpBlock2D" if attention else "UpBlock2D"] + ["UpBlock2D"] * (levels - 1)
    groups = 32 if all(c % 32 == 0 for c in channels) else 8
    return UNet2DModel(
        sample_size=(size[0] // PATCH, size[1] // PATCH),
        in_channels=3 * PATCH * PATCH + (num_classes + 1) * PATCH * PATCH,
        out_channels=3 * PATCH * PATCH,
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=groups,
        attention_head_dim=32,
        resnet_time_scale_shift="scale_shift",  # AdaGN: the timestep scales and shifts every norm
    )


def training_noise_schedule() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=False, timestep_spacing="trailing")


def check_generator_folder(folder: Path) -> dict:
    """A clear error naming the missing files, before anything is loaded; returns the metadata."""
    return check_model_folder(folder, REQUIRED_FILES, GENERATOR_FILE, FORMAT, "builtin generator", "train-generator")
