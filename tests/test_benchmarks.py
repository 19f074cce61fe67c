"""The benchmark scripts run and write their JSON (smoke runs at tiny sizes; no time is asserted).

A renamed option or a moved function breaks `make bench` silently otherwise: these run each
script as `make bench` does, as a subprocess, and check the figures are there and finite.
"""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest

from fakes import PYTHON, REPO, TOY_SPEC, subprocess_env

SMOKE = {
    "filter": (["--images", "16", "--size", "32x32", "--model", "segformer-tiny", "--batch", "4"],
               ["filter_images_per_s", "bare_forward_images_per_s", "ratio", "lane_probe_seconds"]),
    "train_input": (["--data", "toy:n=16,n_val=4,size=32x32", "--model", "segformer-tiny", "--iterations", "6",
                     "--batch", "4", "--workers", "0"],
                    ["pipeline_images_per_s", "bare_images_per_s", "ratio", "after_first_epoch_ratio"]),
    "planning": (["--data", "toy:n=40,size=32"], []),
    "segmenter_throughput": (["--models", "segformer-tiny,mask2former-tiny", "--size", "32x48", "--batch", "2",
                              "--iterations", "2", "--rounds", "1"],
                             ["a_images_per_s", "b_images_per_s", "ratio", "a_parameters", "b_parameters"]),
    "check_files": (["--pairs", "20", "--size", "32x32", "--camvid", ""],
                    ["generated_cold_s", "generated_cached_s", "projected_20k_pairs_cold_s"]),
    "synthesis": (["--size", "32", "--batch", "2", "--steps", "2", "--images", "4", "--rounds", "1",
                   "--channels", "8,16,32"], ["ratio"]),
    "mask_generation": (["--batch", "2", "--steps", "2", "--images", "4", "--rounds", "1"], ["ratio"]),
    "latent_generator": (["--data", "toy:n=8,n_val=4,size=32", "--autoencoder", "tiny", "--latent-size", "32,32",
                          "--latent-channels", "32,32", "--pixel-size", "32,32", "--pixel-channels", "32,32",
                          "--batch", "2", "--iterations", "1", "--rounds", "1", "--psnr-images", "2",
                          "--train-images", "4"],
                         ["psnr_val_mean", "pixel_iterations_per_s", "latent_iterations_per_s", "ratio"]),
}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_script_writes_its_figures(tmp_path, name):
    arguments, figures = SMOKE[name]
    out = tmp_path / f"bench_{name}.json"
    done = subprocess.run([PYTHON, f"benchmarks/bench_{name}.py", *arguments, "--out", str(out)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    for key in figures:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] >= 0, key
    if "ratio" in result:
        assert result["ratio"] > 0
    assert str(out) in done.stdout  # the table is printed, ending with where the JSON went


@pytest.mark.slow  # about 15 s: two worker processes each import torch and build the model
def test_under_load_benchmark_reports_ratios_only_from_an_undisturbed_baseline(tmp_path):
    out = tmp_path / "bench_under_load.json"
    done = subprocess.run([PYTHON, "benchmarks/bench_under_load.py", "--workloads", "forward", "--size", "32x32",
                           "--batch", "2", "--window", "0.3", "--warm", "0.3", "--max-repeats", "3", "--no-compare",
                           "--out", str(out)], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    entry = result["results"]["forward"]
    assert entry["baseline"]["rate"] > 0 and entry["busy"]["rate"] > 0 and min(entry["pair"]["rates"]) > 0
    if entry["baseline"]["valid"]:
        assert entry["busy_ratio"] == entry["unchecked_ratios"][0] and entry["pair_ratio"] == entry["unchecked_ratios"][1]
    else:  # a disturbed baseline: no ratio is reported, and the table says why
        assert entry["busy_ratio"] is None and entry["pair_ratio"] is None and entry["baseline"]["problems"]
        assert "DISTURBED: ratios invalid" in done.stdout


def test_alignment_benchmark_sweeps_guidance_and_scores_at_the_segmenter_size(tmp_path, trained):
    """camvid_alignment.py on toy data: a tiny generator trained with condition dropout, the shared tiny segmenter,
    two guidance scales; each scale gets its own synthetic set and score, the report names the best one."""
    from segsynth.generators.builtin import train_generator
    from segsynth.stage_configs import TrainGeneratorConfig

    generator = train_generator(TrainGeneratorConfig(
        data=TOY_SPEC, out=str(tmp_path / "generator"), iterations=2, cond_dropout=0.5, size=[32, 32], channels=[32, 32],
        layers_per_block=1, attention=False, batch_size=2, warmup=1, sample_steps=2, save_every=1, keep_every=1,
        device="cpu"))
    out = tmp_path / "report" / "alignment"
    done = subprocess.run([PYTHON, "benchmarks/camvid_alignment.py", "--generator", f"builtin:{generator}",
                           "--segmenter", str(trained[0]), "--data", TOY_SPEC, "--guidance", "1,2",
                           "--curve", "--inference-size", "32,32", "--batch-size", "4", "--grid", "2", "--work", str(tmp_path / "work"),
                           "--out", str(out)], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert [row["guidance"] for row in report["guidance_sweep"]] == [1.0, 2.0]
    assert (tmp_path / "work" / "synthetic_g1" / "manifest.jsonl").is_file()
    assert (tmp_path / "work" / "synthetic_g2" / "manifest.jsonl").is_file()
    best = max(report["guidance_sweep"], key=lambda row: row["miou_generated"])
    assert report["guidance"] == best["guidance"] and report["inference_size"] == [32, 32]
    assert report["miou_generated_vs_conditioning_masks"] == best["miou_generated"]
    assert 0 <= report["alignment"] and math.isfinite(report["alignment"])
    assert "Guidance sweep" in out.with_suffix(".md").read_text() and out.with_name("alignment_grid.png").is_file()
    # --curve: the snapshots of iterations 1 and 2 (the final model), at the first guidance scale
    assert [row["iterations"] for row in report["curve"]] == [1, 2]
    assert report["curve"][1]["miou_generated"] == report["guidance_sweep"][0]["miou_generated"]
    curve_lines = out.with_suffix(".md").read_text().split("against training iterations")[1].splitlines()
    header = next(line for line in curve_lines if line.startswith("| iterations"))
    rows = [line for line in curve_lines if line.startswith(("| 1 |", "| 2 |"))]
    # one IoU column per class beside the mean, so the curve says which classes longer training fixes
    assert header.count("|") == 5 + len(report["per_class"]) and len(rows) == 2
    assert all(row.count("|") == header.count("|") for row in rows)


def _benchmark_module(name: str):
    """A benchmark script imported as a module (benchmarks/ is not a package), to test its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_class_confusion_row_and_table():
    module = _benchmark_module("class_confusion")
    # rows = true class, columns = predicted (segsynth.training.evaluate.confusion_matrix)
    confusion = np.array([[8, 1, 1], [2, 6, 2], [0, 3, 7]])
    row = module.confusion_row(confusion, 1)
    assert row["pixels"] == 10 and row["predicted_as"] == [0.2, 0.6, 0.2]
    assert row["precision"] == pytest.approx(6 / 10)  # column 1: 1 + 6 + 3 predicted as class 1
    assert row["predicted_from"] == pytest.approx([0.1, 0.6, 0.3])  # of those 10: 1 x, 6 y, 3 z
    other = {"pixels": 10, "predicted_as": [0.5, 0.4, 0.1], "precision": 0.8, "predicted_from": [0.05, 0.8, 0.15]}
    table = module.markdown({"a": row, "b": other}, ["x", "y", "z"], 1, top=1)
    # the column shown is the class that takes most of y's pixels over both rows: x (0.7) before z (0.3)
    assert table.splitlines()[0] == "| segmenter | y kept (recall) | precision | to x |"
    assert table.splitlines()[2] == "| a | 60.0 % | 60.0 % | 20.0 % |"
    assert table.splitlines()[3] == "| b | 40.0 % | 80.0 % | 50.0 % |"
    # false positives: the true class most often predicted as y over both rows is z (0.45) before x (0.15)
    false_positives = module.false_positive_markdown({"a": row, "b": other}, ["x", "y", "z"], 1, top=1)
    assert false_positives.splitlines()[0] == "| segmenter | predicted y: is it (precision) | is z |"
    assert false_positives.splitlines()[2] == "| a | 60.0 % | 30.0 % |"
    assert false_positives.splitlines()[3] == "| b | 80.0 % | 15.0 % |"
    empty = {"pixels": 10, "predicted_as": [0.5, 0.0, 0.5], "precision": float("nan"), "predicted_from": []}
    assert "| c | nothing predicted |" in module.false_positive_markdown({"a": row, "c": empty}, ["x", "y", "z"], 1, 1)


def test_class_confusion_script_on_a_trained_toy_segmenter(tmp_path, trained):
    out = tmp_path / "confusion"
    command = [PYTHON, "benchmarks/class_confusion.py", "--data", TOY_SPEC, "--size", "32,32",
               "--checkpoint", f"a={trained[0]}", "--checkpoint", f"b={trained[0]}"]
    done = subprocess.run(command + ["--class", "road", "--out", str(out)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    a, b = report["rows"]["a"], report["rows"]["b"]
    assert a == b and a["pixels"] > 0 and sum(a["predicted_as"]) == pytest.approx(1.0)
    assert sum(a["predicted_from"]) == pytest.approx(1.0)
    assert "road kept (recall)" in out.with_suffix(".md").read_text()
    assert "Where the pixels predicted as `road` come from" in out.with_suffix(".md").read_text()
    bad = subprocess.run(command + ["--class", "bike"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "--class bike: not a class of" in bad.stderr and "its classes:" in bad.stderr


def test_filter_by_height_splits_each_object_at_its_own_middle_row():
    module = _benchmark_module("filter_by_height")
    raw = np.zeros((10, 10), np.uint8)
    raw[0:4, 0:2] = 1  # object A, rows 0-3: upper half rows 0-1, lower half rows 2-3
    raw[6:10, 6:8] = 1  # object B, rows 6-9: its own middle, not the image's
    filtered = raw.copy()
    filtered[0:2, 0:2] = 255  # A's upper half ignored
    filtered[9, 6:8] = 255  # one row of B's lower half ignored
    counts = module.ignored_by_half(raw, filtered, 1)
    assert counts.tolist() == [[4, 8], [2, 8]]
    assert module.ignored_by_half(raw, filtered, 2).tolist() == [[0, 0], [0, 0]]


def test_filter_by_height_script_on_a_tiny_filtered_set(tmp_path):
    from segsynth.io import atomic_write_json, atomic_write_png

    root = tmp_path / "set"
    atomic_write_json(root / "classes.json", {"classes": ["road", "rider"], "palette": [[0, 0, 0], [255, 0, 0]]})
    raw = np.zeros((8, 8), np.uint8)
    raw[2:6, 2:4] = 1
    filtered = raw.copy()
    filtered[2:4, 2:4] = 255
    lines = []
    for name in ("a", "b"):
        atomic_write_png(root / "images" / f"{name}.png", np.full((16, 16, 3), 90, np.uint8))
        atomic_write_png(root / "masks" / f"{name}.png", raw)
        atomic_write_png(root / "masks_filtered" / f"{name}.png", filtered)
        lines.append(json.dumps({"id": name, "image": f"images/{name}.png", "mask": f"masks/{name}.png",
                                 "filtered_mask": f"masks_filtered/{name}.png"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "height"
    command = [PYTHON, "benchmarks/filter_by_height.py", "--synthetic", str(root), "--grid-rows", "2"]
    done = subprocess.run(command + ["--grid", "rider", "--out", str(out)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["classes"]["rider"] == {"pixels": 16, "upper": 1.0, "lower": 0.0}
    assert "| rider | 16 | 100.0 % | 0.0 % |" in (tmp_path / "height.md").read_text()
    from PIL import Image
    assert Image.open(tmp_path / "height_grid.png").size == (48, 32)  # 2 samples x (image, overlay, verdict)
    bad = subprocess.run(command + ["--grid", "bike"], cwd=REPO, env=subprocess_env(), capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "--grid bike: not a class of" in bad.stderr


def test_set_class_mix_compares_real_raw_and_kept_shares(tmp_path):
    from synthetic_sets import write_synthetic_set

    from segsynth.data import open_dataset
    from segsynth.io import atomic_write_png

    dataset = open_dataset(TOY_SPEC)
    root = write_synthetic_set(tmp_path / "set", dataset, split="train")
    # a copy of the real masks: the raw mix is the real one; the filter kept nothing of class 0
    lines = []
    for line in (root / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        from PIL import Image
        mask = np.array(Image.open(root / record["mask"]))
        atomic_write_png(root / "masks_filtered" / f"{record['id']}.png", np.where(mask == 0, 255, mask).astype(np.uint8))
        lines.append(json.dumps({**record, "filtered_mask": f"masks_filtered/{record['id']}.png"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    # a plan that renders the first real mask twice and the second's top-left quarter once
    split = dataset.split("train")
    first, second = split[0], split[1]
    plan = tmp_path / "plan.jsonl"
    plan.write_text(json.dumps({"id": first.id, "seeds": [1, 2]}) + "\n"
                    + json.dumps({"id": "b@x", "source": second.id, "seeds": [3], "crop": [0, 0, 16, 16]}) + "\n")
    # two trained arms' folders (their config.yaml): real only, and joint on the filtered copy
    from segsynth.config import save_config
    from segsynth.stage_configs import TrainConfig

    for name, recipe in (("real", "real"), ("joint", "joint")):
        save_config(TrainConfig(data=TOY_SPEC, out=str(tmp_path / name), recipe=recipe,
                                synthetic=[str(root)] if recipe == "joint" else []), tmp_path / name / "config.yaml")
    out = tmp_path / "mix"
    command = [PYTHON, "benchmarks/set_class_mix.py", "--data", TOY_SPEC]
    done = subprocess.run(command + ["--plan", f"two={plan}", "--set", f"copy={root}", "--out", str(out),
                                     "--stream", f"real-arm={tmp_path / 'real'}", "--stream", f"joint-arm={tmp_path / 'joint'}"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    entry = report["sets"]["copy"]
    assert entry["raw"] == pytest.approx(report["real"]) and entry["samples"] == 8
    assert entry["kept"][0] == 0.0 and entry["kept_of_raw"][0] == 0.0 and sum(entry["kept"]) == pytest.approx(1.0)
    present = [i for i, share in enumerate(report["real"]) if share > 0 and i != 0]
    assert present and all(entry["kept_of_raw"][i] == 1.0 for i in present)
    counts = 2 * np.bincount(first.label[first.label < 255], minlength=len(dataset.classes))
    quarter = second.label[:16, :16]
    counts = counts + np.bincount(quarter[quarter < 255], minlength=len(dataset.classes))
    assert report["sets"]["two"]["planned"] == pytest.approx((counts / counts.sum()).tolist())
    assert report["sets"]["two"]["samples"] == 3
    assert "| class | real % | two planned % | copy raw % | copy kept % | real-arm trained % | joint-arm trained % |" \
        in (tmp_path / "mix.md").read_text()
    # A real arm's stream is the real mix; a joint arm's is one real epoch plus the kept pixels of the copy.
    assert report["sets"]["real-arm"]["trained"] == pytest.approx(report["real"])
    real_counts = sum(np.bincount(split.label(i)[split.label(i) < 255], minlength=len(dataset.classes))
                      for i in range(len(split)))
    kept_counts = real_counts.copy()
    kept_counts[0] = 0
    joint = real_counts + kept_counts
    assert report["sets"]["joint-arm"]["trained"] == pytest.approx((joint / joint.sum()).tolist())
    assert report["sets"]["joint-arm"]["samples"] == 16
    bad = subprocess.run(command + ["--set", str(root)], cwd=REPO, env=subprocess_env(), capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "write NAME=DIR" in bad.stderr
