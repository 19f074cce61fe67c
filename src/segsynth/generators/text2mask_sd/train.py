"""`segsynth train-generator --kind text2mask-sd`: fine-tune a diffusers text-to-image model to draw colour-coded masks.

SegGen's Text2Mask (Ye et al. 2023) is SDXL fine-tuned on (caption, colour map)
pairs: every real training mask drawn in a palette of far-apart colours
(segsynth.methods.seggen.colour), with its caption (a captions file, e.g. from
`segsynth captions`, or "a photo of sky, road, car" from the classes present).
This is the same recipe for any SD 1.x/2.x or SDXL base (hub id or folder):

* the UNet is trained (all of it, or rank-N LoRA adapters on its attention
  projections with `--lora-rank N`, through peft's `unet.add_adapter`); the VAE
  and the text encoder(s) stay frozen;
* the standard diffusion loss in the base's latent space with its own noise
  schedule and prediction type (epsilon or v), Min-SNR-gamma weights, prompts
  dropped to the unconditional input with probability `--cond-dropout` (for
  classifier-free guidance), random rescaled crops and flips, AdamW with
  warm-up and cosine decay, an optional EMA of the trained weights;
* mixed precision on GPU (bf16 autocast where the GPU has it), optional
  gradient checkpointing; under torchrun (or `accelerate launch`, which sets the
  same variables) each process takes its slice of every global batch and the
  UNet is wrapped in DistributedDataParallel.

Determinism and resume: iteration i draws its batch, crops, flips, dropped
prompts, latent noise, diffusion noise and timesteps from generators seeded by
(seed, i), and the learning rate is a function of i, so a run resumed from its
last save (OUT/training_state: trained weights, EMA, AdamW state, iteration;
swapped in whole) continues as the uninterrupted run would (bit for bit on a
CPU; on GPUs up to the non-determinism of their kernels).

The output folder is a complete diffusers pipeline folder (model_index.json,
unet/ -- LoRA merged in --, vae/, text_encoder/, tokenizer/, scheduler/, and
for SDXL text_encoder_2/, tokenizer_2/; safetensors) plus segsynth_generator.json
(classes, the colour coding the samples decode by, size, sampling defaults,
training stats). It is written once at the end, swapped in whole; load it with
`--generator text2mask-sd:OUT`.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from segsynth import __version__
from segsynth.config import save_config, to_dict
from segsynth.data import open_dataset
from segsynth.data.validate import quick_check
from segsynth.distributed import barrier, init_distributed
from segsynth.formats.checkpoint import load_optimizer_state, save_optimizer_state
from segsynth.generators.base import model_source
from segsynth.generators.builtin_text.train import (MIN_CLASS_FRACTION, PROMPT_TEMPLATE, class_prompt,
                                                    present_classes, prompts_kind, read_captions)
from segsynth.generators.schedulers import scheduler_name
from segsynth.generators.text2mask_sd.model import Parts, encode_prompts, folder_parts, load_parts, make_pipeline
from segsynth.formats.checkpoint import check_resumed_settings, training_state_folder
from segsynth.io import SegsynthError, append_jsonl, atomic_write_json, read_json, rewind_jsonl, staged_swap
from segsynth.methods.seggen.colour import MIN_COMPONENT, ColourCodingConfig, encode_mask, resolve_palette
from segsynth.stage_configs import TrainGeneratorConfig, resolve_generator_kind
from segsynth.training.schedule import check_finite, warmup_cosine

GENERATOR_FILE = "segsynth_generator.json"
FORMAT = "segsynth-text2mask-sd/1"
TRAINING_STATE = "training_state"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Settings a resumed run may change (everything else must match the saved run).
RESUMABLE_CHANGES = ("out", "resume", "iterations", "max_minutes", "save_every", "log_every", "device",
                     "decode_max_distance", "guidance", "sample_steps", "sample_scheduler", "gradient_checkpointing")


def train_text2mask_sd(config: TrainGeneratorConfig) -> Path:
    """Fine-tune `config.base` on the dataset's (caption, colour-coded mask) pairs; returns the model folder."""
    config = resolve_generator_kind(config)
    info = init_distributed(config.device)
    out, device = Path(config.out), info.device

    # 1. Settings and data before any model is loaded.
    if config.kind != "text2mask-sd":
        raise SegsynthError(f"train_text2mask_sd trains the text2mask-sd kind, not {config.kind!r}")
    if not config.base:
        raise SegsynthError("train-generator --kind text2mask-sd needs --base: a diffusers text-to-image model, hub "
                            "id or folder (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)")
    if config.batch_size < 1 or config.iterations < 1 or config.lora_rank < 0:
        raise SegsynthError("--batch-size and --iterations must be >= 1, --lora-rank >= 0")
    if not 0.0 <= config.cond_dropout < 1.0:
        raise SegsynthError(f"--cond-dropout {config.cond_dropout}: a probability in [0, 1)")
    if not 0.0 < config.crop_scale <= 1.0:
        raise SegsynthError(f"--crop-scale {config.crop_scale}: a fraction in (0, 1]")
    if config.decode_max_distance <= 0:
        raise SegsynthError(f"--decode-max-distance {config.decode_max_distance}: give a distance > 0 (RGB units)")
    scheduler_name(config.sample_scheduler)
    amp = autocast_dtype(config.mixed_precision, device)
    kind = prompts_kind(config.prompts)
    dataset = open_dataset(config.data)
    split = dataset.split(config.split)
    quick_check(dataset, [config.split])
    palette = resolve_palette(ColourCodingConfig(palette=config.palette), dataset.classes, dataset.palette)
    prompts = _training_prompts(config, dataset, split, kind)

    # 2. The base model's parts; its UNet (or LoRA adapters on it) is what trains.
    frozen = amp or torch.float32
    # A full fine-tune keeps fp32 master weights (the UNet runs under autocast); LoRA trains fp32 adapters on a
    # UNet held in the autocast type. An fp16 VAE overflows on SDXL, so fp16 keeps the VAE in fp32.
    parts = load_parts(config.base, dtype=frozen, vae_dtype=torch.float32 if amp == torch.float16 else frozen,
                       unet_dtype=frozen if config.lora_rank else torch.float32)
    size = _working_size(config, parts)
    torch.manual_seed(config.seed)
    unet = parts.unet
    if config.lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    for parameter in unet.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    for module in [unet, parts.vae, *parts.text_encoders]:
        module.to(device)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    trainable_names = [name for name, p in unet.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    ema = _ema(trainable, config.ema_decay)
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config(parts.scheduler_config)
    model = unet
    if info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            unet, device_ids=[info.local_rank] if device.type == "cuda" else None)

    # 3. Resume, or start afresh.
    start, seconds_before = 0, 0.0
    state_folder = training_state_folder(out, TRAINING_STATE) if config.resume else None
    if state_folder is not None:
        start, seconds_before = _resume(state_folder, config, unet, trainable_names, optimizer, ema)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".text2mask-sd-*"):  # staging folders of a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        save_config(config, out / "train_generator.config.yaml")
    log_path = out / "train_log.jsonl"
    if info.is_main:
        if start:
            rewind_jsonl(log_path, keep=lambda record: record.get("iteration", 0) <= start)
        else:
            log_path.unlink(missing_ok=True)
    meta = _meta(config, dataset, size, kind, parts, palette, len(trainable), sum(p.numel() for p in trainable))
    if start >= config.iterations:
        if info.is_main:
            tqdm.write(f"{out}: already trained for {start} iterations (--iterations {config.iterations}); "
                       "nothing to do")
        return out

    # 4. Iterate: colour maps -> latents -> noise at a random timestep -> the base's loss, Min-SNR weighted.
    #    The next batch is read and colour-coded in a thread while this one trains.
    batches = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segsynth-batches")
    read = lambda i: _batch(config, split, prompts, palette, size, i, info.rank, info.world_size)  # noqa: E731
    pending = batches.submit(read, start)
    started, loss_sum, loss_count, smoothed = time.time(), 0.0, 0, None
    bar = tqdm(total=config.iterations, initial=start, desc="train-generator (text2mask-sd)", unit="it",
               dynamic_ncols=True, mininterval=1.0, disable=not info.is_main)
    completed, out_of_time = start, False
    unet.train()
    try:
        for iteration in range(start, config.iterations):
            progress = iteration / config.iterations
            if config.max_minutes > 0:
                elapsed = _agreed(seconds_before + time.time() - started, device)  # the budget spans resumes
                progress = max(progress, elapsed / (config.max_minutes * 60.0))
                if progress >= 1.0:
                    out_of_time = True
                    break
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(config.lr, iteration, config.warmup, progress)
            pixels, batch_prompts, dropped = pending.result()
            if iteration + 1 < config.iterations:
                pending = batches.submit(read, iteration + 1)
            loss = _loss(config, parts, model, noise_schedule, pixels, batch_prompts, dropped, size, iteration,
                         info, amp)
            if not torch.isfinite(loss.detach()):
                check_finite(loss.detach(), iteration + 1, config.iterations, config.lr,
                             saved=f"the training state saved earlier in {out} is intact (--resume continues "
                                   "from it)" if training_state_folder(out, TRAINING_STATE) else f"no model was saved in {out}",
                             before_raise=bar.close)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.step(trainable)

            value = loss.item()
            smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
            loss_sum, loss_count = loss_sum + value, loss_count + 1
            completed = done = iteration + 1
            if info.is_main and done % config.log_every == 0:
                elapsed = time.time() - started
                append_jsonl(log_path, {"iteration": done, "loss": round(loss_sum / loss_count, 5),
                                        "lr": optimizer.param_groups[0]["lr"],
                                        "elapsed_s": round(seconds_before + elapsed, 1),
                                        "images_per_s": round((done - start) * config.batch_size * info.world_size
                                                              / elapsed, 2)})
                loss_sum, loss_count = 0.0, 0
                bar.set_postfix(loss=f"{smoothed:.4f}")
            bar.update(1)
            if done % config.save_every == 0 and done < config.iterations:
                if info.is_main:
                    _save_state(out, unet, trainable_names, optimizer, ema, config, done,
                                seconds_before + time.time() - started)
                barrier()
    finally:
        bar.close()
        batches.shutdown(wait=True, cancel_futures=True)

    # 5. The model (EMA weights, LoRA merged) and its training state, swapped in whole. A run that spent its
    #    --max-minutes is finished too (its schedule was shortened to end there); --resume with a larger
    #    --max-minutes continues it.
    seconds = seconds_before + time.time() - started
    if info.is_main:
        stats = {"iterations": completed, "finished": completed >= config.iterations or out_of_time,
                 "stopped_by": "max_minutes" if out_of_time else "iterations", "resumed_at": start or None,
                 "seconds": round(seconds, 1), "minutes": round(seconds / 60, 2),
                 "images_seen": completed * config.batch_size * info.world_size, "processes": info.world_size,
                 "loss": None if smoothed is None else round(smoothed, 5)}
        _save_model(out, parts, unet, trainable, trainable_names, optimizer, ema, config, {**meta, "training": stats},
                    completed, seconds)
    barrier()
    return out


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """None (fp32) or the autocast dtype; 'auto' is bf16 on a GPU that has it, fp16 on other GPUs, fp32 on CPU."""
    options = {"no": None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if mixed_precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mixed_precision not in options:
        raise SegsynthError(f"--mixed-precision {mixed_precision!r}; options: auto, no, fp16, bf16")
    if options[mixed_precision] is torch.float16 and device.type != "cuda":
        raise SegsynthError("--mixed-precision fp16 needs a GPU; use no (or bf16) on a CPU")
    return options[mixed_precision]


def _working_size(config: TrainGeneratorConfig, parts: Parts) -> tuple[int, int]:
    size = tuple(config.size) if config.size else parts.native_size()
    if len(size) == 1:
        size = (size[0], size[0])
    multiple = parts.size_multiple
    if len(size) != 2 or any(v < multiple or v % multiple for v in size):
        raise SegsynthError(f"--size {list(size)}: give H,W, each a multiple of {multiple} for this model (its VAE "
                            f"and UNet downsample {multiple}x), e.g. {parts.native_size()[0]},{parts.native_size()[1]}")
    return int(size[0]), int(size[1])


def _training_prompts(config: TrainGeneratorConfig, dataset, split, kind: str) -> list[str]:
    if kind == "captions":
        return read_captions(config.prompts, split.ids)
    # image-level prompts: the classes present, each label read once here
    return [class_prompt([dataset.classes[c] for c in present_classes(split.label(i), dataset.num_classes)])
            for i in tqdm(range(len(split)), desc="prompts", unit="mask", leave=False)]


def _ema(parameters, decay: float):
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(parameters, decay=decay, use_ema_warmup=True, power=2 / 3)


def _batch(config: TrainGeneratorConfig, split, prompts: list[str], palette: np.ndarray, size: tuple[int, int],
           iteration: int, rank: int, world_size: int):
    """This rank's slice of iteration `iteration`'s global batch: colour maps in [-1, 1] (B, 3, H, W), their
    prompts and which were dropped. Everything random is drawn for the whole global batch from (seed, iteration),
    so the global batch does not depend on how many processes share it."""
    total = config.batch_size * world_size
    rng = np.random.default_rng([config.seed, iteration])
    indices = rng.integers(0, len(split), total)
    flips = rng.random(total) < (0.5 if config.flip else 0.0)
    dropped = rng.random(total) < config.cond_dropout
    scales = rng.uniform(config.crop_scale, 1.0, (total, 2))
    offsets = rng.random((total, 2))
    mine = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
    pictures = []
    for index, flip, scale, offset in zip(indices[mine], flips[mine], scales[mine], offsets[mine]):
        colours = encode_mask(split.label(int(index)), palette)
        height, width = colours.shape[:2]
        crop_h, crop_w = max(1, int(round(height * scale[0]))), max(1, int(round(width * scale[1])))
        top, left = int(offset[0] * (height - crop_h)), int(offset[1] * (width - crop_w))
        crop = Image.fromarray(colours[top:top + crop_h, left:left + crop_w])
        picture = np.asarray(crop.resize((size[1], size[0]), Image.NEAREST))  # nearest: colours are never blended
        pictures.append(picture[:, ::-1] if flip else picture)
    pixels = torch.from_numpy(np.ascontiguousarray(np.stack(pictures))).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, [prompts[int(i)] for i in indices[mine]], torch.from_numpy(dropped[mine])


def _loss(config: TrainGeneratorConfig, parts: Parts, model, noise_schedule, pixels: torch.Tensor, prompts,
          dropped: torch.Tensor, size, iteration: int, info, amp) -> torch.Tensor:
    """The base's diffusion loss on one batch (latent sampling noise, noise and timesteps drawn for the whole
    global batch on the CPU, this rank's slice used)."""
    generator = torch.Generator("cpu").manual_seed(config.seed * 1_000_003 + iteration)
    return latent_diffusion_loss(parts, model, noise_schedule, pixels, prompts, dropped, size, generator, info, amp,
                                 config.min_snr_gamma, config.base)


def latent_diffusion_loss(parts: Parts, model, noise_schedule, pixels: torch.Tensor, prompts, dropped: torch.Tensor,
                          size, generator: torch.Generator, info, amp, min_snr_gamma: float, base: str) -> torch.Tensor:
    """A diffusers text-to-image model's own training loss on one batch of pixels in [-1, 1] (also what
    `segsynth adapt` fits a LoRA with): VAE latents (a posterior sample), noise at random timesteps, the error of
    the base's prediction type (epsilon or v) given the prompts (`dropped` ones unconditional), Min-SNR-gamma
    weighted. Latent sampling noise, noise and timesteps come from the CPU `generator`, drawn for the whole global
    batch of `info.world_size` processes, this rank's slice used."""
    device, vae = info.device, parts.vae
    batch = pixels.shape[0]
    total = batch * info.world_size
    latent_shape = (vae.config.latent_channels, size[0] // parts.latent_factor, size[1] // parts.latent_factor)
    mine = slice(info.rank * batch, (info.rank + 1) * batch)
    sampling_noise = torch.randn((total, *latent_shape), generator=generator)[mine].to(device)
    noise = torch.randn((total, *latent_shape), generator=generator)[mine].to(device)
    timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (total,), generator=generator)[mine]
    timesteps = timesteps.to(device)
    with torch.no_grad():
        posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        latents = (posterior.mean + posterior.std * sampling_noise.to(vae.dtype)).float() * vae.config.scaling_factor
        states, added = encode_prompts(parts, prompts, dropped, device, size)
    noisy = noise_schedule.add_noise(latents, noise, timesteps)
    prediction_type = noise_schedule.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_schedule.get_velocity(latents, noise, timesteps)
    else:
        raise SegsynthError(f"{base}: prediction type {prediction_type!r}; segsynth trains epsilon or "
                            "v_prediction models")
    unet_dtype = next(p for p in parts.unet.parameters()).dtype if amp is None else amp
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        predicted = model(noisy.to(unet_dtype), timesteps, encoder_hidden_states=states.to(unet_dtype),
                          added_cond_kwargs={k: v.to(unet_dtype) for k, v in added.items()} or None).sample
    per_sample = F.mse_loss(predicted.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * _min_snr_weights(noise_schedule, timesteps, min_snr_gamma, prediction_type)).mean()


def _min_snr_weights(noise_schedule, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) for the base's prediction type: min(SNR, g) / SNR for epsilon,
    min(SNR, g) / (SNR + 1) for v (as diffusers' training examples)."""
    if gamma <= 0:
        return torch.ones(len(timesteps), device=timesteps.device)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_schedule, timesteps)
    capped = snr.clamp(max=gamma)
    return capped / (snr + 1) if prediction_type == "v_prediction" else capped / snr.clamp(min=1e-8)


def _agreed(elapsed: float, device: torch.device) -> float:
    """Rank 0's clock, shared with every rank (so all stop at the same iteration under --max-minutes)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return elapsed
    value = torch.tensor([elapsed], dtype=torch.float64, device=device)
    dist.broadcast(value, src=0)
    return float(value.item())


# --- saving and resuming ------------------------------------------------------------------------


def merged_unet(unet):
    """The UNet as a plain UNet2DConditionModel: LoRA adapters (if any) merged into the layers they adapt."""
    from diffusers import UNet2DConditionModel
    from peft.tuners.lora import LoraLayer

    adapted = {name: module for name, module in unet.named_modules() if isinstance(module, LoraLayer)}
    if not adapted:
        return unet
    state = {key: value for key, value in unet.state_dict().items() if ".lora_" not in key and ".base_layer." not in key}
    for name, module in adapted.items():
        base = module.get_base_layer()
        state[f"{name}.weight"] = base.weight.detach() + module.get_delta_weight("default").to(base.weight.dtype)
        if base.bias is not None:
            state[f"{name}.bias"] = base.bias.detach()
    base_dtype = state[f"{next(iter(adapted))}.weight"].dtype
    plain = UNet2DConditionModel.from_config(unet.config)
    plain.load_state_dict(state)  # copies into fp32 parameters; cast below only when the base is held in another type
    plain = plain.to(next(unet.parameters()).device)
    return plain if base_dtype == torch.float32 else plain.to(base_dtype)


def _write_state(folder: Path, unet, names: list[str], optimizer, ema, config, iteration: int, seconds: float) -> None:
    folder.mkdir()
    parameters = dict(unet.named_parameters())
    save_file({name: parameters[name].detach().contiguous().cpu() for name in names}, folder / "trainable.safetensors")
    if ema is not None:
        state = ema.state_dict()
        shadow = state.pop("shadow_params")
        save_file({f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(shadow)},
                  folder / "ema.safetensors", metadata={"state": json.dumps(state)})
    save_optimizer_state(optimizer, folder / "optimizer.safetensors")
    atomic_write_json(folder / "state.json", {"iteration": iteration, "seconds": round(seconds, 1),
                                              "train_config": to_dict(config)})


def _save_state(out: Path, unet, names, optimizer, ema, config, iteration: int, seconds: float) -> None:
    with staged_swap(out, [TRAINING_STATE], what="text2mask-sd") as staging:
        _write_state(staging / TRAINING_STATE, unet, names, optimizer, ema, config, iteration, seconds)


def _save_model(out: Path, parts: Parts, unet, trainable, names, optimizer, ema, config, meta: dict, iteration: int,
                seconds: float) -> None:
    """The pipeline folder (EMA weights, LoRA merged), the training state and the metadata, swapped in whole."""
    with staged_swap(out, folder_parts(parts.sdxl) + [TRAINING_STATE, GENERATOR_FILE],
                     what="text2mask-sd") as staging:
        _write_state(staging / TRAINING_STATE, unet, names, optimizer, ema, config, iteration, seconds)
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
        try:
            # saved with the sampling scheduler, so the folder samples the same way in any diffusers code
            make_pipeline(parts, unet=merged_unet(unet), scheduler=config.sample_scheduler).save_pretrained(
                staging, safe_serialization=True)
        finally:
            if ema is not None:
                ema.restore(trainable)
        atomic_write_json(staging / GENERATOR_FILE, meta)



def _resume(folder: Path, config: TrainGeneratorConfig, unet, names: list[str], optimizer, ema) -> tuple[int, float]:
    """Load the saved training state into the fresh model; returns (iteration, seconds trained so far)."""
    state = read_json(folder / "state.json")
    check_resumed_settings(folder, state.get("train_config", {}), to_dict(config), RESUMABLE_CHANGES)
    weights = load_file(str(folder / "trainable.safetensors"))
    if sorted(weights) != sorted(names):
        raise SegsynthError(f"{folder}/trainable.safetensors: holds other weights than this model trains; "
                            "resume with the same --base and --lora-rank or use a new --out")
    parameters = dict(unet.named_parameters())
    with torch.no_grad():
        for name in names:
            parameters[name].copy_(weights[name])
    if ema is not None:
        with safe_open(str(folder / "ema.safetensors"), framework="pt") as handle:
            ema_state = json.loads(handle.metadata()["state"])
        shadow = load_file(str(folder / "ema.safetensors"))
        device = next(iter(parameters.values())).device
        ema.load_state_dict({**ema_state, "shadow_params": [shadow[f"shadow.{i}"].to(device)
                                                            for i in range(len(shadow))]})
    load_optimizer_state(optimizer, folder / "optimizer.safetensors")
    return int(state["iteration"]), float(state.get("seconds", 0.0))


def _meta(config: TrainGeneratorConfig, dataset, size, kind: str, parts: Parts, palette: np.ndarray,
          tensors: int, parameters: int) -> dict:
    return {"format": FORMAT, "segsynth_version": __version__, "classes": list(dataset.classes),
            "palette": [list(c) for c in dataset.palette],
            # how samples are read back (text2mask-sd:DIR): palette rows are the classes, then ignore
            "colour_coding": {"palette": palette.tolist(), "choice": config.palette,
                              "max_distance": config.decode_max_distance, "min_component": MIN_COMPONENT},
            "size": list(size), "sdxl": parts.sdxl, "base": model_source(config.base),
            "prompts": kind, "prompt_template": PROMPT_TEMPLATE if kind == "classes" else None,
            "min_class_fraction": MIN_CLASS_FRACTION if kind == "classes" else None,
            "sampling": {"steps": config.sample_steps, "scheduler": config.sample_scheduler,
                         "guidance": config.guidance},
            "trained": {"what": f"LoRA rank {config.lora_rank} on {', '.join(LORA_TARGETS)}" if config.lora_rank
                        else "the whole UNet", "tensors": tensors, "parameters": parameters},
            "data": config.data, "split": config.split, "train_config": to_dict(config)}


__all__ = ["FORMAT", "GENERATOR_FILE", "autocast_dtype", "latent_diffusion_loss", "merged_unet", "train_text2mask_sd"]
