"""Sampling the latent generator: the builtin sampler (generators/builtin/sample.py: scheduler, classifier-free
guidance) on standardised latents, decoded by the generator's copy of its autoencoder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel

from segsynth.generators.base import file_fingerprint, folder_fingerprint
from segsynth.generators.builtin.model import MaskDenoiser, one_hot_masks
from segsynth.generators.builtin.sample import BuiltinGenerator
from segsynth.generators.latent.autoencoder import open_autoencoder
from segsynth.generators.latent.model import (AUTOENCODER_FOLDER, MaskEncoder, check_latent_folder, standardise,
                                              unstandardise)


class LatentGenerator(BuiltinGenerator):
    """Samples a trained latent generator (`latent:DIR`): mask -> latents -> image."""

    name = "latent"

    def check_folder(self, folder: Path) -> dict:
        return check_latent_folder(folder)

    def load_denoiser(self) -> MaskDenoiser:
        autoencoder = self.meta["autoencoder"]
        self.autoencoder = open_autoencoder(f"{autoencoder['kind']}:{self.folder / AUTOENCODER_FOLDER}").to(self.device)
        self.latent_mean = torch.tensor(self.meta["latent_mean"], device=self.device)
        self.latent_std = torch.tensor(self.meta["latent_std"], device=self.device)
        unet = UNet2DModel.from_pretrained(self.folder, subfolder="unet", torch_dtype=torch.float32, use_safetensors=True)
        mask_encoder = MaskEncoder.from_pretrained(self.folder, subfolder="mask_encoder", torch_dtype=torch.float32,
                                                   use_safetensors=True)
        return MaskDenoiser(unet, mask_encoder)

    def weights_fingerprint(self) -> str:
        """The networks' weights and the autoencoder's (not the training state or the latent cache)."""
        parts = [file_fingerprint(self.folder / name / "diffusion_pytorch_model.safetensors")
                 for name in ("unet", "mask_encoder")]
        parts.append(folder_fingerprint(self.folder / AUTOENCODER_FOLDER, suffixes=(".safetensors", ".pth", ".json")))
        return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]

    def noise_shape(self) -> tuple[int, int, int]:
        height, width = self.meta["latent_size"]
        return self.autoencoder.latent_channels, height, width

    def encode_condition(self, masks: np.ndarray) -> torch.Tensor:
        return one_hot_masks(masks, len(self.classes))

    def decode(self, sample: torch.Tensor) -> list[np.ndarray]:
        images = self.autoencoder.decode(unstandardise(sample.float(), self.latent_mean, self.latent_std))
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return list(pixels)

    def encode_source(self, images: torch.Tensor) -> torch.Tensor:
        """Source images (0..255) -> standardised latents, encoded as the training images were."""
        return standardise(self.autoencoder.encode(images / 255.0), self.latent_mean, self.latent_std)
