"""The latent generator against the pixel one: the autoencoder's round trip, and training speed.

1. Round trip: PSNR of decode(encode(image)) against the image, for the first N images of the val split
   (and of train), at the latent generator's working size (a centre crop when the size is at most the
   image's, else a resize), with the autoencoder the latent generator is given.
2. Training speed: one training iteration of each generator -- its batch drawn as its trainer draws it
   (the pixel one: rescaled crops of the real pairs; the latent one: cached latents of the same images),
   the v-prediction loss (`builtin.train.denoising_loss`), backward, AdamW and EMA -- timed in alternating
   rounds (pixel, latent, pixel, ...) so that drift in the machine's load shows as spread, not as bias.
   Reported: iterations/s, images/s, and pixels/s at each model's working size.

    python benchmarks/bench_latent_generator.py           # CamVid from ../shared, taef2; CPU presets
    python benchmarks/bench_latent_generator.py --latent-size 176,240 --latent-channels 64,128
    python benchmarks/bench_latent_generator.py --data toy:n=8,size=32 --autoencoder tiny --latent-size 32,32 \\
        --latent-channels 32,32 --pixel-size 32,32 --pixel-channels 32,32   # smoke run, a tiny random autoencoder
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_filter import machine_info, report  # noqa: E402  (one machine record for every benchmark)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=f"camvid:{SHARED / 'datasets' / 'camvid'}")
    parser.add_argument("--autoencoder", default=f"taesd:{SHARED / 'weights' / 'taef2'}",
                        help="autoencoder spec, or 'tiny' for a tiny random TAESD (smoke runs)")
    parser.add_argument("--psnr-images", type=int, default=8, help="val (and train) images for the round trip")
    parser.add_argument("--train-images", type=int, default=32, help="training images held for the timed batches")
    parser.add_argument("--latent-size", default="192,256")
    parser.add_argument("--latent-channels", default="64,128,256")
    parser.add_argument("--latent-layers", type=int, default=1)
    parser.add_argument("--pixel-size", default="96,128")
    parser.add_argument("--pixel-channels", default="32,64,128")
    parser.add_argument("--pixel-layers", type=int, default=1)
    parser.add_argument("--no-attention", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=4, help="iterations per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians are reported)")
    parser.add_argument("--out", default="results/bench_latent_generator.json")
    return parser.parse_args()


def numbers(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def open_autoencoder_spec(spec: str, scratch: Path):
    from segsynth.generators.latent.autoencoder import open_autoencoder
    from segsynth.generators.testing import save_tiny_taesd

    if spec == "tiny":
        spec = f"taesd:{save_tiny_taesd(scratch / 'tiny_taesd')}"
    return open_autoencoder(spec)


def working_image(sample, size) -> torch.Tensor:
    """(3, H, W) float in [0, 1] at `size`: a centre crop when it fits inside the image, else a resize."""
    from segsynth.generators.builtin.train import resize_pair

    image = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1)
    label = torch.from_numpy(np.ascontiguousarray(sample.label))
    height, width = label.shape
    if size[0] <= height and size[1] <= width:
        top, left = (height - size[0]) // 2, (width - size[1]) // 2
        return image[:, top: top + size[0], left: left + size[1]].float() / 255
    return resize_pair(image, label, size)[0] / 255


def round_trip(autoencoder, split, count: int, size) -> list[float]:
    values = []
    for index in range(min(count, len(split))):
        pixels = working_image(split[index], size)[None]
        with torch.no_grad():
            decoded = autoencoder.decode(autoencoder.encode(pixels))
        error = ((decoded * 255).round() - (pixels * 255).round()).pow(2).mean().item()
        values.append(round(10 * np.log10(255**2 / max(error, 1e-10)), 2))
    return values


def main() -> int:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from diffusers.training_utils import EMAModel

    from segsynth.data import open_dataset
    from segsynth.generators.builtin.model import (MaskDenoiser, build_unet, encode_images, encode_masks,
                                                   one_hot_masks, training_noise_schedule)
    from segsynth.generators.builtin.train import _training_batch, denoising_loss, resize_pair
    from segsynth.generators.latent.model import build_denoiser, latent_working_size, standardise
    from segsynth.stage_configs import TrainGeneratorConfig

    dataset = open_dataset(args.data)
    train, val = dataset.split("train"), dataset.split("val")
    scratch = Path(tempfile.mkdtemp(prefix="bench-latent-"))
    autoencoder = open_autoencoder_spec(args.autoencoder, scratch)
    latent_size = latent_working_size(numbers(args.latent_size), autoencoder.factor, len(numbers(args.latent_channels)))
    pixel_size = tuple(numbers(args.pixel_size))

    # 1. The autoencoder's round trip.
    psnr_val = round_trip(autoencoder, val, args.psnr_images, latent_size)
    psnr_train = round_trip(autoencoder, train, args.psnr_images, latent_size)

    # 2. Both generators' training steps on the same images.
    samples = [train[i] for i in range(min(args.train_images, len(train)))]
    images = [torch.from_numpy(np.ascontiguousarray(s.image)).permute(2, 0, 1) for s in samples]
    labels = [torch.from_numpy(np.ascontiguousarray(s.label)) for s in samples]
    encode_started = time.perf_counter()
    pairs = [resize_pair(image, label, latent_size) for image, label in zip(images, labels)]
    with torch.no_grad():
        latents = torch.cat([autoencoder.encode(torch.stack([p[0] for p in pairs[i: i + 8]]) / 255)
                             for i in range(0, len(pairs), 8)])
    encode_seconds = (time.perf_counter() - encode_started) / len(pairs)
    masks = torch.stack([p[1] for p in pairs])
    mean, std = latents.transpose(0, 1).reshape(latents.shape[1], -1).mean(1), \
        latents.transpose(0, 1).reshape(latents.shape[1], -1).std(1)
    attention = not args.no_attention
    torch.manual_seed(0)
    models = {
        "pixel": MaskDenoiser(build_unet(pixel_size, dataset.num_classes, numbers(args.pixel_channels),
                                         args.pixel_layers, attention)),
        "latent": build_denoiser((latent_size[0] // autoencoder.factor, latent_size[1] // autoencoder.factor),
                                 autoencoder.latent_channels, dataset.num_classes, autoencoder.factor,
                                 numbers(args.latent_channels), args.latent_layers, attention),
    }
    pixel_config = TrainGeneratorConfig(data=args.data, out="unused", batch_size=args.batch)
    noise_schedule = training_noise_schedule()
    alphas_cumprod = noise_schedule.alphas_cumprod
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    emas = {name: EMAModel(list(m.parameters()), decay=0.9995, use_ema_warmup=True, power=2 / 3)
            for name, m in models.items()}

    def batch(name: str, rng: np.random.Generator):
        if name == "pixel":
            batch_images, batch_masks = _training_batch(images, labels, pixel_size, pixel_config, rng)
            return encode_images(batch_images), encode_masks(batch_masks.numpy(), dataset.num_classes)
        index = torch.from_numpy(rng.integers(0, len(latents), args.batch))
        return standardise(latents[index], mean, std), one_hot_masks(masks[index].numpy(), dataset.num_classes)

    def step(name: str, iteration: int) -> None:
        rng = np.random.default_rng([0, iteration])
        clean, condition = batch(name, rng)
        loss = denoising_loss(models[name], noise_schedule, alphas_cumprod, clean, condition,
                              torch.Generator().manual_seed(iteration), 5.0)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models[name].parameters(), 1.0)
        optimizers[name].step()
        emas[name].step(models[name].parameters())

    for name in models:  # warm-up
        step(name, 0)
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(args.rounds):
        for name in models:
            started = time.perf_counter()
            for i in range(args.iterations):
                step(name, 1 + round_index * args.iterations + i)
            rates[name].append(args.iterations / (time.perf_counter() - started))
    load_after = os.getloadavg()

    median = {name: float(np.median(values)) for name, values in rates.items()}
    pixels = {"pixel": int(np.prod(pixel_size)), "latent": int(np.prod(latent_size))}
    result = {
        "benchmark": "latent_generator",
        "autoencoder": args.autoencoder, "latent_channels": autoencoder.latent_channels,
        "psnr_val_mean": round(float(np.mean(psnr_val)), 2), "psnr_val_min": min(psnr_val),
        "psnr_train_mean": round(float(np.mean(psnr_train)), 2), "psnr_val": psnr_val, "psnr_train": psnr_train,
        "psnr_size": list(latent_size), "encode_seconds_per_image": round(encode_seconds, 3),
        "pixel_size": list(pixel_size), "latent_size": list(latent_size),
        "pixel_parameters": sum(p.numel() for p in models["pixel"].parameters()),
        "latent_parameters": sum(p.numel() for p in models["latent"].parameters()),
        "pixel_iterations_per_s": round(median["pixel"], 3), "latent_iterations_per_s": round(median["latent"], 3),
        "pixel_images_per_s": round(median["pixel"] * args.batch, 2),
        "latent_images_per_s": round(median["latent"] * args.batch, 2),
        "ratio": round(median["latent"] / median["pixel"], 3),  # latent iterations/s as a share of the pixel one's
        "pixels_per_s_ratio": round(median["latent"] * pixels["latent"] / (median["pixel"] * pixels["pixel"]), 3),
        "runs": {name: [round(v, 3) for v in values] for name, values in rates.items()},
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "settings": vars(args), "machine": machine_info(),
    }
    report(result, ["autoencoder", "psnr_size", "psnr_val_mean", "psnr_val_min", "psnr_train_mean",
                    "encode_seconds_per_image", "pixel_size", "pixel_parameters", "pixel_iterations_per_s",
                    "latent_size", "latent_parameters", "latent_iterations_per_s", "ratio", "pixels_per_s_ratio",
                    "load_average_before"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
