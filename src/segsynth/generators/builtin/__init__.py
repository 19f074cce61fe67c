"""The built-in mask -> image generator: a small mask-conditioned diffusion model that trains on CPU.

Built from diffusers parts -- a `UNet2DModel` and its noise schedulers -- in
pixel space, with two choices made for CPU budgets:

* Space-to-depth ("patchify", `pixel_unshuffle` by 2): an RxS RGB image becomes
  an R/2 x S/2 x 12 tensor, so every convolution touches 4x fewer positions
  while no pixel is lost and no autoencoder has to be trained first. The
  UNet denoises that tensor; `pixel_shuffle` turns it back into an image.
* The mask is the conditioning, concatenated to the noisy input: a one-hot
  map over the dataset's classes plus one "ignore" channel, patchified the
  same way, so the model sees every label pixel at full resolution.

It is trained with v-prediction on a cosine noise schedule (good for small
images), min-SNR loss weighting (faster convergence), horizontal flips and
random rescaled crops, and an EMA of the weights; it samples with
DPM-Solver++ in ~20 steps. Trained with `--cond-dropout` (the mask blanked for that share of
samples), it also samples with classifier-free guidance (`--guidance`); `--resume` continues a
training from its saved state. The latent generator (generators/latent) reuses the model, the loop
and the sampler on an autoencoder's latents.

A trained generator is a diffusers-style folder:

    DIR/unet/config.json, DIR/unet/diffusion_pytorch_model.safetensors   (UNet2DModel.save_pretrained)
    DIR/scheduler/scheduler_config.json                                  (the training noise schedule)
    DIR/segsynth_generator.json   classes, palette, working size, patch, sampling defaults (steps, scheduler,
                                  guidance), cond_dropout, training stats
    DIR/training_state/           raw and EMA weights, AdamW state, iteration: what --resume continues from
"""

from segsynth.generators.builtin.model import FORMAT, GENERATOR_FILE, MaskDenoiser, check_generator_folder
from segsynth.generators.builtin.sample import BuiltinGenerator
from segsynth.generators.builtin.train import train_denoiser, train_generator

__all__ = ["FORMAT", "GENERATOR_FILE", "BuiltinGenerator", "MaskDenoiser", "check_generator_folder", "train_denoiser",
           "train_generator"]
