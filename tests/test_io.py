"""Atomic writes and small file helpers: nothing is ever half-written."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from PIL import Image

from segsynth import io
from segsynth.io import (
    SegsynthError, append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_png, atomic_write_text,
    read_json, read_jsonl, safe_relative_path,
)


def test_write_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "file.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(path.parent) == ["file.txt"]  # no temp files left


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_written_files_follow_the_umask(tmp_path):
    """Files are not left owner-only (the temp file's 0600): they get the permissions the umask allows."""
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        mode = stat.S_IMODE(os.stat(tmp_path / "f.txt").st_mode)
    finally:
        os.umask(old)
    assert mode == 0o644


def test_json_round_trip_with_numpy_and_paths(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"a": np.float32(1.5), "b": np.arange(3), "c": tmp_path, "d": np.int64(7)})
    assert read_json(path) == {"a": 1.5, "b": [0, 1, 2], "c": str(tmp_path), "d": 7}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        atomic_write_json(tmp_path / "x.json", {"x": object()})
    assert not (tmp_path / "x.json").exists()


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(SegsynthError, match=f"{tmp_path / 'absent.json'}: file not found"):
        read_json(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SegsynthError, match="bad.json: not valid JSON .*fix or regenerate the file"):
        read_json(tmp_path / "bad.json")


def test_png_index_mask_with_palette(tmp_path):
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    atomic_write_png(tmp_path / "m.png", mask, palette=[(0, 0, 0), (255, 0, 0), (0, 255, 0)])
    with Image.open(tmp_path / "m.png") as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), mask)  # raw ids kept
        assert image.getpalette()[3:6] == [255, 0, 0]


def test_png_rgb_and_dtype_checks(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    atomic_write_png(tmp_path / "rgb.png", rgb)
    with Image.open(tmp_path / "rgb.png") as image:
        np.testing.assert_array_equal(np.asarray(image), rgb)
    atomic_write_png(tmp_path / "int.png", np.array([[3, 200]], np.int64))
    with Image.open(tmp_path / "int.png") as image:
        assert np.asarray(image).tolist() == [[3, 200]]
    with pytest.raises(ValueError, match="outside 0..255"):
        atomic_write_png(tmp_path / "big.png", np.array([[300]]))


def test_jsonl_append_and_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    assert list(read_jsonl(path)) == []  # absent: nothing
    append_jsonl(path, {"i": 1})
    append_jsonl(path, {"i": 2, "p": tmp_path})
    with open(path, "a") as handle:
        handle.write('{"i": 3, "lo')  # a kill mid-append
    assert list(read_jsonl(path)) == [{"i": 1}, {"i": 2, "p": str(tmp_path)}]


def test_jsonl_bad_middle_line_is_an_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"i": 1}\nnot json\n{"i": 3}\n')
    with pytest.raises(SegsynthError, match=f"{path}:2: not valid JSON"):
        list(read_jsonl(path))


def test_safe_relative_path(tmp_path):
    assert safe_relative_path(tmp_path, "images/a.png") == (tmp_path / "images" / "a.png").resolve()
    with pytest.raises(SegsynthError, match="is absolute"):
        safe_relative_path(tmp_path, "/etc/passwd")
    with pytest.raises(SegsynthError, match="leaves its folder"):
        safe_relative_path(tmp_path, "../outside.png", what="mask")
    with pytest.raises(SegsynthError, match="leaves its folder"):
        safe_relative_path(tmp_path, "images/../../x")
