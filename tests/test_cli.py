"""The `segsynth` command: verbs run through main(); a SegsynthError is printed and exits with code 2."""

from __future__ import annotations

import json

import pytest

from fakes import TOY_SPEC, stripes, write_mask
from segsynth import __version__
from segsynth.cli import main
from segsynth.data import DATASET_KINDS


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"segsynth {__version__}"


def test_no_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: segsynth" in capsys.readouterr().err


def test_check_data_clean(camvid_root, capsys):
    assert main(["check-data", f"camvid:{camvid_root}"]) == 0
    out = capsys.readouterr().out
    assert f"dataset camvid:{camvid_root}: 11 classes" in out
    assert "split train: 3 samples, 3 decoded" in out and "split test: 2 samples, 2 decoded" in out
    assert "problems: 0" in out and "<ignore>" in out


def test_check_data_limit(camvid_root, capsys):
    assert main(["check-data", f"camvid:{camvid_root}", "--limit", "1"]) == 0
    assert "split train: 3 samples, 1 decoded" in capsys.readouterr().out


def test_check_data_reports_every_problem(folder_root, capsys):
    bad = folder_root / "masks" / "img_4.png"
    write_mask(bad, stripes([0, 200]))
    assert main(["check-data", f"folder:{folder_root}"]) == 1
    out = capsys.readouterr().out
    assert "problems: 1" in out and str(bad) in out and "[200] are outside the 3 classes" in out


def test_check_data_unknown_kind(capsys):
    assert main(["check-data", "kitti:/data"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("segsynth check-data: error: unknown dataset kind 'kitti'")
    for kind in DATASET_KINDS:
        assert kind in captured.err


def test_check_data_unpaired_files(camvid_root, capsys):
    (camvid_root / "trainannot" / "0001TP_train_000.png").unlink()
    assert main(["check-data", f"camvid:{camvid_root}"]) == 2
    err = capsys.readouterr().err
    assert "image without mask" in err and str(camvid_root / "train" / "0001TP_train_000.png") in err


def test_train_unknown_config_key(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {TOY_SPEC}\nout: {tmp_path / 'o'}\nmax_epochs: 3\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segsynth train: error: config file {config}: unknown key(s) max_epochs")
    assert "valid keys:" in err and "iterations" in err and "batch_size" in err
    assert not (tmp_path / "o").exists()


def test_train_bad_flag_value(tmp_path, capsys):
    assert main(["train", "--data", TOY_SPEC, "--out", str(tmp_path / "o"), "--iterations", "lots"]) == 2
    assert "command line: key 'iterations': cannot read 'lots' as int" in capsys.readouterr().err


def test_train_missing_required(capsys):
    assert main(["train", "--data", TOY_SPEC]) == 2
    assert "out" in capsys.readouterr().err


def test_train_unknown_segmenter(tmp_path, capsys):
    assert main(["train", "--data", TOY_SPEC, "--out", str(tmp_path / "o"), "--model", "deeplab-v9"]) == 2
    err = capsys.readouterr().err
    assert "--model deeplab-v9 is unknown: model must be one of: segformer-b0" in err and "segformer-tiny" in err


def test_train_and_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", TOY_SPEC, "--out", str(out), "--model", "segformer-tiny", "--iterations", "1",
                 "--batch-size", "2", "--workers", "0", "--eval-split", "", "--device", "cpu"]) == 0
    assert f"checkpoint: {out / 'checkpoint'}" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(out), "--data", TOY_SPEC, "--split", "val", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("mIoU ") and "sky" in printed and "sign" in printed
    metrics = json.loads((out / "metrics_val.json").read_text())
    assert f"mIoU {metrics['miou']:.2f}" in printed
    assert (out / "metrics_val.config.yaml").is_file()


def test_evaluate_checkpoint_for_other_classes(trained, folder_root, capsys):
    out, _ = trained
    assert main(["evaluate", "--checkpoint", str(out), "--data", f"folder:{folder_root}", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("segsynth evaluate: error: ")
    assert "the segmenter has 9 classes" in captured.err and "has 3" in captured.err
    assert captured.out == ""


def test_evaluate_missing_checkpoint(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--data", TOY_SPEC]) == 2
    assert "no segsynth checkpoint here" in capsys.readouterr().err


def test_train_text_generator_verb_makes_a_text2mask_folder(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["train-text-generator", "--data", "toy:n=4,n_val=2,size=32", "--out", str(out), "--target",
                 "colour-mask", "--size", "32,32", "--channels", "32,64", "--layers-per-block", "1", "--text-width",
                 "32", "--iterations", "1", "--batch-size", "2", "--warmup", "1", "--device", "cpu"]) == 0
    assert f"--generator text2mask:{out}" in capsys.readouterr().out
    assert json.loads((out / "segsynth_generator.json").read_text())["colour_coding"]["choice"] == "separated"
    assert main(["train-text-generator", "--data", "toy:n=4,n_val=2,size=32", "--out", str(tmp_path / "h"),
                 "--target", "colour-mask", "--palette", "rainbow", "--device", "cpu"]) == 2
    assert "palette 'rainbow': neither separated nor dataset" in capsys.readouterr().err


# --- the one error path --------------------------------------------------------------------------------


def test_a_bug_prints_its_traceback_and_exits_3(monkeypatch, capsys):
    """Not bad input: exit 3 (never 1, check-data's "problems found", nor 2), with the traceback."""
    import segsynth.plan

    def broken(config):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(segsynth.plan, "make_plan", broken)
    assert main(["plan", "--data", TOY_SPEC, "--uniform", "1", "--out", "unused.jsonl"]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: division by zero" in err
    assert err.rstrip().endswith("segsynth plan: internal error: ZeroDivisionError: division by zero; this is a bug in "
                                 "segsynth, not in your input: please report it with the traceback above")


def test_a_path_that_cannot_be_opened_is_bad_input(monkeypatch, capsys):
    import segsynth.plan

    def unreadable(config):
        raise PermissionError(13, "Permission denied", "/data/secret.json")

    monkeypatch.setattr(segsynth.plan, "make_plan", unreadable)
    assert main(["plan", "--data", TOY_SPEC, "--uniform", "1", "--out", "unused.jsonl"]) == 2
    assert capsys.readouterr().err == ("segsynth plan: error: /data/secret.json: Permission denied; check the path and "
                                       "its permissions\n")


def test_interrupted_exits_130(monkeypatch, capsys):
    import segsynth.plan

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(segsynth.plan, "make_plan", interrupted)
    assert main(["plan", "--data", TOY_SPEC, "--uniform", "1", "--out", "unused.jsonl"]) == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


def test_an_error_from_a_dataloader_worker_is_its_own_one_line_message():
    from segsynth.cli import one_line

    wrapped = ("Caught SegsynthError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "worker.py", line 308, in _worker_loop\n    data = fetcher.fetch(index)\n'
               "segsynth.io.SegsynthError: DIR/masks/a.png: cannot read mask (broken); replace or remove the file\n")
    assert one_line(wrapped) == "DIR/masks/a.png: cannot read mask (broken); replace or remove the file"
    assert one_line("first part\n  second part") == "first part second part"


def test_a_worker_s_error_reaches_the_user_as_one_line(tmp_path, capsys, monkeypatch):
    """A file that breaks after the check (here: between the check and the first draw) fails in the loader
    worker; the user still sees one line naming the file."""
    from fakes import build_folder
    import segsynth.training.loop as loop

    root = build_folder(tmp_path / "data", n=4)
    original = loop.check_before_compute

    def check_then_break(dataset, splits=None, **kwargs):
        original(dataset, splits, **kwargs)
        (root / "masks" / "img_3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken after the check")

    monkeypatch.setattr(loop, "check_before_compute", check_then_break)
    assert main(["train", "--data", f"folder:{root}", "--out", str(tmp_path / "out"), "--model", "segformer-tiny",
                 "--iterations", "4", "--batch-size", "4", "--workers", "1", "--eval-split", "", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    line = err[err.index("segsynth train: error: "):]
    assert line.count("\n") == 1 and f"{root / 'masks' / 'img_3.png'}: cannot read mask" in line, err
    assert "Traceback" not in err
