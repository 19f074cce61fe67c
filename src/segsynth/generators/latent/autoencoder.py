"""Frozen pretrained autoencoders the latent generator works in, by spec 'NAME:ARGUMENT':

  taesd:DIR        a TAESD-family tiny autoencoder (madebyollin/taesd): DIR holds one `<name>_encoder.pth` and
                   its `<name>_decoder.pth`, plain PyTorch state dicts (e.g. ../shared/weights/taef2: taef2,
                   distilled from the FLUX.2 VAE, 32 latent channels at 1/8 the size)
  diffusers:ID     a diffusers autoencoder (AutoencoderKL, AutoencoderTiny, AutoencoderKLFlux2), hub id or
                   folder; a pipeline folder's `vae/` is found by itself, and a hub id may end in a subfolder
                   (`owner/name/vae`)

Every autoencoder here takes images in [0, 1] (B, 3, H, W, sides divisible by `factor`) and returns latents
(B, latent_channels, H/factor, W/factor); `decode` maps latents back to [0, 1] images. They are frozen:
the generator never trains them and never saves them (its folder names the spec and the weights'
fingerprint, and refuses other weights when it is loaded).

Why the TAESD modules are written here and not taken from diffusers: diffusers' `AutoencoderTiny` is the
TAESD layout of SD 1.x / SDXL, but the TAESD versions for FLUX.1 / FLUX.2 (taef1, taef2) add a "pool"
branch (1x1 conv, GroupNorm, ReLU, 1x1 conv, added before the block) to the three blocks at 1/8
resolution, which `AutoencoderTinyBlock` cannot express, and their state-dict keys follow the original
`nn.Sequential` indices (the decoder's clamp is layer 0). The layout is inferred from the weights (width,
latent channels, which blocks have the pool branch) and the weights are loaded strictly, so older TAESD
files (no pool branch, 4 or 16 channels) load too, and a tiny random one stands in for tests.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from torch import nn

from segsynth.generators.base import model_source
from segsynth.io import SegsynthError, loading

ENCODER_SUFFIX, DECODER_SUFFIX = "_encoder.pth", "_decoder.pth"
BLOCKS_PER_LEVEL = 3
LEVELS = 3  # three stride-2 convolutions: latents at 1/8 the image size
# diffusers classes with `encode(x).latent_dist` or `.latents` and `decode(z).sample` on [-1, 1] images
DIFFUSERS_CLASSES = ("AutoencoderKL", "AutoencoderTiny", "AutoencoderKLFlux2")


# --- the TAESD-family modules --------------------------------------------------------------------------


def _conv(channels_in: int, channels_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the decoder's input latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Three 3x3 convolutions with a skip; the blocks at 1/8 resolution of taef1/taef2 first add a "pool"
    branch (1x1 conv to 4x width, GroupNorm(4), ReLU, 1x1 conv back)."""

    def __init__(self, channels_in: int, channels_out: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(channels_in, channels_out), nn.ReLU(), _conv(channels_out, channels_out),
                                  nn.ReLU(), _conv(channels_out, channels_out))
        self.skip = nn.Conv2d(channels_in, channels_out, 1, bias=False) if channels_in != channels_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = None
        if pool:
            wide = 4 * channels_in
            self.pool = nn.Sequential(nn.Conv2d(channels_in, wide, 1, bias=False), nn.GroupNorm(4, wide),
                                      nn.ReLU(inplace=True), nn.Conv2d(wide, channels_in, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def build_encoder(width: int, latent_channels: int, pool: bool) -> nn.Sequential:
    """conv(3, w), Block; then three times [stride-2 conv, 3 Blocks] (the last three with the pool branch when
    `pool`); conv(w, latent_channels)."""
    layers: list[nn.Module] = [_conv(3, width), Block(width, width)]
    for level in range(LEVELS):
        layers.append(_conv(width, width, stride=2, bias=False))
        layers += [Block(width, width, pool=pool and level == LEVELS - 1) for _ in range(BLOCKS_PER_LEVEL)]
    layers.append(_conv(width, latent_channels))
    return nn.Sequential(*layers)


def build_decoder(width: int, latent_channels: int, pool: bool) -> nn.Sequential:
    """Clamp, conv(latent_channels, w), ReLU; three times [3 Blocks (the first three with the pool branch when
    `pool`), Upsample x2, conv]; Block, conv(w, 3)."""
    layers: list[nn.Module] = [Clamp(), _conv(latent_channels, width), nn.ReLU()]
    for level in range(LEVELS):
        layers += [Block(width, width, pool=pool and level == 0) for _ in range(BLOCKS_PER_LEVEL)]
        layers += [nn.Upsample(scale_factor=2), _conv(width, width, bias=False)]
    layers += [Block(width, width), _conv(width, 3)]
    return nn.Sequential(*layers)


class TinyAutoencoder(nn.Module):
    """A TAESD-family encoder and decoder (images in [0, 1] <-> latents at 1/8 size)."""

    factor = 2 ** LEVELS

    def __init__(self, width: int = 64, latent_channels: int = 32, pool: bool = True):
        super().__init__()
        self.width, self.latent_channels, self.pool = width, latent_channels, pool
        self.encoder = build_encoder(width, latent_channels, pool)
        self.decoder = build_decoder(width, latent_channels, pool)


def taesd_layout(encoder_state: dict) -> tuple[int, int, bool]:
    """(width, latent channels, pool branch) of a TAESD encoder state dict, read from its tensors' shapes."""
    last = 2 + LEVELS * (1 + BLOCKS_PER_LEVEL)  # index of the final conv
    try:
        width, latent_channels = encoder_state["0.weight"].shape[0], encoder_state[f"{last}.weight"].shape[0]
    except (KeyError, AttributeError, IndexError):
        raise ValueError("not a TAESD encoder state dict (no '0.weight' / "
                         f"'{last}.weight' convolution)") from None
    return int(width), int(latent_channels), any(".pool." in key for key in encoder_state)


def save_taesd(model: TinyAutoencoder, folder: str | Path, name: str = "tiny") -> Path:
    """Write `model` as a TAESD folder (NAME_encoder.pth, NAME_decoder.pth): how tests make a tiny one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.encoder.state_dict(), folder / f"{name}{ENCODER_SUFFIX}")
    torch.save(model.decoder.state_dict(), folder / f"{name}{DECODER_SUFFIX}")
    return folder


# --- the autoencoders behind one interface ----------------------------------------------------------------


class Autoencoder:
    """A frozen autoencoder: `encode` ([0, 1] images -> latents), `decode` (latents -> [0, 1] images),
    `latent_channels`, `factor` (image side / latent side), `identity()`."""

    spec: str
    latent_channels: int
    factor: int

    def to(self, device: torch.device) -> "Autoencoder":
        self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def identity(self) -> dict:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """A copy that `open_autoencoder(f"{kind}:{folder}")` loads (the generator keeps one beside its model)."""
        raise NotImplementedError


# files copied with a TAESD pair when they are beside it: its licence travels with the weights
TAESD_COMPANIONS = ("LICENSE", "SOURCE.md")


class TaesdAutoencoder(Autoencoder):
    def __init__(self, argument: str):
        folder = Path(argument).expanduser()
        self.encoder_file, self.decoder_file = taesd_files(folder)
        self.spec = f"taesd:{argument}"
        fix = "restore the file (its SOURCE.md gives the sha256), or give another --autoencoder"
        with loading(self.encoder_file, fix, "the autoencoder's encoder"):
            encoder_state = _state_dict(self.encoder_file)
            width, self.latent_channels, pool = taesd_layout(encoder_state)
            self.module = TinyAutoencoder(width, self.latent_channels, pool)
            self.module.encoder.load_state_dict(encoder_state, strict=True)
        with loading(self.decoder_file, fix, "the autoencoder's decoder"):
            self.module.decoder.load_state_dict(_state_dict(self.decoder_file), strict=True)
        self.module.eval().requires_grad_(False)
        self.factor = TinyAutoencoder.factor
        self.kind = "taesd"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.module.decoder(latents).clamp(0, 1)

    def identity(self) -> dict:
        return {"spec": self.spec, "kind": "taesd", "files": [self.encoder_file.name, self.decoder_file.name],
                "sha256": [_sha256(self.encoder_file), _sha256(self.decoder_file)],
                "latent_channels": self.latent_channels, "factor": self.factor}

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for source in (self.encoder_file, self.decoder_file,
                       *(self.encoder_file.parent / name for name in TAESD_COMPANIONS)):
            if source.is_file():
                shutil.copyfile(source, folder / source.name)


def _state_dict(path: Path) -> dict:
    """A plain tensor state dict from a .pth file; nothing else is ever unpickled (weights_only=True)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever torch raises for a file it cannot read as weights is bad input
        refused = type(error).__name__ == "UnpicklingError"  # the weights-only unpickler met something else
        reason = ("not a PyTorch state dict of tensors (weights-only loading refused it)" if refused else
                  next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__))
        raise ValueError(reason) from None
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    return state


def taesd_files(folder: Path) -> tuple[Path, Path]:
    """The one NAME_encoder.pth / NAME_decoder.pth pair in `folder`, or an error saying what is there."""
    if not folder.is_dir():
        raise SegsynthError(f"autoencoder folder {folder} does not exist; give a folder holding NAME_encoder.pth "
                            "and NAME_decoder.pth (a TAESD autoencoder, e.g. ../shared/weights/taef2)")
    encoders = sorted(folder.glob(f"*{ENCODER_SUFFIX}"))
    pairs = [(e, e.with_name(e.name[: -len(ENCODER_SUFFIX)] + DECODER_SUFFIX)) for e in encoders]
    pairs = [(e, d) for e, d in pairs if d.is_file()]
    if len(pairs) != 1:
        found = ", ".join(sorted(p.name for p in folder.glob("*.pth"))) or "no .pth file"
        raise SegsynthError(f"{folder}: expected one NAME{ENCODER_SUFFIX} with its NAME{DECODER_SUFFIX} (a TAESD "
                            f"autoencoder), found {found}")
    return pairs[0]


class DiffusersAutoencoder(Autoencoder):
    def __init__(self, argument: str):
        import diffusers

        self.spec = f"diffusers:{argument}"
        name, subfolder = _diffusers_location(argument)
        fix = "give a diffusers autoencoder (AutoencoderKL / AutoencoderTiny) hub id or folder"
        with loading(argument, fix, "the autoencoder"):
            config = diffusers.AutoencoderKL.load_config(name, subfolder=subfolder)
            class_name = config.get("_class_name")
            if class_name not in DIFFUSERS_CLASSES:
                raise SegsynthError(f"{argument}: a {class_name}, not an image autoencoder segsynth can use; "
                                    f"options: {', '.join(DIFFUSERS_CLASSES)}")
            self.module = getattr(diffusers, class_name).from_pretrained(name, subfolder=subfolder,
                                                                         torch_dtype=torch.float32)
        self.module.eval().requires_grad_(False)
        self.kind = "diffusers"
        self.source = model_source(str(Path(name) / (subfolder or "")) if Path(name).is_dir() else argument)
        self.latent_channels = int(self.module.config.latent_channels)
        with torch.no_grad():  # the downsampling factor, measured: configs name it differently per class
            probe = self.module.encode(torch.zeros(1, 3, 64, 64))
        self.factor = 64 // _latents(probe).shape[-1]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return _latents(self.module.encode(images * 2 - 1))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((self.module.decode(latents).sample + 1) / 2).clamp(0, 1)

    def identity(self) -> dict:
        return {"spec": self.spec, "kind": "diffusers", "class": type(self.module).__name__, **self.source,
                "latent_channels": self.latent_channels, "factor": self.factor}

    def save(self, folder: Path) -> None:
        self.module.save_pretrained(folder, safe_serialization=True)


def _latents(encoded) -> torch.Tensor:
    """The latents of an `encode` output: a KL autoencoder's distribution mean (deterministic), or the latents."""
    if hasattr(encoded, "latent_dist"):
        return encoded.latent_dist.mode()
    return encoded.latents


def _diffusers_location(argument: str) -> tuple[str, str | None]:
    """(folder or hub id, subfolder): a folder with config.json as it is, a pipeline folder's vae/; a hub id
    'owner/name' as it is, 'owner/name/SUB' with a subfolder."""
    path = Path(argument).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        if (path / "vae" / "config.json").is_file():
            return str(path), "vae"
        raise SegsynthError(f"{argument}: no config.json (nor vae/config.json): not a diffusers autoencoder folder")
    parts = argument.strip("/").split("/")
    if len(parts) > 2:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return argument, None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# name -> builder(argument). A new autoencoder kind is one more row.
AUTOENCODERS = {
    "taesd": TaesdAutoencoder,
    "diffusers": DiffusersAutoencoder,
}


def open_autoencoder(spec: str) -> Autoencoder:
    """The frozen autoencoder `spec` names ('taesd:DIR' or 'diffusers:ID_OR_DIR')."""
    name, _, argument = (spec or "").partition(":")
    name = name.strip().lower()
    if name not in AUTOENCODERS:
        raise SegsynthError(f"unknown autoencoder {spec!r}; options: {', '.join(AUTOENCODERS)} (write NAME:ARGUMENT, "
                            "e.g. taesd:../shared/weights/taef2 or diffusers:madebyollin/taesd)")
    if not argument:
        raise SegsynthError(f"autoencoder spec {spec!r} needs an argument: {name}:PATH_OR_HUB_ID")
    return AUTOENCODERS[name](argument)
