"""Generators behind the request -> sample contract (see `segsynth.generators.base`).

A generator spec is 'NAME:ARGUMENT', as dataset specs are:

  builtin:DIR                 a `segsynth train-generator` folder (mask -> image)
  latent:DIR                  a `segsynth train-generator --kind latent` folder (mask -> image on the latents of
                              a frozen pretrained autoencoder)
  text2mask:DIR               a `segsynth train-text-generator --target colour-mask` folder (text -> colour-coded
                              mask, decoded to labels: SegGen's MaskSyn)
  text2mask-sd:DIR            a `segsynth train-generator --kind text2mask-sd` folder: Stable Diffusion / SDXL
                              fine-tuned to draw colour-coded masks (the GPU MaskSyn)
  controlnet:BASE             Stable Diffusion 1.x/2.x + a ControlNet (settings.controlnet), hub id or folder
  controlnet-sdxl:BASE        SDXL + an SDXL ControlNet
  attention:DIR               text -> image + attention pseudo-mask, a `segsynth train-text-generator` folder
  attention-sd:BASE           text -> image + attention pseudo-mask, Stable Diffusion 1.x/2.x, hub id or folder
"""

from __future__ import annotations

from segsynth.generators.base import Generator, GeneratorSettings, Prepared
from segsynth.io import SegsynthError


# Each builder imports its backend when called: a ControlNet backend pulls in diffusers' pipelines and
# transformers' text models (seconds of imports) that a run with the built-in generator never needs.
def _builtin(argument: str, settings: GeneratorSettings) -> Generator:
    from segsynth.generators.builtin import BuiltinGenerator

    return BuiltinGenerator(argument, settings)


def _latent(argument: str, settings: GeneratorSettings) -> Generator:
    from segsynth.generators.latent import LatentGenerator

    return LatentGenerator(argument, settings)


def _controlnet(argument: str, settings: GeneratorSettings) -> Generator:
    from segsynth.generators.controlnet import ControlNetGenerator

    return ControlNetGenerator(argument, settings, sdxl=False)


def _controlnet_sdxl(argument: str, settings: GeneratorSettings) -> Generator:
    from segsynth.generators.controlnet import ControlNetGenerator

    return ControlNetGenerator(argument, settings, sdxl=True)


def _text2mask(argument: str, settings: GeneratorSettings) -> Generator:
    from segsynth.generators.builtin_text.text2mask import TextToMaskGenerator

    return TextToMaskGenerator(argument, settings)


def _text2mask_sd(argument: str, settings: GeneratorSettings) -> Generator:
    from segsynth.generators.text2mask_sd.sample import SDTextToMaskGenerator

    return SDTextToMaskGenerator(argument, settings)


def _attention(argument: str, settings: GeneratorSettings) -> Generator:
    from segsynth.generators.attention_generator import BuiltinAttentionGenerator

    return BuiltinAttentionGenerator(argument, settings)


def _attention_sd(argument: str, settings: GeneratorSettings) -> Generator:
    from segsynth.generators.attention_generator import SDAttentionGenerator

    return SDAttentionGenerator(argument, settings)


# name -> builder(argument, settings). A new backend is one more row.
GENERATORS = {
    "builtin": _builtin,
    "latent": _latent,
    "controlnet": _controlnet,
    "controlnet-sdxl": _controlnet_sdxl,
    "text2mask": _text2mask,
    "text2mask-sd": _text2mask_sd,
    "attention": _attention,
    "attention-sd": _attention_sd,
}


def _train_builtin(config):
    from segsynth.generators.builtin import train_generator

    return train_generator(config)


def _train_latent(config):
    from segsynth.generators.latent import train_latent_generator

    return train_latent_generator(config)


def _train_text2mask_sd(config):
    from segsynth.generators.text2mask_sd import train_text2mask_sd

    return train_text2mask_sd(config)


# `segsynth train-generator --kind KIND` -> (trainer(TrainGeneratorConfig) -> folder, the generator name that loads
# the folder). The keys each kind takes are listed in stage_configs.GENERATOR_KINDS.
TRAINERS = {
    "builtin": (_train_builtin, "builtin"),
    "latent": (_train_latent, "latent"),
    "text2mask-sd": (_train_text2mask_sd, "text2mask-sd"),
}


def train_generator_kind(config) -> tuple:
    """Train the generator `config.kind` names; returns (its folder, the spec that loads it)."""
    if config.kind not in TRAINERS:
        raise SegsynthError(f"unknown generator kind {config.kind!r}; options: {', '.join(TRAINERS)}")
    trainer, name = TRAINERS[config.kind]
    folder = trainer(config)
    return folder, f"{name}:{folder}"


def open_generator(spec: str, settings: GeneratorSettings | None = None) -> Generator:
    """Open the generator named by `spec` ('builtin:DIR', 'controlnet:BASE', ...), checking its files first."""
    name, _, argument = spec.partition(":")
    name = name.strip().lower()
    if name not in GENERATORS:
        raise SegsynthError(f"unknown generator {name!r} in {spec!r}; options: {', '.join(GENERATORS)} "
                            "(write NAME:ARGUMENT, e.g. builtin:runs/generator)")
    if not argument:
        raise SegsynthError(f"generator spec {spec!r} needs an argument: {name}:PATH_OR_HUB_ID")
    return GENERATORS[name](argument, settings or GeneratorSettings())


__all__ = ["GENERATORS", "TRAINERS", "Generator", "GeneratorSettings", "Prepared", "open_generator",
           "train_generator_kind"]
