"""Training: checkpoints round-trip, resume (in-process crash, SIGKILL, kill mid-swap) ends where an
uninterrupted run ends, and a 2-process torchrun run works."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fakes import PYTHON, REPO, TINY_TRAIN, TOY_SPEC, subprocess_env
from segsynth.config import build_config, load_yaml
from segsynth.data import open_dataset
from segsynth.io import SegsynthError, default_mode, read_jsonl
from segsynth.segmenters import load_segmenter
from segsynth.training.loop import (
    DrawSampler, SampleStream, Source, TrainConfig, learning_rate, resolve_checkpoint, train,
)
from segsynth.data.transforms import AugmentConfig
from segsynth.distributed import DistInfo


def assert_same_weights(a: Path, b: Path, atol: float = 1e-7) -> None:
    for name in ("model.safetensors", "optimizer.safetensors"):
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert left.keys() == right.keys()
        for key in left:
            assert torch.allclose(left[key].double(), right[key].double(), rtol=0, atol=atol), (name, key)


def leftovers(out: Path) -> list[str]:
    """Anything a clean run must not leave: staging folders, checkpoint.old, temp files."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.name == "checkpoint.old")


# --- the shared run -------------------------------------------------------------------


def test_checkpoint_round_trip(trained):
    out, model = trained
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "segsynth.json"]
    assert leftovers(out) == []
    # not owner-only: the folder and its files get what mkdir/open would give under the umask
    assert stat.S_IMODE((out / "checkpoint").stat().st_mode) == default_mode(directory=True)
    assert stat.S_IMODE((out / "checkpoint" / "segsynth.json").stat().st_mode) == default_mode()
    loaded, meta = load_segmenter(out / "checkpoint")
    assert meta["format"] == "segsynth-checkpoint/1" and meta["model"] == "segformer-tiny"
    assert meta["state"]["iteration"] == 4 and meta["state"]["finished"] is True
    assert meta["classes"] == list(open_dataset(TOY_SPEC).classes) and len(meta["palette"]) == 9
    assert meta["crop"] == [32, 32] and meta["base_size"] == [32, 32]  # defaults: the first image's size

    model.eval(), loaded.eval()
    val = open_dataset(TOY_SPEC).split("val")
    images = torch.from_numpy(np.stack([val[i].image for i in range(4)])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        expected, got = model(images), loaded(images)
    assert torch.equal(expected, got)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_run_folder_contents(trained):
    out, _ = trained
    records = list(read_jsonl(out / "metrics.jsonl"))
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert [r["lr"] for r in records if "loss" in r] == pytest.approx([3e-4, 6e-4, 6e-4, 3e-4])
    final_eval = [r for r in records if r.get("split") == "val"]
    assert len(final_eval) == 1 and final_eval[0]["iteration"] == 4
    metrics = json.loads((out / "metrics_val.json").read_text())
    assert metrics["split"] == "val" and metrics["pixels"] == 4 * 32 * 32 and 0 <= metrics["miou"] <= 100
    # the resolved config is saved, and is a valid --config for the same run
    config = build_config(TrainConfig, load_yaml(out / "config.yaml"))
    assert config == TrainConfig(data=TOY_SPEC, out=str(out), **TINY_TRAIN)


def test_resolve_checkpoint(trained, tmp_path):
    out, _ = trained
    assert resolve_checkpoint(out) == out / "checkpoint"
    assert resolve_checkpoint(out / "checkpoint") == out / "checkpoint"
    # a kill between the two renames of the swap leaves only checkpoint.old: it is found
    shutil.copytree(out / "checkpoint", tmp_path / "checkpoint.old")
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    with pytest.raises(SegsynthError, match="no segsynth checkpoint here"):
        resolve_checkpoint(tmp_path / "nothing")


# --- resume ---------------------------------------------------------------------------


class Crash(Exception):
    pass


def test_resume_after_crash_matches_uninterrupted(trained, tmp_path, monkeypatch):
    """Crash right after the iteration-2 checkpoint, even mid-swap (only checkpoint.old and a stale staging
    folder left): the resumed run's final weights and optimizer state equal the uninterrupted run's."""
    import segsynth.training.loop as train_module

    reference, _ = trained
    out = tmp_path / "run"
    config = TrainConfig(data=TOY_SPEC, out=str(out), **TINY_TRAIN)
    original = train_module.save_checkpoint

    def save_then_crash(*args, **kwargs):
        original(*args, **kwargs)
        raise Crash

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train(config)
    monkeypatch.setattr(train_module, "save_checkpoint", original)
    assert json.loads((out / "checkpoint" / "segsynth.json").read_text())["state"] == {
        "iteration": 2, "finished": False}
    os.replace(out / "checkpoint", out / "checkpoint.old")
    (out / ".checkpoint-stale").mkdir()

    train(TrainConfig(data=TOY_SPEC, out=str(out), **{**TINY_TRAIN, "resume": True}))
    assert json.loads((out / "checkpoint" / "segsynth.json").read_text())["state"]["iteration"] == 4
    assert not (out / "checkpoint.old").exists()
    assert_same_weights(out / "checkpoint", reference / "checkpoint", atol=0)
    # the resumed run logged only iterations 3 and 4 after the crash
    logged = [r["iteration"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert logged == [1, 2, 3, 4]


def test_resume_refuses_changed_settings(trained, tmp_path):
    out = tmp_path / "run"  # a moved run folder: `out` itself may differ
    shutil.copytree(trained[0], out)
    changed = TrainConfig(data=TOY_SPEC, out=str(out), **{**TINY_TRAIN, "resume": True, "lr": 1e-3, "seed": 3})
    with pytest.raises(SegsynthError, match=r"settings differ from the run being resumed \(lr, seed\)"):
        train(changed)
    other_model = TrainConfig(data=TOY_SPEC, out=str(out), **{**TINY_TRAIN, "resume": True,
                                                              "model": "segformer-small"})
    with pytest.raises(SegsynthError, match="cannot resume it as segformer-small"):
        train(other_model)


def test_resume_flag_without_checkpoint_starts_fresh(tmp_path):
    out = tmp_path / "fresh"
    train(TrainConfig(data=TOY_SPEC, out=str(out), **{**TINY_TRAIN, "iterations": 1, "resume": True,
                                                      "eval_split": ""}))
    assert json.loads((out / "checkpoint" / "segsynth.json").read_text())["state"]["iteration"] == 1
    assert not (out / "metrics_val.json").exists()  # eval_split '' skips evaluation


def cli_train_command(out: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "segsynth", "train", "--data", "toy:n=8,n_val=2,size=32", "--out", str(out),
            "--model", "segformer-tiny", "--iterations", "24", "--batch-size", "2", "--workers", "0",
            "--save-every", "2", "--warmup", "2", "--eval-split=", "--device", "cpu", *extra]


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    """`segsynth train` SIGKILLed after its first checkpoint, then rerun with --resume, ends with the
    weights of an uninterrupted run with the same settings."""
    env = subprocess_env()
    killed = tmp_path / "killed"
    process = subprocess.Popen(cli_train_command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (killed / "checkpoint" / "segsynth.json").is_file():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    state = json.loads(resolve_checkpoint(killed).joinpath("segsynth.json").read_text())["state"]
    assert state["finished"] is False and state["iteration"] < 24  # really interrupted

    resumed = subprocess.run(cli_train_command(killed, "--resume"), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = tmp_path / "whole"
    uninterrupted = subprocess.run(cli_train_command(whole), cwd=REPO, env=env, capture_output=True, text=True,
                                   timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    assert json.loads((killed / "checkpoint" / "segsynth.json").read_text())["state"]["iteration"] == 24
    assert_same_weights(killed / "checkpoint", whole / "checkpoint", atol=1e-7)


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "segsynth",
               "train", "--data", "toy:n=8,n_val=3,size=32", "--out", str(out), "--model", "segformer-tiny",
               "--iterations", "4", "--batch-size", "1", "--workers", "0", "--save-every", "2", "--warmup", "1",
               "--device", "cpu", "--log-every", "1"]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "config.yaml", "metrics.jsonl",
                                                     "metrics_val.json"]
    assert (out / "checkpoint" / "model.safetensors").is_file()
    meta = json.loads((out / "checkpoint" / "segsynth.json").read_text())
    assert meta["state"]["iteration"] == 4 and meta["state"]["finished"] is True
    assert f"checkpoint: {out / 'checkpoint'}" in result.stdout
    # the val split (3 images) was sharded over both ranks and summed
    assert json.loads((out / "metrics_val.json").read_text())["pixels"] == 3 * 32 * 32
    # 2 ranks x batch 1 = 2 images per iteration
    assert [r["iteration"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


# --- pieces of the loop ----------------------------------------------------------------


def test_learning_rate_schedule():
    config = TrainConfig(data="toy", out="x", iterations=10, warmup=4, lr=1.0)
    rates = [learning_rate(config, i) for i in range(10)]
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4:] == pytest.approx([1 - k / 6 for k in range(6)])
    assert rates == sorted(rates[:4]) + sorted(rates[4:], reverse=True)


def sources(repeat_a=1.0, repeat_b=1.0):
    dataset = open_dataset("toy:n=6,n_val=4,size=32")
    return [Source("a", dataset.split("train"), repeat_a), Source("b", dataset.split("val"), repeat_b)]


AUG = AugmentConfig(crop=(32, 32), base=(32, 32))


def test_sample_stream_epochs_cover_every_sample():
    stream = SampleStream(sources(2.0, 0.5), AUG, seed=0)
    epoch = len(stream.epoch_items)
    assert epoch == 6 * 2 + 2
    drawn = [stream.locate(g) for g in range(epoch)]
    counts = {}
    for item in drawn:
        counts[item] = counts.get(item, 0) + 1
    assert all(counts[(0, i)] == 2 for i in range(6))
    assert sum(n for (source, _), n in counts.items() if source == 1) == 2
    assert [stream.locate(g) for g in range(epoch, 2 * epoch)] != drawn  # each epoch reshuffles


def test_sample_stream_draws_are_pure_functions_of_seed_and_draw():
    a, b = SampleStream(sources(), AUG, seed=1), SampleStream(sources(), AUG, seed=1)
    for draw in (17, 3, 17, 40):  # order and repetition of requests do not matter
        for x, y in zip(a[draw], b[draw]):
            assert torch.equal(x, y)
    image, label, weight = a[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert label.shape == (32, 32) and weight.dtype == torch.float32 and (weight == 1).all()
    assert not torch.equal(SampleStream(sources(), AUG, seed=2)[5][0], image)


def test_draw_sampler_partitions_draws_over_ranks():
    per_rank = [list(DrawSampler(1, 3, 2, DistInfo(rank, 2, rank, torch.device("cpu")))) for rank in range(2)]
    assert per_rank[0] == [[4, 5], [8, 9]] and per_rank[1] == [[6, 7], [10, 11]]
    assert len(DrawSampler(1, 3, 2, DistInfo(0, 1, 0, torch.device("cpu")))) == 2


@pytest.mark.parametrize("change, message", [
    ({"recipe": "magic"}, "recipe = 'magic' is unknown: recipe must be one of: real"),
    ({"crop": [4, 4]}, r"crop = \[4, 4\] has item 4 that is too small: crop must be a list of 0 to 2 integers each in 8"),
    ({"base_size": [32, 32, 32]}, "base_size = .* has 3 item.s.: base_size must be a list of 0 to 2 integers"),
    ({"model": "segformer-b9"}, "model = 'segformer-b9' is unknown: model must be one of: segformer-b0"),
])
def test_train_config_errors(tmp_path, change, message):
    """Out-of-range settings are refused as the config is made (the Python API), before train() runs."""
    with pytest.raises(SegsynthError, match=message):
        TrainConfig(**{"data": TOY_SPEC, "out": str(tmp_path / "o"), **TINY_TRAIN, **change})
    assert not (tmp_path / "o").exists()


def test_unknown_dataset_kind_is_refused_by_train(tmp_path):
    with pytest.raises(SegsynthError, match="unknown dataset kind 'nope'"):
        train(TrainConfig(**{"data": "nope:x", "out": str(tmp_path / "o"), **TINY_TRAIN}))


def test_train_refuses_bad_data_before_compute(tmp_path):
    from fakes import build_folder, stripes, write_mask

    root = build_folder(tmp_path / "f", n=3)
    write_mask(root / "masks" / "img_1.png", stripes([0, 9]))
    with pytest.raises(SegsynthError, match="img_1.png: label value"):
        train(TrainConfig(data=f"folder:{root}", out=str(tmp_path / "o"), **TINY_TRAIN))
    assert not (tmp_path / "o").exists()


def test_decoded_cache_loads_once_within_its_budget_and_freezes_what_it_keeps():
    from segsynth.data.base import Sample
    from segsynth.training.stream import DecodedCache

    loads = []

    def load(i):
        loads.append(i)
        return Sample(f"s{i}", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))

    cache = DecodedCache(budget_bytes=2 * (48 + 16))  # room for two samples
    for i in (0, 1, 2, 0, 1, 2):
        sample = cache.get(i, lambda i=i: load(i))
    assert loads == [0, 1, 2, 2]  # the third does not fit: decoded each time
    assert not cache.get(0, lambda: load(0)).image.flags.writeable
    assert sample.image.flags.writeable  # an uncached sample is left alone


def test_sample_stream_draws_are_the_same_with_and_without_the_cache():
    split = open_dataset(TOY_SPEC).split("train")
    config = AugmentConfig(crop=(24, 24), base=split[0].label.shape)
    cold = SampleStream([Source("real", split)], config, seed=3, cache_bytes=0)
    warm = SampleStream([Source("real", split)], config, seed=3, cache_bytes=2**30)
    for draw in list(range(len(split))) * 2:
        for a, b in zip(cold[draw], warm[draw]):
            assert torch.equal(a, b)
