"""`segsynth export`: mmsegmentation's img_dir/ann_dir layout with a config snippet, and an imagefolder dataset
that `datasets.load_dataset` reads back, from a synthetic set (filtered masks, ignore 255) or a real dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakes import TOY_SPEC, build_folder
from segsynth.cli import main
from segsynth.data import open_dataset
from segsynth.export import file_stem
from segsynth.io import atomic_write_png
from synthetic_sets import write_synthetic_set


@pytest.fixture
def filtered_set(tmp_path) -> Path:
    """A hand-made synthetic set of the toy data whose filter set a block of each mask to ignore."""
    root = write_synthetic_set(tmp_path / "set", open_dataset(TOY_SPEC))
    lines = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    for record in lines:
        mask = np.array(Image.open(root / record["mask"]))
        mask[:5, :7] = 255
        record["filtered_mask"] = f"masks_filtered/{record['id']}.png"
        atomic_write_png(root / record["filtered_mask"], mask)
        record["ignored_fraction"] = 0.1
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def read(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def test_mmseg_export_of_a_filtered_synthetic_set(filtered_set, tmp_path, capsys):
    out = tmp_path / "mmseg"
    assert main(["export", str(filtered_set), "--format", "mmseg", "--out", str(out)]) == 0
    assert "exported synthetic:" in capsys.readouterr().out
    source = open_dataset(f"synthetic:{filtered_set}").split("train")
    # Train and val (every 10th sample, at least one) from the one split of a synthetic set; the same file name in both dirs.
    train = sorted(p.stem for p in (out / "img_dir" / "train").iterdir())
    val = sorted(p.stem for p in (out / "img_dir" / "val").iterdir())
    assert len(val) == max(1, len(source) // 10) and len(train) + len(val) == len(source)
    assert not set(train) & set(val)
    assert sorted(p.stem for p in (out / "ann_dir" / "train").iterdir()) == train
    for index in range(len(source)):
        sample = source[index]
        split = "val" if file_stem(sample.id) in val else "train"
        label = Image.open(out / "ann_dir" / split / f"{file_stem(sample.id)}.png")
        assert label.mode == "L"  # plain class ids, what mmseg's LoadAnnotations reads
        assert np.array_equal(np.array(label), sample.label)  # the filtered mask, ignore = 255
        assert (np.array(label)[:5, :7] == 255).all()
        assert np.array_equal(read(out / "img_dir" / split / f"{file_stem(sample.id)}.png"), sample.image)
    # The config snippet is Python an mmseg config can hold: classes, palette, ignore index, reduce_zero_label.
    namespace: dict = {}
    exec((out / "segsynth_mmseg.py").read_text(), namespace)
    dataset = namespace["train_dataloader"]["dataset"]
    assert namespace["metainfo"]["classes"] == tuple(open_dataset(TOY_SPEC).classes)
    assert namespace["metainfo"]["palette"] == [list(c) for c in open_dataset(TOY_SPEC).palette]
    assert dataset["ignore_index"] == 255 and dataset["reduce_zero_label"] is False
    assert dataset["data_prefix"] == {"img_path": "img_dir/train", "seg_map_path": "ann_dir/train"}
    assert namespace["val_dataloader"]["dataset"]["data_prefix"]["img_path"] == "img_dir/val"
    assert Path(namespace["data_root"]) == out.resolve() and namespace["num_classes"] == 9
    assert json.loads((out / "classes.json").read_text())["ignore_index"] == 255
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_hf_export_round_trips_through_datasets_load_dataset(filtered_set, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "hf"
    assert main(["export", f"synthetic:{filtered_set}", "--format", "hf", "--out", str(out)]) == 0
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "cache"))
    source = open_dataset(f"synthetic:{filtered_set}").split("train")
    assert set(loaded) == {"train", "validation"}
    assert loaded["train"].num_rows + loaded["validation"].num_rows == len(source)
    for split in loaded.values():
        for row in split:
            sample = source[source.index_of(row["id"])]
            assert np.array_equal(np.array(row["image"]), sample.image)
            assert np.array_equal(np.array(row["annotation"]), sample.label)  # filtered, 255 = ignore
            assert row["source"] and row["ignored_fraction"] == 0.1
    id2label = json.loads((out / "id2label.json").read_text())
    assert id2label["0"] == "sky" and len(id2label) == 9


def test_a_real_dataset_exports_its_own_splits(tmp_path):
    """A dataset spec (here CamVid-like conventions are already translated: a folder with ignore 255)."""
    datasets = pytest.importorskip("datasets")
    root = build_folder(tmp_path / "folder", splits={"train": ["img_0", "img_1", "img_2"], "val": ["img_3"]})
    for kind in ("hf", "mmseg"):
        assert main(["export", f"folder:{root}", "--format", kind, "--out", str(tmp_path / kind)]) == 0
    real = open_dataset(f"folder:{root}")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "hf"), cache_dir=str(tmp_path / "cache"))
    assert {name: split.num_rows for name, split in loaded.items()} == {"train": 3, "validation": 1}
    row = loaded["validation"][0]
    assert np.array_equal(np.array(row["annotation"]), real.split("val").label(0))
    assert sorted(p.name for p in (tmp_path / "mmseg" / "ann_dir").iterdir()) == ["train", "val"]
    assert np.array_equal(read(tmp_path / "mmseg" / "ann_dir" / "val" / "img_3.png"), real.split("val").label(0))


def test_a_target_that_exists_and_is_not_empty_is_refused_unless_overwrite(filtered_set, tmp_path, capsys):
    """Bad input: an export target that exists and is not empty."""
    out = tmp_path / "target"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(filtered_set), "--format", "mmseg", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "segsynth export: error: " in error and "exists and is not empty" in error and "--overwrite" in error
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set", "target"]  # and nothing staged beside it

    assert main(["export", str(filtered_set), "--format", "mmseg", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "segsynth_mmseg.py").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set", "target"]
    # An empty folder is fine without --overwrite.
    (tmp_path / "empty").mkdir()
    assert main(["export", TOY_SPEC, "--format", "hf", "--out", str(tmp_path / "empty"), "--limit", "2"]) == 0
    assert (tmp_path / "empty" / "train" / "metadata.jsonl").read_text().count("\n") == 2


def test_a_failure_midway_leaves_no_target_and_no_staging(filtered_set, tmp_path, capsys):
    broken = next((filtered_set / "masks_filtered").iterdir())
    broken.write_bytes(b"not a png")
    assert main(["export", str(filtered_set), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    assert "cannot read mask" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


@pytest.mark.parametrize("argv, message", [
    (["--format", "coco"], "--format coco is unknown: format must be one of: mmseg, hf"),
    (["--splits", "test"], "--splits test: .* has train"),
    (["--val-fraction", "1.5"], r"--val-fraction 1.5 is too large: val_fraction must be a number in \[0, 1\)"),
])
def test_bad_export_options(filtered_set, tmp_path, capsys, argv, message):
    assert main(["export", str(filtered_set), "--out", str(tmp_path / "out"), *argv]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
