"""Arms that vary one setting of FreeMask's arms, and the synthetic sets they train on.

Each variant is one more row of the results, next to the arm it varies
(`Arm.tags` say which sweep, which arm and which value):

  filter settings  (`filter_alphas`, `filter_judges`): an arm on filtered masks gets
                   <arm>-alpha<A> per alpha (<arm>-alpha<A>-<JUDGE> for a judge other than
                   the run's real-data reference segmenter) and <arm>-unfiltered for alpha 0.
                   Its set <set>-alpha<A>[-<JUDGE>] is a copy of the arm's set (images and raw
                   masks hard-linked, nothing rendered again) that the filter judges again, so
                   the filtered masks of different settings live in different folders and
                   never overwrite each other; only the cheap filter runs per setting. The
                   arm itself is the run's filter.alpha with the reference judge.
  volume           (`volumes`): <arm>-k<K> trains on <set>-k<K>, a share K / images_per_mask
                   of its set's samples with their filtered masks carried over (the filter
                   judges each sample alone, so filtering the subset again would give the
                   same masks). Samples are taken in one fixed order (`nested_ids`), so the
                   set of a smaller K is a subset of every larger one; rendered once, at
                   images_per_mask. Iterations: the run's for every K (`volume_iterations:
                   same`) or scaled with K (`scaled`).
  synthetic share  (`synthetic_shares`): <arm>-share<P> for each joint arm (whose draws are half
                   synthetic): the replace recipe from the pool of the arm's sets, a real draw
                   becoming a synthetic one with probability P; same sets, same iterations.
  closed loop      (`rounds`, loop.py): <loop_arm>-round<r>, trained after round r's stages.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from segsynth.formats.manifest import MANIFEST, read_manifest, read_set_info, sample_record, write_set_info
from segsynth.formats.plan import read_plan
from segsynth.io import (SegsynthError, atomic_write_json, atomic_write_text, link_or_copy, read_json,
                         safe_relative_path)
from segsynth.methods.base import Arm
from segsynth.stage_configs import FilterConfig, TrainConfig

HARDNESS_FIRST_SEED = 10_000_000  # the hardness plan's seeds never meet the uniform plan's
ROUND_SEEDS = 10_000_000  # closed-loop round r's seeds start at HARDNESS_FIRST_SEED + r * ROUND_SEEDS
REFERENCE = "reference"  # the judge that is the run's own real-data segmenter (its first real seed)
LOOP_SET = "hardness-round{}"  # the set closed-loop round r renders
# The joint recipe repeats real data to the synthetic count, and every plan renders at least one image per real
# mask on average (images_per_mask >= 1), so half of a joint arm's draws are synthetic.
JOINT_SHARE = 0.5


@dataclass(frozen=True)
class DerivedSet:
    """A synthetic set made from another one without rendering: a copy filtered again, or a nested subset."""

    name: str
    source: str  # the set it is made from (OUT/synthetic/<source>)
    kind: str  # "refilter" (every sample, raw masks, judged again) or "subset" (a share, filter carried over)
    alpha: float = 0.0  # refilter: the filter threshold
    judge: str = REFERENCE  # refilter: who judges (REFERENCE or a filter_judges name)
    share: tuple[int, int] = (1, 1)  # subset: K of images_per_mask


def alpha_text(alpha: float) -> str:
    return f"{alpha:g}"


def run_alpha(config) -> float:
    return float(config.filter.get("alpha", FilterConfig.__dataclass_fields__["alpha"].default))


def run_iterations(config) -> int:
    return int(config.train.get("iterations", TrainConfig.__dataclass_fields__["iterations"].default))


def plan_variants(config, table: dict[str, Arm]) -> tuple[dict[str, Arm], dict[str, DerivedSet]]:
    """The derived arms of a run (in table order) and the sets they need, from the run's arms found in `table`
    (the method's own arms; derived names in config.arms are ignored, so resolving twice gives the same)."""
    base = [table[name] for name in config.arms if name in table]
    arms: dict[str, Arm] = {}
    sets: dict[str, DerivedSet] = {}

    # 1. Filter settings: every (judge, alpha) but the arm's own, for each arm on filtered masks.
    judges = [REFERENCE, *config.filter_judges]
    alphas = list(config.filter_alphas) or ([run_alpha(config)] if config.filter_judges else [])
    filtered = _varied(config, alphas, [arm for arm in base if arm.masks == "filtered" and arm.synthetic],
                       "filter_alphas / filter_judges compare filter settings of the arms on filtered masks",
                       "uses them", "joint-filtered-hardness")
    for arm in filtered:
        for judge in judges:
            for alpha in alphas:
                tags = (("sweep", "filter"), ("of", arm.name), ("alpha", alpha),
                        ("judge", judge if alpha else "none"), ("base_alpha", run_alpha(config)))
                if alpha == 0:
                    if judge == REFERENCE:  # no filter: nobody judges, one arm
                        arms[f"{arm.name}-unfiltered"] = dataclasses.replace(arm, name=f"{arm.name}-unfiltered",
                                                                             masks="raw", tags=tags)
                    continue
                if judge == REFERENCE and alpha == run_alpha(config):
                    continue  # the arm itself
                suffix = f"alpha{alpha_text(alpha)}" + ("" if judge == REFERENCE else f"-{judge}")
                names = tuple(f"{name}-{suffix}" for name in arm.synthetic)
                for source, name in zip(arm.synthetic, names):
                    sets[name] = DerivedSet(name, source, "refilter", alpha=alpha, judge=judge)
                arms[f"{arm.name}-{suffix}"] = dataclasses.replace(arm, name=f"{arm.name}-{suffix}", synthetic=names,
                                                                   tags=tags)

    # 2. Volume: nested shares of each synthetic arm's sets.
    top = config.images_per_mask
    too_many = [k for k in config.volumes if k > top]
    if too_many:
        raise SegsynthError(f"volumes {config.volumes}: {too_many} exceed images_per_mask {top}, the volume the sets "
                            f"are rendered at; set images_per_mask: {max(config.volumes)} (or leave it out: with "
                            "volumes it defaults to the largest)")
    for arm in _varied(config, config.volumes, [arm for arm in base if arm.synthetic],
                       "volumes compare synthetic volumes of the arms on synthetic data", "uses any",
                       "joint-filtered-uniform"):
        for k in config.volumes:
            if k == top:
                continue  # the arm itself
            iterations = run_iterations(config)
            if config.volume_iterations == "scaled":
                iterations = max(1, round(iterations * k / top))
            names = tuple(f"{name}-k{k}" for name in arm.synthetic)
            for source, name in zip(arm.synthetic, names):
                sets[name] = DerivedSet(name, source, "subset", share=(k, top))
            train = tuple(item for item in arm.train if item[0] != "iterations") + (
                (("iterations", iterations),) if config.volume_iterations == "scaled" else ())
            arms[f"{arm.name}-k{k}"] = dataclasses.replace(
                arm, name=f"{arm.name}-k{k}", synthetic=names, train=train,
                tags=(("sweep", "volume"), ("of", arm.name), ("k", k), ("base_k", top), ("iterations", iterations),
                      ("base_iterations", run_iterations(config)), ("iterations_rule", config.volume_iterations)))

    # 3. Synthetic share: each joint arm again, with a share P of its draws synthetic instead of half.
    for arm in _varied(config, config.synthetic_shares, [arm for arm in base if arm.recipe == "joint"],
                       "synthetic_shares compare the synthetic share of the joint arms", "is one",
                       "joint-filtered-hardness"):
        for share in config.synthetic_shares:
            if share == JOINT_SHARE:
                continue  # the arm itself
            name = f"{arm.name}-share{share:g}"
            # The replace recipe drawing from the pool of the arm's sets: a real draw (uniform over the real
            # split, as in the joint stream) becomes a synthetic one (uniform over the pooled samples, as in the
            # joint stream, so a hardness plan's extra samples of hard masks keep their weight) with probability
            # P. At P = 0.5 that is the joint arm's stream in distribution.
            arms[name] = dataclasses.replace(
                arm, name=name, recipe="replace",
                train=arm.train + (("replace_probability", share), ("replace_from", "pool")),
                tags=(("sweep", "share"), ("of", arm.name), ("share", share), ("base_share", JOINT_SHARE)))

    # 4. The closed loop: one arm per round, continuing loop_arm.
    if config.rounds:
        if config.loop_arm not in [arm.name for arm in base]:
            raise SegsynthError(f"rounds {config.rounds}: the closed loop continues loop_arm {config.loop_arm!r}, "
                                f"which is not among the run's arms ({', '.join(config.arms)}); add it to arms or "
                                "choose another loop_arm")
        origin = table[config.loop_arm]
        for r in range(1, config.rounds + 1):
            new = tuple(LOOP_SET.format(i) for i in (range(1, r + 1) if config.loop_sets == "accumulate" else (r,)))
            previous = config.loop_arm if r == 1 else f"{config.loop_arm}-round{r - 1}"
            name = f"{config.loop_arm}-round{r}"
            arms[name] = dataclasses.replace(
                origin, name=name, synthetic=(origin.synthetic if config.loop_sets == "accumulate" else ()) + new,
                round=r, init_from=previous if config.loop_init == "previous" else "",
                tags=(("sweep", "loop"), ("of", config.loop_arm), ("round", r), ("signal", config.loop_signal),
                      ("planner", config.loop_planner if config.loop_planner != "targeted-crops" else
                                  f"targeted-crops {config.loop_class_crop:g}"), ("init", config.loop_init), ("sets", config.loop_sets),
                      ("signal_file", f"loop/round{r}/class_stats.json"),
                      # the round's plan and the one before it, so the table can show how far the signal moved it
                      ("plan_file", f"plans/{LOOP_SET.format(r)}.jsonl"),
                      ("previous_plan_file", f"plans/{origin.synthetic[0] if r == 1 else LOOP_SET.format(r - 1)}.jsonl")))
    return arms, sets


def _varied(config, values: list, arms: list[Arm], what: str, lack: str, example: str) -> list[Arm]:
    """The arms a sweep varies; a sweep that has values but no arm to vary is refused."""
    if values and not arms:
        raise SegsynthError(f"{what}, and none of the run's arms ({', '.join(config.arms)}) {lack}; add one, e.g. "
                            f"{example}")
    return arms


def nested_ids(plan_path: Path, share: tuple[int, int]) -> list[str]:
    """The sample ids of a share K / Kmax of a planned set, in plan order.

    Every sample has a place in one order: sample j (in seed order) of an entry with n seeds sits at
    (j + 0.5) / n, ties in plan order; a share takes the first round(total x K / Kmax) samples. The
    same order serves every K, so a smaller share is a subset of a larger one, and each entry keeps about
    K / Kmax of its samples (exactly K of Kmax in a uniform plan)."""
    k, top = share
    entries = read_plan(plan_path)
    ordered = sorted(((j + 0.5) / len(entry.seeds), position, f"{entry.id}_s{seed}")
                     for position, entry in enumerate(entries) for j, seed in enumerate(entry.seeds))
    total = len(ordered)
    keep = {sample_id for _, _, sample_id in ordered[: int(math.floor(total * k / top + 0.5))]}
    return [f"{entry.id}_s{seed}" for entry in entries for seed in entry.seeds if f"{entry.id}_s{seed}" in keep]


# Record keys naming the source's files, or its filter's verdicts (not carried into a refiltered copy).
_FILE_KEYS = ("id", "image", "mask", "weight", "extras", "filtered_mask")
_FILTER_KEYS = ("filtered_mask", "ignored_fraction", "ignored")


def derive_set(source: str | os.PathLike, out: str | os.PathLike, ids: list[str] | None = None,
               carry_filter: bool = False) -> dict:
    """Write OUT: the samples `ids` of SOURCE (all when None) as a synthetic set, files hard-linked (copied
    across file systems), with the source's filtered masks and verdicts when `carry_filter`, else raw masks
    only (ready to be filtered again). The manifest is written last: its presence means the set is complete."""
    source, out = Path(source), Path(out)
    records = read_manifest(source)
    if not records:
        raise SegsynthError(f"{source}: no finished samples to derive {out.name} from; run `segsynth synthesize` first")
    by_id = {record["id"]: record for record in records}
    wanted = list(by_id) if ids is None else ids
    absent = [sample_id for sample_id in wanted if sample_id not in by_id]
    if absent:
        raise SegsynthError(f"{source}: {len(absent)} planned sample(s) are not finished (e.g. {absent[:3]}); "
                            f"finish `segsynth synthesize` into {source} before deriving {out.name}")
    if carry_filter and not all(by_id[sample_id].get("filtered_mask") for sample_id in wanted):
        raise SegsynthError(f"{source}: not filtered yet, so {out.name} cannot carry its filtered masks; run "
                            f"`segsynth filter --synthetic {source}` first")
    info = read_set_info(source)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an earlier derivation (of a source filtered since) is redone whole
    write_set_info(out, info["classes"], info.get("palette") or [])
    lines = []
    for sample_id in wanted:
        record = by_id[sample_id]
        files = {}
        for key in ("image", "mask", "weight"):
            if record.get(key):
                files[key] = record[key]
                link_or_copy(safe_relative_path(source, record[key], f"{MANIFEST} {key} of {sample_id}"), out / record[key])
        if record.get("extras"):
            files["extras"] = record["extras"]
            for name, path in record["extras"].items():
                link_or_copy(safe_relative_path(source, path, f"{MANIFEST} extra {name} of {sample_id}"), out / path)
        fields = {key: value for key, value in record.items() if key not in _FILE_KEYS + _FILTER_KEYS}
        if carry_filter:
            path = record["filtered_mask"]
            link_or_copy(safe_relative_path(source, path, f"{MANIFEST} filtered_mask of {sample_id}"), out / path)
            fields.update({key: record[key] for key in _FILTER_KEYS if key in record})
        lines.append(json.dumps(sample_record(sample_id, files, **fields)) + "\n")
    summary = {"derived_from": str(source), "samples": len(lines), "filter": "carried" if carry_filter else "none"}
    if carry_filter and (source / "filter.json").is_file():
        atomic_write_json(out / "filter.json", {**read_json(source / "filter.json"), "carried_from": str(source)})
    atomic_write_json(out / "summary.json", {"planned": len(lines), **summary})
    atomic_write_text(out / MANIFEST, "".join(lines))
    return summary


def derived_set_done(source: Path, out: Path, ids: list[str] | None, carry_filter: bool) -> bool:
    """OUT lists exactly the wanted samples of SOURCE, with filtered masks when they are carried (a source
    resumed or filtered since is derived again)."""
    if not (out / MANIFEST).is_file() or not (source / MANIFEST).is_file():
        return False
    records = read_manifest(out)
    wanted = [record["id"] for record in read_manifest(source)] if ids is None else ids
    if sorted(record["id"] for record in records) != sorted(wanted):
        return False
    return not carry_filter or all(record.get("filtered_mask") for record in records)


def run_filter_rules(config) -> dict:
    """The run's filter rules besides alpha that make a filtered set what it is: `drop_classes` and
    `region_classes` (compared as sets) and `class_alphas` (filter.json lists them by class name)."""
    return {"drop_classes": sorted(config.filter.get("drop_classes", [])),
            "class_alphas": dict(config.filter.get("class_alphas", {})),  # values checked by the filter itself
            "region_classes": sorted(set(config.filter.get("region_classes", [])))}


def filtered_done(folder: Path, alpha: float, rules: dict | None = None) -> bool:
    """Every sample of the set has its filtered mask from a filter at `alpha` with exactly the run's other
    `rules` (run_filter_rules; none: the plain rule), as filter.json records them."""
    if not (folder / "filter.json").is_file() or not (folder / MANIFEST).is_file():
        return False
    settings = read_json(folder / "filter.json")
    rules = rules or {}
    return (settings.get("alpha") == alpha
            and sorted(settings.get("drop_classes", [])) == sorted(rules.get("drop_classes", []))
            and settings.get("class_alphas", {}) == rules.get("class_alphas", {})
            and sorted(settings.get("region_classes", [])) == sorted(rules.get("region_classes", []))
            and all(record.get("filtered_mask") for record in read_manifest(folder)))
