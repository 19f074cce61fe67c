"""The generator interface every backend implements, and the settings they share.

A generator turns a batch of (mask, prompt, seed) into images. Work is split
in two so the synthesis loop can overlap it:

  prepare(masks, prompts, seeds) -> Prepared   CPU-only (colour maps, one-hot
                                               masks, initial noise); runs in a
                                               background thread
  run(prepared) -> list of HxWx3 uint8 images  the model; runs in the main thread

Determinism contract: a sample's pixels depend only on (generator, mask,
prompt, seed, settings) -- never on its batch. Backends draw each sample's
initial noise from its own CPU `torch.Generator` seeded with the sample's
seed, and use deterministic (ODE) samplers or per-sample generators for any
later noise.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from segsynth.io import SegsynthError

# A weights file bigger than this is fingerprinted by its size and its first and
# last MiB: hashing a 5 GB SDXL UNet in full would cost more than loading it.
_FULL_HASH_LIMIT = 64 * 1024 * 1024


@dataclass
class GeneratorSettings:
    """Everything a backend may be told besides its spec; `None` means the backend's own default."""

    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    negative_prompt: str = ""
    controlnet: str | None = None
    controlnet_scale: float = 1.0
    lcm_lora: str | None = None
    colour_map: str = "ade20k"
    captions: str | None = None
    resolution: tuple[int, int] | None = None
    dtype: str = "auto"
    device: str = "auto"


@dataclass
class Prepared:
    """A batch ready for the model: whatever `prepare` made, plus the prompts it was made from."""

    size: tuple[int, int]
    prompts: list[str]
    seeds: list[int]
    tensors: dict[str, Any] = field(default_factory=dict)


class Generator(ABC):
    """Mask-conditioned image generator (see the module docstring for the contract)."""

    name: str = "generator"
    uses_prompts: bool = False
    steps: int | None = None
    guidance: float | None = None

    def check_dataset(self, classes: Sequence[str], palette: Sequence[Sequence[int]]) -> None:
        """Raise SegsynthError if this generator cannot render masks of these classes (before any compute)."""

    def check_ids(self, ids: Sequence[str]) -> None:
        """Raise SegsynthError if per-mask inputs (e.g. captions) are missing for some of these mask ids."""

    @abstractmethod
    def working_size(self, mask_shape: tuple[int, int]) -> tuple[int, int]:
        """The (H, W) this generator renders a mask of `mask_shape` at."""

    def prompt(self, mask_id: str, mask: np.ndarray, classes: Sequence[str]) -> str:
        """The text prompt for one mask ('' for generators that take no text)."""
        return ""

    @abstractmethod
    def prepare(self, masks: list[np.ndarray], prompts: list[str], seeds: list[int]) -> Prepared:
        """CPU-side preparation of a batch of masks already at `working_size` (thread-safe, no model calls)."""

    @abstractmethod
    def run(self, prepared: Prepared) -> list[np.ndarray]:
        """Render a prepared batch: one HxWx3 uint8 image per mask, at the working size."""

    def generate(self, masks: list[np.ndarray], prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        """The whole interface in one call: masks (at working size), prompts and seeds -> images."""
        return self.run(self.prepare(masks, prompts, seeds))

    @abstractmethod
    def identity(self) -> dict:
        """Generator id, revision or content hash, and every setting that changes pixels (JSON-able)."""


# --- helpers the backends share ---------------------------------------------------


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to (H, W): labels are never blended."""
    if mask.shape == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST))


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One noise tensor per seed, each from its own CPU generator: batch-independent and device-independent."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed))) for seed in seeds])


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on GPU (what SD checkpoints are published in) and fp32 on CPU (fp16 convs are slow there)."""
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise SegsynthError(f"unknown dtype {dtype!r}; options: auto, fp32, fp16, bf16")
    return table[dtype]


def folder_fingerprint(folder: str | os.PathLike, suffixes: Sequence[str] = (".json", ".safetensors", ".bin", ".txt")) -> str:
    """A short content hash of a model folder, its identity when no hub revision exists."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode())
        size = path.stat().st_size
        digest.update(str(size).encode())
        with open(path, "rb") as handle:
            if size <= _FULL_HASH_LIMIT:
                digest.update(handle.read())
            else:
                digest.update(handle.read(1 << 20))
                handle.seek(size - (1 << 20))
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def model_source(name_or_path: str) -> dict:
    """Identity of a model given as a local folder (content hash) or a hub id (the cached commit, if known)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return {"path": str(path.resolve()), "fingerprint": folder_fingerprint(path)}
    return {"hub_id": name_or_path, "revision": hub_revision(name_or_path)}


def hub_revision(repo_id: str) -> str | None:
    """The commit hash of a hub model in the local cache (after from_pretrained fetched it); None if unknown."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for filename in ("model_index.json", "config.json"):
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            parts = Path(cached).parts
            if "snapshots" in parts:
                return parts[parts.index("snapshots") + 1]
    return None


def settings_dict(settings: GeneratorSettings) -> dict:
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in asdict(settings).items()}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
