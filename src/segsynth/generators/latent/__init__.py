"""The latent mask -> image generator: a mask-conditioned diffusion model on the latents of a frozen
pretrained autoencoder (`train-generator --kind latent --autoencoder taesd:DIR`, sampled as `latent:DIR`).

A pretrained autoencoder (e.g. taef2, distilled from the FLUX.2 VAE on a very large image collection)
turns an image into latents 8x smaller per side with 32 channels and decodes them back to sharp natural
texture; a small diffusion model trained on a few hundred images then only has to learn the layout of
latents for a mask, at 1/64 of the pixel positions, so CamVid near its full resolution (192x256 -> 24x32 latents)
trains on a CPU. The model, the training loop and the sampler are the builtin generator's
(generators/builtin: `MaskDenoiser`, `train_denoiser`, `BuiltinGenerator`) with a mask encoder in front of
the UNet, cached latents as training data, and the autoencoder's decoder after sampling:

  autoencoder.py   the frozen autoencoders by spec: taesd:DIR (TAESD family, written here: diffusers'
                   AutoencoderTiny has no taef1/taef2 "pool" branch) and diffusers:ID (AutoencoderKL / Tiny)
  model.py         MaskEncoder (one-hot mask -> latent grid), the denoiser, the folder layout
  train.py         the latent cache, the latent statistics, `train_latent_generator`
  sample.py        `LatentGenerator`
"""

from segsynth.generators.latent.model import FORMAT, check_latent_folder
from segsynth.generators.latent.sample import LatentGenerator
from segsynth.generators.latent.train import train_latent_generator

__all__ = ["FORMAT", "LatentGenerator", "check_latent_folder", "train_latent_generator"]
