"""`segsynth synthesize`: plan x generator -> a synthetic set that is itself a `folder:` dataset.

The plan lists requests (formats/plan.py); each is resolved into a condition
(the mask it names, read from `--data` and resized to the generator's working
size, and its prompt), and the generator returns a sample: image, label map,
optional confidence map and extras (generators/base.py). The output folder is
a synthetic set (formats/manifest.py); besides the samples it holds:

    synthesis.json              what made the set: dataset, split, classes, generator identity, plan hash
    synthesize.config.yaml      the resolved config of the last run
    summary.json                the last run's counts and images/s

`--data` may itself be a synthetic set (`synthetic-raw:MASKSET`, the masks a
text -> mask generator made: SegGen's MaskSyn). Each new record then says
where its mask came from, so a sample's whole history is in one manifest:
record["meta"]["source"] = {"set", "id", "prompt", "generator"} -- the
source set's folder, its sample id, the prompt and the generator identity
that made the mask (record["generator"] is the one that rendered the image).

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
  finishes the samples (`Generator.finish`: a text -> mask generator decodes
  its colour maps there), encodes PNGs and appends the manifest, and the main
  thread only runs the model (segsynth.pipeline), so the pipeline's own work
  hides behind the denoising loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segsynth import __version__
from segsynth.config import save_config
from segsynth.cpu import thread_governor
from segsynth.data import open_dataset
from segsynth.data.base import Split
from segsynth.data.specs import base_spec
from segsynth.data.validate import check_before_compute
from segsynth.distributed import all_reduce_sum, barrier, init_distributed, shard
from segsynth.formats.manifest import merge_manifests, read_manifest, read_records, sample_record, write_set_info
from segsynth.formats.plan import plan_requests, read_plan
from segsynth.generators import Generator, GeneratorSettings, open_generator
from segsynth.generators.base import Condition, GeneratedSample, Request, resize_image, resize_mask
from segsynth.io import SegsynthError, append_text, atomic_write_json, atomic_write_png, read_json
from segsynth.outputs import check_no_escaping_links, claim_folder
from segsynth.pipeline import run_pipeline
from segsynth.stage_configs import SynthesizeConfig

MANIFEST = "manifest.jsonl"
SET_LOCK = ".synthesize.lock"
STATE = "synthesis.json"
FORMAT = "segsynth-synthetic-set/1"
QUEUE_DEPTH = 2  # batches prepared ahead of the model, and batches waiting for the writer


def synthesize(config: SynthesizeConfig) -> dict:
    """Make every planned sample not yet in `config.out`; returns the run summary."""
    info = init_distributed(config.device)
    out = Path(config.out)

    # 1. Everything that needs no model: dataset, plan, their agreement, and the output folder's contents.
    dataset = open_dataset(config.data)
    split = dataset.split(config.split)
    requests = plan_requests(read_plan(config.plan), config.plan)
    check_sources(requests, split, config.plan)
    check_before_compute(dataset, [config.split])
    state = read_state(out)
    check_no_escaping_links(out)
    finished = read_records(out)
    check_same_plan(out, finished, requests, config.plan)

    # 2. The generator: its files, classes and per-request inputs are checked as it opens, before any compute.
    generator = open_generator(config.generator, generator_settings(config, info.device))
    check_request_kinds(generator, requests, config)
    check_source_images(generator, config)
    generator.check_dataset(dataset.classes, dataset.palette)
    generator.check_requests(requests)
    identity = generator.identity()
    check_same_generator(out, state, finished, identity, dataset.classes, config.split)

    # 3. Rank 0 locks the folder against a second run, makes it consistent (one manifest, no orphans)
    #    and records what makes this set.
    order = {request.id: position for position, request in enumerate(requests)}
    with lock_output(out, info.is_main):  # released however this exits
        if info.is_main:
            merge_manifests(out, order)
            write_set_info(out, dataset.classes, dataset.palette)
            atomic_write_json(out / STATE, {"format": FORMAT, "segsynth_version": __version__, "data": config.data,
                                            "split": config.split, "classes": list(dataset.classes), "generator": identity,
                                            "plan": str(config.plan), "plan_sha256": _sha256(config.plan),
                                            "samples": len(requests)})
            save_config(config, out / "synthesize.config.yaml")
        barrier()

        # 4. This rank's share of the unfinished requests.
        done_ids = set(read_records(out))
        pending = [request for request in requests if request.id not in done_ids]
        mine = shard(pending, info.rank, info.world_size)

        # 5. Loader thread -> model (here) -> writer thread.
        manifest = out / (MANIFEST if info.world_size == 1 else f"manifest.rank{info.rank}.jsonl")
        started = time.time()
        generated = render(generator, split, dataset, mine, config, identity, out, manifest,
                           show=info.is_main and config.progress, sources=source_provenance(config.data))
        seconds = time.time() - started

        # 6. Merge the rank manifests, then summarise over all ranks.
        barrier()
        if info.is_main and info.world_size > 1:
            merge_manifests(out, order)
        total = int(all_reduce_sum(torch.tensor([generated], dtype=torch.int64))[0])
        summary = {"planned": len(requests), "already_done": len(requests) - len(pending), "generated": total,
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
                             dtype=config.dtype, device=str(device), pseudo_mask=config.pseudo_mask,
                             pseudo_mask_settings=dict(config.pseudo_mask_settings), lora=config.lora,
                             lora_scale=config.lora_scale, strength=config.strength)


def data_kind(spec: str) -> tuple[str, str]:
    """A dataset spec's kind (lower case) and argument."""
    kind, _, argument = base_spec(spec).partition(":")
    return kind.strip().lower(), argument


def source_provenance(spec: str) -> dict[str, dict] | None:
    """For `--data` that is a synthetic set: per sample id, where that sample came from (set, id, prompt,
    generator); None for any other dataset."""
    kind, argument = data_kind(spec)
    if kind not in ("synthetic", "synthetic-raw"):
        return None
    folder = Path(argument)
    return {record["id"]: {"set": str(folder.resolve()), "id": record["id"],
                           "prompt": record.get("prompt") or (record.get("meta") or {}).get("prompt"),
                           "generator": record.get("generator")}
            for record in read_manifest(folder)}


# --- checks before compute -------------------------------------------------------------------


def check_sources(requests: list[Request], split: Split, plan_path: str) -> None:
    """Every mask a request names must exist in the split it is rendered from, and every crop lie inside it."""
    missing = sorted({r.source for r in requests if r.kind == "mask" and not split.has(r.source)})
    if missing:
        raise SegsynthError(f"{plan_path}: {len(missing)} mask id(s) are not in split {split.name!r}, e.g. "
                            f"{missing[:5]}; make the plan from this dataset and split (segsynth plan --split)")
    shapes: dict[str, tuple[int, int]] = {}
    for request in requests:
        if request.crop is None:
            continue
        if request.source not in shapes:
            shapes[request.source] = split.label(split.index_of(request.source)).shape[:2]
        top, left, height, width = request.crop
        if top + height > shapes[request.source][0] or left + width > shapes[request.source][1]:
            raise SegsynthError(f"{plan_path}: {request.id}: crop {list(request.crop)} (top, left, height, width) reaches "
                                f"outside mask {request.source} ({shapes[request.source][0]}x{shapes[request.source][1]}); "
                                "make the plan from this dataset (segsynth plan --class-crop)")


def check_request_kinds(generator: Generator, requests: list[Request], config: SynthesizeConfig) -> None:
    kinds = sorted({request.kind for request in requests} - set(generator.request_kinds))
    if kinds:
        raise SegsynthError(f"{config.plan}: has {', '.join(kinds)} request(s), but generator {config.generator} "
                            f"takes only {', '.join(generator.request_kinds)} requests; use a plan made for it or "
                            "another generator")


def check_source_images(generator: Generator, config: SynthesizeConfig) -> None:
    """--strength starts each sample from its mask's own image: the generator must take one, the data have one."""
    if config.strength is None:
        return
    if not generator.takes_source_images:
        raise SegsynthError(f"generator {config.generator} cannot start from source images; drop --strength (it works "
                            "with the builtin and latent generators)")
    if data_kind(config.data)[0] == "synthetic-raw":
        raise SegsynthError(f"--data {config.data}: a generated mask set has no images to start from; drop --strength")


def read_state(out: Path) -> dict | None:
    """The folder's synthesis.json; refuses a non-empty folder that is not a synthetic set (its files are not ours to clean)."""
    if (out / STATE).is_file():
        return read_json(out / STATE)
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise SegsynthError(f"{out}: exists and is not a segsynth synthetic set (no {STATE}); "
                            "choose a new or empty --out folder")
    return None


def check_same_plan(out: Path, finished: dict[str, dict], requests: list[Request], plan_path: str) -> None:
    """Finished samples must all belong to this plan: a folder never mixes two plans' samples."""
    planned = {request.id for request in requests}
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


# --- the pipeline ------------------------------------------------------------------------------------


def lock_output(out: Path, lock: bool = True):
    """The exclusive lock on OUT/.synthesize.lock (segsynth.outputs): a second run into the same folder would
    delete our in-flight files; `filter` takes it too. Only rank 0 locks (`lock`)."""
    return claim_folder(out, "synthesize", "synthesize.config.yaml", "SynthesizeConfig", markers=(STATE,),
                        lock_name=SET_LOCK, lock=lock,
                        busy=f"{out}: another `segsynth synthesize` is writing to this folder (or a `segsynth filter` "
                             "is); wait for it or use torchrun to run several processes on one folder")


def render(generator: Generator, split: Split, dataset, requests: list[Request], config: SynthesizeConfig,
           identity: dict, out: Path, manifest: Path, show: bool, sources: dict[str, dict] | None = None) -> int:
    """Make `requests`; returns how many samples were written. Any thread's error stops all three and is raised here.
    `sources`: provenance per mask id, recorded in each sample's meta (see `source_provenance`)."""
    if not requests:
        return 0
    bar = tqdm(total=len(requests), desc="synthesize", unit="img", disable=not show, dynamic_ncols=True,
               mininterval=0.5, smoothing=0.1)
    written = [0]
    fields = {"generator": identity, "steps": generator.steps, "guidance": generator.guidance}

    def run_model(batch: dict) -> dict:
        thread_governor().tick()  # load-aware thread count (segsynth.cpu), in the thread that runs the model
        started = time.time()
        batch["samples"] = generator.run(batch["prepared"])
        batch["seconds"] = (time.time() - started) / len(batch["samples"])
        return batch

    def write(batch: dict) -> None:
        batch["samples"] = generator.finish(batch["prepared"], batch["samples"])  # e.g. colour maps -> labels
        _write_batch(batch, out, manifest, dataset.palette, fields, generator.uses_prompts, sources)
        written[0] += len(batch["samples"])
        bar.update(len(batch["samples"]))

    try:
        run_pipeline(_batches(generator, split, dataset, requests, config.batch_size), run_model, write,
                     depth=QUEUE_DEPTH, low_priority_helpers=True)
    finally:
        bar.close()
    return written[0]


def _batches(generator: Generator, split: Split, dataset, requests: list[Request], batch_size: int):
    """Prepared batches of up to `batch_size` requests of one working size, in plan order within each size."""
    buckets: dict[tuple[int, int], list[Condition]] = {}
    mask_cache: dict[tuple, tuple] = {}  # consecutive seeds of one mask (and crop) share its read and prompt
    for request in requests:
        if request.kind == "mask":
            key = (request.source, request.crop)
            if key not in mask_cache:
                mask_cache.clear()
                index = split.index_of(request.source)
                # --strength: the sample starts from the mask's own image (the same window of it), so read both
                if generator.strength is not None:
                    sample = split[index]
                    image, label = sample.image, sample.label
                else:
                    image, label = None, split.label(index)
                if request.crop is not None:  # a class-centred window of the mask, rendered at the working size
                    top, left, height, width = request.crop
                    label = np.ascontiguousarray(label[top: top + height, left: left + width])
                    image = None if image is None else image[top: top + height, left: left + width]
                size = generator.working_size(label.shape)
                mask_cache[key] = (size, resize_mask(label, size), generator.prompt(request, label, dataset.classes),
                                   None if image is None else resize_image(image, size))
            size, mask, prompt, image = mask_cache[key]
        else:
            size, mask, prompt, image = (generator.working_size(None), None,
                                         generator.prompt(request, None, dataset.classes), None)
        bucket = buckets.setdefault(size, [])
        bucket.append(Condition(request, mask, prompt, image))
        if len(bucket) == batch_size:
            yield _prepare(generator, buckets.pop(size))
    for bucket in buckets.values():
        yield _prepare(generator, bucket)


def _prepare(generator: Generator, conditions: list[Condition]) -> dict:
    return {"conditions": conditions, "prepared": generator.prepare(conditions)}


def _write_batch(batch: dict, out: Path, manifest: Path, palette, fields: dict, uses_prompts: bool,
                 sources: dict[str, dict] | None = None) -> None:
    """Every file of every sample (temp + rename), then the batch's manifest lines in one fsync'd append."""
    lines = []
    for condition, sample in zip(batch["conditions"], batch["samples"]):
        request = condition.request
        files = _write_sample(out, request.id, sample, palette)
        record = sample_record(request.id, files, kind=request.kind, source=request.source, seed=request.seed,
                               prompt=condition.prompt if uses_prompts else None, **fields,
                               size=list(sample.image.shape[:2]), seconds=round(batch["seconds"], 4))
        meta = dict(sample.meta)
        if request.crop is not None:
            meta["crop"] = list(request.crop)
        if sources is not None and request.source in sources:
            meta["source"] = sources[request.source]
        if meta:
            record["meta"] = meta
        lines.append(json.dumps(record) + "\n")
    append_text(manifest, "".join(lines))


def _write_sample(out: Path, sample_id: str, sample: GeneratedSample, palette) -> dict:
    """A sample's files; returns their paths relative to the set (the manifest's "image", "mask", ...)."""
    name = f"{sample_id}.png"
    label = sample.label if sample.label.shape == sample.image.shape[:2] else resize_mask(sample.label, sample.image.shape[:2])
    files: dict = {"image": f"images/{name}", "mask": f"masks/{name}"}
    atomic_write_png(out / files["image"], sample.image)
    atomic_write_png(out / files["mask"], label, palette)
    if sample.weight is not None:
        files["weight"] = f"weights/{name}"
        atomic_write_png(out / files["weight"], np.round(np.clip(sample.weight, 0.0, 1.0) * 255).astype(np.uint8))
    if sample.extras:
        files["extras"] = {}
        for extra, picture in sample.extras.items():
            files["extras"][extra] = f"extras/{extra}/{name}"
            atomic_write_png(out / files["extras"][extra], picture)
    return files


def format_summary(summary: dict) -> str:
    return (f"synthesized {summary['generated']} image(s) in {summary['seconds']:.1f}s "
            f"({summary['images_per_s']:.2f} images/s, {summary['processes']} process(es)); "
            f"{summary['already_done']} of {summary['planned']} were already done")
