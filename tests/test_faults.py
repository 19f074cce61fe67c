"""Fault injection: SIGKILL at seeded random moments, a full disk, a killed rank.

Each test runs in two sizes from the same code: a quick representative (in the
default suite where no faster twin elsewhere covers the stage), and the full tier
(`pytest -m fault`): 20 kills per stage, a real size-limited tmpfs where the
machine allows mounting one.

After every kill the visible output must be consistent (every PNG decodes,
every manifest line but a torn last one parses); after the final rerun the
output must equal an uninterrupted run's.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import segsynth.io
from fakes import PYTHON, REPO, subprocess_env
from segsynth.cli import main
from segsynth.data import open_dataset
from segsynth.methods.freemask.filter import FilterConfig, filter_synthetic
from segsynth.generators.testing import save_tiny_builtin
from segsynth.io import SegsynthError
from segsynth.plan import PlanConfig, make_plan
from segsynth.methods.freemask.stats import StatsConfig, compute_class_stats
from segsynth.synthesize import SynthesizeConfig, synthesize
from segsynth.training.loop import TrainConfig, train
from synthetic_sets import assert_same_pixels, images, write_synthetic_set

TOY = "toy:n=20,n_val=4,size=32"
KILL_SEED = 20261122

QUICK_OR_TIER = [pytest.param(2, id="2-kills"), pytest.param(20, marks=pytest.mark.fault, id="20-kills")]
# Synthesis and training have fast SIGKILL twins in the default suite (tests/test_synthesize.py
# test_sigkill_loses_at_most_the_batches_in_flight_and_resume_completes, tests/training/test_loop.py
# test_resume_after_sigkill_matches_uninterrupted), so their 2-kill variants run with the tier only.
TIER_ONLY = [pytest.param(2, marks=pytest.mark.fault, id="2-kills"), pytest.param(20, marks=pytest.mark.fault, id="20-kills")]


# --- the kill harness ------------------------------------------------------------------------------


def kill_repeatedly(command: list[str], kills: int, progress, check_after_kill, pace: tuple[float, float, float],
                    seed: int = KILL_SEED) -> dict:
    """Start `command`, SIGKILL it at a seeded random moment, check the output, repeat `kills` times.

    `pace` is (seconds to first progress, seconds in all, progress made) of an uninterrupted run. One
    kill in five lands in start-up (0.3-1x the time to first progress). The others land mid-work, placed
    by progress rather than by the clock: once this run has made a seeded random 1..share of progress
    (share: the progress still left, split among the kills still to come plus one), plus a uniform 0-1x
    of the time one unit of progress takes, so a kill lands mid-write or between writes. Clock-placed
    kills missed on a loaded machine: the resumed run finished its remaining work inside the window and
    the second of two kills never landed. Together the kills walk through most of the run however fast
    a resumed run starts. Returns counts.
    """
    rng = np.random.default_rng(seed)
    first, whole, units = pace
    unit_seconds = max(whole - first, 0.01) / max(units, 1)
    landed = before_progress = 0
    start = progress()
    for _ in range(kills):
        left = max(units - (progress() - start), 0)
        steps = 1 + int(rng.integers(0, max(left // (kills - landed + 1), 1)))
        in_startup = rng.random() < 0.2
        moment = float(rng.uniform(0.3 * first, first) if in_startup else rng.uniform(0, unit_seconds))
        before = progress()
        process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not in_startup and _wait(process, 10 * whole, until=lambda: progress() >= before + steps):
            moment = 0.0  # it finished before making the progress the kill waits for
        if _wait(process, moment):
            assert process.returncode == 0, process.stderr.read().decode()[-3000:]
            process.stderr.close()
            break  # it finished: nothing left to interrupt
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
        landed += 1
        before_progress += progress() == before
        check_after_kill()
    return {"kills": landed, "kills_before_any_progress": before_progress, "first_progress_s": round(first, 2),
            "uninterrupted_s": round(whole, 2)}


def run_timed(command: list[str], progress) -> tuple[float, float, float]:
    """Run `command` uninterrupted; returns (seconds until progress() first rose, seconds in all, progress made)."""
    start = progress()
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    began, first = time.time(), None
    while process.poll() is None:
        if first is None and progress() > start:
            first = time.time() - began
        time.sleep(0.005)
    whole = time.time() - began
    assert process.returncode == 0, process.stderr.read().decode()[-3000:]
    process.stderr.close()
    return (first if first is not None else whole), whole, progress() - start


def _wait(process: subprocess.Popen, seconds: float, until=lambda: False) -> bool:
    """Wait `seconds`, or less when `until()` turns true; returns whether the process has exited."""
    deadline = time.time() + seconds
    while time.time() < deadline and not until():
        if process.poll() is not None:
            return True
        time.sleep(0.005)
    return process.poll() is not None


def lines_of(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def assert_manifest_parses(path: Path) -> list[dict]:
    """Every line parses, except possibly a torn last one (a kill mid-append)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            assert number == len(lines), f"{path}:{number} is torn but is not the last line"
    return records


def assert_pngs_decode(*folders: Path) -> None:
    for folder in folders:
        if folder.is_dir():
            for path in folder.glob("*.png"):
                Image.open(path).load()


def report(name: str, figures: dict) -> None:
    print(f"\n[fault] {name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))


# --- synthesis --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    return save_tiny_builtin(tmp_path_factory.mktemp("builtin") / "generator", data=TOY)


def synthesis_plan(path: Path, uniform: int, limit: int) -> Path:
    make_plan(PlanConfig(data=TOY, out=str(path), uniform=uniform, limit=limit, seed=0))
    return path


def synthesize_command(plan: Path, generator_dir: Path, out: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "segsynth", "synthesize", "--data", TOY, "--plan", str(plan), "--generator",
            f"builtin:{generator_dir}", "--out", str(out), "--no-progress", "--batch-size", "2", "--steps", "30",
            *extra]


def synthesize_in_process(plan: Path, generator_dir: Path, out: Path) -> dict:
    return synthesize(SynthesizeConfig(data=TOY, plan=str(plan), generator=f"builtin:{generator_dir}", out=str(out),
                                       progress=False, batch_size=2, steps=30))


def synthetic_state(out: Path) -> dict:
    """What the final output must agree on: the sample set and each image's pixels."""
    records = assert_manifest_parses(out / "manifest.jsonl")
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "a sample appears twice in the manifest"
    for folder in ("images", "masks"):
        assert {p.name for p in (out / folder).iterdir()} == {f"{i}.png" for i in ids}, f"{folder}/ has strays"
    assert not list(out.glob("manifest.rank*.jsonl"))
    return images(out)


@pytest.mark.parametrize("kills", TIER_ONLY)
def test_synthesis_survives_random_sigkills(tmp_path, generator_dir, kills):
    plan = synthesis_plan(tmp_path / "plan.jsonl", uniform=10 if kills > 2 else 3, limit=20 if kills > 2 else 6)
    # 100 batches of 2 for 20 kills: each resumed run finishes at least one batch before its kill can land
    # mid-work, so fewer batches (60 at uniform 6) let the job complete before the 20th kill.
    planned = 10 * 20 if kills > 2 else 3 * 6
    out = tmp_path / "set"

    def check():
        assert_manifest_parses(out / "manifest.jsonl")
        assert_pngs_decode(out / "images", out / "masks")

    reference = tmp_path / "reference"
    pace = run_timed(synthesize_command(plan, generator_dir, reference), lambda: lines_of(reference / "manifest.jsonl"))
    figures = kill_repeatedly(synthesize_command(plan, generator_dir, out), kills, pace=pace,
                              progress=lambda: lines_of(out / "manifest.jsonl"), check_after_kill=check)
    done_before_rerun = len({r["id"] for r in assert_manifest_parses(out / "manifest.jsonl")})
    summary = synthesize_in_process(plan, generator_dir, out)
    assert summary["already_done"] + summary["generated"] == summary["planned"] == planned
    assert_same_pixels(synthetic_state(reference), synthetic_state(out))
    report("synthesis", {**figures, "planned": planned, "done_before_final_rerun": done_before_rerun})
    assert figures["kills"] == kills


# --- filtering --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_segmenter(tmp_path_factory):
    out = tmp_path_factory.mktemp("segmenter") / "real"
    train(TrainConfig(data=TOY, out=str(out), model="segformer-tiny", iterations=20, batch_size=4, warmup=2,
                      workers=0, eval_split="", device="cpu", log_every=10, save_every=1000))
    return out


def filter_command(root: Path, segmenter: Path) -> list[str]:
    return [PYTHON, "-m", "segsynth", "filter", "--synthetic", str(root), "--segmenter", str(segmenter),
            "--batch-size", "2", "--lanes", "2", "--device", "cpu"]


def filter_state(root: Path) -> dict:
    manifest = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    assert all("filtered_mask" in r for r in manifest), "a sample was left unfiltered"
    files = {p.name: p.read_bytes() for p in (root / "masks_filtered").iterdir()}
    assert set(files) == {Path(r["filtered_mask"]).name for r in manifest}
    return {"files": files, "ignored": {r["id"]: r.get("ignored") for r in manifest}}


@pytest.mark.parametrize("kills", QUICK_OR_TIER)
def test_filter_survives_random_sigkills(tmp_path, toy_segmenter, kills):
    dataset = open_dataset(TOY)
    copies = 30 if kills > 2 else 2
    reference = write_synthetic_set(tmp_path / "reference", dataset, copies=copies)
    root = write_synthetic_set(tmp_path / "set", dataset, copies=copies)
    # The class statistics come first (and once): kills then land in the filtering itself.
    stats = Path(toy_segmenter) / "class_stats.json"
    if not stats.is_file():
        compute_class_stats(StatsConfig(segmenter=str(toy_segmenter), out=str(stats), device="cpu"))

    def check():
        for log in root.glob("filter.rank*.jsonl"):
            assert_manifest_parses(log)
        assert_pngs_decode(root / "masks_filtered")

    pace = run_timed(filter_command(reference, toy_segmenter), lambda: lines_of(reference / "filter.rank0.jsonl"))
    figures = kill_repeatedly(filter_command(root, toy_segmenter), kills, pace=pace,
                              progress=lambda: lines_of(root / "filter.rank0.jsonl"), check_after_kill=check)
    summary = filter_synthetic(FilterConfig(synthetic=str(root), segmenter=str(toy_segmenter), batch_size=2,
                                            lanes=2, device="cpu"))
    assert summary["filtered"] == 20 * copies
    assert filter_state(reference) == filter_state(root)
    report("filter", {**figures, "samples": 20 * copies, "filtered_in_final_rerun": summary["filtered_now"]})
    assert figures["kills"] == kills


# --- training -----------------------------------------------------------------------------------------


def train_command(out: Path, iterations: int) -> list[str]:
    return [PYTHON, "-m", "segsynth", "train", "--data", TOY, "--out", str(out), "--model", "segformer-tiny",
            "--iterations", str(iterations), "--batch-size", "2", "--workers", "0", "--save-every", "2",
            "--warmup", "2", "--eval-split", "val", "--device", "cpu", "--resume"]


def checkpoint_iteration(out: Path) -> int:
    for folder in (out / "checkpoint", out / "checkpoint.old"):
        meta = folder / "segsynth.json"
        if meta.is_file():
            try:
                return json.loads(meta.read_text())["state"]["iteration"]
            except (json.JSONDecodeError, KeyError):
                return 0
    return 0


@pytest.mark.parametrize("kills", TIER_ONLY)
def test_training_survives_random_sigkills(tmp_path, kills):
    iterations = 300 if kills > 2 else 16
    out = tmp_path / "killed"

    def check():
        checkpoint = out / "checkpoint"
        if checkpoint.exists():  # a visible checkpoint is always whole
            load_file(str(checkpoint / "model.safetensors"))
            json.loads((checkpoint / "segsynth.json").read_text())
        assert_manifest_parses(out / "metrics.jsonl")

    whole = tmp_path / "whole"
    pace = run_timed(train_command(whole, iterations), lambda: checkpoint_iteration(whole))
    figures = kill_repeatedly(train_command(out, iterations), kills, pace=pace,
                              progress=lambda: checkpoint_iteration(out), check_after_kill=check)
    result = subprocess.run(train_command(out, iterations), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((out / "metrics_val.json").read_text())
    whole_metrics = json.loads((whole / "metrics_val.json").read_text())
    assert abs(resumed["miou"] - whole_metrics["miou"]) < 0.01, (resumed["miou"], whole_metrics["miou"])
    left, right = load_file(str(out / "checkpoint" / "model.safetensors")), \
        load_file(str(tmp_path / "whole" / "checkpoint" / "model.safetensors"))
    difference = max(float((left[k].double() - right[k].double()).abs().max()) for k in left)
    assert difference < 1e-5
    report("training", {**figures, "iterations": iterations, "val_miou_resumed": round(resumed["miou"], 4),
                        "val_miou_uninterrupted": round(whole_metrics["miou"], 4), "max_weight_difference": difference})
    assert figures["kills"] == kills


# --- disk full ----------------------------------------------------------------------------------------


def fail_fsync_after(monkeypatch, allowed: int) -> None:
    """Every write in segsynth.io fsyncs; from call `allowed` on, fsync reports a full disk."""
    real_fsync, calls = os.fsync, [0]

    def fsync(fd):
        calls[0] += 1
        if calls[0] > allowed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(segsynth.io.os, "fsync", fsync)


def assert_no_temp_files(root: Path) -> None:
    leftovers = [p for p in root.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith((".checkpoint-", ".generator-"))]
    assert not leftovers, leftovers


def test_disk_full_during_synthesis_is_a_clear_error_and_a_rerun_completes(tmp_path, generator_dir, monkeypatch):
    plan = synthesis_plan(tmp_path / "plan.jsonl", uniform=2, limit=5)
    out = tmp_path / "set"
    fail_fsync_after(monkeypatch, allowed=16)  # a few samples, then the disk is full mid-sample
    with pytest.raises(SegsynthError, match="No space left on device.*free space.*rerun"):
        synthesize_in_process(plan, generator_dir, out)
    assert_no_temp_files(out)
    assert_pngs_decode(out / "images", out / "masks")
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]  # no torn line
    assert 0 < len(records) < 10
    monkeypatch.undo()
    summary = synthesize_in_process(plan, generator_dir, out)
    assert summary["already_done"] == len(records) and summary["generated"] == 10 - len(records)
    synthesize_in_process(plan, generator_dir, tmp_path / "reference")
    assert_same_pixels(synthetic_state(tmp_path / "reference"), synthetic_state(out))


@pytest.mark.parametrize("full_disk_error", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    # safetensors' Rust writer reports ENOSPC as its own exception type, not OSError
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
], ids=["oserror", "safetensors"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, full_disk_error):
    out = tmp_path / "run"
    config = dict(data=TOY, out=str(out), model="segformer-tiny", iterations=4, batch_size=2, warmup=1, workers=0,
                  eval_split="", device="cpu", save_every=2, resume=True)
    train(TrainConfig(**{**config, "iterations": 2}))
    before = (out / "checkpoint" / "model.safetensors").read_bytes()

    import segsynth.formats.checkpoint as checkpoint_module

    def full_disk(*args, **kwargs):
        raise full_disk_error

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    code = main(["train", "--data", TOY, "--out", str(out), "--model", "segformer-tiny", "--iterations", "4",
                 "--batch-size", "2", "--warmup", "1", "--workers", "0", "--eval-split=", "--device", "cpu",
                 "--save-every", "2", "--resume"])
    assert code == 2
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before  # the old checkpoint stands
    assert_no_temp_files(out)
    monkeypatch.undo()
    train(TrainConfig(**config))
    assert json.loads((out / "checkpoint" / "segsynth.json").read_text())["state"]["iteration"] == 4


def test_disk_full_message_from_the_cli(tmp_path, generator_dir, monkeypatch, capsys):
    plan = synthesis_plan(tmp_path / "plan.jsonl", uniform=1, limit=3)
    fail_fsync_after(monkeypatch, allowed=1)
    code = main(["synthesize", "--data", TOY, "--plan", str(plan), "--generator", f"builtin:{generator_dir}",
                 "--out", str(tmp_path / "set"), "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err
    assert "segsynth synthesize: error:" in error and str(tmp_path / "set") in error and "free space" in error


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    if result.returncode == 0:
        subprocess.run(["umount", str(where)], check=True)
    return result.returncode == 0


@pytest.mark.fault
def test_a_real_full_tmpfs_during_synthesis_and_training(tmp_path, generator_dir):
    """The same as the injected tests above, on a size-limited tmpfs the test mounts (needs root)."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root and mount); the injected-ENOSPC tests cover the logic")
    plan = synthesis_plan(tmp_path / "plan.jsonl", uniform=3, limit=20)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "set"
        failed = subprocess.run(synthesize_command(plan, generator_dir, out), cwd=REPO, env=subprocess_env(), capture_output=True,
                                text=True, timeout=300)
        assert failed.returncode == 2, failed.stderr[-3000:]
        assert "No space left on device" in failed.stderr and "free space" in failed.stderr
        assert_no_temp_files(out)
        assert_pngs_decode(out / "images", out / "masks")
        done = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # space freed
        rerun = subprocess.run(synthesize_command(plan, generator_dir, out), cwd=REPO, env=subprocess_env(), capture_output=True,
                               text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        synthesize_in_process(plan, generator_dir, tmp_path / "reference")
        assert_same_pixels(synthetic_state(tmp_path / "reference"), synthetic_state(out))

        subprocess.run(["mount", "-o", "remount,size=" + str(_used_kib(disk) + 600) + "k", str(disk)], check=True)
        run = disk / "run"
        failed = subprocess.run(train_command(run, 8), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert failed.returncode == 2, failed.stderr[-3000:]
        assert "No space left on device" in failed.stderr
        assert_no_temp_files(run)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        rerun = subprocess.run(train_command(run, 8), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        report("disk full (tmpfs)", {"synthesis_done_before_full": len(done), "training": "resumed to the end"})
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def _used_kib(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) // 1024


# --- a killed rank -------------------------------------------------------------------------------------


def _worker_with_rank(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=`rank` among `parent`'s descendants (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=%d" % rank in environ and _descends(ppid, parent):
            return int(entry.name)
    return None


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return False


def test_two_rank_synthesis_with_one_rank_killed_reruns_only_the_missing_work(tmp_path, generator_dir):
    plan = synthesis_plan(tmp_path / "plan.jsonl", uniform=2, limit=10)  # 20 samples, 10 per rank
    out = tmp_path / "set"
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "segsynth",
               "synthesize", *synthesize_command(plan, generator_dir, out)[4:]]
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while lines_of(out / "manifest.rank1.jsonl") < 2:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "rank 1 wrote nothing"
            time.sleep(0.01)
        victim = _worker_with_rank(process.pid, 1)
        assert victim is not None, "could not find the rank-1 worker"
        os.kill(victim, signal.SIGKILL)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert process.returncode != 0  # torchrun reports the lost rank
    done = {r["id"] for name in ("manifest.jsonl", "manifest.rank0.jsonl", "manifest.rank1.jsonl")
            for r in assert_manifest_parses(out / name)}
    assert 2 <= len(done) < 20
    kept = {i: (out / "images" / f"{i}.png").stat().st_mtime_ns for i in done}

    summary = synthesize_in_process(plan, generator_dir, out)
    assert summary["already_done"] == len(done)
    assert summary["generated"] == 20 - len(done)  # only the missing work
    assert {i: (out / "images" / f"{i}.png").stat().st_mtime_ns for i in done} == kept  # finished files untouched
    synthesize_in_process(plan, generator_dir, tmp_path / "reference")
    assert_same_pixels(synthetic_state(tmp_path / "reference"), synthetic_state(out))
    report("killed rank", {"done_when_rank1_died": len(done), "rerun_generated": summary["generated"]})
