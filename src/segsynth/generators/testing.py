"""Tiny random diffusers models for tests, benchmarks and offline smoke runs.

They are built from configs (nothing is downloaded) and saved with
`save_pretrained`, so loading them goes through exactly the `from_pretrained`
path a hub id takes. The CLIP tokenizer is byte-level: a vocab of the 256
byte symbols, their end-of-word forms and the two special tokens, and no
merges, which needs no download and still tokenizes any prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from segsynth.generators.builtin import train_generator
from segsynth.stage_configs import TrainGeneratorConfig

TEXT_LENGTH = 77  # the CLIP context length SD pipelines pad prompts to


def byte_level_vocab() -> dict[str, int]:
    """GPT-2/CLIP byte-to-unicode symbols: 256 byte symbols, 256 '</w>' forms, then the special tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    symbols = [chr(code) for code in codes]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": index + 256 for index, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return vocab


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=TEXT_LENGTH)


def tiny_text_encoder(with_projection: bool = False, hidden_size: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                            max_position_embeddings=TEXT_LENGTH, projection_dim=hidden_size)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    # Two levels: a latent at 1/2 the image size (SD's VAE is 1/8), matched by the ControlNet's hint encoder.
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=32, sample_size=32)


def _unet_and_controlnet_kwargs(sdxl: bool) -> dict:
    common = dict(block_out_channels=(32, 64), layers_per_block=1, in_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), norm_num_groups=32)
    if sdxl:
        # SDXL's extra conditioning: pooled text (32) + six size/crop numbers embedded in 8 dims each.
        common.update(cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=(1, 1))
    else:
        common.update(cross_attention_dim=32, attention_head_dim=8)
    return common


def _tiny_unet(sdxl: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=16, out_channels=4, up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                **_unet_and_controlnet_kwargs(sdxl))


def _tiny_pipeline(unet, sdxl: bool):
    """SD 1.x (or SDXL) around `unet`: tiny VAE and text encoder(s), SD 1.5's scheduler (scaled-linear betas,
    epsilon prediction)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    if sdxl:
        return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(),
                                         text_encoder_2=tiny_text_encoder(with_projection=True),
                                         tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny_sd(folder: str | Path, sdxl: bool = False, seed: int = 0) -> Path:
    """Save a tiny random SD 1.x (or SDXL) text-to-image pipeline folder (32x32 images, 16x16 latents) at
    folder/sd (folder/sdxl); returns it."""
    torch.manual_seed(seed)
    base_dir = Path(folder) / ("sdxl" if sdxl else "sd")
    _tiny_pipeline(_tiny_unet(sdxl), sdxl).save_pretrained(base_dir, safe_serialization=True)
    return base_dir


def save_tiny_controlnet_models(folder: str | Path, sdxl: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """Save a tiny SD (or SDXL) base pipeline and a matching ControlNet; returns (base dir, controlnet dir)."""
    from diffusers import ControlNetModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = _tiny_unet(sdxl)
    controlnet = ControlNetModel(conditioning_embedding_out_channels=(16, 32), **_unet_and_controlnet_kwargs(sdxl))
    base_dir, controlnet_dir = folder / ("sdxl" if sdxl else "sd"), folder / ("controlnet-sdxl" if sdxl else "controlnet")
    _tiny_pipeline(unet, sdxl).save_pretrained(base_dir, safe_serialization=True)
    controlnet.save_pretrained(controlnet_dir, safe_serialization=True)
    return base_dir, controlnet_dir


def save_lcm_lora(base_dir: str | Path, out: str | Path, rank: int = 4, seed: int = 0) -> Path:
    """A random LoRA on the tiny UNet's attention projections, in the diffusers LoRA format (stands in for LCM-LoRA)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return Path(out)


def save_tiny_taesd(folder: str | Path, width: int = 8, latent_channels: int = 4, pool: bool = True,
                    seed: int = 0) -> Path:
    """A tiny random TAESD-family autoencoder (x8, the taef2 layout at width `width`) as a taesd:DIR folder."""
    from segsynth.generators.latent.autoencoder import TinyAutoencoder, save_taesd

    torch.manual_seed(seed)
    return save_taesd(TinyAutoencoder(width, latent_channels, pool), folder)


def save_colour_taesd(folder: str | Path, width: int = 8, latent_channels: int = 4) -> Path:
    """A hand-set TAESD-layout autoencoder whose latents are the image's colours, subsampled x8 (and whose decoder
    repeats each latent colour over its 8x8 cell): a known latent space, so a learning test can tell red from
    blue where a random autoencoder's latents barely separate them. Every residual branch is zero (a block
    is then a ReLU), every other convolution copies its first three channels through its centre tap."""
    from segsynth.generators.latent.autoencoder import TinyAutoencoder, save_taesd

    model = TinyAutoencoder(width, latent_channels, pool=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
                if module.kernel_size == (3, 3) and not _inside_block(model, module):
                    for channel in range(3):
                        module.weight[channel, channel, 1, 1] = 1.0
            elif isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
    return save_taesd(model, folder, name="colour")


def _inside_block(model, conv) -> bool:
    from segsynth.generators.latent.autoencoder import Block

    return any(conv is inner for block in model.modules() if isinstance(block, Block) for inner in block.modules())


def save_tiny_diffusers_autoencoder(folder: str | Path, kind: str = "tiny", seed: int = 0) -> Path:
    """A tiny random diffusers AutoencoderTiny ("tiny", x8) or AutoencoderKL ("kl", x4) saved to `folder`."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.manual_seed(seed)
    if kind == "tiny":
        model = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
    else:
        model = AutoencoderKL(block_out_channels=(8, 8, 8), in_channels=3, out_channels=3, latent_channels=4,
                              down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                              norm_num_groups=8, layers_per_block=1, sample_size=32)
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def save_tiny_latent(folder: str | Path, autoencoder: str, data: str = "toy:n=12,n_val=4,size=32",
                     iterations: int = 2, size: tuple[int, int] = (32, 32), channels: tuple[int, ...] = (32, 32),
                     sample_steps: int = 4, **settings) -> Path:
    """A barely trained latent generator on `autoencoder` (e.g. taesd:DIR of `save_tiny_taesd`)."""
    from segsynth.generators.latent import train_latent_generator

    values = dict(layers_per_block=1, attention=False, batch_size=2, log_every=1, device="cpu")
    config = TrainGeneratorConfig(data=data, out=str(folder), kind="latent", autoencoder=autoencoder, size=list(size),
                                  channels=list(channels), iterations=iterations, sample_steps=sample_steps,
                                  **{**values, **settings})
    return train_latent_generator(config)


def save_tiny_builtin(folder: str | Path, data: str = "toy:n=12,n_val=4,size=32", iterations: int = 2,
                      size: tuple[int, int] = (32, 32), channels: tuple[int, ...] = (32, 32), sample_steps: int = 4) -> Path:
    """A barely trained builtin generator: the smallest real `segsynth train-generator` folder."""

    config = TrainGeneratorConfig(data=data, out=str(folder), size=list(size), channels=list(channels),
                                  layers_per_block=1, attention=False, iterations=iterations, batch_size=2,
                                  log_every=1, sample_steps=sample_steps)
    return train_generator(config)
