"""`segsynth report RUN`: one self-contained HTML page from the files of a run folder."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from segsynth.cli import main
from segsynth.html_report import write_report
from segsynth.report import format_paired
from segsynth.stage_configs import ReportConfig

IMG = re.compile(r"<img [^>]*src=\"([^\"]*)\"")


def images_of(page: str) -> list[np.ndarray]:
    """Every <img> of the page, decoded; each must be embedded (no file beside the page, no server)."""
    pictures = []
    for source in IMG.findall(page):
        assert source.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), source[:60]
        pictures.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))))
    return pictures


def test_the_report_of_a_comparison_run_holds_every_section(compare_run, tmp_path):
    out, results, _ = compare_run
    page = (out / "report.html").read_text()  # written by `segsynth run` at its end
    assert main(["report", str(out), "--out", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text() == page  # from the files alone: the same page again

    # 1. The comparison table: every arm with its mean, as in results.json.
    table = page[page.index("id='comparison'"):page.index("id='per-class'")]
    for name, arm in results["arms"].items():
        assert re.search(rf"<td class=\"\">{re.escape(name)}</td><td class=\"\">[a-z0-9]+</td><td class=\"num\">"
                         rf"{arm['mean']:.2f}</td>", table), name
        # Each arm against real-only at the same seeds, and its own training seconds, as results.md gives them.
        row = table[table.index(f'<td class="">{name}</td>'):]
        row = row[:row.index("</tr>")]
        if name != "real":
            assert f'<td class="num">{format_paired(arm["vs_real_paired"])}</td>' in row, name
        assert row.endswith(f'<td class="num">{round(arm["train_seconds"])}</td>'), name
    # 2-6. Every section, from its own files.
    for anchor in ("per-class", "freemask", "seggen", "attn2mask", "stages"):
        assert f"id='{anchor}'" in page, anchor
    for text in ("Hardness-aware plan", "Pixels the filter ignored, per class", "Mask quality",
                 "Pseudo-mask quality", "Gallery: set <code>hardness</code>", "Gallery: set <code>masksyn-b</code>",
                 "Gallery: set <code>attention-band</code>", "images/s", "seggen: synthesize masksyn-b"):
        assert text in page, text
    assert "id='missing'" not in page  # a finished run lacks nothing
    # Galleries are grouped by class; a SegGen row shows its caption.
    caption = read_first_caption(out / "synthetic" / "masksyn-b")
    assert f"<td class='caption'>{caption}</td>" in page
    assert "<summary>sky (" in page
    # Every picture is an embedded PNG that decodes.
    pictures = images_of(page)
    assert len(pictures) > 30 and all(p.size > 0 for p in pictures)
    # Datasets with many classes: each gallery shows the classes found in the most samples.
    capped = write_report(ReportConfig(run=str(out), out=str(tmp_path / "capped.html"), gallery_classes=3)).read_text()
    assert capped.count("<details open>") == 3 * 3 and "The 3 classes found in the most samples" in capped


def read_first_caption(root: Path) -> str:
    records = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    return records[0]["meta"]["source"]["prompt"]


def test_an_incomplete_run_folder_is_reported_with_what_is_missing(compare_run, tmp_path, capsys):
    """Bad input: a run folder that is incomplete (a run still going, or stopped): what is there is shown, what is
    missing is listed, nothing crashes."""
    out, _, _ = compare_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "results.json").unlink()
    (run / "report.html").unlink()
    shutil.rmtree(run / "arms" / "seggen-masksyn+imgsyn-replace")
    (run / "arms" / "real" / "seed1" / "metrics_val.json").unlink()
    shutil.rmtree(run / "synthetic" / "attention-band")
    (run / "mask_quality" / "mask_quality.json").unlink()
    (run / "seconds.json").write_text("{not json")

    assert main(["report", str(run)]) == 0
    assert "report:" in capsys.readouterr().out
    page = (run / "report.html").read_text()
    missing = page[page.index("id='missing'"):page.index("</ul>")]
    for item in ("results.json (the run has not reached its end", "arms/real/seed1/metrics_val.json",
                 "arms/seggen-masksyn+imgsyn-replace/seed0/metrics_val.json", "synthetic/attention-band/",
                 "mask_quality/mask_quality.json", "seconds.json (unreadable"):
        assert item in missing, item
    # What is there is still shown: the real arm from its one remaining seed, FreeMask's sections.
    real = json.loads((out / "arms" / "real" / "seed0" / "metrics_val.json").read_text())["miou"]
    assert f"<td class=\"num\">{round(real, 2):.2f}</td>" in page
    assert "Gallery: set <code>hardness</code>" in page and "Gallery: set <code>attention-band</code>" not in page
    images_of(page)

    # A folder that is not a run at all is refused with the fix.
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a segsynth run folder (no run.config.yaml or results.json)" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no such run folder" in capsys.readouterr().err


HOSTILE = ["<b>sky</b>", "building & <i>co</i>", "road\"'><script>alert(1)</script>"]


def test_class_names_and_captions_with_html_in_them_are_escaped(compare_run, tmp_path):
    """Bad input: a class name (or caption) with HTML in it is shown as text, everywhere it appears."""
    out, _, _ = compare_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    names = json.loads((run / "classes.json").read_text())["classes"]
    renamed = dict(zip(names, HOSTILE + names[len(HOSTILE):]))
    info = json.loads((run / "classes.json").read_text())
    (run / "classes.json").write_text(json.dumps({**info, "classes": [renamed[c] for c in names]}))
    for path in run.glob("arms/*/seed*/metrics_val.json"):  # the metrics name the classes too
        metrics = json.loads(path.read_text())
        metrics["per_class"] = {renamed[c]: v for c, v in metrics["per_class"].items()}
        path.write_text(json.dumps(metrics))
    manifest = run / "synthetic" / "masksyn-b" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    records[0]["meta"]["source"]["prompt"] = "a <img src=x onerror=alert(2)> & a road"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "results.json").unlink()  # its per-class keys are the old names

    page = write_report(ReportConfig(run=str(run))).read_text()
    for name in HOSTILE:
        escaped = name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;").replace(
            "'", "&#x27;")
        assert escaped in page, name
    assert "<script>alert" not in page and "<b>sky" not in page and "<i>co" not in page
    assert "a &lt;img src=x onerror=alert(2)&gt; &amp; a road" in page
    assert "<img src=x" not in page
    assert len(re.findall(r"<script>", page)) == 1  # only the page's own table sorter
    images_of(page)


def test_the_report_of_a_single_method_run_shows_its_own_sections(tmp_path):
    """A FreeMask-only run folder (no SegGen or attention files) gets the comparison and FreeMask sections only."""
    from segsynth.run import resolve_run_config, run

    out = tmp_path / "run"
    run(resolve_run_config({"data": "toy:n=6,n_val=3,size=32x40", "seeds": [0], "generator": "train",
                            "images_per_mask": 1, "device": "cpu", "out": str(out),
                            "arms": ["real", "synthetic-filtered-hardness"],
                            "train": {"iterations": 2, "batch_size": 2, "workers": 0, "warmup": 1},
                            "train_generator": {"size": [32, 40], "channels": [32, 64], "layers_per_block": 1,
                                                "iterations": 2, "max_minutes": 0.0, "batch_size": 2},
                            "synthesize": {"steps": 2, "batch_size": 6}}))
    page = (out / "report.html").read_text()
    assert "id='freemask'" in page and "id='seggen'" not in page and "id='attn2mask'" not in page
    assert "synthetic-filtered-hardness" in page and "id='missing'" not in page
    images_of(page)


def test_large_gallery_pictures_are_stored_small():
    """A 512 x 512 picture (Stable Diffusion size) is stored 192 high as JPEG; a mask stays PNG with its values."""
    from segsynth.html_report import TILE_STORED, tile_uri

    photo = np.random.default_rng(0).integers(0, 255, (512, 512, 3), np.uint8)
    uri = tile_uri(photo, photo=True)
    assert uri.startswith("data:image/jpeg;base64,") and len(uri) < 120_000
    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size == (TILE_STORED, TILE_STORED)
    mask = np.zeros((512, 512, 3), np.uint8)
    mask[:, 256:] = (70, 130, 180)
    small = np.asarray(Image.open(io.BytesIO(base64.b64decode(tile_uri(mask, photo=False).split(",", 1)[1]))))
    assert small.shape == (TILE_STORED, TILE_STORED, 3)
    assert {tuple(c) for c in small.reshape(-1, 3)} == {(0, 0, 0), (70, 130, 180)}  # nearest: no blended colours
    tiny = tile_uri(photo[:64, :80], photo=True)
    assert tiny.startswith("data:image/png;base64,")  # toy-sized pictures stay lossless


def test_trainings_that_ran_side_by_side_keep_their_seconds_in_the_table(compare_run, tmp_path):
    """`--parallel` records a training as "train ARM seed S (parallel)"; the table's "train s" counts it the same."""
    out, _, _ = compare_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    seconds = json.loads((copy / "seconds.json").read_text())
    trainings = [key for key in seconds if key.startswith("train ")]
    assert trainings
    marked = {(f"{key} (parallel)" if key in trainings else key): value for key, value in seconds.items()}
    (copy / "seconds.json").write_text(json.dumps(marked))

    def comparison(page: str) -> str:
        return page[page.index("id='comparison'"):page.index("id='per-class'")]

    original = comparison((out / "report.html").read_text())
    again = comparison(write_report(ReportConfig(run=str(copy), out=str(tmp_path / "r.html"))).read_text())
    assert again == original
