"""The generator contract every backend meets: request -> sample.

A plan lists *requests*; a generator turns each into a *sample*:

  Request      what conditions the sample: a mask of the plan's dataset (a real
               mask, or a mask an earlier text -> mask stage generated), a text
               prompt with the words that stand for each class, or nothing; plus
               its seed. Its `id` names the sample's files.
  Condition    a request resolved by `synthesize` before the model runs: the
               mask read and resized to the generator's working size, the prompt.
  GeneratedSample  an image, a label map (255 = ignore), optionally a per-pixel
               weight / confidence map in [0, 1], extra pictures to keep beside
               it (a colour-coded mask, attention heat maps) and JSON metadata.

Mask -> image (FreeMask, SegGen's ImgSyn), text -> mask (SegGen's MaskSyn,
whose "image" is the colour-coded mask and whose label is its decoding) and
text -> image with attention pseudo-masks (Attn2mask) all fit it. Filtering,
training, evaluation and reports never ask which kind made a sample.

Work is split in three so the synthesis loop can overlap it:

  prepare(conditions) -> Prepared            CPU-only (colour maps, one-hot masks,
                                             tokens, initial noise); loader thread
  run(prepared) -> list[GeneratedSample]     the model; the main thread
  finish(prepared, samples) -> samples       CPU-only work on the model's output that
                                             needs no model (a text -> mask generator
                                             decodes its colour maps to labels here);
                                             writer thread, overlapping the next run

Determinism contract: a sample's pixels depend only on (generator, condition,
seed, settings) -- never on its batch. Backends draw each sample's initial
noise from its own CPU `torch.Generator` seeded with the sample's seed, and
use deterministic (ODE) samplers or per-sample generators for any later noise.
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

from segsynth.io import SegsynthError, read_json

# A weights file bigger than this is fingerprinted by its size and its first and
# last MiB: hashing a 5 GB SDXL UNet in full would cost more than loading it.
_FULL_HASH_LIMIT = 64 * 1024 * 1024

# What a request can be conditioned on.
REQUEST_KINDS = ("mask", "text", "none")


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
    pseudo_mask: str = "dataset-diffusion"  # attention generators: a pseudo_mask.PRESETS recipe
    pseudo_mask_settings: dict = field(default_factory=dict)  # ... with these PseudoMaskConfig fields overridden
    lora: str | None = None  # a `segsynth adapt` adapter folder, loaded onto the UNet (generators/lora.py)
    lora_scale: float = 1.0  # ... at this scale (0: off, 1: as trained)
    strength: float | None = None  # start from the request's source image noised this far (SDEdit); None: from noise


@dataclass(frozen=True)
class Request:
    """One sample to make. `id` is "<plan entry id>_s<seed>" and names the sample's files."""

    id: str
    kind: str  # one of REQUEST_KINDS
    seed: int
    source: str | None = None  # kind "mask": id of the mask in the plan's dataset
    prompt: str = ""  # kind "text": the prompt; kind "mask": an optional caption from the plan
    class_words: tuple[tuple[str, tuple[str, ...]], ...] = ()  # class name -> words in `prompt` standing for it
    crop: tuple[int, int, int, int] | None = None  # kind "mask": render this window (top, left, height, width) of it

    def words_by_class(self) -> dict[str, list[str]]:
        return {name: list(words) for name, words in self.class_words}


@dataclass
class Condition:
    """A request resolved for the model: the mask at working size (kind "mask") and the prompt used."""

    request: Request
    mask: np.ndarray | None
    prompt: str
    image: np.ndarray | None = None  # the mask's own image at working size, H x W x 3 uint8: only for --strength


@dataclass
class GeneratedSample:
    """What a generator returns per request (see the module docstring)."""

    image: np.ndarray  # H x W x 3 uint8
    label: np.ndarray | None  # H x W uint8, classes 0..C-1, 255 = ignore (None from `run` only: `finish` fills it)
    weight: np.ndarray | None = None  # H x W float32 in [0, 1]: per-pixel confidence, used as loss weight
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> H x W (x 3) uint8 picture kept beside
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able, recorded in the manifest


@dataclass
class Prepared:
    """A batch ready for the model: whatever `prepare` made, plus the conditions it was made from."""

    size: tuple[int, int]
    prompts: list[str]
    seeds: list[int]
    tensors: dict[str, Any] = field(default_factory=dict)
    conditions: list[Condition] = field(default_factory=list)


class Generator(ABC):
    """A request -> sample generator (see the module docstring for the contract)."""

    name: str = "generator"
    request_kinds: tuple[str, ...] = ("mask",)  # the request kinds this generator accepts
    uses_prompts: bool = False
    steps: int | None = None
    guidance: float | None = None
    # Backends that can start a sample from its mask's own image, noised part of the way (SDEdit; `strength`):
    # `synthesize` then reads each request's source image into its Condition.
    takes_source_images: bool = False
    strength: float | None = None

    def check_dataset(self, classes: Sequence[str], palette: Sequence[Sequence[int]]) -> None:
        """Raise SegsynthError if this generator cannot make samples of these classes (before any compute)."""

    def check_requests(self, requests: Sequence[Request]) -> None:
        """Raise SegsynthError if some requests lack what this generator needs (e.g. captions); before compute."""

    @abstractmethod
    def working_size(self, mask_shape: tuple[int, int] | None) -> tuple[int, int]:
        """The (H, W) this generator renders a request at (`mask_shape` is None for requests without a mask)."""

    def prompt(self, request: Request, mask: np.ndarray | None, classes: Sequence[str]) -> str:
        """The text prompt for one request ('' for generators that take no text)."""
        return request.prompt

    @abstractmethod
    def prepare(self, conditions: list[Condition]) -> Prepared:
        """CPU-side preparation of a batch of conditions of one working size (thread-safe, no model calls)."""

    @abstractmethod
    def run(self, prepared: Prepared) -> list[GeneratedSample]:
        """Make a prepared batch: one sample per condition, at the working size."""

    def finish(self, prepared: Prepared, samples: list[GeneratedSample]) -> list[GeneratedSample]:
        """CPU-only work on `run`'s samples that needs no model (thread-safe): e.g. decoding a drawn colour map
        to its label map. `synthesize` runs it in the writer thread, where it overlaps the next batch's model
        call. Default: nothing to do."""
        return samples

    def generate(self, conditions: list[Condition]) -> list[GeneratedSample]:
        """The whole contract in one call: conditions -> samples."""
        prepared = self.prepare(conditions)
        return self.finish(prepared, self.run(prepared))

    @abstractmethod
    def identity(self) -> dict:
        """Generator id, revision or content hash, and every setting that changes pixels (JSON-able)."""


class MaskToImageGenerator(Generator):
    """A generator that renders an image for a mask; the sample's label is that mask (FreeMask, ImgSyn).

    Backends implement `render(prepared) -> images` and get `run` for free."""

    request_kinds = ("mask",)

    @abstractmethod
    def render(self, prepared: Prepared) -> list[np.ndarray]:
        """One H x W x 3 uint8 image per condition of the prepared batch, at the working size."""

    def run(self, prepared: Prepared) -> list[GeneratedSample]:
        images = self.render(prepared)
        return [GeneratedSample(image, resize_mask(condition.mask, image.shape[:2]))
                for image, condition in zip(images, prepared.conditions)]

    def render_masks(self, masks: list[np.ndarray], prompts: list[str], seeds: list[int],
                     images: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Images for masks already at working size (the API for callers without a plan); `images`: each mask's
        own image at working size, for a generator opened with a `strength`."""
        images = images if images is not None else [None] * len(masks)
        conditions = [Condition(Request(f"mask{i}_s{seed}", "mask", int(seed), source=f"mask{i}"), mask, prompt, image)
                      for i, (mask, prompt, seed, image) in enumerate(zip(masks, prompts, seeds, images))]
        return self.render(self.prepare(conditions))


# --- helpers the backends share ---------------------------------------------------


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to (H, W): labels are never blended."""
    if mask.shape == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST))


def resize_image_tensor(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of a (3, H, W) image (0..255) to `size`: the mask generators' training images
    (generators/builtin/train.py `resize_pair`) and their source images (`resize_image`) get the same one."""
    resized = torch.nn.functional.interpolate(image.float()[None], size=tuple(size), mode="bilinear", antialias=True,
                                              align_corners=False)
    return resized[0].clamp(0, 255)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`resize_image_tensor` for an H x W x 3 uint8 image, so a source image looks as the training images did."""
    if image.shape[:2] == tuple(size):
        return image
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return resize_image_tensor(tensor, size).round().to(torch.uint8).permute(1, 2, 0).numpy()


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One noise tensor per seed, each from its own CPU generator: batch-independent and device-independent."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed))) for seed in seeds])


def duration_text(seconds: float) -> str:
    """A training's expected time as its trainers print it: seconds, minutes or hours."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


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


def check_model_folder(folder: Path, required: Sequence[str], meta_file: str, format_name: str, what: str,
                       verb: str) -> dict:
    """A built-in generator folder, checked before anything is loaded: it exists, holds every `required`
    file, and its `meta_file` names `format_name`. Returns the metadata. Errors name the folder or file and
    the `segsynth VERB` that makes one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SegsynthError(f"{what} folder {folder} does not exist; train one with "
                            f"`segsynth {verb} --data SPEC --out {folder}`")
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise SegsynthError(f"{folder}: not a {what}, missing {', '.join(missing)}; "
                            f"give a `segsynth {verb} --out` folder (or rerun that training)")
    meta = read_json(folder / meta_file)
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != format_name:
        raise SegsynthError(f"{folder / meta_file}: format {found!r}, expected {format_name!r}")
    return meta


def check_trained_classes(folder: Path, trained: Sequence[str], classes: Sequence[str], what: str) -> None:
    """A trained generator draws its own classes only: refuse a dataset with others, naming both lists."""
    if tuple(classes) != tuple(trained):
        raise SegsynthError(f"{folder} was trained on classes {list(trained)}, but the dataset has "
                            f"{list(classes)}; train {what} on this dataset's classes")


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
