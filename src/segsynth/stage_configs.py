"""Every stage's config dataclass, in one light module.

A stage module (training/loop.py, synthesize.py, ...) holds its one public function and
imports its config from here. They live together, apart from the stages, for two reasons:
the CLI builds every verb's flags from them without importing torch, diffusers or
transformers (`segsynth --help` stays well under a second), and `segsynth run` validates
its per-stage sections against them before any compute. Nothing here imports more than
the standard library and `segsynth.config`.
"""

from __future__ import annotations

import re

from segsynth.config import Range, check_values, coerce_values, config_class, field

# --- the meaningful values of the fields, shared by several configs ------------------------------------
# Bounds are where a value stops meaning anything (0 iterations save an untrained checkpoint) or where
# numpy, torch or PIL would overflow or allocate without end (sides beyond PIL's decompression-bomb
# limit of about 9459^2 pixels, seeds beyond 32 bits, batches of millions).

MAX_ITERATIONS = 10**9
ITERATIONS = Range(1, MAX_ITERATIONS)
COUNT = Range(0, MAX_ITERATIONS)  # 0 = none / all / off, as each field's help says
EVERY = Range(1, MAX_ITERATIONS)
BATCH = Range(1, 4096)
SEED = Range(0, 2**31 - 1)  # seed + offsets stay within the 32-bit seeds numpy and torch take
POSITIVE = Range(0.0, low_open=True)  # a learning rate too large to train is only known by training: see check_finite
PROBABILITY = Range(0.0, 1.0)
MINUTES = Range(0.0, 10.0**6)
MAX_SIDE = 8192  # PIL refuses images beyond ~9459^2 pixels (decompression-bomb limit)
SIZE = Range(8, MAX_SIDE, lengths=(0, 2), shape="H,W; empty: each image's own size")
CROP = Range(8, MAX_SIDE, lengths=(0, 1, 2), shape="H,W or one number for a square; empty: the first training "
                                                   "image's size")
MAX_GENERATOR_SIDE = 4096
GENERATOR_SIZE = Range(8, MAX_GENERATOR_SIDE, lengths=(1, 2), shape="H,W or one number for a square")
CHANNELS = Range(8, 4096, multiple=8, lengths=tuple(range(1, 7)), shape="one width per UNet level")
STEPS = Range(1, 1000)
GUIDANCE = Range(0.0, 100.0)
MAX_PER_ENTRY = 10_000
PER_ENTRY = Range(0, MAX_PER_ENTRY)
MAX_PLANNED = 10**8
DEVICE = Range(choices=("auto", "cpu", "cuda"), pattern=r"cuda:\d+", pattern_hint="cuda:N")
DTYPE = Range(choices=("auto", "fp32", "fp16", "bf16"))

# Names of table rows that live in modules importing torch (kept equal to them by tests/test_config_ranges.py).
SEGMENTER_NAMES = ("segformer-b0", "segformer-b1", "segformer-b2", "segformer-b3", "segformer-b4", "segformer-b5",
                   "segformer-small", "segformer-tiny", "mask2former-swin-t", "mask2former-swin-s", "mask2former-swin-b",
                   "mask2former-swin-l", "mask2former-small", "mask2former-tiny")  # segmenters.SEGMENTERS
RECIPE_NAMES = ("real", "synthetic", "joint", "pretrain-finetune", "replace", "paste")  # training.recipes.RECIPES
SCHEDULER_NAMES = ("dpm++", "unipc", "ddim", "euler", "lcm", "dpmsolver++", "dpm-solver++", "dpmpp", "uni-pc")
SCHEDULER = Range(choices=SCHEDULER_NAMES)  # generators.schedulers.SCHEDULERS and ALIASES
PSEUDO_MASK_PRESETS = ("diffumask", "dataset-diffusion", "daam")  # methods.attn2mask.pseudo_mask.PRESETS
METHOD_NAMES = ("freemask", "seggen", "attn2mask", "all")  # run.METHODS
# methods.freemask.method.ARMS that train on synthetic sets: the arms a closed loop can continue
FREEMASK_SYNTHETIC_ARMS = ("synthetic-raw-uniform", "synthetic-filtered-hardness", "joint-raw-uniform",
                           "joint-filtered-uniform", "joint-filtered-hardness", "pretrain-finetune-filtered-hardness",
                           "joint-filtered-targeted", "paste-filtered-hardness",
                           "paste-hardness-and-real")
SWEEP_LENGTHS = tuple(range(0, 17))  # at most 16 values per sweep
GENERATOR_KIND_NAMES = ("builtin", "latent", "text2mask-sd")  # GENERATOR_KINDS below, generators.TRAINERS


def _ordered_pair(key: str):
    def check(values: dict, source: str) -> str | None:
        pair = values[key]
        if len(pair) == 2 and pair[0] > pair[1]:
            return f"key {key!r} {pair}: give low <= high"
        return None
    return check


def _keep_every_fits_saves(values: dict, source: str) -> str | None:
    """Snapshots copy a saved model, so they come at saves (builtin and latent only)."""
    keep, save = values.get("keep_every") or 0, values.get("save_every") or 500
    if not keep:
        return None
    if values.get("kind", "builtin") not in ("builtin", "latent"):
        return f"key 'keep_every' {keep}: snapshots are kept by the builtin and latent trainers only; drop it"
    if keep % save:
        return (f"key 'keep_every' {keep} is not a multiple of save_every {save}: a snapshot is a copy of a saved "
                f"model; give a multiple, e.g. --keep-every {save * -(-keep // save)}")
    return None


def _size_fits_unet(values: dict, source: str) -> str | None:
    """The working size must pass space-to-depth (builtin: x2; latent: the autoencoder's x8) and every UNet
    downsampling; checked here when both are given (otherwise once the kind's preset fills them in)."""
    kind = values.get("kind", "builtin")
    if kind not in ("builtin", "latent") or not values.get("size") or not values.get("channels"):
        return None
    if kind == "latent" and not str(values.get("autoencoder") or "").startswith("taesd:"):
        return None  # a diffusers autoencoder's factor is known once it is loaded (train_latent_generator checks)
    factor, grid, example = ((2, "space-to-depth x2", "96,128") if kind == "builtin" else
                             (8, "the autoencoder's x8", "192,256"))
    multiple = factor * 2 ** (len(values["channels"]) - 1)
    if any(side % multiple for side in values["size"]):
        return (f"key 'size' {values['size']}: H and W must be multiples of {multiple} ({grid} and "
                f"{len(values['channels']) - 1} UNet downsamplings of --channels {values['channels']}); e.g. {example}")
    return None


def _two_levels(values: dict, source: str) -> str | None:
    if len(values["channels"]) < 2:
        return f"key 'channels' {values['channels']}: give at least two levels (cross-attention works on the lower ones)"
    return None


def _pseudo_mask_settings(values: dict, source: str) -> str | None:
    """The pseudo_mask_settings section holds PseudoMaskConfig keys, each in its range (checked now, not
    when an attention generator opens)."""
    where = "--pseudo-mask-settings" if source == "command line" else f"{source}: key 'pseudo_mask_settings'"
    check_values(PseudoMaskConfig, coerce_values(PseudoMaskConfig, values["pseudo_mask_settings"] or {}, where), where)
    return None


def _distinct_seeds(values: dict, source: str) -> str | None:
    if len(set(values["seeds"])) != len(values["seeds"]):
        return f"key 'seeds' {values['seeds']}: give distinct seeds (each names its arm's folder)"
    return None


def _distinct(key: str, what: str):
    def check(values: dict, source: str) -> str | None:
        if len(set(values[key])) != len(values[key]):
            return f"key {key!r} {values[key]}: give distinct values (each names {what})"
        return None
    return check


def _judge_names(values: dict, source: str) -> str | None:
    """filter_judges: NAME -> checkpoint folder; a name becomes part of arm and folder names."""
    judges = values.get("filter_judges") or {}
    for name, path in judges.items():
        if name == "reference" or not re.fullmatch(r"[A-Za-z0-9_]+", str(name)):
            return (f"key 'filter_judges': judge name {name!r} cannot name arms and folders; use letters, digits "
                    "and '_' (not 'reference', the run's own real-data segmenter), e.g. filter_judges: {big: DIR}")
        if not isinstance(path, str) or not path:
            return (f"key 'filter_judges': judge {name!r} needs a checkpoint folder (a `segsynth train --out` "
                    f"folder), got {path!r}")
    return None


TEXT_MASK_GENERATORS = ("text2mask", "text2mask-sd")


def _text_mask_generator_spec(values: dict, source: str) -> str | None:
    spec = values.get("text_mask_generator", "train")
    name, _, argument = spec.partition(":")
    if spec != "train" and (name not in TEXT_MASK_GENERATORS or not argument):
        return (f"key 'text_mask_generator' {spec!r}: give train or a trained text -> mask generator, "
                f"{' or '.join(n + ':DIR' for n in TEXT_MASK_GENERATORS)}")
    return None


@config_class
class TrainConfig:
    data: str = field(help="real dataset spec, e.g. camvid:PATH, folder:PATH or toy")
    out: str = field(help="output folder: checkpoint/, metrics.jsonl, config.yaml")
    model: str = field("segformer-b0", range=Range(choices=SEGMENTER_NAMES),
                       help="segmenter name: segformer-b0..b5, -small, -tiny; mask2former-swin-t/s/b/l, -small, -tiny "
                            "(segmenters.SEGMENTERS)")
    pretrained: str | None = field(None, help="hub id or local folder to initialise from")
    recipe: str = field("real", range=Range(choices=RECIPE_NAMES),
                        help="real, synthetic, joint, pretrain-finetune, replace or paste (see segsynth.recipes)")
    synthetic: list[str] = field([], help="synthetic set folder for the synthetic recipes")
    synthetic_masks: str = field("auto", range=Range(choices=("auto", "filtered", "raw")),
                                 help="auto (filtered when the set has them), filtered or raw")
    replace_probability: float = field(0.6, range=PROBABILITY,
                                       help="replace recipe: chance a real draw becomes a synthetic one (SegGen)")
    replace_from: str = field("same-mask", range=Range(choices=("same-mask", "pool")),
                              help="replace recipe: same-mask (a synthetic sample of the drawn real mask) "
                                   "or pool (any sample of the --synthetic sets, uniformly: SegGen's "
                                   "MaskSyn samples have no real twin)")
    paste_classes: list[str] = field([], help="paste recipe: class names whose filter-kept synthetic pixels are "
                                              "pasted onto real images (e.g. the thin classes)")
    paste_probability: float = field(0.5, range=PROBABILITY,
                                     help="paste recipe: chance a real draw gets a synthetic sample's pixels pasted")
    paste_from: str = field("pool", range=Range(choices=("same-mask", "pool", "real", "pool+real")),
                            help="paste recipe: pool (any synthetic sample: new objects where its mask has them), "
                                 "same-mask (a sample of the drawn real mask: new looks for the objects it has), "
                                 "real (another real training image, no --synthetic: the control without "
                                 "synthetic data) or pool+real (any synthetic sample or real training image, "
                                 "uniformly: the synthetic set on top of copy-paste from real images)")
    pretrain_iterations: int = field(0, range=Range(0, MAX_ITERATIONS),
                                     help="pretrain-finetune: synthetic-stage iterations (--iterations is the real stage)")
    init_checkpoint: str | None = field(None, help="start from this segsynth checkpoint's weights")
    iterations: int = field(2000, range=ITERATIONS, help="training iterations")
    batch_size: int = field(8, range=BATCH, help="images per iteration per process")
    crop: list[int] = field([], range=CROP, help="crop H,W (default: the first training image's size)")
    base_size: list[int] = field([], range=CROP,
                                 help="H,W that random resize ratios 0.5-2.0 refer to (default: first image's size)")
    scale_range: list[float] = field([0.5, 2.0], range=Range(0.05, 20.0, lengths=(2,), shape="low, high ratio"),
                                     help="random resize ratio range")
    lr: float = field(6e-4, range=POSITIVE, help="peak learning rate (AdamW)")
    weight_decay: float = field(0.01, range=Range(0.0, 1.0), help="AdamW weight decay")
    warmup: int = field(100, range=COUNT, help="linear warm-up iterations")
    poly_power: float = field(1.0, range=Range(0.0, 10.0), help="poly decay power after warm-up")
    seed: int = field(0, range=SEED, help="run seed")
    cache_gb: float = field(2.0, range=Range(0.0, 4096.0),
                            help="GiB of decoded training samples kept in memory across epochs (0: none)")
    workers: int = field(1, range=Range(0, 256), help="data loader worker processes per training process")
    save_every: int = field(500, range=EVERY, help="save a resumable checkpoint every N iterations")
    eval_every: int = field(0, range=Range(0, MAX_ITERATIONS),
                            help="evaluate on --eval-split every N iterations (0: only at the end)")
    eval_split: str = field("val", help="split evaluated during and after training ('' to skip)")
    eval_size: list[int] = field([], range=SIZE, help="inference size H,W for evaluation (default: native)")
    resume: bool = field(False, help="continue from OUT/checkpoint if it exists")
    device: str = field("auto", range=DEVICE, help="auto, cpu or cuda")
    log_every: int = field(20, range=EVERY, help="write a metrics.jsonl line every N iterations")
    loss: str = field("ce", range=Range(choices=("ce", "ce-ignore-unknown", "reliable")),
                      help="ce (cross-entropy, per-pixel weights; Mask2Former: its set-prediction loss), "
                           "ce-ignore-unknown (the same; Mask2Former's class term also leaves queries whose masks "
                           "lie on ignore pixels unjudged, instead of telling them 'no object') or reliable (per "
                           "predicted class, only the most confident share of pixels in full: training on noisy "
                           "pseudo-masks, Attn2mask)")
    reliable_share: float = field(0.5, range=Range(0.0, 1.0, low_open=True),
                                  help="loss reliable: share of each predicted class's pixels trusted in full")
    unreliable_weight: float = field(0.0, range=PROBABILITY,
                                     help="loss reliable: weight of the other pixels (0: dropped)")

    __cross_checks__ = (_ordered_pair("scale_range"),)


@config_class
class EvalConfig:
    checkpoint: str = field(help="checkpoint folder (a `segsynth train --out` folder)")
    data: str = field(help="dataset spec, e.g. camvid:PATH or toy")
    split: str = field("val", help="split to evaluate (train, val, test, ...)")
    out: str | None = field(None, help="write metrics JSON here (default: CHECKPOINT/metrics_<split>.json)")
    size: list[int] = field([], range=SIZE, help="inference size H,W (default: each image's own size)")
    batch_size: int = field(8, range=BATCH, help="images per forward pass")
    device: str = field("auto", range=DEVICE, help="auto, cpu or cuda")


@config_class
class StatsConfig:
    segmenter: str = field(help="segmenter checkpoint trained on the real data (a `segsynth train --out` folder)")
    out: str = field(help="class statistics JSON to write")
    data: str | None = field(None, help="real dataset spec (default: the one the segmenter was trained on)")
    split: str = field("train", help="split whose pixels define L̄_c")
    batch_size: int = field(8, range=BATCH, help="images per forward pass")
    size: list[int] = field([], range=SIZE,
                            help="inference size H,W (default: each image's own); use the size the segmenter "
                                 "sees synthetic images at, so real and synthetic losses compare")
    device: str = field("auto", range=DEVICE, help="auto, cpu or cuda")


# --- prompt augmentation (methods/attn2mask/prompts.py) ---------------------------------------------
# One definition of each field, used by the settings section (PromptAugmentationConfig: the
# `prompt_augmentation` key of plan and train-text-generator) and by the `segsynth prompts` verb.
DEFAULT_TEMPLATES = ["a photo of {classes}", "a picture of {classes}", "an image of {classes}",
                     "a photograph of {classes}", "a scene with {classes}"]
_AUGMENTATION_FIELDS = {
    "templates": dict(default=DEFAULT_TEMPLATES,
                      range=Range(pattern=r"[^{}]*\{classes\}[^{}]*", pattern_hint="a text with {classes} once",
                                  lengths=tuple(range(1, 65))),
                      help="prompt templates, each with {classes} once (filled with the class words, ', '-joined); "
                           "a prompt's template is a seeded choice"),
    "synonyms": dict(default=True, help="add WordNet synonyms of each class name (its first noun senses' lemmas)"),
    "hyponyms": dict(default=True, help="add WordNet hyponyms of each class name (kinds of it: car -> sedan, jeep)"),
    "per_class": dict(default=6, range=Range(0, 1000),
                      help="words per class at most: its own name and the --words file's first, then WordNet "
                           "synonyms, then a seeded choice of hyponyms (0: every word found)"),
    "min_count": dict(default=1, range=Range(0, 10**6),
                      help="a WordNet synonym or hyponym needs this many uses in WordNet's sense-tagged corpus "
                           "(SemCor), which keeps rare words out (car: 'machine' has 0; 0 keeps every lemma)"),
    "senses": dict(default=1, range=Range(1, 100),
                   help="how many of a class name's WordNet noun senses (most frequent first) give words"),
    "words": dict(default=None, help="YAML/JSON file {class: [words]} (or {class: {words: [...], synset: "
                                     "sidewalk.n.01}}) of extra words per class, kept before WordNet's; "
                                     "'synset' replaces the WordNet sense looked up from the class name"),
    "seed": dict(default=0, range=SEED, help="seed of every choice (hyponyms, templates, each prompt's words)"),
}


def _prompt_augmentation(values: dict, source: str) -> str | None:
    """The prompt_augmentation section holds PromptAugmentationConfig keys, each in its range."""
    where = "--prompt-augmentation" if source == "command line" else f"{source}: key 'prompt_augmentation'"
    section = values["prompt_augmentation"] or {}
    check_values(PromptAugmentationConfig, coerce_values(PromptAugmentationConfig, section, where), where)
    return None


@config_class
class PromptAugmentationConfig:
    """Which words and templates an augmented class prompt may use (methods/attn2mask/prompts.py)."""

    templates: list[str] = field(**_AUGMENTATION_FIELDS["templates"])
    synonyms: bool = field(**_AUGMENTATION_FIELDS["synonyms"])
    hyponyms: bool = field(**_AUGMENTATION_FIELDS["hyponyms"])
    per_class: int = field(**_AUGMENTATION_FIELDS["per_class"])
    min_count: int = field(**_AUGMENTATION_FIELDS["min_count"])
    senses: int = field(**_AUGMENTATION_FIELDS["senses"])
    words: str | None = field(**_AUGMENTATION_FIELDS["words"])
    seed: int = field(**_AUGMENTATION_FIELDS["seed"])


@config_class
class PromptsConfig:
    """`segsynth prompts`: the words and prompts each class of a dataset gets under prompt augmentation."""

    data: str = field(help="dataset spec whose classes are prompted, e.g. camvid:PATH")
    out: str | None = field(None, help="JSON file to write the lists to (the resolved config beside it); "
                                       "default: print only")
    templates: list[str] = field(**_AUGMENTATION_FIELDS["templates"])
    synonyms: bool = field(**_AUGMENTATION_FIELDS["synonyms"])
    hyponyms: bool = field(**_AUGMENTATION_FIELDS["hyponyms"])
    per_class: int = field(**_AUGMENTATION_FIELDS["per_class"])
    min_count: int = field(**_AUGMENTATION_FIELDS["min_count"])
    senses: int = field(**_AUGMENTATION_FIELDS["senses"])
    words: str | None = field(**_AUGMENTATION_FIELDS["words"])
    seed: int = field(**_AUGMENTATION_FIELDS["seed"])


@config_class
class PlanConfig:
    data: str = field(help="dataset spec whose masks are planned (text plan: whose mask ids the captions use), "
                           "e.g. camvid:PATH or synthetic-raw:DIR")
    out: str = field(help="plan file to write (JSONL)")
    split: str = field("train", help="split whose masks (or captions) are planned")
    uniform: int = field(0, range=PER_ENTRY, help="uniform plan: K synthetic images for every mask")
    limit: int = field(0, range=COUNT, help="plan only the first N masks of the split (0: all), for smoke runs")
    seed: int = field(0, range=SEED, help="first seed; each sample gets the next one, so seeds are distinct")
    hardness: bool = field(False, help="hardness-aware plan (FreeMask); needs --stats")
    stats: str | None = field(None, help="hardness plan: class-stats JSON from `segsynth stats` (selects the hardness "
                                         "plan, or the targeted plan with --targeted)")
    targeted: bool = field(False, help="class-targeted plan (needs --stats): the budget split over classes by their "
                                       "mean_loss weight, each class's share over the masks showing it by how much "
                                       "of the mask it covers, at most Nmax per mask (methods/freemask/targeted.py)")
    class_crop: float = field(0.0, range=Range(0.0, 1.0),
                              help="targeted plan: render each class's images from the window of this fraction of "
                                   "each side of the mask that holds the most of the class (class-centred crops; "
                                   "0: whole masks)")
    nmax: int = field(20, range=Range(1, MAX_PER_ENTRY),
                      help="hardness plan: the hardest mask gets Nmax images, the easiest 1 (targeted: the cap)")
    budget: int = field(0, range=Range(0, MAX_PLANNED),
                        help="hardness plan: scale k so the plan renders exactly this many images in all "
                             "(targeted: the images in all, default one per mask)")
    captions: str | None = field(None, help="text plan: captions file (JSON {mask id: caption} or JSONL, e.g. from "
                                            "`segsynth captions`) whose captions become text requests")
    per_caption: int = field(0, range=PER_ENTRY, help="text plan: N seeds (samples) per caption")
    class_prompts: int = field(0, range=PER_ENTRY,
                               help="text plan: N images for each real image's class set, prompted 'a photo of "
                                    "road, car' (image-level labels only), for text -> image generators")
    augment_prompts: bool = field(False, help="class-prompt plan: one entry per sample, its prompt drawn from the "
                                              "templates and each class's words (prompt augmentation: synonyms, "
                                              "hyponyms, --words lists), its class_words naming the words drawn")
    prompt_augmentation: dict = field({}, help="PromptAugmentationConfig keys for --augment-prompts, e.g. "
                                               "per_class=4 words=camvid_words.yaml (see `segsynth prompts`)")

    __cross_checks__ = (_prompt_augmentation,)


@config_class
class TrainGeneratorConfig:
    data: str = field(help="dataset spec whose (image, mask) pairs the generator learns, e.g. camvid:PATH")
    out: str = field(help="output folder: a generator (load it with --generator builtin:OUT, latent:OUT or "
                          "text2mask-sd:OUT)")
    kind: str = field("builtin", range=Range(choices=GENERATOR_KIND_NAMES),
                      help="what to train: builtin (the CPU mask -> image diffusion model on 2x2-packed pixels), "
                           "latent (a mask -> image diffusion model on the latents of a frozen pretrained "
                           "--autoencoder: sharp images at 8x less compute) or text2mask-sd (fine-tune a "
                           "diffusers SD 1.x/2.x or SDXL text-to-image model from --base on (caption, "
                           "colour-coded mask) pairs: SegGen's text -> mask)")
    split: str = field("train", help="split to train on")
    size: list[int] = field([], range=Range(8, MAX_GENERATOR_SIDE, lengths=(0, 1, 2), shape="H,W or one number for a "
                                                                                  "square; empty: the kind's default"),
                            help="working resolution H,W (default: builtin 96,128, each a multiple of "
                                 "2*2^(levels-1); latent 192,256, each a multiple of 8*2^(levels-1); "
                                 "text2mask-sd the base model's own size, e.g. 512,512)")
    channels: list[int] = field([], range=Range(8, 4096, multiple=8, lengths=tuple(range(0, 7)),
                                                shape="one width per UNet level; empty: the kind's preset"),
                                help="builtin, latent: UNet widths per level (one level per entry; default: "
                                     "the CPU preset (builtin 32,64,128; latent 64,128,256) unless a GPU "
                                     "is present (builtin 64,128,256; latent 128,256,512))")
    layers_per_block: int | None = field(None, range=Range(1, 8),
                                         help="builtin, latent: ResNet blocks per UNet level (default: 1 on CPU, "
                                              "2 on GPU)")
    attention: bool = field(True, help="builtin, latent: self-attention at the lowest UNet level")
    autoencoder: str | None = field(None, help="latent: the frozen pretrained autoencoder the model works in: "
                                               "taesd:DIR (NAME_encoder.pth + NAME_decoder.pth, e.g. "
                                               "taesd:../shared/weights/taef2) or diffusers:ID_OR_DIR "
                                               "(AutoencoderKL / AutoencoderTiny, hub id or folder); nothing is "
                                               "downloaded for taesd")
    cached_crops: int = field(0, range=Range(0, 64),
                              help="latent: random rescaled crops (each side >= --crop-scale) encoded per training "
                                   "image besides the whole image, once, into OUT/latents.safetensors (the "
                                   "autoencoder is frozen); each also flipped with --flip")
    base: str | None = field(None, help="text2mask-sd: the text-to-image model to fine-tune, a hub id or diffusers "
                                        "folder, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 or "
                                        "stabilityai/stable-diffusion-xl-base-1.0")
    prompts: str = field("classes", help="text2mask-sd: 'classes' ('a photo of sky, road, car') or a captions file "
                                         "with a caption per training mask (`segsynth captions`: JSONL {\"id\", "
                                         "\"caption\"} lines, or JSON {id: caption})")
    palette: str = field("separated", help="text2mask-sd: colours the masks are drawn in: separated (maximally far "
                                           "apart, SegGen), dataset, or a JSON file {class: [r, g, b]}; stored "
                                           "with the model, which decodes by it")
    # the default is methods.seggen.colour.MAX_DISTANCE (this module imports no numpy)
    decode_max_distance: float = field(64.0, range=Range(0.0, 442.0, low_open=True),
                                       help="text2mask-sd: a generated pixel farther than this (RGB, 0..441) "
                                            "from every palette colour decodes to ignore; stored with the model")
    lora_rank: int = field(0, range=Range(0, 1024),
                           help="text2mask-sd: 0 fine-tunes the whole UNet; N > 0 trains rank-N LoRA adapters on "
                                "its attention projections (peft), merged into the saved UNet")
    cond_dropout: float | None = field(None, range=Range(0.0, 1.0, high_open=True),
                                       help="probability of training a sample without its condition, for "
                                            "classifier-free guidance (builtin, latent: the mask blanked; "
                                            "text2mask-sd: the empty prompt); default: builtin and latent 0 "
                                            "(off), text2mask-sd 0.1")
    guidance: float | None = field(None, range=GUIDANCE,
                                   help="default classifier-free guidance scale stored with the model (1: off; "
                                        "builtin and latent need --cond-dropout > 0 for another); default: "
                                        "builtin and latent 1, text2mask-sd 5")
    mixed_precision: str = field("auto", range=Range(choices=("auto", "no", "fp16", "bf16")),
                                 help="text2mask-sd: auto (bf16 on a GPU that has it, else fp16 on GPU, "
                                      "none on CPU), no, fp16 or bf16: autocast for the UNet, frozen parts "
                                      "held in that type")
    gradient_checkpointing: bool = field(False, help="text2mask-sd: recompute UNet activations in the backward pass "
                                                     "(less memory, ~30% slower)")
    resume: bool = field(False, help="continue from OUT/training_state if it exists (a larger --iterations "
                                     "trains a finished model further)")
    iterations: int = field(4000, range=ITERATIONS, help="training iterations")
    max_minutes: float = field(0.0, range=MINUTES,
                               help="stop after this many minutes of training, the LR schedule shortened to fit; a resumed "
                                    "run counts the minutes it trained before (0: no limit)")
    batch_size: int = field(16, range=BATCH, help="images per iteration (per process under torchrun)")
    lr: float | None = field(None, range=POSITIVE,
                             help="peak learning rate (AdamW, linear warm-up then cosine decay; default: "
                                  "builtin 6e-4, latent 3e-4, text2mask-sd 1e-5, or 1e-4 with --lora-rank)")
    warmup: int = field(100, range=COUNT, help="warm-up iterations")
    ema_decay: float = field(0.9995, range=Range(0.0, 1.0, high_open=True),
                             help="largest EMA decay (EMA warm-up ramps towards it; text2mask-sd: 0 = no EMA)")
    min_snr_gamma: float = field(5.0, range=Range(0.0, 1000.0), help="min-SNR loss weighting gamma (0: plain MSE)")
    crop_scale: float = field(0.7, range=Range(0.0, 1.0, low_open=True),
                              help="random crops cover this fraction of each side or more, then resize (latent: "
                                   "the --cached-crops)")
    flip: bool = field(True, help="random horizontal flips")
    sample_steps: int = field(20, range=STEPS, help="default sampling steps stored with the model")
    sample_scheduler: str = field("dpm++", range=SCHEDULER, help="default sampling scheduler stored with the model")
    seed: int = field(0, range=SEED, help="run seed")
    save_every: int = field(500, range=EVERY, help="write the (EMA) model and the resumable training state every N "
                                                   "iterations, so a kill loses little")
    keep_every: int = field(0, range=Range(0, 10_000_000),
                            help="builtin, latent: also keep the (EMA) model of every Nth iteration, a multiple of "
                                 "--save-every, in OUT/snapshots/it<N> (each opens as a generator: a quality-vs-"
                                 "iterations curve from one run; 0: none)")
    log_every: int = field(50, range=EVERY, help="write a OUT/train_log.jsonl line every N iterations")
    device: str = field("auto", range=DEVICE, help="auto, cpu or cuda")

    __cross_checks__ = (_size_fits_unet, _keep_every_fits_saves)


# train-generator kinds. "keys": the kind-specific keys this kind reads (one another kind reads but this one
# does not, set away from its default, is an error); "defaults": values for the keys left unset, on any
# device; "cpu" / "gpu": the size and width presets for keys still unset, by whether a GPU is present, so a
# run without a config fits the machine (`resolve_generator_kind`).
UNET_KEYS = ("channels", "layers_per_block", "attention")
GENERATOR_KINDS = {
    "builtin": {"keys": UNET_KEYS + ("crop_scale",),
                "defaults": {"size": [96, 128], "lr": 6e-4, "cond_dropout": 0.0, "guidance": 1.0},
                "cpu": {"channels": [32, 64, 128], "layers_per_block": 1},
                "gpu": {"channels": [64, 128, 256], "layers_per_block": 2}},
    "latent": {"keys": UNET_KEYS + ("autoencoder", "cached_crops", "crop_scale"),
               "defaults": {"lr": 3e-4, "cond_dropout": 0.0, "guidance": 1.0},
               "cpu": {"size": [192, 256], "channels": [64, 128, 256], "layers_per_block": 1},
               "gpu": {"size": [192, 256], "channels": [128, 256, 512], "layers_per_block": 2}},
    "text2mask-sd": {"keys": ("base", "prompts", "palette", "decode_max_distance", "lora_rank", "mixed_precision",
                              "gradient_checkpointing", "crop_scale"),
                     "defaults": {"lr": 1e-5, "cond_dropout": 0.1, "guidance": 5.0}},
}
LORA_LR = 1e-4  # text2mask-sd's default learning rate with --lora-rank (adapters start at zero and need more)


def resolve_generator_kind(config: "TrainGeneratorConfig", gpu: bool = False) -> "TrainGeneratorConfig":
    """The config with its kind checked, keys the kind does not read refused unless left at their defaults,
    and the kind's defaults filled in for the keys left unset (size, widths, lr, ...): the GPU preset when
    `gpu`, else the CPU one."""
    from dataclasses import MISSING, fields, replace

    from segsynth.io import SegsynthError

    if config.kind not in GENERATOR_KINDS:
        raise SegsynthError(f"unknown generator kind {config.kind!r}; options: {', '.join(GENERATOR_KINDS)}")
    defaults = {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default)
                for f in fields(config) if not (f.default is MISSING and f.default_factory is MISSING)}
    entry = GENERATOR_KINDS[config.kind]
    others = {name for kind, other in GENERATOR_KINDS.items() if kind != config.kind for name in other["keys"]}
    foreign = sorted(name for name in others - set(entry["keys"]) if getattr(config, name) != defaults[name])
    if foreign:
        readers = sorted(kind for kind, other in GENERATOR_KINDS.items() if set(foreign) & set(other["keys"]))
        raise SegsynthError(f"train-generator --kind {config.kind} takes no {', '.join('--' + n.replace('_', '-') for n in foreign)} "
                            f"(keys of kind(s) {', '.join(readers)}); leave them out")
    preset = entry.get("gpu" if gpu else "cpu", {})
    filled = {key: value for key, value in {**entry["defaults"], **preset}.items()
              if getattr(config, key) in (None, [])}
    if config.kind == "text2mask-sd" and config.lr is None and config.lora_rank > 0:
        filled["lr"] = LORA_LR
    return replace(config, **filled)


def preset_keys(config: "TrainGeneratorConfig", gpu: bool) -> dict:
    """The size and width keys `resolve_generator_kind` would fill from the CPU / GPU preset (empty when the
    config sets them all): what `train-generator` reports choosing for the machine."""
    entry = GENERATOR_KINDS.get(config.kind, {})
    preset = {**{k: v for k, v in entry.get("defaults", {}).items() if k == "size"}, **entry.get("gpu" if gpu else "cpu", {})}
    return {key: value for key, value in preset.items() if getattr(config, key) in (None, [])}


@config_class
class TrainTextGeneratorConfig:
    data: str = field(help="dataset spec whose images (or masks) the generator learns, e.g. camvid:PATH")
    out: str = field(help="output folder: a builtin text generator")
    split: str = field("train", help="split to train on")
    target: str = field("image", range=Range(choices=("image", "colour-mask")),
                        help="what is generated: image (real photos, image-level labels only) or "
                             "colour-mask (the mask drawn in --palette colours: SegGen's text -> mask)")
    palette: str = field("separated", help="colour-mask target: class colours: separated (maximally far apart, "
                                           "SegGen), dataset (the dataset's own) or a JSON file {class: [r, g, b]}; "
                                           "stored with the model, which decodes by it")
    # the default is methods.seggen.colour.MAX_DISTANCE (this module imports no numpy)
    decode_max_distance: float = field(64.0, range=Range(0.0, 442.0, low_open=True),
                                       help="colour-mask target: a generated pixel farther than this (RGB, "
                                            "0..441) from every palette colour decodes to ignore; stored with "
                                            "the model")
    prompts: str = field("classes", help="'classes' ('a photo of sky, road, car' from the classes present) or a "
                                         "captions file with a caption per training sample (`segsynth captions`: "
                                         "JSONL {\"id\", \"caption\"} lines, or JSON {id: caption})")
    size: list[int] = field([96, 128], range=GENERATOR_SIZE,
                            help="working resolution H,W (each a multiple of 2*2^(levels-1))")
    channels: list[int] = field([32, 64, 128], range=CHANNELS,
                                help="UNet widths per level; cross-attention on all but the first")
    layers_per_block: int = field(2, range=Range(1, 8), help="ResNet blocks per UNet level")
    text_width: int = field(64, range=Range(8, 4096), help="text encoder width = the UNet's cross-attention dim")
    text_layers: int = field(2, range=Range(0, 48),
                             help="text encoder transformer layers (0: each token its own embedding, no context)")
    keys: str = field("all", range=Range(choices=("all", "class-words")),
                      help="which prompt tokens the UNet's cross-attention may attend to: all, or class-words "
                           "(the class names and <bos>, which stands for 'none of them'): with class words "
                           "only, each pixel's attention is a competition between the classes named, which "
                           "is what an attention pseudo-mask reads; stored with the model")
    max_length: int = field(0, range=Range(3, 1024, also=(0,)),
                            help="tokens per prompt with <bos>/<eos> (0: the longest training prompt's, rounded up to 8)")
    iterations: int = field(4000, range=ITERATIONS, help="training iterations")
    max_minutes: float = field(0.0, range=MINUTES,
                               help="stop after this many minutes of training, the LR schedule shortened to fit; a resumed "
                                    "run counts the minutes it trained before (0: no limit)")
    batch_size: int = field(16, range=BATCH, help="images per iteration")
    lr: float = field(5e-4, range=POSITIVE, help="peak learning rate (AdamW, linear warm-up then cosine decay)")
    warmup: int = field(100, range=COUNT, help="warm-up iterations")
    ema_decay: float = field(0.9995, range=Range(0.0, 1.0, high_open=True),
                             help="largest EMA decay (EMA warm-up ramps towards it)")
    min_snr_gamma: float = field(5.0, range=Range(0.0, 1000.0),
                                 help="Min-SNR-style cap on the x0-loss weight SNR+1 of nearly clean steps (0: plain v-MSE)")
    cond_dropout: float = field(0.1, range=Range(0.0, 1.0, high_open=True),
                                help="probability of training on the empty prompt (for classifier-free guidance)")
    flip: bool = field(True, help="random horizontal flips")
    sample_steps: int = field(20, range=STEPS, help="default sampling steps stored with the model")
    sample_scheduler: str = field("dpm++", range=SCHEDULER, help="default sampling scheduler stored with the model")
    guidance: float = field(3.0, range=GUIDANCE, help="default classifier-free guidance scale stored with the model")
    seed: int = field(0, range=SEED, help="run seed")
    save_every: int = field(500, range=EVERY, help="write the model and its training state every N iterations")
    log_every: int = field(50, range=EVERY, help="write a OUT/train_log.jsonl line every N iterations")
    device: str = field("auto", range=DEVICE, help="auto, cpu or cuda")
    resume: bool = field(False, help="continue from OUT/training_state if it exists")
    augment_prompts: bool = field(False, help="prompts classes: train on prompts drawn from templates and each "
                                              "class's words (prompt augmentation, `segsynth prompts`), so the "
                                              "generator knows every word an augmented plan uses")
    prompt_augmentation: dict = field({}, help="PromptAugmentationConfig keys for --augment-prompts (give the plan "
                                               "the same ones), e.g. per_class=4 words=camvid_words.yaml")

    __cross_checks__ = (_two_levels, _size_fits_unet, _prompt_augmentation)


@config_class
class CaptionConfig:
    data: str = field(help="real dataset spec whose masks get captions, e.g. camvid:PATH")
    out: str = field(help="output folder: captions.jsonl and captions.config.yaml are written there")
    split: str = field("train", help="split to caption")
    captioner: str = field("mask", help="mask (describe each mask's classes and their places), file (a given "
                                        "--captions file), or a BLIP-2 hub id / folder captioning the images, "
                                        "e.g. Salesforce/blip2-opt-2.7b")
    captions: str | None = field(None, help="captions file for --captioner file: JSON {mask id: caption} or JSONL")
    min_fraction: float = field(0.01, range=Range(0.0, 1.0, high_open=True),
                                help="mask captions leave out classes under this share of the pixels")
    batch_size: int = field(8, range=BATCH, help="images per BLIP-2 call")
    max_new_tokens: int = field(30, range=Range(1, 1024), help="longest BLIP-2 caption, in tokens")
    device: str = field("auto", range=DEVICE, help="auto, cpu or cuda (BLIP-2)")
    dtype: str = field("auto", range=DTYPE, help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16 (BLIP-2)")


NORMALISATIONS = ("max", "min-max")
NORMALISE_AT = ("each-resolution", "combined")
UPSAMPLINGS = ("bilinear", "bicubic")
CONFIDENCES = ("score", "margin", "none")


@config_class
class PseudoMaskConfig:
    """How attention maps become a pseudo label map (methods/attn2mask/pseudo_mask.py: the steps and the
    recipes); the `pseudo_mask_settings` section of synthesize and attention-quality holds its keys."""

    resolutions: list[int] = field([16, 32, 64], range=Range(1, 1024, lengths=tuple(range(1, 9))),
                                   help="cross-attention resolutions (map heights) to average")
    steps: list[int] = field([], range=Range(0, 1000, lengths=(0, 2)),
                             help="[start, stop) denoising steps whose attention is averaged; [] = all "
                                  "(for AttentionCapture(steps=...))")
    refine_power: int = field(0, range=Range(0, 16),
                              help="self-attention refinement power k (scores <- SA^k . scores); 0 = off")
    self_attention_resolution: int = field(32, range=Range(1, 1024),
                                           help="resolution of the self-attention used to refine")
    normalisation: str = field("max", range=Range(choices=NORMALISATIONS),
                               help="per-class scaling to [0, 1]: max (divide by the max) or min-max")
    normalise_at: str = field("combined", range=Range(choices=NORMALISE_AT),
                              help="each-resolution (before averaging, DiffuMask) or combined (after averaging and "
                                   "refining)")
    upsampling: str = field("bicubic", range=Range(choices=UPSAMPLINGS), help="bilinear or bicubic")
    background_threshold: float = field(0.5, range=Range(0.0, 1.0),
                                        help="a pixel whose top class score is below this is background")
    uncertain_band: list[float] = field([], range=Range(0.0, 1.0, lengths=(0, 2)),
                                        help="[low, high): top scores in it are labelled ignore (255); [] = none")
    confidence: str = field("score", range=Range(choices=CONFIDENCES),
                            help="score (the winner's normalised score), margin (distance to the decision) or none "
                                 "(1: no per-pixel weights)")


@config_class
class SynthesizeConfig:
    data: str = field(help="dataset spec the plan's masks come from, e.g. camvid:PATH, or synthetic-raw:DIR for a "
                           "mask set a text -> mask generator made (each record then names its source sample)")
    plan: str = field(help="plan file (JSONL) from `segsynth plan`")
    generator: str = field(help="generator spec: builtin:DIR, controlnet:BASE, controlnet-sdxl:BASE, text2mask:DIR, "
                                "attention:DIR or attention-sd:BASE")
    out: str = field(help="output folder (a folder: dataset); rerun with the same arguments to resume")
    split: str = field("train", help="split the plan's mask ids belong to")
    batch_size: int = field(4, range=BATCH, help="masks per model call (does not change any sample's pixels)")
    steps: int | None = field(None, range=STEPS, help="denoising steps (default: the generator's own)")
    guidance: float | None = field(None, range=GUIDANCE,
                                   help="classifier-free guidance scale (ControlNet: default 7.5, LCM 1.5; builtin "
                                        "and latent: the model's stored scale, 1 = off, another needs a model "
                                        "trained with --cond-dropout > 0)")
    scheduler: str | None = field(None, range=SCHEDULER, help="dpm++, unipc, ddim, euler, or lcm (with --lcm-lora)")
    negative_prompt: str = field("", help="negative prompt (ControlNet)")
    controlnet: str | None = field(None, help="ControlNet hub id or folder, e.g. lllyasviel/control_v11p_sd15_seg")
    controlnet_scale: float = field(1.0, range=Range(0.0, 10.0), help="ControlNet conditioning scale")
    lcm_lora: str | None = field(None, help="LCM-LoRA hub id or folder: fuse it and sample with LCM in 4-8 steps")
    colour_map: str = field("ade20k", help="mask colours for the ControlNet: ade20k, dataset, or a JSON file")
    captions: str | None = field(None, help="per-mask captions (JSON {id: text} or JSONL) instead of class-name prompts")
    resolution: list[int] = field([], range=Range(8, MAX_GENERATOR_SIDE, lengths=(0, 1, 2),
                                                 shape="H,W or one number for a square; empty: the generator's own"),
                                  help="ControlNet working size H,W (default: 512 short side; 1024 for SDXL)")
    dtype: str = field("auto", range=DTYPE, help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16")
    device: str = field("auto", range=DEVICE, help="auto, cpu or cuda")
    progress: bool = field(True, help="show a progress bar")
    pseudo_mask: str = field("dataset-diffusion", range=Range(choices=PSEUDO_MASK_PRESETS),
                             help="attention generators: pseudo-mask recipe (diffumask, "
                                  "dataset-diffusion or daam; methods/attn2mask/pseudo_mask.py)")
    pseudo_mask_settings: dict = field({}, help="attention generators: PseudoMaskConfig keys over the recipe, e.g. "
                                                "resolutions=[16,8] background_threshold=0.4")
    lora: str | None = field(None, help="a LoRA adapter folder from `segsynth adapt` made for this generator "
                                        "(attention, builtin, attention-sd, controlnet), merged into its UNet")
    lora_scale: float = field(1.0, range=Range(0.0, 10.0), help="--lora: scale of the adapter's update (0: off, 1: as "
                                                                "trained)")
    strength: float | None = field(None, range=Range(0.0, 1.0, low_open=True),
                                   help="builtin and latent: start each sample from its mask's own image noised to "
                                        "this share of the schedule and run that share of the steps (SDEdit): small "
                                        "values keep the real image's layout and colours; default: from pure noise")

    __cross_checks__ = (_pseudo_mask_settings,)


@config_class
class AdaptConfig:
    """`segsynth adapt`: a LoRA adapter that moves a generator towards a target domain, from unlabeled images."""

    generator: str = field(help="generator spec whose UNet is adapted: attention:DIR (the builtin text -> image "
                                "model), builtin:DIR (mask -> image), attention-sd:BASE, controlnet:BASE or "
                                "controlnet-sdxl:BASE (a diffusers SD / SDXL model: its UNet)")
    images: str = field(help="the target domain's images: a folder of images, or a dataset spec whose --split images "
                             "are used (labels never read), e.g. 'camvid:PATH?include=0001TP'")
    out: str = field(help="output folder: the adapter (adapter.safetensors + adapter.json); load it with "
                          "synthesize --lora OUT")
    split: str = field("train", help="--images given as a dataset spec: the split whose images are used")
    prompt: str = field("", help="what every target image is conditioned on: '' (the unconditional input, which the "
                                 "generator learned from its prompt dropout; the images have no labels), or a domain "
                                 "prompt (builtin text generator: words of its vocabulary only). Mask -> image: the "
                                 "all-ignore mask, always")
    preserve_classes: float = field(1.0, range=Range(0.0, 100.0),
                                    help="builtin text generator: weight of the term that keeps each class prompt's "
                                         "prediction minus the unconditional one as the base model has it (class "
                                         "prompts drawn from its classes), so the adapter moves the domain, not what "
                                         "tells the classes apart (0: off)")
    rank: int = field(8, range=Range(1, 1024), help="LoRA rank r of every adapted layer")
    alpha: float | None = field(None, range=POSITIVE, help="LoRA alpha: the update is scaled by alpha / rank "
                                                           "(default: alpha = rank, scale 1)")
    dropout: float = field(0.0, range=Range(0.0, 1.0, high_open=True), help="dropout on the LoRA input while training")
    target_modules: list[str] = field(["to_q", "to_k", "to_v", "to_out.0"],
                                      range=Range(lengths=tuple(range(1, 65)), pattern=r"[A-Za-z0-9_.]+",
                                                  pattern_hint="a layer name or name suffix such as to_q",
                                                  shape="layer name suffixes"),
                                      help="layers that get adapters, by name or name suffix (peft's rule); "
                                           "default: the attention projections, self- and cross-attention")
    iterations: int = field(500, range=ITERATIONS, help="training iterations")
    max_minutes: float = field(0.0, range=MINUTES,
                               help="stop after this many minutes of training, the LR schedule shortened to fit; a resumed "
                                    "run counts the minutes it trained before (0: no limit)")
    batch_size: int = field(8, range=BATCH, help="images per iteration")
    lr: float | None = field(None, range=POSITIVE, help="peak learning rate (AdamW, linear warm-up then cosine decay; "
                                                        "default: 1e-3 for the builtin generators, 1e-4 for diffusers "
                                                        "models)")
    warmup: int = field(20, range=COUNT, help="warm-up iterations")
    size: list[int] = field([], range=Range(8, MAX_GENERATOR_SIDE, lengths=(0, 1, 2),
                                            shape="H,W or one number for a square; empty: the generator's own"),
                            help="working size H,W: the builtin generators' own only; diffusers models any multiple "
                                 "of their size step (default: the UNet's native size)")
    crop_scale: float = field(1.0, range=Range(0.0, 1.0, low_open=True),
                              help="random crops cover this fraction of each side or more (1: whole images, as the "
                                   "builtin text generator was trained), then resize to the working size")
    flip: bool = field(True, help="random horizontal flips")
    mixed_precision: str = field("auto", range=Range(choices=("auto", "no", "fp16", "bf16")),
                                 help="diffusers models: autocast type (auto: bf16 on a GPU that has it, else fp16 on "
                                      "GPU, none on CPU); the frozen UNet is held in it, the adapter in fp32")
    seed: int = field(0, range=SEED, help="run seed")
    save_every: int = field(100, range=EVERY, help="write the adapter and its training state every N iterations")
    log_every: int = field(10, range=EVERY, help="write a OUT/train_log.jsonl line every N iterations")
    resume: bool = field(False, help="continue from OUT/training_state if it exists")
    device: str = field("auto", range=DEVICE, help="auto, cpu or cuda")


@config_class
class AttentionQualityConfig:
    generator: str = field(help="attention generator spec: attention:DIR or attention-sd:BASE")
    data: str = field(help="real dataset spec with labels, e.g. camvid:PATH or toy")
    out: str = field(help="folder for attention_quality.json and attention_quality.md")
    split: str = field("val", help="held-out split whose images are noised and labelled")
    presets: list[str] = field(["diffumask", "dataset-diffusion", "daam"], range=Range(choices=PSEUDO_MASK_PRESETS, lengths=tuple(range(1, 4))),
                               help="pseudo-mask recipes to score")
    pseudo_mask_settings: dict = field({}, help="PseudoMaskConfig keys over every recipe, e.g. resolutions=[16,8]")
    timestep: float = field(0.5, range=Range(0.0, 999.0),
                            help="noise level: a fraction of the training schedule (0-1) or a timestep (> 1)")
    limit: int = field(0, range=COUNT, help="score only the first N images of the split (0: all)")
    seed: int = field(0, range=SEED, help="seed of the noise added to each image (image i uses seed + i)")
    dtype: str = field("auto", range=DTYPE, help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16 (attention-sd)")
    device: str = field("auto", range=DEVICE, help="auto, cpu or cuda")

    __cross_checks__ = (_pseudo_mask_settings,)


@config_class
class FilterConfig:
    synthetic: str = field(help="synthetic set folder (from `segsynth synthesize`)")
    segmenter: str = field(help="segmenter checkpoint trained on the real data")
    stats: str | None = field(None, help="class-stats JSON (default: SEGMENTER/class_stats.json, computed if missing)")
    alpha: float = field(1.25, range=Range(0.0, 100.0, low_open=True),
                         help="ignore a pixel of class c when its loss > alpha * mean real loss of c")
    drop_classes: list[str] = field([], help="class names whose synthetic pixels all become ignore, whatever their "
                                             "loss: learn those classes from real pixels only (on CamVid it did "
                                             "not help bicyclist, and made building, tree and fence 2-4x worse than "
                                             "the generator's pixels did: results/camvid_latent_mask2former.md)")
    class_alphas: dict = field({}, help="alpha per class name over `alpha`, e.g. bicyclist=0.6: stricter for a class "
                                        "whose L̄_c is high, where alpha * L̄_c keeps pixels the judge gives little "
                                        "probability (CamVid bicyclist at 1.25: any above 9 percent)")
    region_classes: list[str] = field([], help="class names judged per object instead of per pixel: each connected "
                                               "region of such a class in a synthetic mask is ignored whole when its "
                                               "mean pixel loss exceeds alpha_c * L̄_c and kept whole otherwise (a "
                                               "rider on a bicycle, whose body the pixel rule drops and whose "
                                               "wheels it keeps)")
    batch_size: int = field(8, range=BATCH, help="images per forward pass")
    lanes: int = field(0, range=Range(0, 64),
                       help="parallel decode+score threads (0: auto: on a CPU, timed on the first batch: one "
                            "lane per core up to 8, each single-threaded, or one lane using every core; 2 on a GPU)")
    device: str = field("auto", range=DEVICE, help="auto, cpu or cuda")


@config_class
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
    size: list[int] = field([], range=SIZE, help="segmenter inference size H,W (default: each image's own)")
    batch_size: int = field(8, range=BATCH, help="images per forward pass")
    grid_rows: int = field(6, range=Range(1, 64), help="rows in mask_quality_grid.png")
    device: str = field("auto", range=DEVICE, help="auto, cpu or cuda")


@config_class
class ReportConfig:
    run: str = field(help="run folder (the --out of `segsynth run`)")
    out: str | None = field(None, help="HTML file to write (default: RUN/report.html)")
    per_class: int = field(2, range=Range(1, 100), help="gallery samples shown per class and synthetic set")
    gallery_classes: int = field(30, range=Range(0, 255),
                                 help="classes a gallery shows at most: those in the most samples (0: all)")
    scan: int = field(400, range=Range(0, 10**8), help="masks read per synthetic set to find each class's samples (0: all)")


@config_class
class ExportConfig:
    data: str = field(help="what to export: a synthetic set folder (filtered masks when it has them), or any "
                           "dataset spec (camvid:PATH, synthetic:DIR, synthetic-raw:DIR, toy ...)")
    out: str = field(help="target folder (refused when it exists and is not empty, unless --overwrite)")
    format: str = field("mmseg", range=Range(choices=("mmseg", "hf")),
                        help="mmseg (img_dir/ann_dir + a config snippet) or hf (an imagefolder dataset "
                             "for datasets.load_dataset)")
    splits: list[str] = field([], help="splits to export (default: every split the data has)")
    val_fraction: float = field(0.1, range=Range(0.0, 1.0, high_open=True),
                                help="data with a train split only (a synthetic set): this share of it, "
                                     "every k-th sample, becomes the val split (0: none)")
    overwrite: bool = field(False, help="replace a target folder that exists and is not empty")
    limit: int = field(0, range=Range(0, 10**9), help="export only the first N samples of each split (0: all)")


@config_class
class RunConfig:
    """`segsynth run`: a method's stages and arms on one dataset. The run's own keys are below; each
    stage section holds keys of that stage's config (TrainConfig, TrainGeneratorConfig, StatsConfig,
    PlanConfig, SynthesizeConfig, FilterConfig, CaptionConfig, TrainTextGeneratorConfig) that every use
    of the stage in the run shares; a method uses the sections of its own stages. What the run decides
    itself (data, out, seeds, recipes, which synthetic sets) is not a section key."""

    method: str = field("freemask", range=Range(choices=METHOD_NAMES),
                        help="method whose stages and arms run: freemask, seggen, attn2mask, or all (the "
                             "three side by side: one segmenter, schedule, seeds and budget; segsynth.run.METHODS)")
    data: str = field("toy:n=240,n_val=80,size=64x80", help="dataset spec (default: the embedded toy dataset)")
    out: str = field("runs/segsynth", help="output folder")
    preset: str = field("default", range=Range(choices=("quick", "default", "demo")),
                        help="quick or default: sizes for toy or real data (any key overrides them); "
                             "demo: the toy data's comparison of `make demo` (--method all)")
    arms: list[str] = field([], help="arms to run (default: the method's main arms; an arm outside them, such as "
                                     "freemask's joint-filtered-targeted, runs when named)")
    seeds: list[int] = field([0, 1], range=Range(0, 2**31 - 1, lengths=tuple(range(1, 33))),
                             help="training seeds per arm")
    eval_split: str = field("val", help="held-out split every arm is evaluated on")
    images_per_mask: int = field(2, range=Range(1, MAX_PER_ENTRY),
                                 help="synthetic budget: images per real training mask; every arm that uses "
                                      "synthetic data gets the same total")
    pretrain_fraction: float = field(0.5, range=Range(0.0, 1.0, low_open=True, high_open=True),
                                     help="pretrain-finetune arms: share of train.iterations on synthetic data")
    generator: str = field("auto", help="mask-to-image generator: auto (the shipped toy generator on toy data, else "
                                        "train one), train, or a spec such as builtin:DIR (attn2mask: auto/train "
                                        "the builtin text generator, attention:DIR or attention-sd:BASE)")
    text_mask_generator: str = field("train", help="seggen: the text -> mask generator of MaskSyn: train (the "
                                                   "built-in one, trained by the run on the captions: section "
                                                   "train_text_generator) or a trained one, text2mask:DIR or "
                                                   "text2mask-sd:DIR (`train-generator --kind text2mask-sd`, GPU)")
    grids: int = field(6, range=Range(1, 64), help="rows in each visual grid")
    parallel: int = field(1, range=Range(1, 64),
                          help="arm trainings run at once, in worker processes that share the CPU threads "
                               "(2 on 2 cores: two one-thread trainings, faster than one after the other for "
                               "small segmenters)")
    device: str = field("auto", range=DEVICE, help="auto, cpu or cuda")
    train: dict = field({}, help="TrainConfig keys for every arm, e.g. model=segformer-small")
    train_generator: dict = field({}, help="TrainGeneratorConfig keys, e.g. max_minutes=20")
    stats: dict = field({}, help="StatsConfig keys (default size: train's eval_size)")
    plan: dict = field({}, help="PlanConfig keys, e.g. nmax=20")
    synthesize: dict = field({}, help="SynthesizeConfig keys, e.g. steps=20")
    filter: dict = field({}, help="FilterConfig keys, e.g. alpha=1.25")
    captions: dict = field({}, help="CaptionConfig keys (SegGen), e.g. captioner=Salesforce/blip2-opt-2.7b")
    train_text_generator: dict = field({}, help="TrainTextGeneratorConfig keys of the built-in text "
                                                "generator: SegGen's text -> mask, Attn2mask's text -> image; "
                                                "e.g. max_minutes=20")
    target_images: str = field("", help="attn2mask: unlabeled images of the target domain (a folder, or a dataset "
                                        "spec whose train images are read, labels never: e.g. "
                                        "'camvid:PATH?include=0001TP'); given, the run adapts its generator to them "
                                        "with LoRA (segsynth adapt) and trains the + LoRA arm")
    adapt: dict = field({}, help="AdaptConfig keys for the + LoRA arm's adapter, e.g. rank=4 iterations=300")
    per_method: dict = field({}, help="method all: keys of one member method over the shared ones: its generator "
                                      "and stage sections but train, e.g. per_method: {seggen: "
                                      "{train_text_generator: {max_minutes: 2}}, attn2mask: {generator: "
                                      "attention-sd:BASE}} (resolved per member in run.config.yaml)")
    # Sweeps and the closed loop (freemask): derived arms added to the run's arms (methods/freemask/variants.py).
    filter_alphas: list[float] = field([], range=Range(0.0, 100.0, lengths=SWEEP_LENGTHS,
                                                       shape="filter thresholds; 0: no filter"),
                                       help="freemask: filter thresholds to compare; each arm on filtered masks gets "
                                            "<arm>-alpha<A> per alpha (its set's images re-filtered at A in a copy "
                                            "<set>-alpha<A>, nothing rendered again) and <arm>-unfiltered for 0 "
                                            "(raw masks); the arm itself is filter.alpha")
    filter_judges: dict = field({}, help="freemask: other segmenters that judge the filter, NAME=DIR (a `segsynth "
                                         "train --out` folder trained on this run's real data): arms "
                                         "<arm>-alpha<A>-<NAME> at every alpha of filter_alphas (or filter.alpha), "
                                         "with that segmenter's own class losses")
    volumes: list[int] = field([], range=Range(1, MAX_PER_ENTRY, lengths=SWEEP_LENGTHS,
                                               shape="synthetic images per real mask"),
                               help="freemask: synthetic volumes K to compare: each synthetic arm gets <arm>-k<K>, "
                                    "trained on the share K / images_per_mask of its set (nested: K=1 within K=2 "
                                    "within ...; rendered once at images_per_mask, which defaults to max K here)")
    volume_iterations: str = field("same", range=Range(choices=("same", "scaled")),
                                   help="volume arms' training length: same (train.iterations for every K) or "
                                        "scaled (train.iterations x K / images_per_mask: as many passes over the "
                                        "data as the full-volume arm)")
    synthetic_shares: list[float] = field([], range=Range(0.0, 1.0, low_open=True, lengths=SWEEP_LENGTHS,
                                                          shape="shares of training draws from synthetic data"),
                                          help="freemask: synthetic shares to compare: each joint arm (half its "
                                               "draws synthetic) gets <arm>-share<P>, trained with the replace "
                                               "recipe from a pool of its sets (a real draw becomes a synthetic "
                                               "one, drawn as the joint arm draws them, with probability P)")
    rounds: int = field(0, range=Range(0, 100),
                        help="freemask closed loop: rounds after the first training (0: off). Round r measures "
                             "what loop_arm's model of round r-1 still fails (loop_signal), re-plans a hardness-aware "
                             "set for it with new seeds, synthesizes and filters it, and trains <loop_arm>-round<r>")
    loop_arm: str = field("joint-filtered-hardness", range=Range(choices=FREEMASK_SYNTHETIC_ARMS),
                          help="closed loop: the arm whose model drives the loop and whose recipe and masks each "
                               "round trains with (must be one of the run's arms)")
    loop_signal: str = field("loss", range=Range(choices=("loss", "iou")),
                             help="closed loop: what plans the next round: loss (the class-wise mean loss L̄_c of "
                                  "the previous round's first-seed model on the real train split, FreeMask's "
                                  "hardness) or iou (1 - its per-class IoU on eval_split, mean over seeds: the "
                                  "held-out split then steers which classes get data)")
    loop_init: str = field("scratch", range=Range(choices=("scratch", "previous")),
                           help="closed loop: each round trains from scratch (default: every round has the same "
                                "iterations, so rounds differ only in their data) or from the previous round's "
                                "checkpoint of the same seed")
    loop_sets: str = field("accumulate", range=Range(choices=("accumulate", "latest")),
                           help="closed loop: round r trains on loop_arm's sets plus every round's set so far "
                                "(accumulate) or on round r's set alone (latest: the same volume every round)")
    loop_planner: str = field("hardness", range=Range(choices=("hardness", "targeted", "targeted-crops")),
                              help="closed loop: how the signal becomes a plan: hardness (FreeMask's mask ranking "
                                   "by mean class weight), targeted (the budget split over classes by weight, "
                                   "then over the masks showing each class: what a failed small class needs) or "
                                   "targeted-crops (targeted, each class's images rendered from a class-centred "
                                   "crop of loop_class_crop x each side of the mask)")
    loop_class_crop: float = field(0.5, range=Range(0.05, 1.0),
                                   help="closed loop, targeted-crops planner: the crop's side as a fraction of the "
                                        "mask's")
    loop_images_per_mask: int = field(0, range=Range(0, MAX_PER_ENTRY),
                                      help="closed loop: synthetic images per real mask each round adds (0: "
                                           "images_per_mask)")

    __cross_checks__ = (_distinct_seeds, _text_mask_generator_spec, _distinct("filter_alphas", "an arm"),
                        _distinct("volumes", "an arm"),
                        _distinct("synthetic_shares", "an arm"), _judge_names)


# Settings sections inside a stage config (a dict field) -> the config whose keys they hold.
SETTINGS_SECTIONS = {"pseudo_mask_settings": PseudoMaskConfig, "prompt_augmentation": PromptAugmentationConfig}

# Run section -> (stage config, keys the run sets itself and a section may not).
RUN_SECTIONS = {
    "train": (TrainConfig, ("data", "out", "recipe", "synthetic", "synthetic_masks", "pretrain_iterations",
                            "init_checkpoint", "seed", "resume", "eval_split", "device")),
    "train_generator": (TrainGeneratorConfig, ("data", "out", "resume", "device")),
    "stats": (StatsConfig, ("segmenter", "out", "data", "device")),
    "plan": (PlanConfig, ("data", "out", "uniform", "hardness", "stats", "targeted", "budget", "seed", "captions",
                          "per_caption", "class_prompts", "augment_prompts")),
    "synthesize": (SynthesizeConfig, ("data", "plan", "generator", "out", "device", "lora")),
    "filter": (FilterConfig, ("synthetic", "segmenter", "stats", "device")),
    "captions": (CaptionConfig, ("data", "out", "split", "device")),
    "train_text_generator": (TrainTextGeneratorConfig, ("data", "out", "target", "prompts", "resume", "device",
                                                        "augment_prompts", "prompt_augmentation")),
    "adapt": (AdaptConfig, ("generator", "images", "out", "resume", "device")),
}
