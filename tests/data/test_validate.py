"""check_split / quick_check / format_report: every problem is collected, named and counted; and
check_before_compute: every file of a split, checked once and cached."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from fakes import FOLDER_RAW, H, W, build_folder, stripes, write_image, write_json, write_mask
from segsynth.cli import main
from segsynth.data import open_dataset, validate
from segsynth.data.validate import check_before_compute, check_files, check_split, format_report, quick_check
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


# --- every file before compute, cached -------------------------------------------------------------------

UNSAMPLED = 14  # of 30 samples, the 8 spread ones decoded in full are 0, 4, 8, 12, 17, 21, 25, 29


def _truncated(root):
    path = root / "images" / f"img_{UNSAMPLED}.png"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path, "cannot read image"


def _damaged(root):  # one flipped byte inside the compressed pixels: the header still opens
    path = root / "images" / f"img_{UNSAMPLED}.png"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path, "cannot read image"


def _label_out_of_range(root):
    path = root / "masks" / f"img_{UNSAMPLED}.png"
    write_mask(path, stripes([0, 1, 9]))
    return path, "label value(s) [9] are outside the 3 classes"


def _mask_of_another_size(root):
    path = root / "masks" / f"img_{UNSAMPLED}.png"
    write_mask(path, stripes([0, 1], size=(H, W + 8)))
    return path, "masks must match their images"


def _decompression_bomb(root):
    """A PNG whose header claims 20000x20000 pixels (its data is a few bytes): PIL refuses to open it."""
    path = root / "images" / f"img_{UNSAMPLED}.png"
    data = bytearray(path.read_bytes())
    ihdr = struct.pack(">II", 20000, 20000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path, "cannot read image (Image size (400000000 pixels) exceeds limit"


def _huge_but_under_the_bomb_limit(root):
    """Under a lowered limit (H x W pixels), one image of twice the size is refused by its header alone."""
    path = root / "images" / f"img_{UNSAMPLED}.png"
    write_image(path, size=(2 * H, 2 * W))
    return path, f"image is {2 * W}x{2 * H}"


BREAKAGES = {"truncated-png": _truncated, "damaged-png": _damaged, "label-out-of-range": _label_out_of_range,
             "mask-of-another-size": _mask_of_another_size, "decompression-bomb": _decompression_bomb,
             "more-pixels-than-pil-decodes": _huge_but_under_the_bomb_limit}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_bad_file_anywhere_stops_training_before_the_first_iteration(tmp_path, capsys, monkeypatch, breakage):
    """The spread decode alone (8 of 30) never sees sample 14; the file check does, whatever is wrong with it."""
    root = build_folder(tmp_path / "data", n=30)
    quick_check(open_dataset(f"folder:{root}"))  # sample 14 is not among the 8 decoded
    path, needle = BREAKAGES[breakage](root)
    if breakage == "more-pixels-than-pil-decodes":
        monkeypatch.setattr(validate, "MAX_IMAGE_PIXELS", H * W)
    quick_check(open_dataset(f"folder:{root}"))  # still unseen by the sample
    out = tmp_path / "out"
    assert main(["train", "--data", f"folder:{root}", "--out", str(out), "--model", "segformer-tiny",
                 "--iterations", "2", "--batch-size", "2", "--workers", "0", "--eval-split", "", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"dataset folder:{root}, split train: {path}" in err and needle in err, err
    assert f"run `segsynth check-data folder:{root}` for the full list" in err
    assert not out.exists()


def test_every_file_is_read_once_then_only_stat_ed(tmp_path, monkeypatch):
    root = build_folder(tmp_path / "data", n=6)
    dataset = open_dataset(f"folder:{root}")
    reads = []
    original = validate.inspect_file
    monkeypatch.setattr(validate, "inspect_file", lambda path, kind: reads.append(path) or original(path, kind))
    check_before_compute(dataset)
    assert len(reads) == 12  # 6 images + 6 masks
    reads.clear()
    check_before_compute(open_dataset(f"folder:{root}"))
    assert reads == []  # the cache knew every file (same path, size, mtime, inode)
    write_mask(root / "masks" / "img_3.png", stripes([0, 2]))  # replaced: a new inode, size or mtime
    check_before_compute(open_dataset(f"folder:{root}"))
    assert reads == [root / "masks" / "img_3.png"]


def test_the_cache_keeps_label_values_so_a_new_classes_json_is_judged_afresh(tmp_path):
    root = build_folder(tmp_path / "data", n=3)
    check_files(open_dataset(f"folder:{root}"))  # FOLDER_RAW uses raw values 0, 1, 2 and 255
    write_json(root / "classes.json", {"classes": ["background", "cat"]})  # value 2 is no class any more
    with pytest.raises(SegsynthError, match=r"label value\(s\) \[2\] are outside the 2 classes .* \(and 2 more\)"):
        check_files(open_dataset(f"folder:{root}"))


def test_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SEGSYNTH_CACHE_DIR", str(blocker))
    root = build_folder(tmp_path / "data", n=2)
    assert check_files(open_dataset(f"folder:{root}")) == {"train": []}
