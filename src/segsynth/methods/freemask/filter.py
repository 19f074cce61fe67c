"""`segsynth filter`: FreeMask's noise filter for synthetic masks.

A segmenter trained on real data scores every synthetic pixel with its
cross-entropy against the synthetic (conditioning) mask. With L̄_c the mean
loss of class c over real training pixels (see `segsynth.stats`), a pixel of
class c whose loss exceeds α·L̄_c is set to ignore (255): the generator did
not render that class there convincingly, so it would teach the wrong thing.
`drop_classes` (not in the paper) ignores every synthetic pixel of the named
classes, so they are learnt from real pixels only. `class_alphas` (not in the
paper either) sets α per class: the rule is relative to L̄_c, so for a class
the real-data segmenter itself finds hard (high L̄_c) it keeps pixels the judge
gives little probability (CamVid bicyclist, L̄ = 1.95 at α 1.25: any above
exp(-2.43) = 9 %), and a smaller α there asks for more. `region_classes` (ours)
judges the named classes per object: each connected region (8-neighbour) of
such a class is ignored whole when its mean pixel loss exceeds α_c·L̄_c and
kept whole otherwise. The pixel rule splits a compound object by how typical
each part looks: on CamVid it ignored 51.5 % of the rendered bicyclists' upper
halves (the rider) and 22.6 % of their lower halves (the bicycle), so the set
taught "bicyclist" from wheels and legs
(results/camvid_latent_longgen_filter_by_height.md).

Outputs, inside the synthetic set: masks_filtered/<id>.png (originals kept),
filter.rank<R>.jsonl (one line per filtered sample, appended after its file is
in place: the resume log), filter.json (the settings, so a rerun with other
settings is refused instead of mixed in), filter.lanes.rank<R>.json (how the
CPU threads were split, timed once and kept), and finally manifest.jsonl rewritten
with `filtered_mask`, `ignored_fraction` and per-class `ignored` per record.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segsynth import IGNORE_INDEX
from segsynth.config import save_config
from segsynth.cpu import thread_governor, torch_threads
from segsynth.data.base import group_by_size, read_image, read_raw_mask
from segsynth.data.synthetic import open_synthetic
from segsynth.data.validate import check_before_compute
from segsynth.distributed import barrier, init_distributed, shard
from segsynth.formats.manifest import MANIFEST, read_manifest, read_set_info
from segsynth.formats.stats import load_class_stats
from segsynth.io import (SegsynthError, append_text, atomic_write_json, atomic_write_png, atomic_write_text,
                         read_json, read_jsonl, rewind_jsonl, safe_relative_path)
from segsynth.methods.freemask.stats import compute_class_stats
from segsynth.outputs import check_no_escaping_links, claim_folder
from segsynth.pipeline import run_pipeline
from segsynth.segmenters import load_checkpoint_for
from segsynth.segmenters.losses import pixel_losses
from segsynth.stage_configs import FilterConfig, StatsConfig




def class_thresholds(mean_loss: np.ndarray, alpha: float, device=None, dropped=(),
                     class_alphas: dict[int, float] | None = None) -> torch.Tensor:
    """alpha * L̄_c per label value 0..255 (class id c's own alpha where `class_alphas` has one): classes
    without L̄_c (no real pixels), values past the classes and ignore (255) get inf, so they are never
    ignored and one gather serves every pixel. Class ids in `dropped` get -inf: every one of their pixels
    is ignored."""
    alphas = np.full(len(mean_loss), float(alpha))
    for class_id, class_alpha in (class_alphas or {}).items():
        alphas[class_id] = class_alpha
    table = np.full(256, np.inf)
    table[: len(mean_loss)] = np.where(np.isfinite(mean_loss), alphas * mean_loss, np.inf)
    table[list(dropped)] = -np.inf
    return torch.as_tensor(table, dtype=torch.float32, device=device)


def check_class_names(option: str, names, classes: list[str], where: Path) -> None:
    """A filter option naming classes: an unknown name is an error that lists the set's classes."""
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise SegsynthError(f"filter {option} {unknown}: not classes of {where} (its classes: {', '.join(classes)}); "
                            "give class names from that list")


def dropped_class_ids(names: list[str], classes: list[str], where: Path) -> list[int]:
    """The ids of `drop_classes`, by name."""
    check_class_names("drop_classes", names, classes, where)
    return sorted(classes.index(name) for name in set(names))


def class_alpha_ids(class_alphas: dict, classes: list[str], where: Path) -> dict[int, float]:
    """`class_alphas` by class id; a value that is not a positive number is an error that says what to give."""
    check_class_names("class_alphas", class_alphas, classes, where)
    resolved = {}
    for name, value in class_alphas.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
            raise SegsynthError(f"filter class_alphas {name}={value!r}: give a number in (0, 100], e.g. {name}=0.6")
        resolved[classes.index(name)] = float(value)
    return dict(sorted(resolved.items()))


def region_class_ids(names: list[str], classes: list[str], dropped: list[int], where: Path) -> list[int]:
    """The ids of `region_classes`, by name; a class also in `drop_classes` is refused (drop ignores every
    pixel of it: no region is left to judge)."""
    check_class_names("region_classes", names, classes, where)
    both = sorted({classes.index(name) for name in names} & set(dropped))
    if both:
        raise SegsynthError(f"filter region_classes and drop_classes both name {[classes[c] for c in both]}: drop "
                            "ignores every pixel of a class, so no region of it is left to judge; keep each class "
                            "in one of the two lists")
    return sorted(classes.index(name) for name in set(names))


def judge_regions(label: np.ndarray, loss: np.ndarray, filtered: np.ndarray, class_ids: list[int],
                  class_threshold: np.ndarray) -> np.ndarray:
    """The per-object rule on one H x W sample: every connected region (8-neighbour) of a class in `class_ids`
    becomes ignore whole when its mean loss exceeds class_threshold[c], and keeps its label whole otherwise,
    whatever the pixel rule decided inside it. Other classes keep the pixel rule's `filtered`."""
    from scipy import ndimage  # a dependency (Mask2Former's matcher); imported where regions are judged

    result = filtered.copy()
    for class_id in class_ids:
        regions, count = ndimage.label(label == class_id, structure=np.ones((3, 3), bool))
        if not count:
            continue
        flat = regions.ravel()
        sums = np.bincount(flat, weights=loss.ravel().astype(np.float64), minlength=count + 1)
        sizes = np.bincount(flat, minlength=count + 1)
        drop = sums[1:] / sizes[1:] > class_threshold[class_id]
        decided = np.concatenate([[False], drop])[regions]  # region 0 is background: never touched here
        inside = regions > 0
        result[inside] = np.where(decided[inside], IGNORE_INDEX, class_id)
    return result


def filter_batch(labels: torch.Tensor, losses: torch.Tensor, class_threshold: torch.Tensor, num_classes: int):
    """FreeMask's rule for a whole batch (B x H x W) in a few tensor ops: a pixel of class c whose loss
    exceeds class_threshold[c] becomes ignore.

    Returns the filtered labels, and per sample and class the labelled and the newly ignored pixel
    counts (B x C each)."""
    values = labels.long()
    dropped = losses > class_threshold[values]  # ignore pixels have an inf threshold
    filtered = labels.masked_fill(dropped, IGNORE_INDEX)
    # One bincount over (sample, label value, dropped) counts both: no boolean indexing.
    key = ((torch.arange(labels.shape[0], device=labels.device).view(-1, 1, 1) * 256 + values) * 2 + dropped)
    counts = torch.bincount(key.view(-1), minlength=labels.shape[0] * 512).view(-1, 256, 2)[:, :num_classes]
    return filtered, counts.sum(-1), counts[..., 1]


def filter_labels(label: np.ndarray, loss: np.ndarray, mean_loss: np.ndarray, alpha: float, dropped=(),
                  class_alphas: dict[int, float] | None = None) -> np.ndarray:
    """`filter_batch` for one H x W label map: pixel of class c -> ignore when loss > alpha_c * L̄_c (or c dropped)."""
    filtered, _, _ = filter_batch(torch.from_numpy(label)[None], torch.from_numpy(loss)[None],
                                  class_thresholds(mean_loss, alpha, dropped=dropped, class_alphas=class_alphas),
                                  len(mean_loss))
    return filtered[0].numpy()


def ignored_by_class(label: np.ndarray, filtered: np.ndarray, classes) -> dict:
    """Fraction of each present class's pixels that the filter set to ignore (as the manifest records it)."""
    valid = label != IGNORE_INDEX
    labelled = np.bincount(label[valid], minlength=len(classes))
    ignored = np.bincount(label[valid & (filtered == IGNORE_INDEX)], minlength=len(classes))
    return _record("", labelled, ignored, classes)["ignored"]


def _record(sample_id: str, labelled: np.ndarray, ignored: np.ndarray, classes) -> dict:
    """The manifest fields of one filtered sample, from its per-class labelled and ignored pixel counts."""
    total = int(labelled.sum())
    return {"id": sample_id, "filtered_mask": f"masks_filtered/{sample_id}.png",
            "ignored_fraction": round(float(ignored.sum() / total) if total else 0.0, 4),
            "ignored": {classes[c]: round(float(ignored[c] / labelled[c]), 4) for c in np.flatnonzero(labelled)}}


def _read_pair(root: Path, record: dict, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic (image, mask) pair, decoded and checked (paths were checked up front)."""
    image_path, mask_path = root / record["image"], root / record["mask"]
    image, mask = read_image(image_path), np.asarray(read_raw_mask(mask_path))
    if mask.shape != image.shape[:2]:
        raise SegsynthError(f"{mask_path}: mask size {mask.shape} differs from its image {image_path} {image.shape[:2]}")
    bad = (mask != IGNORE_INDEX) & (mask >= num_classes)
    if bad.any():
        raise SegsynthError(f"{mask_path}: label values {np.unique(mask[bad])[:5].tolist()} outside the "
                            f"{num_classes} classes of {root / 'classes.json'}")
    return image, mask


SET_LOCK = ".synthesize.lock"  # synthesize.SET_LOCK (a stage does not import another stage)
MAX_AUTO_LANES = 8  # beyond this, activations x lanes costs memory and the GIL costs more than it gains


def scoring_lanes(requested: int, device: torch.device, probe=None) -> tuple[int, int, dict]:
    """(lanes, torch threads per lane, probe figures).

    Two ways to use a CPU's T threads: one lane whose forward uses all T (an OpenMP team), or T lanes
    of one thread each. Lanes let one lane's decoding, loss and hand-off run while the others compute,
    instead of stalling a whole team at its barriers; a team runs a large model's big ops faster.
    Measured on 2 cores: a tiny segmenter at 96x128 filtered at 0.55 of its bare forward with a team
    plus a decoding process and 0.75-0.83 with lanes, while segformer-b0 at 192x256 reached 0.96
    with one team and 0.74 with lanes. So with `requested` 0 (auto) `probe(lanes, threads)` times
    both on the first batch and returns the figures, with `use_lanes`. On a GPU: two lanes (one
    decodes while the other's batch is on the device)."""
    threads = torch.get_num_threads()
    if device.type != "cpu":
        return requested or 2, threads, {}
    if requested:
        return requested, max(1, threads // requested), {}
    lanes = min(threads, MAX_AUTO_LANES)
    if lanes == 1 or probe is None:
        return 1, threads, {}
    figures = probe(lanes, threads)
    return (lanes, max(1, threads // lanes), figures) if figures["use_lanes"] else (1, threads, figures)


def probe_lanes(model, batch: list[tuple[np.ndarray, np.ndarray]], decode_seconds: float, lanes: int,
                threads: int) -> dict:
    """Time a few images both ways (after a warm-up of each, best of two) and pick the faster
    pipeline: lanes hide most of the per-image side work (decode, loss, write: about twice the
    decode time) behind each other, a team pays it in series."""
    images = torch.from_numpy(np.stack([image for image, _ in batch])).permute(0, 3, 1, 2).float()

    def forward():
        with torch.inference_mode():
            model(images)

    def team() -> float:
        with torch_threads(threads):
            started = time.perf_counter()
            forward()
            return (time.perf_counter() - started) / len(images)

    def in_lanes() -> float:
        with torch_threads(max(1, threads // lanes)):
            workers = [threading.Thread(target=forward) for _ in range(lanes)]
            started = time.perf_counter()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            return (time.perf_counter() - started) / (lanes * len(images))

    team(), in_lanes()  # warm-up: the first call at a new size or thread count builds kernels
    rounds = [(team(), in_lanes()) for _ in range(2)]  # alternating; the best of each resists a noisy machine
    team_s, lanes_s = min(r[0] for r in rounds), min(r[1] for r in rounds)
    side = 2 * decode_seconds / len(batch)
    return {"use_lanes": lanes_s + side / lanes <= team_s + side, "team_ms_per_image": round(team_s * 1e3, 3),
            "lanes_ms_per_image": round(lanes_s * 1e3, 3), "side_work_ms_per_image": round(side * 1e3, 3)}


def filter_synthetic(config: FilterConfig) -> dict:
    """Filter every sample of a synthetic set (resumable, sharded over torchrun ranks); returns a summary."""
    # 1. Check inputs before compute: the set, the segmenter, matching classes, the statistics.
    info = init_distributed(config.device)
    root = Path(config.synthetic)
    records = read_manifest(root)
    if not records:
        raise SegsynthError(f"{root}: no finished samples in {MANIFEST}; run `segsynth synthesize` first")
    classes = read_set_info(root)["classes"]
    dropped = dropped_class_ids(config.drop_classes, classes, root / "classes.json")
    class_alphas = class_alpha_ids(config.class_alphas, classes, root / "classes.json")
    regions = region_class_ids(config.region_classes, classes, dropped, root / "classes.json")
    check_no_escaping_links(root)  # before anything is computed or written (class statistics included)
    for record in records:  # every path stays inside the set: checked before anything is loaded or written
        safe_relative_path(root, record["image"], f"{root / MANIFEST} image of {record['id']}")
        safe_relative_path(root, record["mask"], f"{root / MANIFEST} mask of {record['id']}")
        safe_relative_path(root / "masks_filtered", f"{record['id']}.png", f"{root / MANIFEST} id")
    model, _, checkpoint = load_checkpoint_for(config.segmenter, classes, str(root / "classes.json"),
                                               "filter with a segmenter trained on the set's real dataset")
    check_before_compute(open_synthetic(root, f"synthetic-raw:{root}", filtered=False), ["train"])

    # The set's lock (the one synthesize takes): no synthesize and no second filter writes to it meanwhile.
    with claim_folder(root, "filter", "filter.config.yaml", "FilterConfig", markers=(MANIFEST,), lock_name=SET_LOCK,
                      lock=info.is_main, busy=f"{root}: another `segsynth filter` (or a `segsynth synthesize`) is "
                                           "writing to this set; wait for it (torchrun shards one filter over "
                                           "processes)"):
        stats_path = Path(config.stats) if config.stats else checkpoint.parent / "class_stats.json"
        if not stats_path.is_file():
            if config.stats:
                raise SegsynthError(f"{stats_path}: class-stats file not found; make it with `segsynth stats` or omit --stats")
            if info.is_main:
                tqdm.write(f"computing class statistics once -> {stats_path}")
            compute_class_stats(StatsConfig(segmenter=str(checkpoint), out=str(stats_path), device=config.device))
            barrier()
        mean_loss = load_class_stats(stats_path, classes)
        model.to(info.device).eval()

        # 2. Refuse to mix runs with other settings; pick up where an earlier run stopped.
        settings = {"alpha": config.alpha, "segmenter": str(checkpoint), "stats": str(stats_path),
                    "stats_sha1": hashlib.sha1(stats_path.read_bytes()).hexdigest()}
        if dropped:  # only when set, so the filter.json of sets filtered before the option stays valid
            settings["drop_classes"] = [classes[c] for c in dropped]
        if class_alphas:
            settings["class_alphas"] = {classes[c]: value for c, value in class_alphas.items()}
        if regions:
            settings["region_classes"] = [classes[c] for c in regions]
        settings_path = root / "filter.json"
        if settings_path.is_file() and read_json(settings_path) != settings:
            raise SegsynthError(f"{settings_path}: this set was filtered with other settings ({read_json(settings_path)}); "
                                "use the same settings, or delete masks_filtered/, filter.json and filter.rank*.jsonl to refilter")
        barrier()
        if info.is_main:
            atomic_write_json(settings_path, settings)
            save_config(config, root / "filter.config.yaml")
            for temp in (root / "masks_filtered").glob(".*.tmp"):  # a killed run's half-written masks
                temp.unlink(missing_ok=True)
        log_path = root / f"filter.rank{info.rank}.jsonl"
        rewind_jsonl(log_path)  # a kill mid-append leaves a torn last line; appending after it would bury it
        barrier()
        done = {r["id"] for path in root.glob("filter.rank*.jsonl") for r in read_jsonl(path)
                if (root / r["filtered_mask"]).is_file()}
        pending = shard([r for r in records if r["id"] not in done], info.rank, info.world_size)

        # 3. Stream: each lane decodes a batch, scores it and hands it to one writer thread.
        started = time.time()  # the probe counts: it is part of what filtering costs

        def probe(lanes: int, threads: int) -> dict:
            # The choice is kept in the set, so a resumed run scores with the same thread count (it
            # changes float rounding, ~1e-7) and does not pay for the probe again.
            choice_path, key = root / f"filter.lanes.rank{info.rank}.json", {"device": str(info.device), "threads": threads}
            if choice_path.is_file() and (kept := read_json(choice_path)).get("key") == key:
                return kept["figures"]
            sample = pending[: config.batch_size]  # smaller batches misjudge: a tiny model's team looked 25 % faster at 2
            decode_started = time.perf_counter()
            batch = [_read_pair(root, record, len(classes)) for record in sample]
            figures = probe_lanes(model, batch, time.perf_counter() - decode_started, lanes, threads)
            atomic_write_json(choice_path, {"key": key, "figures": figures})
            return figures

        thread_governor().tick()  # the thread budget the lanes split: the cores other processes leave free
        lanes, threads_per_lane, probed = scoring_lanes(config.lanes, info.device, probe if pending else None)
        summary = {"samples": len(records), "filtered_now": len(pending), "lanes": lanes,
                   "threads_per_lane": threads_per_lane, "lane_probe": probed,
                   "lane_probe_seconds": round(time.time() - started, 3)}
        with torch_threads(threads_per_lane):  # the lanes started inside pick it up
            _stream(root, pending, classes, model, mean_loss, config, info, lanes, log_path, dropped, class_alphas,
                    regions)
        summary["seconds"] = round(time.time() - started, 2)
        barrier()

        # 4. Merge the logs into the manifest (rank 0), atomically.
        if info.is_main:
            summary.update(_merge_into_manifest(root, records, classes))
        return summary


def _stream(root: Path, pending: list[dict], classes, model, mean_loss, config: FilterConfig, info, lanes: int,
            log_path: Path, dropped: list[int], class_alphas: dict[int, float], regions: list[int]) -> None:
    """Filter `pending` with `lanes` threads (decode -> forward -> loss -> rule) and one writer thread
    (segsynth.pipeline).

    Batches are fixed slices of `pending`, so which lane takes a batch does not change its pixels.
    The writer saves a batch's masks first (temp + rename), then its log lines in one fsync'd
    append: a line in the log always means its file is in place."""
    batches = [pending[start:start + config.batch_size] for start in range(0, len(pending), config.batch_size)]
    class_threshold = class_thresholds(mean_loss, config.alpha, info.device, dropped, class_alphas)
    region_threshold = class_threshold.cpu().numpy()
    bar = tqdm(total=len(pending), desc="filter", unit="img", disable=not info.is_main, dynamic_ncols=True)

    @torch.inference_mode()  # grad mode is per thread: set in the lane that scores
    def score(batch: list[dict]) -> list[tuple[np.ndarray, dict]]:
        thread_governor().tick(share=lanes)  # this lane's share of the load-aware thread count (segsynth.cpu)
        pairs = [_read_pair(root, record, len(classes)) for record in batch]
        scored = []
        for group in group_by_size([(record, image, mask) for record, (image, mask) in zip(batch, pairs)],
                                   lambda item: item[1].shape):
            images = torch.from_numpy(np.stack([g[1] for g in group])).to(info.device).permute(0, 3, 1, 2).float()
            labels = torch.from_numpy(np.stack([g[2] for g in group])).to(info.device)
            losses = pixel_losses(model, images, labels)
            filtered, labelled, ignored = filter_batch(labels, losses, class_threshold, len(classes))
            filtered, labelled, ignored = filtered.cpu().numpy(), labelled.cpu().numpy(), ignored.cpu().numpy()
            if regions:  # the per-object rule overrides the pixel rule on its classes, then recount
                label_maps, loss_maps = labels.cpu().numpy(), losses.cpu().numpy()
                for i in range(len(group)):
                    filtered[i] = judge_regions(label_maps[i], loss_maps[i], filtered[i], regions, region_threshold)
                    ignored[i] = np.bincount(label_maps[i][(filtered[i] == IGNORE_INDEX)
                                                           & (label_maps[i] != IGNORE_INDEX)],
                                             minlength=256)[:len(classes)]
            scored += [(filtered[i], _record(g[0]["id"], labelled[i], ignored[i], classes)) for i, g in enumerate(group)]
        return scored

    def write(job: list[tuple[np.ndarray, dict]]) -> None:
        for filtered, record in job:
            atomic_write_png(root / record["filtered_mask"], filtered)
        append_text(log_path, "".join(json.dumps(record) + "\n" for _, record in job))
        bar.update(len(job))

    try:
        run_pipeline(batches, score, write, workers=lanes)
    finally:
        bar.close()


def _merge_into_manifest(root: Path, records: list[dict], classes) -> dict:
    log = {r["id"]: r for path in sorted(root.glob("filter.rank*.jsonl")) for r in read_jsonl(path)}
    merged = [{**record, **log.get(record["id"], {})} for record in records]
    atomic_write_text(root / MANIFEST, "".join(json.dumps(r) + "\n" for r in merged))
    for path in root.glob("manifest.rank*.jsonl"):  # now folded into manifest.jsonl
        path.unlink()
    fractions = [r["ignored_fraction"] for r in merged if "ignored_fraction" in r]
    per_class = {}
    for name in classes:
        values = [r["ignored"][name] for r in merged if name in r.get("ignored", {})]
        per_class[name] = round(float(np.mean(values)), 4) if values else math.nan
    return {"filtered": len(fractions), "mean_ignored_fraction": round(float(np.mean(fractions)), 4) if fractions else 0.0,
            "mean_ignored_by_class": per_class}
