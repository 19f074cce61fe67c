"""`segsynth synthesize`: plan x generator -> a synthetic set that is itself a `folder:` dataset.

Output folder:

    images/<mask>_s<seed>.png   the generated image, at the generator's working size
    masks/<mask>_s<seed>.png    the conditioning mask at the image's size (nearest), palette PNG
    manifest.jsonl              one record per finished sample (format below)
    classes.json                class names and palette (what `folder:` reads)
    synthesis.json              what made the set: dataset, split, classes, generator identity, plan hash
    synthesize.config.yaml      the resolved config of the last run
    summary.json                the last run's counts and images/s

A manifest record, appended only after both of its files are in place:

    {"id": "<mask>_s<seed>", "source": "<mask>", "seed": 42, "image": "images/...png",
     "mask": "masks/...png", "prompt": "...", "generator": {...}, "steps": 20,
     "guidance": 2.0, "size": [h, w], "seconds": 0.31}

Guarantees, and how:
* Deterministic: every sample's noise comes from its own seed (see
  `segsynth.generators.base`), so batch size, batch composition and the number
  of processes do not change its pixels.
* Resumable and kill-safe: files are written under temporary names and
  renamed; the manifest line comes last. At start, rank 0 merges the
  manifests, drops records whose files are gone and deletes every file no
  record names (the batches a kill cut short), so a rerun skips exactly the
  finished samples and the folder never holds a half-written or orphan file
  a reader would take.
* Distributed: under torchrun each rank renders its shard of the unfinished
  samples and appends to manifest.rank<R>.jsonl; rank 0 merges them into
  manifest.jsonl (in plan order) at the end, or at the next start after a kill.
* Fast: a loader thread reads masks and prepares batches, a writer thread
  encodes PNGs and appends the manifest, and the main thread only runs the
  model, so the pipeline's own work hides behind the denoising loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from segsynth import __version__
from segsynth.config import field, save_config
from segsynth.cpu import lower_this_thread_priority
from segsynth.data import open_dataset
from segsynth.data.base import Split
from segsynth.data.validate import quick_check
from segsynth.distributed import all_reduce_sum, barrier, init_distributed, shard
from segsynth.generators import Generator, GeneratorSettings, open_generator
from segsynth.generators.base import resize_mask
from segsynth.io import SegsynthError, append_text, atomic_write_json, atomic_write_png, atomic_write_text, read_json, read_jsonl
from segsynth.plan import PlanEntry, read_plan

MANIFEST = "manifest.jsonl"
STATE = "synthesis.json"
FORMAT = "segsynth-synthetic-set/1"
QUEUE_DEPTH = 2  # batches prepared ahead of the model, and batches waiting for the writer


@dataclass
class SynthesizeConfig:
    data: str = field(help="real dataset spec the plan's masks come from, e.g. camvid:PATH")
    plan: str = field(help="plan file (JSONL) from `segsynth plan`")
    generator: str = field(help="generator spec: builtin:DIR, controlnet:BASE or controlnet-sdxl:BASE")
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


@dataclass(frozen=True)
class PlannedSample:
    source: str
    seed: int
    index: int  # position of the source mask in the split

    @property
    def id(self) -> str:
        return f"{self.source}_s{self.seed}"


def synthesize(config: SynthesizeConfig) -> dict:
    """Render every planned sample not yet in `config.out`; returns the run summary."""
    info = init_distributed(config.device)
    out = Path(config.out)

    # 1. Everything that needs no model: dataset, plan, their agreement, and the output folder's contents.
    if config.batch_size < 1:
        raise SegsynthError(f"--batch-size must be >= 1, got {config.batch_size}")
    dataset = open_dataset(config.data)
    split = dataset.split(config.split)
    plan = read_plan(config.plan)
    samples = planned_samples(plan, split, config.plan)
    quick_check(dataset, [config.split])
    state = read_state(out)
    finished = read_manifests(out)
    check_same_plan(out, finished, samples, config.plan)

    # 2. The generator: its files, classes and per-mask inputs are checked as it opens, before any compute.
    generator = open_generator(config.generator, generator_settings(config, info.device))
    generator.check_dataset(dataset.classes, dataset.palette)
    generator.check_ids([entry.id for entry in plan])
    identity = generator.identity()
    check_same_generator(out, state, finished, identity, dataset.classes, config.split)

    # 3. Rank 0 locks the folder against a second run, makes it consistent (one manifest, no orphans)
    #    and records what makes this set.
    with lock_output(out) if info.is_main else contextlib.nullcontext():  # released however this exits
        if info.is_main:
            recover_output(out, samples)
            atomic_write_json(out / "classes.json", {"classes": list(dataset.classes),
                                                     "palette": [list(c) for c in dataset.palette], "ignore_index": 255})
            atomic_write_json(out / STATE, {"format": FORMAT, "segsynth_version": __version__, "data": config.data,
                                            "split": config.split, "classes": list(dataset.classes), "generator": identity,
                                            "plan": str(config.plan), "plan_sha256": _sha256(config.plan),
                                            "samples": len(samples)})
            save_config(config, out / "synthesize.config.yaml")
        barrier()

        # 4. This rank's share of the unfinished samples.
        done_ids = set(read_manifests(out))
        pending = [sample for sample in samples if sample.id not in done_ids]
        mine = shard(pending, info.rank, info.world_size)

        # 5. Loader thread -> model (here) -> writer thread.
        manifest = out / (MANIFEST if info.world_size == 1 else f"manifest.rank{info.rank}.jsonl")
        started = time.time()
        generated = render(generator, split, dataset, mine, config, identity, out, manifest, show=info.is_main and config.progress)
        seconds = time.time() - started

        # 6. Merge the rank manifests, then summarise over all ranks.
        barrier()
        if info.is_main and info.world_size > 1:
            recover_output(out, samples)
        total = int(all_reduce_sum(torch.tensor([generated], dtype=torch.int64))[0])
        summary = {"planned": len(samples), "already_done": len(samples) - len(pending), "generated": total,
                   "processes": info.world_size, "seconds": round(seconds, 2),
                   "images_per_s": round(total / seconds, 3) if seconds > 0 and total else 0.0}
        if info.is_main:
            atomic_write_json(out / "summary.json", summary)
        return summary


def generator_settings(config: SynthesizeConfig, device: torch.device) -> GeneratorSettings:
    resolution = None
    if config.resolution:
        values = config.resolution * 2 if len(config.resolution) == 1 else config.resolution
        if len(values) != 2:
            raise SegsynthError(f"--resolution takes H,W (or one number); got {config.resolution}")
        resolution = (int(values[0]), int(values[1]))
    return GeneratorSettings(steps=config.steps, guidance=config.guidance, scheduler=config.scheduler,
                             negative_prompt=config.negative_prompt, controlnet=config.controlnet,
                             controlnet_scale=config.controlnet_scale, lcm_lora=config.lcm_lora,
                             colour_map=config.colour_map, captions=config.captions, resolution=resolution,
                             dtype=config.dtype, device=str(device))


# --- checks before compute -------------------------------------------------------------------


def planned_samples(plan: list[PlanEntry], split: Split, plan_path: str) -> list[PlannedSample]:
    """Plan entries -> samples in plan order; every mask id must exist and be usable as a file name."""
    missing = [entry.id for entry in plan if not split.has(entry.id)]
    if missing:
        raise SegsynthError(f"{plan_path}: {len(missing)} mask id(s) are not in split {split.name!r}, e.g. "
                            f"{missing[:5]}; make the plan from this dataset and split (segsynth plan --split)")
    unsafe = [entry.id for entry in plan if entry.id.startswith(".") or "/" in entry.id or "\\" in entry.id]
    if unsafe:
        raise SegsynthError(f"{plan_path}: mask id(s) {unsafe[:5]} cannot name files (leading '.', or a path separator)")
    samples = [PlannedSample(entry.id, seed, split.index_of(entry.id)) for entry in plan for seed in entry.seeds]
    ids = [sample.id for sample in samples]
    if len(set(ids)) != len(ids):
        clash = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise SegsynthError(f"{plan_path}: sample names collide ({clash}); mask ids ending in _s<N> clash with seeds")
    return samples


def read_state(out: Path) -> dict | None:
    """The folder's synthesis.json; refuses a non-empty folder that is not a synthetic set (its files are not ours to clean)."""
    if (out / STATE).is_file():
        return read_json(out / STATE)
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise SegsynthError(f"{out}: exists and is not a segsynth synthetic set (no {STATE}); "
                            "choose a new or empty --out folder")
    return None


def read_manifests(out: Path) -> dict[str, dict]:
    """Finished records by id from manifest.jsonl and any rank manifests; a later record of an id adds to it
    (as `segsynth.data.synthetic.read_manifest` reads them, so later stages' fields are kept)."""
    records: dict[str, dict] = {}
    for path in [out / MANIFEST] + sorted(out.glob("manifest.rank*.jsonl")):
        for record in read_jsonl(path):
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                records[record["id"]] = {**records.get(record["id"], {}), **record}
    return records


def check_same_plan(out: Path, finished: dict[str, dict], samples: list[PlannedSample], plan_path: str) -> None:
    """Finished samples must all belong to this plan: a folder never mixes two plans' samples."""
    planned = {sample.id for sample in samples}
    foreign = [sample_id for sample_id in finished if sample_id not in planned]
    if foreign:
        raise SegsynthError(f"{out}: holds {len(foreign)} sample(s) of a different plan (e.g. {foreign[:3]}) that "
                            f"{plan_path} does not list; use a new --out, or the plan that made this folder")


def check_same_generator(out: Path, state: dict | None, finished: dict, identity: dict, classes, split: str) -> None:
    """Finished samples must come from this generator, with these settings, for these classes."""
    if state is None or not finished:
        return
    expected = {"generator": _comparable(identity), "classes": list(classes), "split": split}
    found = {"generator": _comparable(state.get("generator", {})), "classes": state.get("classes"), "split": state.get("split")}
    if expected != found:
        changed = [key for key in expected if expected[key] != found[key]]
        detail = ""
        if "generator" in changed:
            keys = sorted(k for k in set(expected["generator"]) | set(found["generator"] or {})
                          if expected["generator"].get(k) != (found["generator"] or {}).get(k))
            detail = f" (generator settings differ: {', '.join(keys)})"
        raise SegsynthError(f"{out}: its {len(finished)} finished sample(s) were made with a different "
                            f"{', '.join(changed)}{detail}; use a new --out, or the same generator and settings")


def _comparable(identity: dict) -> dict:
    """Identity without local paths where a content fingerprint identifies the model (folders may move)."""
    if not isinstance(identity, dict):
        return identity
    result = {}
    for key, value in identity.items():
        if key == "path" and "fingerprint" in identity:
            continue
        result[key] = _comparable(value) if isinstance(value, dict) else value
    return result


def _sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- recovery ------------------------------------------------------------------------------------


def lock_output(out: Path):
    """An exclusive lock on OUT/.synthesize.lock: a second run into the same folder would delete our in-flight files."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".synthesize.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SegsynthError(f"{out}: another `segsynth synthesize` is writing to this folder; wait for it or use "
                            "torchrun to run several processes on one folder") from None
    return handle


def recover_output(out: Path, samples: list[PlannedSample]) -> None:
    """Merge manifests into one (plan order), drop records whose files are gone, delete every unrecorded file.

    Order matters for kill-safety: the merged manifest is written (atomically)
    before the rank manifests and files it supersedes are removed.
    """
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    records = read_manifests(out)
    complete = {sample_id: record for sample_id, record in records.items()
                if (out / "images" / f"{sample_id}.png").is_file() and (out / "masks" / f"{sample_id}.png").is_file()}
    order = {sample.id: position for position, sample in enumerate(samples)}
    kept = sorted(complete.values(), key=lambda record: order.get(record["id"], len(order)))
    text = "".join(json.dumps(record) + "\n" for record in kept)
    atomic_write_text(out / MANIFEST, text)
    for rank_manifest in out.glob("manifest.rank*.jsonl"):
        rank_manifest.unlink(missing_ok=True)
    for folder in ("images", "masks"):
        for path in (out / folder).iterdir():
            if path.is_file() and (path.name.startswith(".") or path.suffix != ".png" or path.stem not in complete):
                path.unlink(missing_ok=True)


# --- the pipeline ------------------------------------------------------------------------------------


class _Stop:
    """End-of-stream marker between the threads."""


def render(generator: Generator, split: Split, dataset, samples: list[PlannedSample], config: SynthesizeConfig,
           identity: dict, out: Path, manifest: Path, show: bool) -> int:
    """Render `samples`; returns how many were written. Any thread's error stops all three and is raised here."""
    if not samples:
        return 0
    prepared_batches: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    finished_batches: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    stop = threading.Event()
    errors: list[BaseException] = []
    bar = tqdm(total=len(samples), desc="synthesize", unit="img", disable=not show, dynamic_ncols=True,
               mininterval=0.5, smoothing=0.1)
    written = [0]

    def load() -> None:
        lower_this_thread_priority()
        try:
            for batch in _batches(generator, split, dataset, samples, config.batch_size):
                if not _put(prepared_batches, batch, stop):
                    return
        except BaseException as error:  # handed to the main thread
            errors.append(error)
            stop.set()
        finally:
            _put(prepared_batches, _Stop(), stop)

    def write() -> None:
        lower_this_thread_priority()
        try:
            while True:
                item = finished_batches.get()
                if isinstance(item, _Stop):
                    return
                _write_batch(item, out, manifest, dataset.palette)
                written[0] += len(item["samples"])
                bar.update(len(item["samples"]))
        except BaseException as error:
            errors.append(error)
            stop.set()

    loader = threading.Thread(target=load, name="segsynth-loader", daemon=True)
    writer = threading.Thread(target=write, name="segsynth-writer", daemon=True)
    loader.start()
    writer.start()
    try:
        while True:
            batch = _get(prepared_batches, stop)
            if isinstance(batch, _Stop):
                break
            started = time.time()
            images = generator.run(batch["prepared"])
            batch["images"] = images
            batch["seconds"] = (time.time() - started) / len(images)
            batch["identity"], batch["steps"], batch["guidance"] = identity, generator.steps, generator.guidance
            batch["uses_prompts"] = generator.uses_prompts
            if not _put(finished_batches, batch, stop):
                break
    finally:
        stop_writer = _Stop()
        while writer.is_alive():  # hand the writer its stop marker even if its queue is full
            try:
                finished_batches.put(stop_writer, timeout=0.1)
                break
            except queue.Full:
                continue
        writer.join()
        stop.set()
        loader.join(timeout=5)
        bar.close()
    if errors:
        raise errors[0]
    return written[0]


def _put(target: queue.Queue, item, stop: threading.Event) -> bool:
    """Put unless the pipeline is stopping (so no thread blocks forever on a full queue)."""
    while not stop.is_set():
        try:
            target.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(source: queue.Queue, stop: threading.Event):
    """Get the next item, or a stop marker once the pipeline is stopping."""
    while not stop.is_set():
        try:
            return source.get(timeout=0.1)
        except queue.Empty:
            continue
    return _Stop()


def _batches(generator: Generator, split: Split, dataset, samples: list[PlannedSample], batch_size: int):
    """Prepared batches of up to `batch_size` samples of one working size, in plan order within each size."""
    buckets: dict[tuple[int, int], list] = {}
    mask_cache: dict[int, tuple] = {}  # consecutive seeds of one mask share its read and prompt
    for sample in samples:
        if sample.index not in mask_cache:
            mask_cache.clear()
            label = split.label(sample.index)
            size = generator.working_size(label.shape)
            mask_cache[sample.index] = (size, resize_mask(label, size), generator.prompt(sample.source, label, dataset.classes))
        size, mask, prompt = mask_cache[sample.index]
        bucket = buckets.setdefault(size, [])
        bucket.append((sample, mask, prompt))
        if len(bucket) == batch_size:
            yield _prepare(generator, buckets.pop(size))
    for bucket in buckets.values():
        yield _prepare(generator, bucket)


def _prepare(generator: Generator, bucket: list) -> dict:
    samples, masks, prompts = zip(*bucket)
    prepared = generator.prepare(list(masks), list(prompts), [sample.seed for sample in samples])
    return {"samples": list(samples), "masks": list(masks), "prompts": list(prompts), "prepared": prepared}


def _write_batch(batch: dict, out: Path, manifest: Path, palette) -> None:
    """Both files of every sample (temp + rename), then the batch's manifest lines in one fsync'd append."""
    lines = []
    for sample, mask, prompt, image in zip(batch["samples"], batch["masks"], batch["prompts"], batch["images"]):
        name = f"{sample.id}.png"
        mask = resize_mask(mask, image.shape[:2])
        atomic_write_png(out / "images" / name, image)
        atomic_write_png(out / "masks" / name, mask, palette)
        record = {"id": sample.id, "source": sample.source, "seed": sample.seed, "image": f"images/{name}",
                  "mask": f"masks/{name}", "prompt": prompt if batch["uses_prompts"] else None,
                  "generator": batch["identity"], "steps": batch["steps"], "guidance": batch["guidance"],
                  "size": list(image.shape[:2]), "seconds": round(batch["seconds"], 4)}
        lines.append(json.dumps(record) + "\n")
    append_text(manifest, "".join(lines))


def format_summary(summary: dict) -> str:
    return (f"synthesized {summary['generated']} image(s) in {summary['seconds']:.1f}s "
            f"({summary['images_per_s']:.2f} images/s, {summary['processes']} process(es)); "
            f"{summary['already_done']} of {summary['planned']} were already done")
