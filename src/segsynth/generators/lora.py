"""LoRA adapters on a generator's UNet, through peft: add them for training, load a saved one for sampling.

One code path for every UNet segsynth samples with:

* diffusers `UNet2DConditionModel`s (the builtin text generator's, Stable Diffusion's and SDXL's) have
  diffusers' peft integration: `unet.add_adapter(LoraConfig(...))`;
* the builtin mask -> image generator's `UNet2DModel` has none: peft's `inject_adapter_in_model` wraps
  the same layers.

Either way the targeted `nn.Linear` layers (default: every attention projection, `to_q`, `to_k`,
`to_v`, `to_out.0`, self- and cross-attention alike) become peft `LoraLayer`s that call their base layer
and add the low-rank update. Attention processors, segsynth's recording ones included
(`generators.attention.AttentionCapture`), call `attn.to_q(...)`, `attn.to_k(...)`: they get the adapted
projection with no change.

At sampling time the adapter is merged into the base weights at its scale (`LoraLayer.merge`), so a
step costs what it cost without one; the layers stay peft layers (merged), and `load_adapter(...,
merge=False)` keeps the update apart instead.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch

from segsynth.formats.adapter import WEIGHTS_FILE, check_base, read_adapter_info
from segsynth.generators.base import file_fingerprint, model_source
from segsynth.io import SegsynthError, loading

ADAPTER_NAME = "segsynth"
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]  # the default target modules
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)  # the layer kinds peft's LoRA wraps that segsynth checks ranks of


# --- which layers, and whether a rank fits them ---------------------------------------------------


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target modules: the module's name is the target or ends with '.' + target."""
    return name == target or name.endswith("." + target)


def targeted_layers(unet: torch.nn.Module, targets: Sequence[str]) -> dict[str, torch.nn.Module]:
    """{module name: layer} of every layer the targets name; a target naming no layer, or a layer LoRA cannot
    wrap, is an error listing what the UNet has."""
    modules = dict(unet.named_modules())
    found = {}
    for target in targets:
        hits = {name: module for name, module in modules.items() if _matches(name, target)}
        if not hits:
            suffixes = sorted({".".join(name.split(".")[-2:]) if name.split(".")[-1].isdigit() else name.split(".")[-1]
                               for name, module in modules.items() if isinstance(module, ADAPTABLE)})
            raise SegsynthError(f"--target-modules {target!r}: no layer of this {type(unet).__name__} is named so; "
                                f"its linear and convolution layers end in: {', '.join(suffixes)}")
        wrong = [f"{name} ({type(module).__name__})" for name, module in hits.items() if not isinstance(module, ADAPTABLE)]
        if wrong:
            raise SegsynthError(f"--target-modules {target!r} names layer(s) LoRA cannot adapt: {', '.join(wrong[:3])}; "
                                "name linear or convolution layers (e.g. to_q, to_k, to_v, to_out.0)")
        found.update(hits)
    return found


def layer_sides(layer: torch.nn.Module) -> tuple[int, int]:
    """(input, output) features of a linear layer, channels of a convolution."""
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def check_rank(layers: dict[str, torch.nn.Module], rank: int) -> None:
    """A rank-r update of an m x n layer has rank min(m, n, r): a rank above the smallest side of a targeted
    layer adds parameters that cannot change anything. Refused, naming the smallest such layer."""
    too_small = {name: layer_sides(layer) for name, layer in layers.items() if min(layer_sides(layer)) < rank}
    if too_small:
        name, (inputs, outputs) = min(too_small.items(), key=lambda item: min(item[1]))
        raise SegsynthError(f"--rank {rank} is larger than layer {name} ({inputs} -> {outputs} features; "
                            f"{len(too_small)} of the {len(layers)} targeted layers are that small): its update has "
                            f"rank {min(inputs, outputs)} at most; give --rank {min(inputs, outputs)} or less, or "
                            "leave such layers out of --target-modules")


# --- adding and reading the adapter ----------------------------------------------------------------


def lora_config(rank: int, alpha: float, dropout: float, targets: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                      target_modules=list(targets), init_lora_weights=True)


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str]) -> list:
    """Freeze the UNet, wrap its targeted layers in fresh LoRA layers (B = 0: the UNet is unchanged until they
    train) and return the trainable parameters (the adapters', in fp32)."""
    check_rank(targeted_layers(unet, targets), rank)
    unet.requires_grad_(False)
    _inject(unet, lora_config(rank, alpha, dropout, targets))
    trainable = [parameter for name, parameter in unet.named_parameters() if ".lora_" in name]
    for parameter in trainable:
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    return trainable


def _inject(unet: torch.nn.Module, config) -> None:
    from diffusers.loaders.peft import PeftAdapterMixin

    if isinstance(unet, PeftAdapterMixin):  # diffusers' UNet2DConditionModel: its own peft integration
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    else:  # UNet2DModel: peft directly
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)


def adapter_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights only: {'<layer>.lora_A.weight': ..., '<layer>.lora_B.weight': ...}, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    return {key: value.detach().contiguous().cpu() for key, value in state.items()}


@contextlib.contextmanager
def adapters_off(unet: torch.nn.Module):
    """The base model inside the block: every LoRA layer passes its input to its base layer alone."""
    layers = list(lora_layers(unet).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_layers(unet: torch.nn.Module) -> dict:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in unet.named_modules() if isinstance(module, LoraLayer)}


def load_adapter(unet: torch.nn.Module, folder: str | Path, scale: float, base: dict, spec: str,
                 merge: bool = True) -> dict:
    """Put the saved adapter in `folder` on `unet` at `scale` (0 = off, 1 = as trained), after checking it was
    made for the generator `base` identifies (`spec` names it in errors); merged into the weights unless
    `merge` is False. Returns its identity for the generator's (what changes pixels)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    info = read_adapter_info(folder)
    check_base(folder, info, base, spec)
    lora = info["lora"]
    targeted_layers(unet, lora["target_modules"])
    _inject(unet, lora_config(lora["rank"], lora["alpha"], lora.get("dropout", 0.0), lora["target_modules"]))
    with loading(folder / WEIGHTS_FILE, "the adapter is damaged: adapt again into a new --out", "the LoRA adapter"):
        state = load_file(str(folder / WEIGHTS_FILE))
        result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    missing = [key for key in result.missing_keys if ".lora_" in key]
    if missing or result.unexpected_keys or not state:
        raise SegsynthError(f"{folder / WEIGHTS_FILE}: does not fit this UNet ({len(missing)} adapter weight(s) "
                            f"missing, {len(result.unexpected_keys)} unexpected); the adapter is damaged: adapt again")
    for module in lora_layers(unet).values():
        module.set_scale(ADAPTER_NAME, float(scale))
        if merge:
            module.merge(adapter_names=[ADAPTER_NAME])
    unet.requires_grad_(False)
    return {"path": str(folder.resolve()), "fingerprint": file_fingerprint(folder / WEIGHTS_FILE),
            "scale": float(scale), "rank": lora["rank"]}


# --- which base an adapter belongs to ------------------------------------------------------------


def folder_identity(family: str, generator: str, folder: str | Path, fingerprint: str) -> dict:
    """A builtin generator folder's identity: the content fingerprint its generator computes."""
    return {"family": family, "generator": generator, "path": str(Path(folder).resolve()), "fingerprint": fingerprint}


def diffusers_identity(generator: str, base: str) -> dict:
    """A diffusers base model's identity: its folder's content fingerprint, or its hub id and cached revision."""
    return {"family": "diffusers-unet", "generator": generator, **model_source(base)}


__all__ = ["ADAPTER_NAME", "ATTENTION_PROJECTIONS", "adapter_state", "add_lora", "check_rank", "diffusers_identity",
           "folder_identity", "load_adapter", "lora_layers", "targeted_layers"]
