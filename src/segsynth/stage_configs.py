"""Every stage's config dataclass, in one light module.

A stage module (training/loop.py, synthesize.py, ...) holds its one public function and
imports its config from here. They live together, apart from the stages, for two reasons:
the CLI builds every verb's flags from them without importing torch, diffusers or
transformers (`segsynth --help` stays well under a second), and `segsynth run` validates
its per-stage sections against them before any compute. Nothing here imports more than
the standard library and `segsynth.config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from segsynth.config import field


@dataclass
class TrainConfig:
    data: str = field(help="real dataset spec, e.g. camvid:PATH, folder:PATH or toy")
    out: str = field(help="output folder: checkpoint/, metrics.jsonl, config.yaml")
    model: str = field("segformer-b0", help="segmenter name (see models.SEGMENTERS)")
    pretrained: str | None = field(None, help="hub id or local folder to initialise from")
    recipe: str = field("real", help="real, synthetic, joint, pretrain-finetune or replace (see segsynth.recipes)")
    synthetic: list[str] = field([], help="synthetic set folder for the synthetic recipes")
    synthetic_masks: str = field("auto", help="auto (filtered when the set has them), filtered or raw")
    replace_probability: float = field(0.6, help="replace recipe: chance a real draw becomes a synthetic one (SegGen)")
    replace_from: str = field("same-mask", help="replace recipe: same-mask (a synthetic sample of the drawn real mask) "
                                                "or pool (any sample of the --synthetic sets, uniformly: SegGen's "
                                                "MaskSyn samples have no real twin)")
    pretrain_iterations: int = field(0, help="pretrain-finetune: synthetic-stage iterations (--iterations is the real stage)")
    init_checkpoint: str | None = field(None, help="start from this segsynth checkpoint's weights")
    iterations: int = field(2000, help="training iterations")
    batch_size: int = field(8, help="images per iteration per process")
    crop: list[int] = field([], help="crop H,W (default: the first training image's size)")
    base_size: list[int] = field([], help="H,W that random resize ratios 0.5-2.0 refer to (default: first image's size)")
    scale_range: list[float] = field([0.5, 2.0], help="random resize ratio range")
    lr: float = field(6e-4, help="peak learning rate (AdamW)")
    weight_decay: float = field(0.01, help="AdamW weight decay")
    warmup: int = field(100, help="linear warm-up iterations")
    poly_power: float = field(1.0, help="poly decay power after warm-up")
    seed: int = field(0, help="run seed")
    cache_gb: float = field(2.0, help="GiB of decoded training samples kept in memory across epochs (0: none)")
    workers: int = field(1, help="data loader worker processes per training process")
    save_every: int = field(500, help="save a resumable checkpoint every N iterations")
    eval_every: int = field(0, help="evaluate on --eval-split every N iterations (0: only at the end)")
    eval_split: str = field("val", help="split evaluated during and after training ('' to skip)")
    eval_size: list[int] = field([], help="inference size H,W for evaluation (default: native)")
    resume: bool = field(False, help="continue from OUT/checkpoint if it exists")
    device: str = field("auto", help="auto, cpu or cuda")
    log_every: int = field(20, help="write a metrics.jsonl line every N iterations")
    loss: str = field("ce", help="ce (cross-entropy, per-pixel weights) or reliable (per predicted class, only the "
                                 "most confident share of pixels in full: training on noisy pseudo-masks, Attn2mask)")
    reliable_share: float = field(0.5, help="loss reliable: share of each predicted class's pixels trusted in full")
    unreliable_weight: float = field(0.0, help="loss reliable: weight of the other pixels (0: dropped)")


@dataclass
class EvalConfig:
    checkpoint: str = field(help="checkpoint folder (a `segsynth train --out` folder)")
    data: str = field(help="dataset spec, e.g. camvid:PATH or toy")
    split: str = field("val", help="split to evaluate (train, val, test, ...)")
    out: str | None = field(None, help="write metrics JSON here (default: CHECKPOINT/metrics_<split>.json)")
    size: list[int] = field([], help="inference size H,W (default: each image's own size)")
    batch_size: int = field(8, help="images per forward pass")
    device: str = field("auto", help="auto, cpu or cuda")


@dataclass
class StatsConfig:
    segmenter: str = field(help="segmenter checkpoint trained on the real data (a `segsynth train --out` folder)")
    out: str = field(help="class statistics JSON to write")
    data: str | None = field(None, help="real dataset spec (default: the one the segmenter was trained on)")
    split: str = field("train", help="split whose pixels define L̄_c")
    batch_size: int = field(8, help="images per forward pass")
    size: list[int] = field([], help="inference size H,W (default: each image's own); use the size the segmenter "
                                     "sees synthetic images at, so real and synthetic losses compare")
    device: str = field("auto", help="auto, cpu or cuda")


@dataclass
class PlanConfig:
    data: str = field(help="dataset spec whose masks are planned (text plan: whose mask ids the captions use), "
                           "e.g. camvid:PATH or synthetic-raw:DIR")
    out: str = field(help="plan file to write (JSONL)")
    split: str = field("train", help="split whose masks (or captions) are planned")
    uniform: int = field(0, help="uniform plan: K synthetic images for every mask")
    limit: int = field(0, help="plan only the first N masks of the split (0: all), for smoke runs")
    seed: int = field(0, help="first seed; each sample gets the next one, so seeds are distinct")
    hardness: bool = field(False, help="hardness-aware plan (FreeMask); needs --stats")
    stats: str | None = field(None, help="hardness plan: class-stats JSON from `segsynth stats` (selects the hardness plan)")
    nmax: int = field(20, help="hardness plan: the hardest mask gets Nmax images, the easiest 1")
    budget: int = field(0, help="hardness plan: scale k so the plan renders exactly this many images in all")
    captions: str | None = field(None, help="text plan: captions file (JSON {mask id: caption} or JSONL, e.g. from "
                                            "`segsynth captions`) whose captions become text requests")
    per_caption: int = field(0, help="text plan: N seeds (samples) per caption")
    class_prompts: int = field(0, help="text plan: N images for each real image's class set, prompted 'a photo of "
                                       "road, car' (image-level labels only), for text -> image generators")


@dataclass
class TrainGeneratorConfig:
    data: str = field(help="dataset spec whose (image, mask) pairs the generator learns, e.g. camvid:PATH")
    out: str = field(help="output folder: a builtin generator (load it with --generator builtin:OUT)")
    split: str = field("train", help="split to train on")
    size: list[int] = field([96, 128], help="working resolution H,W (each a multiple of 2*2^(levels-1))")
    channels: list[int] = field([64, 128, 256], help="UNet widths per level (one level per entry)")
    layers_per_block: int = field(2, help="ResNet blocks per UNet level")
    attention: bool = field(True, help="self-attention at the lowest UNet level")
    iterations: int = field(4000, help="training iterations")
    max_minutes: float = field(0.0, help="stop after this many minutes, the LR schedule shortened to fit (0: no limit)")
    batch_size: int = field(16, help="images per iteration")
    lr: float = field(6e-4, help="peak learning rate (AdamW, linear warm-up then cosine decay)")
    warmup: int = field(100, help="warm-up iterations")
    ema_decay: float = field(0.9995, help="largest EMA decay (EMA warm-up ramps towards it)")
    min_snr_gamma: float = field(5.0, help="min-SNR loss weighting gamma (0: plain MSE)")
    crop_scale: float = field(0.7, help="random crops cover this fraction of each side or more, then resize")
    flip: bool = field(True, help="random horizontal flips")
    sample_steps: int = field(20, help="default sampling steps stored with the model")
    sample_scheduler: str = field("dpm++", help="default sampling scheduler stored with the model")
    seed: int = field(0, help="run seed")
    save_every: int = field(500, help="write the (EMA) model every N iterations, so a kill loses little")
    log_every: int = field(50, help="write a OUT/train_log.jsonl line every N iterations")
    device: str = field("auto", help="auto, cpu or cuda")


@dataclass
class TrainTextGeneratorConfig:
    data: str = field(help="dataset spec whose images (or masks) the generator learns, e.g. camvid:PATH")
    out: str = field(help="output folder: a builtin text generator")
    split: str = field("train", help="split to train on")
    target: str = field("image", help="what is generated: image (real photos, image-level labels only) or "
                                      "colour-mask (the mask drawn in --palette colours: SegGen's text -> mask)")
    palette: str = field("separated", help="colour-mask target: class colours: separated (maximally far apart, "
                                           "SegGen), dataset (the dataset's own) or a JSON file {class: [r, g, b]}; "
                                           "stored with the model, which decodes by it")
    # the default is methods.seggen.colour.MAX_DISTANCE (this module imports no numpy)
    decode_max_distance: float = field(64.0, help="colour-mask target: a generated pixel farther than this (RGB, "
                                                  "0..441) from every palette colour decodes to ignore; stored with "
                                                  "the model")
    prompts: str = field("classes", help="'classes' ('a photo of sky, road, car' from the classes present) or a "
                                         "captions file with a caption per training sample (`segsynth captions`: "
                                         "JSONL {\"id\", \"caption\"} lines, or JSON {id: caption})")
    size: list[int] = field([96, 128], help="working resolution H,W (each a multiple of 2*2^(levels-1))")
    channels: list[int] = field([32, 64, 128], help="UNet widths per level; cross-attention on all but the first")
    layers_per_block: int = field(2, help="ResNet blocks per UNet level")
    text_width: int = field(64, help="text encoder width = the UNet's cross-attention dim")
    text_layers: int = field(2, help="text encoder transformer layers (0: each token its own embedding, no context)")
    keys: str = field("all", help="which prompt tokens the UNet's cross-attention may attend to: all, or class-words "
                                  "(the class names and <bos>, which stands for 'none of them'): with class words "
                                  "only, each pixel's attention is a competition between the classes named, which "
                                  "is what an attention pseudo-mask reads; stored with the model")
    max_length: int = field(0, help="tokens per prompt with <bos>/<eos> (0: the longest training prompt's, rounded up to 8)")
    iterations: int = field(4000, help="training iterations")
    max_minutes: float = field(0.0, help="stop after this many minutes, the LR schedule shortened to fit (0: no limit)")
    batch_size: int = field(16, help="images per iteration")
    lr: float = field(5e-4, help="peak learning rate (AdamW, linear warm-up then cosine decay)")
    warmup: int = field(100, help="warm-up iterations")
    ema_decay: float = field(0.9995, help="largest EMA decay (EMA warm-up ramps towards it)")
    min_snr_gamma: float = field(5.0, help="Min-SNR-style cap on the x0-loss weight SNR+1 of nearly clean steps (0: plain v-MSE)")
    cond_dropout: float = field(0.1, help="probability of training on the empty prompt (for classifier-free guidance)")
    flip: bool = field(True, help="random horizontal flips")
    sample_steps: int = field(20, help="default sampling steps stored with the model")
    sample_scheduler: str = field("dpm++", help="default sampling scheduler stored with the model")
    guidance: float = field(3.0, help="default classifier-free guidance scale stored with the model")
    seed: int = field(0, help="run seed")
    save_every: int = field(500, help="write the model and its training state every N iterations")
    log_every: int = field(50, help="write a OUT/train_log.jsonl line every N iterations")
    device: str = field("auto", help="auto, cpu or cuda")
    resume: bool = field(False, help="continue from OUT/training_state if it exists")


@dataclass
class CaptionConfig:
    data: str = field(help="real dataset spec whose masks get captions, e.g. camvid:PATH")
    out: str = field(help="output folder: captions.jsonl and captions.config.yaml are written there")
    split: str = field("train", help="split to caption")
    captioner: str = field("mask", help="mask (describe each mask's classes and their places), file (a given "
                                        "--captions file), or a BLIP-2 hub id / folder captioning the images, "
                                        "e.g. Salesforce/blip2-opt-2.7b")
    captions: str | None = field(None, help="captions file for --captioner file: JSON {mask id: caption} or JSONL")
    min_fraction: float = field(0.01, help="mask captions leave out classes under this share of the pixels")
    batch_size: int = field(8, help="images per BLIP-2 call")
    max_new_tokens: int = field(30, help="longest BLIP-2 caption, in tokens")
    device: str = field("auto", help="auto, cpu or cuda (BLIP-2)")
    dtype: str = field("auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16 (BLIP-2)")


@dataclass
class SynthesizeConfig:
    data: str = field(help="dataset spec the plan's masks come from, e.g. camvid:PATH, or synthetic-raw:DIR for a "
                           "mask set a text -> mask generator made (each record then names its source sample)")
    plan: str = field(help="plan file (JSONL) from `segsynth plan`")
    generator: str = field(help="generator spec: builtin:DIR, controlnet:BASE, controlnet-sdxl:BASE, text2mask:DIR, "
                                "attention:DIR or attention-sd:BASE")
    out: str = field(help="output folder (a folder: dataset); rerun with the same arguments to resume")
    split: str = field("train", help="split the plan's mask ids belong to")
    batch_size: int = field(4, help="masks per model call (does not change any sample's pixels)")
    steps: int | None = field(None, help="denoising steps (default: the generator's own)")
    guidance: float | None = field(None, help="classifier-free guidance scale (ControlNet; default 7.5, LCM 1.5)")
    scheduler: str | None = field(None, help="dpm++, unipc, ddim, euler, or lcm (with --lcm-lora)")
    negative_prompt: str = field("", help="negative prompt (ControlNet)")
    controlnet: str | None = field(None, help="ControlNet hub id or folder, e.g. lllyasviel/control_v11p_sd15_seg")
    controlnet_scale: float = field(1.0, help="ControlNet conditioning scale")
    lcm_lora: str | None = field(None, help="LCM-LoRA hub id or folder: fuse it and sample with LCM in 4-8 steps")
    colour_map: str = field("ade20k", help="mask colours for the ControlNet: ade20k, dataset, or a JSON file")
    captions: str | None = field(None, help="per-mask captions (JSON {id: text} or JSONL) instead of class-name prompts")
    resolution: list[int] = field([], help="ControlNet working size H,W (default: 512 short side; 1024 for SDXL)")
    dtype: str = field("auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16")
    device: str = field("auto", help="auto, cpu or cuda")
    progress: bool = field(True, help="show a progress bar")
    pseudo_mask: str = field("dataset-diffusion", help="attention generators: pseudo-mask recipe (diffumask, "
                                                       "dataset-diffusion or daam; methods/attn2mask/pseudo_mask.py)")
    pseudo_mask_settings: dict = field({}, help="attention generators: PseudoMaskConfig keys over the recipe, e.g. "
                                                "resolutions=[16,8] background_threshold=0.4")


@dataclass
class AttentionQualityConfig:
    generator: str = field(help="attention generator spec: attention:DIR or attention-sd:BASE")
    data: str = field(help="real dataset spec with labels, e.g. camvid:PATH or toy")
    out: str = field(help="folder for attention_quality.json and attention_quality.md")
    split: str = field("val", help="held-out split whose images are noised and labelled")
    presets: list[str] = field(["diffumask", "dataset-diffusion", "daam"], help="pseudo-mask recipes to score")
    pseudo_mask_settings: dict = field({}, help="PseudoMaskConfig keys over every recipe, e.g. resolutions=[16,8]")
    timestep: float = field(0.5, help="noise level: a fraction of the training schedule (0-1) or a timestep (> 1)")
    limit: int = field(0, help="score only the first N images of the split (0: all)")
    seed: int = field(0, help="seed of the noise added to each image (image i uses seed + i)")
    dtype: str = field("auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16 (attention-sd)")
    device: str = field("auto", help="auto, cpu or cuda")


@dataclass
class FilterConfig:
    synthetic: str = field(help="synthetic set folder (from `segsynth synthesize`)")
    segmenter: str = field(help="segmenter checkpoint trained on the real data")
    stats: str | None = field(None, help="class-stats JSON (default: SEGMENTER/class_stats.json, computed if missing)")
    alpha: float = field(1.25, help="ignore a pixel of class c when its loss > alpha * mean real loss of c")
    batch_size: int = field(8, help="images per forward pass")
    lanes: int = field(0, help="parallel decode+score threads (0: auto: on a CPU, timed on the first batch: one "
                               "lane per core up to 8, each single-threaded, or one lane using every core; 2 on a GPU)")
    device: str = field("auto", help="auto, cpu or cuda")


@dataclass
class MaskQualityConfig:
    masks: str = field(help="mask set folder: text -> mask samples (`segsynth synthesize --generator text2mask:DIR`)")
    data: str = field(help="real dataset spec whose training masks the generated ones are compared with")
    out: str = field(help="output folder: mask_quality.json, mask_quality.md, mask_quality_grid.png")
    rendered: list[str] = field([], help="synthetic set(s) rendered from the mask set (MaskSyn images), for the "
                                         "alignment score and the grid")
    segmenter: str | None = field(None, help="real-trained segmenter checkpoint; alignment = its mIoU on the rendered "
                                             "images against their generated masks (and on real --eval-split images)")
    split: str = field("train", help="real split whose masks the generated ones are compared with")
    eval_split: str = field("val", help="real split the segmenter's yardstick mIoU is measured on")
    size: list[int] = field([], help="segmenter inference size H,W (default: each image's own)")
    batch_size: int = field(8, help="images per forward pass")
    grid_rows: int = field(6, help="rows in mask_quality_grid.png")
    device: str = field("auto", help="auto, cpu or cuda")


@dataclass
class RunConfig:
    """`segsynth run`: a method's stages and arms on one dataset. The run's own keys are below; each
    stage section holds keys of that stage's config (TrainConfig, TrainGeneratorConfig, StatsConfig,
    PlanConfig, SynthesizeConfig, FilterConfig, CaptionConfig, TrainTextGeneratorConfig) that every use
    of the stage in the run shares; a method uses the sections of its own stages. What the run decides
    itself (data, out, seeds, recipes, which synthetic sets) is not a section key."""

    method: str = field("freemask", help="method whose stages and arms run: freemask or seggen (segsynth.run.METHODS)")
    data: str = field("toy:n=240,n_val=80,size=64x80", help="dataset spec (default: the embedded toy dataset)")
    out: str = field("runs/segsynth", help="output folder")
    preset: str = field("default", help="quick or default: sizes for toy or real data (any key overrides them)")
    arms: list[str] = field([], help="arms to run (default: every arm of the method)")
    seeds: list[int] = field([0, 1], help="training seeds per arm")
    eval_split: str = field("val", help="held-out split every arm is evaluated on")
    images_per_mask: int = field(2, help="synthetic budget: images per real training mask; every arm that uses "
                                         "synthetic data gets the same total")
    pretrain_fraction: float = field(0.5, help="pretrain-finetune arms: share of train.iterations on synthetic data")
    generator: str = field("auto", help="mask-to-image generator: auto (the shipped toy generator on toy data, else "
                                        "train one), train, or a spec such as builtin:DIR (attn2mask: auto/train "
                                        "the builtin text generator, attention:DIR or attention-sd:BASE)")
    grids: int = field(6, help="rows in each visual grid")
    device: str = field("auto", help="auto, cpu or cuda")
    train: dict = field({}, help="TrainConfig keys for every arm, e.g. model=segformer-small")
    train_generator: dict = field({}, help="TrainGeneratorConfig keys, e.g. max_minutes=20")
    train_text_generator: dict = field({}, help="TrainTextGeneratorConfig keys (attn2mask), e.g. max_minutes=20")
    stats: dict = field({}, help="StatsConfig keys (default size: train's eval_size)")
    plan: dict = field({}, help="PlanConfig keys, e.g. nmax=20")
    synthesize: dict = field({}, help="SynthesizeConfig keys, e.g. steps=20")
    filter: dict = field({}, help="FilterConfig keys, e.g. alpha=1.25")
    captions: dict = field({}, help="CaptionConfig keys (SegGen), e.g. captioner=Salesforce/blip2-opt-2.7b")
    train_text_generator: dict = field({}, help="TrainTextGeneratorConfig keys (SegGen's text -> mask), e.g. "
                                                "max_minutes=20")


# Run section -> (stage config, keys the run sets itself and a section may not).
RUN_SECTIONS = {
    "train": (TrainConfig, ("data", "out", "recipe", "synthetic", "synthetic_masks", "pretrain_iterations",
                            "init_checkpoint", "seed", "resume", "eval_split", "device")),
    "train_generator": (TrainGeneratorConfig, ("data", "out", "device")),
    "stats": (StatsConfig, ("segmenter", "out", "data", "device")),
    "plan": (PlanConfig, ("data", "out", "uniform", "hardness", "stats", "budget", "seed", "captions", "per_caption",
                          "class_prompts")),
    "synthesize": (SynthesizeConfig, ("data", "plan", "generator", "out", "device")),
    "filter": (FilterConfig, ("synthetic", "segmenter", "stats", "device")),
    "captions": (CaptionConfig, ("data", "out", "split", "device")),
    "train_text_generator": (TrainTextGeneratorConfig, ("data", "out", "target", "prompts", "resume", "device")),
}
