"""`segsynth report RUN`: one self-contained HTML page for a run folder.

The page needs no server and no other file: every picture (matplotlib charts,
gallery tiles) is a base64 data URI inside it (PNG; JPEG for large pictures), and
it opens from disk. It
reads only files in the run folder (run.config.yaml, classes.json, seconds.json,
results.json, each arm's metrics_<split>.json, the synthetic sets' manifests
and pictures, plans/, mask_quality/, attention_quality/), so it can be made on
another machine, or while a run is still going: whatever a section needs and
the folder lacks is listed under "Missing", and the rest is shown.

Sections:
  1. the comparison table: mIoU mean, spread and seeds per arm, the difference to
     real, the synthetic samples each arm trained on, its training seconds
  2. per-class IoU: a table and grouped bars per arm
  2b. sweeps (FreeMask's derived arms): filter settings (alpha, judge), synthetic volume K and share P, and the
     closed loop's per-class IoU per round (a table and grouped bars per round)
  3. FreeMask: the hardness histogram and images per mask of the hardness plan,
     per-class ignored fractions of the filter, a gallery real mask | synthetic
     image | filtered pixels
  4. SegGen: mask-quality figures (class frequencies, pieces per mask,
     co-occurrence, alignment) and a gallery caption | generated mask | rendered image
  5. Attn2mask: pseudo-mask quality per recipe, per-class ignored fractions of the
     uncertain band, a gallery image | attention heat map | pseudo-mask
  6. seconds and images/s per stage
Galleries are grouped by class: under each class, the samples in which it covers
the largest share of the mask. Every class name, caption and prompt is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from segsynth import IGNORE_INDEX
from segsynth.formats.manifest import read_manifest
from segsynth.io import SegsynthError, atomic_write_text, read_json, read_jsonl, safe_relative_path
from segsynth.report import PARALLEL_MARK, format_paired, paired_with_real, summarize_seeds
from segsynth.stage_configs import ReportConfig

REPORT = "report.html"
MEMBERS = ("freemask", "seggen", "attn2mask")  # method names a `--method all` arm name starts with
TILE_HEIGHT = 96  # CSS pixels a gallery tile is shown at
# Tiles are stored at most twice that high (masks scaled nearest, pictures smoothly), pictures taller than
# TILE_HEIGHT as JPEG: a 512 x 512 Stable Diffusion image would otherwise add ~300 KB to the page per tile.
TILE_STORED = 2 * TILE_HEIGHT
IGNORE_COLOUR = (0, 0, 0)
RED = np.array([255, 0, 0])


# --- 1. What the run folder holds --------------------------------------------------------------------------


@dataclass
class RunFolder:
    root: Path
    config: dict
    classes: list[str]
    palette: np.ndarray  # 256 x 3; 255 (ignore) black
    results: dict | None
    seconds: dict
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifests: dict = field(default_factory=dict)  # set name -> its records, read once per report

    @property
    def method(self) -> str:
        return str(self.config.get("method", "freemask"))

    @property
    def eval_split(self) -> str:
        return str(self.config.get("eval_split", "val"))

    @property
    def arms(self) -> list[str]:
        return [str(arm) for arm in self.config.get("arms") or []]

    @property
    def seeds(self) -> list[int]:
        return [int(seed) for seed in self.config.get("seeds") or []]

    def synthetic(self, name: str) -> Path:
        return self.root / "synthetic" / name

    def records(self, name: str) -> list[dict]:
        """The finished samples of synthetic set `name` ([] when it has none, or its manifest is unreadable)."""
        if name not in self.manifests:
            folder = self.synthetic(name)
            try:
                self.manifests[name] = read_manifest(folder) if folder.is_dir() else []
            except SegsynthError as error:
                self.missing.append(f"synthetic/{name}/manifest.jsonl (unreadable: {error})")
                self.manifests[name] = []
        return self.manifests[name]


def read_run(root: Path) -> RunFolder:
    """The run's config, classes and timings; anything unreadable or absent goes to `missing`."""
    if not root.is_dir():
        raise SegsynthError(f"{root}: no such run folder; give the --out folder of `segsynth run`")
    missing: list[str] = []
    results = _json_or_missing(root / "results.json", missing, "results.json (the run has not reached its end: "
                                                                "the table is made from the arms finished so far)")
    if (root / "run.config.yaml").is_file():
        try:
            config = yaml.safe_load((root / "run.config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise SegsynthError(f"{root / 'run.config.yaml'}: not valid YAML ({error}); restore the file "
                                "`segsynth run` wrote") from None
    elif results and isinstance(results.get("config"), dict):
        config = results["config"]
        missing.append("run.config.yaml (the settings were read from results.json)")
    else:
        raise SegsynthError(f"{root}: not a segsynth run folder (no run.config.yaml or results.json); give the "
                            "--out folder of `segsynth run`")
    if not isinstance(config, dict):
        raise SegsynthError(f"{root / 'run.config.yaml'}: not a run config (a mapping of keys); restore the file")
    seconds = _json_or_missing(root / "seconds.json", missing, "seconds.json (no stage has finished)") or {}
    notes: list[str] = []
    classes, palette = _classes(root, results, notes, missing)
    return RunFolder(root, config, classes, palette, results, seconds, missing, notes)


def _json_or_missing(path: Path, missing: list[str], what: str):
    if not path.is_file():
        missing.append(what)
        return None
    try:
        return read_json(path)
    except SegsynthError as error:
        missing.append(f"{path.name} (unreadable: {error})")
        return None


def _classes(root: Path, results: dict | None, notes: list[str], missing: list[str]) -> tuple[list[str], np.ndarray]:
    """Class names and palette: the run's classes.json, else results.json, a checkpoint or a synthetic set."""
    candidates = [root / "classes.json", *sorted(root.glob("arms/*/seed*/checkpoint/segsynth.json")),
                  *sorted(root.glob("synthetic/*/classes.json"))]
    info = None
    if results and results.get("classes"):
        info = results
    for path in candidates:
        if info is not None:
            break
        if path.is_file():
            try:
                data = read_json(path)
            except SegsynthError:
                continue
            if isinstance(data, dict) and data.get("classes"):
                info = data
                if path != root / "classes.json":
                    notes.append(f"class names read from {path.relative_to(root)}")
    if info is None:  # an early run folder: names from any arm's metrics, colours made up
        for path in sorted(root.glob("arms/*/seed*/metrics_*.json")):
            try:
                info = {"classes": list(read_json(path).get("per_class", {}))}
                break
            except (SegsynthError, AttributeError):
                continue
    if not (root / "classes.json").is_file():
        missing.append("classes.json (written at the start of a run)")
    classes = [str(name) for name in (info or {}).get("classes", [])]
    palette = np.zeros((256, 3), np.uint8)
    colours = (info or {}).get("palette") or []
    for index in range(len(classes)):
        colour = colours[index] if index < len(colours) else _default_colour(index)
        palette[index] = np.clip(np.asarray(colour, int)[:3], 0, 255)
    palette[IGNORE_INDEX] = IGNORE_COLOUR
    return classes, palette


def _default_colour(index: int) -> tuple[int, int, int]:
    return ((index * 97) % 256, (index * 57 + 80) % 256, (index * 131 + 160) % 256)


def arm_sets(run: RunFolder) -> dict[str, list[str]]:
    """The synthetic sets each arm trains on: results.json says; for an unfinished run, the method's table."""
    if run.results and all("synthetic_sets" in arm for arm in run.results.get("arms", {}).values()):
        return {name: list(arm["synthetic_sets"]) for name, arm in run.results["arms"].items()}
    table = method_arms(run)
    if table is None:
        run.notes.append(f"unknown method {run.method!r}: the arms' synthetic sets are not known")
        return {arm: [] for arm in run.arms}
    return {arm: list(table[arm].synthetic) if arm in table else [] for arm in run.arms}


def method_arms(run: RunFolder) -> dict | None:
    """The run's arms by name from its method's table, the derived ones (sweeps, closed-loop rounds) included
    where the saved config still reads; None for an unknown method."""
    from segsynth.config import build_config
    from segsynth.run import METHODS  # the method tables (torch and the stages come with them)
    from segsynth.stage_configs import RunConfig

    method = METHODS.get(run.method)
    if method is None:
        return None
    try:
        return method.arm_table(build_config(RunConfig, run.config, "run.config.yaml"))
    except SegsynthError:
        return dict(method.arms)


def arm_variants(run: RunFolder) -> dict[str, dict]:
    """What each derived arm varies (Arm.tags): results.json says; for an unfinished run, the method's table."""
    if run.results and all("variant" in arm for arm in run.results.get("arms", {}).values()):
        return {name: dict(arm["variant"]) for name, arm in run.results["arms"].items()}
    table = method_arms(run) or {}
    return {arm: dict(table[arm].tags) if arm in table else {} for arm in run.arms}


def arm_method(run: RunFolder, arm: str) -> str:
    if run.method != "all":
        return run.method
    return next((member for member in MEMBERS if arm.startswith(member + "-")), "shared")


# --- 2. The numbers -----------------------------------------------------------------------------------------


def arm_table(run: RunFolder, sets: dict[str, list[str]]) -> dict[str, dict]:
    """Per arm (config order): the metrics of every seed found on disk, summarised as results.json does."""
    table = {}
    for arm in run.arms:
        metrics = {}
        for seed in run.seeds:
            path = run.root / "arms" / arm / f"seed{seed}" / f"metrics_{run.eval_split}.json"
            if path.is_file():
                try:
                    metrics[seed] = read_json(path)
                    continue
                except SegsynthError as error:
                    run.missing.append(f"{path.relative_to(run.root)} (unreadable: {error})")
                    continue
            run.missing.append(f"{path.relative_to(run.root)} (arm {arm}, seed {seed}: not trained or not evaluated)")
        summary = summarize_seeds(metrics, run.classes)
        # a training that ran beside others is recorded under its name + PARALLEL_MARK (its own seconds)
        seconds = sum(run.seconds.get(f"train {arm} seed {seed}{mark}", 0.0)
                      for seed in run.seeds for mark in ("", PARALLEL_MARK))
        images = sum(len(run.records(name)) for name in sets.get(arm, []))
        table[arm] = {**summary, "method": arm_method(run, arm), "synthetic_images": images, "train_seconds": seconds}
    return table


def check_sets(run: RunFolder, sets: dict[str, list[str]]) -> None:
    """Every synthetic set an arm trains on, and the methods' diagnostics, or a line under Missing."""
    for name in sorted({name for names in sets.values() for name in names}):
        users = ", ".join(arm for arm, names in sets.items() if name in names)
        if not (run.synthetic(name) / "manifest.jsonl").is_file():
            run.missing.append(f"synthetic/{name}/ (the synthetic set of {users}: not synthesized yet)")
        elif not run.records(name):
            run.missing.append(f"synthetic/{name}/ has no finished sample (used by {users})")
    used = {name for names in sets.values() for name in names}
    wanted = {"masksyn": ("mask_quality/mask_quality.json", "SegGen's mask quality"),
              "attention": ("attention_quality/attention_quality.json", "Attn2mask's pseudo-mask quality"),
              "hardness": ("plans/hardness.jsonl", "FreeMask's hardness plan")}
    for prefix, (path, what) in wanted.items():  # the diagnostics of the sets some arm trains on
        if any(name.startswith(prefix) for name in used) and not (run.root / path).is_file():
            run.missing.append(f"{path} ({what})")


# --- 3. Pictures ---------------------------------------------------------------------------------------------


def png_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG", compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def tile_uri(array: np.ndarray, photo: bool) -> str:
    """A gallery tile: at most TILE_STORED high; a picture taller than TILE_HEIGHT as JPEG, the rest PNG."""
    picture = Image.fromarray(np.asarray(array, np.uint8)[..., :3] if np.ndim(array) == 3 else np.asarray(array, np.uint8))
    if picture.height > TILE_STORED:
        width = max(1, round(picture.width * TILE_STORED / picture.height))
        picture = picture.resize((width, TILE_STORED), Image.BILINEAR if photo else Image.NEAREST)
    if not photo or picture.height <= TILE_HEIGHT:
        return png_uri(np.asarray(picture))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_uri(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _label(text: str) -> str:
    """A class name as matplotlib text, literally (a '$' would start mathtext)."""
    return str(text).replace("$", r"\$")


def grouped_bars(groups: list[str], series: dict[str, list], ylabel: str, title: str, ymax: float | None = None):
    """One bar per series in each group (None -> no bar); long group lists are split over several rows."""
    plt = _pyplot()
    per_row = 24
    rows = max(1, math.ceil(len(groups) / per_row))
    width_inches = min(16, 2.5 + 0.55 * min(len(groups), per_row) * max(1, len(series)) ** 0.5)
    figure, axes = plt.subplots(rows, 1, figsize=(width_inches, 3.2 * rows), squeeze=False)
    width = 0.8 / max(1, len(series))
    for row in range(rows):
        axis = axes[row][0]
        chunk = range(row * per_row, min(len(groups), (row + 1) * per_row))
        x = np.arange(len(chunk))
        for number, (name, values) in enumerate(series.items()):
            heights = [values[i] if values[i] is not None and np.isfinite(values[i]) else 0.0 for i in chunk]
            axis.bar(x + (number - (len(series) - 1) / 2) * width, heights, width, label=_label(name))
        axis.set_xticks(x)
        axis.set_xticklabels([_label(groups[i]) for i in chunk], rotation=30, ha="right", fontsize=8)
        axis.set_ylabel(ylabel)
        if ymax is not None:
            axis.set_ylim(0, ymax)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_title(_label(title))
    if len(series) > 1:
        axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure_uri(figure)


# --- 4. HTML pieces -------------------------------------------------------------------------------------------


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def img(uri: str, alt: str, css: str = "chart") -> str:
    return f'<img class="{css}" src="{uri}" alt="{esc(alt)}">'


def table_html(header: list[str], rows: list[list], sortable: bool = False, numeric_from: int = 1) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="{"num" if i >= numeric_from else ""}">{esc(_cell(v))}</td>' for i, v in enumerate(row)) + "</tr>"
        for row in rows)
    return f'<table class="{"sortable" if sortable else ""}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def legend_html(run: RunFolder) -> str:
    items = "".join(f'<span class="swatch" style="background: rgb({int(r)},{int(g)},{int(b)})"></span>{esc(name)} '
                    for name, (r, g, b) in zip(run.classes, run.palette[: len(run.classes)]))
    return f'<p class="legend">{items}<span class="swatch" style="background: #000"></span>ignore</p>'


# --- 5. Sections ------------------------------------------------------------------------------------------------


def comparison_section(run: RunFolder, table: dict[str, dict]) -> str:
    real_arm = table.get("real")
    real = None if real_arm is None else real_arm["mean"]
    rows = []
    for name, arm in table.items():
        delta = None if arm["mean"] is None or real is None or name == "real" else round(arm["mean"] - real, 2)
        paired = None if real_arm is None or name == "real" else paired_with_real(arm["miou"], real_arm["miou"])
        rows.append([name, arm["method"], arm["mean"], arm["spread"], ", ".join(f"{v:.2f}" for v in arm["miou"].values()),
                     None if delta is None else f"{delta:+.2f}", format_paired(paired) or None,
                     arm["synthetic_images"], round(arm["train_seconds"])])
    train = run.config.get("train") or {}
    settings = (f"data <code>{esc(run.config.get('data', '?'))}</code>, evaluated on <code>{esc(run.eval_split)}</code>; "
                f"segmenter {esc(train.get('model', '?'))}, {esc(train.get('iterations', '?'))} iterations of batch "
                f"{esc(train.get('batch_size', '?'))} per arm; seeds {esc(run.seeds)}; "
                f"{esc(run.config.get('images_per_mask', '?'))} synthetic image(s) per real mask.")
    return (f"<h2 id='comparison'>Comparison</h2><p>{settings}</p>" +
            table_html(["arm", "method", "mIoU mean", "spread", "per seed", "vs real", "seeds above real", "synthetic images",
                        "train s"],
                       rows, sortable=True, numeric_from=2) +
            "<p class='hint'>Click a column header to sort. Spread = max - min over seeds. Seeds above real: the seeds "
            "whose mIoU beats real-only's at the same seed (same initialisation), out of those both arms have, and "
            "the range of those differences.</p>")


def per_class_section(run: RunFolder, table: dict[str, dict]) -> str:
    scored = {name: arm for name, arm in table.items() if arm["per_class"]}
    if not scored or not run.classes:
        return "<h2 id='per-class'>Per-class IoU</h2><p>No arm has been evaluated yet.</p>"
    rows = [[name] + [arm["per_class"].get(c) for c in run.classes] for name, arm in scored.items()]
    series = {name: [arm["per_class"].get(c) for c in run.classes] for name, arm in scored.items()}
    chart = grouped_bars(run.classes, series, "IoU (%)", "Per-class IoU per arm (mean over seeds)", ymax=100)
    return ("<h2 id='per-class'>Per-class IoU</h2>" + img(chart, "per-class IoU bars per arm") +
            table_html(["arm", *run.classes], rows, sortable=True))


def sweeps_section(run: RunFolder, table: dict[str, dict], sets: dict[str, list[str]]) -> str:
    """FreeMask's sweeps: filter settings, synthetic volume and share, and the closed loop's per-class IoU per round
    (the tables of results.md, with a chart of the rounds)."""
    from segsynth.report import sweep_rows

    variants = arm_variants(run)
    if not any(variant.get("sweep") for variant in variants.values()):
        return ""
    iterations = (run.config.get("train") or {}).get("iterations")
    arms = {}
    for name, arm in table.items():
        ignored = [r["ignored_fraction"] for set_name in sets.get(name, []) for r in run.records(set_name)
                   if "ignored_fraction" in r]
        arms[name] = {**arm, "variant": variants.get(name, {}),
                      "iterations": variants.get(name, {}).get("iterations", iterations),
                      "ignored_fraction": float(np.mean(ignored)) if ignored and
                      variants.get(name, {}).get("judge") != "none" else None}
    results = {"arms": arms, "classes": run.classes}
    parts = ["<h2 id='sweeps'>Sweeps</h2>"]
    for origin, rows in sweep_rows(results, "filter").items():
        parts.append(f"<h3>Filter settings of {esc(origin)}</h3>" + table_html(
            ["arm", "alpha", "judge", "ignored (%)", "mIoU mean", "spread"],
            [[name, variant.get("alpha") or "off", variant.get("judge"),
              None if arms[name]["ignored_fraction"] is None else 100 * arms[name]["ignored_fraction"],
              arms[name]["mean"], arms[name]["spread"]] for name, variant in rows], sortable=True, numeric_from=3))
    for origin, rows in sweep_rows(results, "volume").items():
        parts.append(f"<h3>Synthetic volume of {esc(origin)}</h3>" + table_html(
            ["arm", "K (images per mask)", "synthetic images", "iterations", "mIoU mean", "spread"],
            [[name, variant.get("k"), arms[name]["synthetic_images"], arms[name]["iterations"], arms[name]["mean"],
              arms[name]["spread"]] for name, variant in rows], numeric_from=1) +
            "<p class='hint'>Each K trains on a nested subset of one synthetic set rendered at the largest K; "
            f"iterations {'scaled with K' if any(v.get('iterations_rule') == 'scaled' for _, v in rows) else 'the same for every K'}.</p>")
    for origin, rows in sweep_rows(results, "share").items():
        parts.append(f"<h3>Synthetic share of {esc(origin)}</h3>" + table_html(
            ["arm", "synthetic share", "mIoU mean", "spread", *run.classes],
            [[name, variant.get("share"), arms[name]["mean"], arms[name]["spread"],
              *[arms[name]["per_class"].get(c) for c in run.classes]] for name, variant in rows], numeric_from=1) +
            "<p class='hint'>The share of training draws taken from the synthetic sets: half in the joint arm, "
            "P in its replace-recipe variants (a real draw becomes a pooled synthetic one with probability P).</p>")
    for origin, rows in sweep_rows(results, "loop").items():
        last = rows[-1][1]
        series = {f"round {variant['round']}": [arms[name]["per_class"].get(c) for c in run.classes]
                  for name, variant in rows if arms[name]["per_class"]}
        chart = img(grouped_bars(run.classes, series, "IoU (%)", f"Per-class IoU per closed-loop round of {origin}",
                                 ymax=100), "per-class IoU per round") if series and run.classes else ""
        parts.append(f"<h3>Closed loop of {esc(origin)}</h3><p>signal {esc(last.get('signal'))}, planner "
                     f"{esc(last.get('planner', 'hardness'))}, init "
                     f"{esc(last.get('init'))}, sets {esc(last.get('sets'))}.</p>" + chart + table_html(
                         ["round", "arm", "synthetic images", "re-planned images", "mIoU mean", "spread",
                          *run.classes],
                         [[variant["round"], name, arms[name]["synthetic_images"],
                           (arms[name].get("plan_change") or {}).get("moved"), arms[name]["mean"],
                           arms[name]["spread"], *[arms[name]["per_class"].get(c) for c in run.classes]]
                          for name, variant in rows], numeric_from=2))
    return "".join(parts)


def freemask_section(run: RunFolder, config: ReportConfig) -> str:
    filtered = [name for name in ("hardness", "uniform") if run.records(name)]
    plan_path = run.root / "plans" / "hardness.jsonl"
    if not filtered and not plan_path.is_file():
        return ""
    parts = ["<h2 id='freemask'>FreeMask</h2>"]
    # 1. The hardness plan: how hard each mask is and how many images it got.
    if plan_path.is_file():
        entries = [e for e in read_jsonl(plan_path) if isinstance(e, dict)]
        hardness = [float(e["hardness"]) for e in entries if isinstance(e.get("hardness"), (int, float))]
        images = [len(e.get("seeds") or []) for e in entries]
        if entries:
            plt = _pyplot()
            figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
            left.hist(hardness, bins=min(30, max(5, len(hardness) // 4)), color="#4477aa")
            left.set_xlabel("hardness (mean class loss of the mask)")
            left.set_ylabel("masks")
            left.set_title("Hardness of the real masks")
            counts = np.bincount(images)
            right.bar(np.arange(1, len(counts)), counts[1:], color="#cc6677")
            right.set_xticks(np.arange(1, len(counts), max(1, (len(counts) - 1) // 10)))
            right.set_xlabel("synthetic images for the mask (k)")
            right.set_ylabel("masks")
            right.set_title(f"Images per mask ({sum(images)} in all)")
            parts.append("<h3>Hardness-aware plan</h3>" + img(figure_uri(figure), "hardness histogram and images per mask"))
    # 2. What the filter ignored, per class.
    ignored = {name: _ignored_by_class(run, name) for name in filtered}
    ignored = {name: values for name, values in ignored.items() if values}
    if ignored:
        series = {f"set {name}": [values.get(c) for c in run.classes] for name, values in ignored.items()}
        parts.append("<h3>Pixels the filter ignored, per class</h3>" +
                     img(grouped_bars(run.classes, {k: [None if v is None else 100 * v for v in vals]
                                                    for k, vals in series.items()}, "ignored (%)",
                                      "Share of each class's synthetic pixels set to ignore (loss > alpha x mean)"),
                         "per-class ignored fractions of the filter") +
                     table_html(["set", *run.classes], [[name, *[None if v is None else 100 * v for v in values]]
                                                        for name, values in series.items()]))
    # 3. The gallery.
    if filtered:
        parts.append(gallery(run, config, filtered[0], ("real mask", "synthetic image", "filtered pixels (red)"),
                             _freemask_row))
    return "".join(parts)


def _ignored_by_class(run: RunFolder, name: str) -> dict[str, float]:
    """Mean over filtered samples of each class's ignored share (the filter's per-record `ignored`)."""
    records = [r for r in run.records(name) if isinstance(r.get("ignored"), dict)]
    result = {}
    for c in run.classes:
        values = [r["ignored"][c] for r in records if c in r["ignored"]]
        if values:
            result[c] = float(np.mean(values))
    return result


def seggen_section(run: RunFolder, config: ReportConfig) -> str:
    quality_path = run.root / "mask_quality" / "mask_quality.json"
    rendered = [name for name in ("masksyn-a", "masksyn-b") if run.records(name)]
    if not quality_path.is_file() and not rendered:
        return ""
    parts = ["<h2 id='seggen'>SegGen</h2>"]
    if quality_path.is_file():
        try:
            parts.append(mask_quality_html(run, read_json(quality_path)))
        except (SegsynthError, KeyError, TypeError, ValueError) as error:
            run.missing.append(f"mask_quality/mask_quality.json (unreadable: {error})")
    for name in rendered[:1]:
        parts.append(gallery(run, config, name, ("caption", "generated mask", "rendered image"), _seggen_row))
    return "".join(parts)


def mask_quality_html(run: RunFolder, report: dict) -> str:
    classes = report.get("classes") or run.classes
    plt = _pyplot()
    frequency, components = report["class_frequency"], report["components_per_mask"]
    charts = [grouped_bars(classes, {"real": [100 * v for v in frequency["real"]],
                                     "generated": [100 * v for v in frequency["generated"]]},
                           "share of labelled pixels (%)", "Class frequency: real vs generated masks"),
              grouped_bars(classes, {"real": components["real"], "generated": components["generated"]},
                           "pieces per mask", "Connected pieces per mask where the class appears")]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for axis, name in zip(axes, ("real", "generated")):
        shown = axis.imshow(np.asarray(report["cooccurrence"][name], float), vmin=0, vmax=1, cmap="viridis")
        axis.set_xticks(range(len(classes)))
        axis.set_yticks(range(len(classes)))
        axis.set_xticklabels([_label(c) for c in classes], rotation=90, fontsize=7)
        axis.set_yticklabels([_label(c) for c in classes], fontsize=7)
        axis.set_title(f"co-occurrence, {name} masks")
    figure.colorbar(shown, ax=list(axes), shrink=0.8)
    charts.append(figure_uri(figure))
    alignment = report.get("alignment") or {}
    numbers = [["KL(real || generated) of class frequencies", report.get("kl_real_generated")],
               ["co-occurrence mean |real - generated|", report.get("cooccurrence_mean_abs_diff")],
               ["ignore share of generated masks (%)",
                100 * (report.get("ignore_fraction") or {}).get("generated", math.nan)],
               ["masks generated / real", f"{report.get('num_generated')} / {report.get('num_real')}"]]
    if alignment:
        numbers += [["alignment: real-trained segmenter's mIoU on the rendered images vs their masks",
                     alignment.get("rendered_miou")],
                    [f"the same segmenter's mIoU on real {alignment.get('real_split', 'val')} images",
                     alignment.get("real_miou")]]
    grid = run.root / "mask_quality" / "mask_quality_grid.png"
    grid_html = ""
    if grid.is_file():
        grid_html = "<h4>caption | colour map | decoded mask | rendered image</h4>" + img(
            png_uri(np.array(Image.open(grid).convert("RGB"))), "mask quality grid", "grid")
    return ("<h3>Mask quality</h3>" + table_html(["figure", "value"], numbers) +
            "".join(img(uri, "mask quality figure") for uri in charts) + grid_html)


def attention_section(run: RunFolder, config: ReportConfig) -> str:
    quality_path = run.root / "attention_quality" / "attention_quality.json"
    band = "attention-band" if run.records("attention-band") else None
    if not quality_path.is_file() and band is None:
        return ""
    parts = ["<h2 id='attn2mask'>Attn2mask / DiffuMask</h2>"]
    if quality_path.is_file():
        try:
            quality = read_json(quality_path)
            recipes = quality["recipes"]
            classes = quality.get("classes") or run.classes
            rows = [[name, r.get("miou"), None if r.get("coverage") is None else 100 * r["coverage"]]
                    for name, r in recipes.items()]
            chart = grouped_bars(classes, {name: [r["per_class"].get(c) for c in classes] for name, r in recipes.items()},
                                 "IoU (%)", f"Pseudo-masks of noised real {quality.get('split', 'val')} images vs their "
                                            "labels, per recipe", ymax=100)
            parts.append(f"<h3>Pseudo-mask quality ({esc(quality.get('images', '?'))} real images)</h3>" +
                         table_html(["recipe", "mIoU", "labelled pixels (%)"], rows) + img(chart, "attention quality"))
        except (SegsynthError, KeyError, TypeError, AttributeError) as error:
            run.missing.append(f"attention_quality/attention_quality.json (unreadable: {error})")
    if band:
        ignored = _band_ignored(run, band, config.scan)
        if ignored:
            parts.append("<h3>Pixels in the uncertain band (ignored), per class of the plain pseudo-mask</h3>" +
                         img(grouped_bars(run.classes, {"band": [None if ignored.get(c) is None else 100 * ignored[c]
                                                                 for c in run.classes]}, "ignored (%)",
                                          "Share of each class's pseudo-mask pixels the band set ignores"),
                             "per-class ignored fractions of the attention band"))
        parts.append(gallery(run, config, band, ("image", "attention heat map", "pseudo-mask"), _attention_row))
    return "".join(parts)


def _band_ignored(run: RunFolder, name: str, scan: int) -> dict[str, float]:
    """Per class of the plain (band-free) label: the share of its pixels the band set marks ignore."""
    root = run.synthetic(name)
    records = [r for r in run.records(name) if "raw_label" in (r.get("extras") or {})]
    labelled = np.zeros(256, np.int64)
    ignored = np.zeros(256, np.int64)
    for record in records[: scan or None]:
        raw = _read(root, record["extras"]["raw_label"])
        mask = _read(root, record["mask"])
        if raw is None or mask is None or raw.shape != mask.shape:
            continue
        labelled += np.bincount(raw.ravel(), minlength=256)
        ignored += np.bincount(raw[mask == IGNORE_INDEX].ravel(), minlength=256)
    return {c: float(ignored[i] / labelled[i]) for i, c in enumerate(run.classes) if labelled[i]}


def stages_section(run: RunFolder) -> str:
    """Seconds per stage, and images/s where the stage has a count of images."""
    if not run.seconds:
        return "<h2 id='stages'>Seconds per stage</h2><p>No stage has finished yet.</p>"
    train = run.config.get("train") or {}
    images_per_training = int(train.get("iterations", 0) or 0) * int(train.get("batch_size", 0) or 0)
    rows = []
    for stage, seconds in run.seconds.items():
        bare = re.sub(r"^[\w-]+: ", "", stage)  # "seggen: synthesize masks" -> "synthesize masks"
        images = None
        if match := re.fullmatch(r"(synthesize|relabel) (\S+)", bare):
            images = len(run.records(match.group(2))) or None
        elif match := re.fullmatch(r"filter (\S+)", bare):
            images = sum(1 for r in run.records(match.group(1)) if r.get("filtered_mask")) or None
        elif re.fullmatch(r"train .+ seed \d+", bare) and images_per_training:
            images = images_per_training
        rate = images / seconds if images and seconds > 0 else None
        rows.append([stage, float(seconds), images, rate])
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(9, 0.6 + 0.22 * len(rows)))
    axis.barh(range(len(rows)), [row[1] for row in rows], color="#228833")
    axis.set_yticks(range(len(rows)))
    axis.set_yticklabels([_label(row[0]) for row in rows], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("seconds")
    total = sum(row[1] for row in rows)
    return (f"<h2 id='stages'>Seconds per stage</h2><p>Total {total:.0f} s ({total / 60:.1f} min). Images/s: "
            "synthetic samples made (synthesize, relabel) or scored (filter), or training images seen "
            "(iterations x batch) per second.</p>" +
            table_html(["stage", "seconds", "images", "images/s"], rows, sortable=True) +
            img(figure_uri(figure), "seconds per stage"))


# --- 6. Galleries, grouped by class ---------------------------------------------------------------------------------


def _read(root: Path, relative: str) -> np.ndarray | None:
    try:
        return np.array(Image.open(safe_relative_path(root, relative, "manifest path")))
    except (OSError, SegsynthError):
        return None


def gallery(run: RunFolder, config: ReportConfig, name: str, columns: tuple[str, str, str], row_of) -> str:
    """Under each class, up to `per_class` samples of set `name` where the class covers the largest share of the
    mask, from different source masks, each shown under one class while others remain; each row made by
    `row_of(run, root, record)`."""
    root = run.synthetic(name)
    records = run.records(name)
    shares: dict[str, np.ndarray] = {}
    for record in records[: config.scan or None]:
        mask = _read(root, record["mask"])
        if mask is not None:
            counts = np.bincount(mask.ravel(), minlength=256)[: len(run.classes)]
            shares[record["id"]] = counts / max(1, mask.size)
    by_id = {r["id"]: r for r in records}
    used: set[str] = set()
    sections = []
    presence = np.sum([share > 0 for share in shares.values()], axis=0) if shares else np.zeros(len(run.classes))
    shown = sorted(np.argsort(-presence, kind="stable")[: config.gallery_classes or None])  # the most common classes
    for index in shown:
        class_name = run.classes[index]
        ranked = sorted((ids for ids in shares if shares[ids][index] > 0), key=lambda i: -shares[i][index])
        chosen, sources = [], set()
        for pool in ([i for i in ranked if i not in used], ranked):  # unused samples first
            for sample_id in pool:
                source = by_id[sample_id].get("source") or sample_id
                if len(chosen) < config.per_class and sample_id not in chosen and source not in sources:
                    chosen.append(sample_id)
                    sources.add(source)
        used.update(chosen)
        if not chosen:
            continue
        rows = "".join(row_of(run, root, by_id[i]) for i in chosen)
        sections.append(f"<details open><summary>{esc(class_name)} ({len(ranked)} sample(s) show it)</summary>"
                        f"<table class='gallery'><thead><tr>{''.join(f'<th>{esc(c)}</th>' for c in columns)}"
                        f"<th>sample</th></tr></thead><tbody>{rows}</tbody></table></details>")
    header = (f"<h3>Gallery: set <code>{esc(name)}</code> ({len(records)} samples; grouped by class, the samples where "
              f"it covers most of the mask)</h3>" + legend_html(run))
    if len(shown) < len(run.classes):
        header += (f"<p class='hint'>The {len(shown)} classes found in the most samples of the first "
                   f"{len(shares)}; --gallery-classes shows more.</p>")
    return header + ("".join(sections) or "<p>No sample could be read.</p>")


def _tile(array: np.ndarray | None, alt: str, photo: bool = True) -> str:
    if array is None:
        return "<td class='absent'>(file missing)</td>"
    return f"<td>{img(tile_uri(array, photo), alt, 'tile')}</td>"


def _colour(run: RunFolder, mask: np.ndarray | None) -> np.ndarray | None:
    return None if mask is None else run.palette[mask]


def _freemask_row(run: RunFolder, root: Path, record: dict) -> str:
    image, mask = _read(root, record["image"]), _read(root, record["mask"])
    shown = None
    if image is not None and mask is not None:
        shown = image[..., :3].copy() if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        filtered = _read(root, record["filtered_mask"]) if record.get("filtered_mask") else None
        if filtered is not None and filtered.shape == mask.shape:
            ignored = (filtered == IGNORE_INDEX) & (mask != IGNORE_INDEX)
            shown[ignored] = (0.35 * shown[ignored] + 0.65 * RED).astype(np.uint8)
    fraction = record.get("ignored_fraction")
    note = "not filtered" if fraction is None else f"{100 * fraction:.1f}% ignored"
    return (f"<tr>{_tile(_colour(run, mask), 'real mask', photo=False)}{_tile(image, 'synthetic image')}"
            f"{_tile(shown, 'filtered pixels')}<td class='meta'>{esc(record['id'])}<br>{esc(note)}</td></tr>")


def _seggen_row(run: RunFolder, root: Path, record: dict) -> str:
    source = (record.get("meta") or {}).get("source") or {}
    caption = source.get("prompt") or record.get("prompt") or "(no caption)"
    mask, image = _read(root, record["mask"]), _read(root, record["image"])
    return (f"<tr><td class='caption'>{esc(caption)}</td>{_tile(_colour(run, mask), 'generated mask', photo=False)}"
            f"{_tile(image, 'rendered image')}<td class='meta'>{esc(record['id'])}</td></tr>")


def _attention_row(run: RunFolder, root: Path, record: dict) -> str:
    extras = record.get("extras") or {}
    image, mask = _read(root, record["image"]), _read(root, record["mask"])
    heat = _read(root, extras["attention"]) if "attention" in extras else None
    if heat is not None and heat.ndim == 2:
        heat = np.repeat(heat[..., None], 3, axis=2)
    prompt = record.get("prompt") or (record.get("meta") or {}).get("prompt") or ""
    return (f"<tr>{_tile(image, 'image')}{_tile(heat, 'attention heat map')}"
            f"{_tile(_colour(run, mask), 'pseudo-mask', photo=False)}"
            f"<td class='meta'>{esc(record['id'])}<br>{esc(prompt)}</td></tr>")


# --- 7. The page ---------------------------------------------------------------------------------------------------


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1300px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; vertical-align: middle; }
th { background: #f0f0f0; }
table.sortable th { cursor: pointer; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.caption { max-width: 320px; font-size: 0.9em; }
td.meta { font-size: 0.75em; color: #555; max-width: 260px; word-break: break-all; }
img.chart { display: block; max-width: 100%; margin: 0.5em 0; }
img.grid { display: block; max-width: 100%; image-rendering: pixelated; }
img.tile { height: TILE_HEIGHTpx; image-rendering: pixelated; display: block; }
.missing { background: #fff4e5; border: 1px solid #f0b060; padding: 0.5em 1em; }
.hint, .legend { font-size: 0.8em; color: #555; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.2em 0 0.6em; vertical-align: middle;
          border: 1px solid #888; }
details { margin: 0.3em 0; } summary { cursor: pointer; font-weight: 600; }
nav a { margin-right: 1em; }
""".replace("TILE_HEIGHT", str(TILE_HEIGHT))

# Click a header to sort its table (numbers as numbers, '-' last).
SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, column) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var up = th.dataset.up !== "1"; th.dataset.up = up ? "1" : "0";
    function key(row) { var t = row.cells[column].textContent; var n = parseFloat(t);
      return isNaN(n) ? (t === "-" ? null : t) : n; }
    rows.sort(function (a, b) { var x = key(a), y = key(b);
      if (x === null) return 1; if (y === null) return -1;
      return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def write_report(config: ReportConfig) -> Path:
    """Write the HTML report of run folder `config.run` (default RUN/report.html); returns its path."""
    # 1. What the folder holds, and what it should.
    run = read_run(Path(config.run))
    sets = arm_sets(run)
    table = arm_table(run, sets)
    check_sets(run, sets)

    # 2. The sections, each from its own files.
    body = [comparison_section(run, table), per_class_section(run, table), sweeps_section(run, table, sets),
            freemask_section(run, config), seggen_section(run, config), attention_section(run, config),
            stages_section(run)]

    # 3. The page: what is missing first (sections above may have added to it).
    missing = ""
    if run.missing:
        missing = ("<div class='missing'><h2 id='missing'>Missing</h2><p>This run folder is incomplete; the sections "
                   "below show what it has.</p><ul>" + "".join(f"<li>{esc(m)}</li>" for m in run.missing) + "</ul></div>")
    notes = "".join(f"<p class='hint'>{esc(n)}</p>" for n in run.notes)
    links = "".join(f"<a href='#{anchor}'>{label}</a>" for anchor, label in (
        ("comparison", "comparison"), ("per-class", "per-class IoU"), ("sweeps", "sweeps"), ("freemask", "FreeMask"), ("seggen", "SegGen"),
        ("attn2mask", "Attn2mask"), ("stages", "seconds")) if f"id='{anchor}'" in "".join(body))
    title = f"segsynth run: {run.method} on {run.config.get('data', '?')}"
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1><nav>{links}</nav>{missing}{notes}"
            + "".join(body) +
            f"<p class='hint'>Made by <code>segsynth report</code> from the files in {esc(run.root.resolve())}."
            f"</p><script>{SCRIPT}</script></body></html>\n")
    out = Path(config.out) if config.out else run.root / REPORT
    atomic_write_text(out, page)
    return out
