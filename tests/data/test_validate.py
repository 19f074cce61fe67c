"""check_split / quick_check / format_report: every problem is collected, named and counted."""

from __future__ import annotations

import numpy as np
import pytest

from fakes import FOLDER_RAW, H, W, build_folder, stripes, write_mask
from segsynth.data import open_dataset
from segsynth.data.validate import check_split, format_report, quick_check
from segsynth.io import SegsynthError


def test_clean_split_report(folder_root):
    dataset = open_dataset(f"folder:{folder_root}")
    report = check_split(dataset, "train")
    assert report.samples == 3 and report.checked == 3 and report.errors == []
    assert report.sizes == {(H, W): 3}
    # per class, plus ignore at the end: each stripe of FOLDER_RAW covers W / 4 columns
    per_value = 3 * H * (W // len(FOLDER_RAW))
    assert report.pixels.tolist() == [per_value] * 4
    quick_check(dataset)  # no problem: no exception


def test_limit_spreads_over_the_split(tmp_path):
    dataset = open_dataset(f"folder:{build_folder(tmp_path / 'f', n=9)}")
    report = check_split(dataset, "train", limit=3)
    assert report.samples == 9 and report.checked == 3


def test_problems_are_collected_not_raised(folder_root):
    bad_label = folder_root / "masks" / "img_0.png"
    write_mask(bad_label, stripes([0, 5]))
    bad_size = folder_root / "masks" / "img_2.png"
    write_mask(bad_size, stripes([0], size=(H + 1, W)))
    dataset = open_dataset(f"folder:{folder_root}")
    report = check_split(dataset, "train")
    assert report.checked == 1 and len(report.errors) == 2
    assert str(bad_label) in report.errors[0] and "outside the 3 classes" in report.errors[0]
    assert str(bad_size) in report.errors[1] and "masks must match their images" in report.errors[1]

    text = format_report(dataset, [report, check_split(dataset, "val")])
    assert "3 classes" in text and "split train: 3 samples, 1 decoded" in text
    assert "split val: 2 samples, 2 decoded" in text and f"sizes (WxH) {W}x{H}: 2" in text
    assert "problems: 2" in text and str(bad_label) in text and str(bad_size) in text

    with pytest.raises(SegsynthError) as error:
        quick_check(dataset, ["train"])
    message = str(error.value)
    assert str(bad_label) in message and "(and 1 more in the 3 checked)" in message
    assert f"run `segsynth check-data folder:{folder_root}` for the full list" in message
    quick_check(dataset, ["val"])  # the other split is fine


def test_report_lists_classes_without_pixels(tmp_path):
    root = build_folder(tmp_path / "f", n=2, classes=["background", "cat", "dog", "bird"])
    dataset = open_dataset(f"folder:{root}")
    text = format_report(dataset, [check_split(dataset, "train")])
    assert "classes with no pixels: bird" in text
    assert "problems: 0" in text


def test_toy_pixel_histogram_sums_to_all_pixels():
    dataset = open_dataset("toy:n=4,n_val=1,size=32")
    report = check_split(dataset, "train")
    assert report.pixels.sum() == 4 * 32 * 32 and report.pixels[-1] == 0
    assert np.count_nonzero(report.pixels[:-1]) >= 4
