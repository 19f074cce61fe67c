"""`segsynth synthesize`: output layout, determinism, resume after SIGKILL, sharding, and bad-input errors.

Every test uses a tiny builtin generator (32x32, saved to a tmp dir and loaded by path).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fakes import subprocess_env
from segsynth.data import open_dataset
from segsynth.distributed import shard
from segsynth.generators.base import resize_image, resize_mask
from segsynth.generators.testing import save_tiny_builtin
from segsynth.io import SegsynthError
from segsynth.plan import PlanConfig, make_plan
from segsynth.synthesize import SynthesizeConfig, check_source_images, synthesize
from synthetic_sets import assert_same_pixels, images

TOY = "toy:n=12,n_val=4,size=32"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    return save_tiny_builtin(tmp_path_factory.mktemp("builtin") / "generator", data=TOY)


def make_test_plan(path, uniform=2, limit=5, seed=0, split="train"):
    return make_plan(PlanConfig(data=TOY, out=str(path), uniform=uniform, limit=limit, seed=seed, split=split))


def run(plan, generator_dir, out, **overrides) -> dict:
    config = SynthesizeConfig(data=TOY, plan=str(plan), generator=f"builtin:{generator_dir}", out=str(out),
                              progress=False, **overrides)
    return synthesize(config)


def manifest(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "manifest.jsonl").read_text().splitlines() if line.strip()]


def visible_files(out) -> dict[str, set]:
    return {folder: {p.name for p in (Path(out) / folder).iterdir()} for folder in ("images", "masks")}


def assert_consistent(out, planned: int) -> None:
    """One manifest line per sample, both files present and decodable, nothing else in images/ or masks/."""
    records = manifest(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == planned
    expected = {f"{i}.png" for i in ids}
    assert visible_files(out) == {"images": expected, "masks": expected}
    for name in expected:
        Image.open(Path(out) / "images" / name).load()
        Image.open(Path(out) / "masks" / name).load()
    assert not list(Path(out).glob("manifest.rank*.jsonl"))


# --- the output -------------------------------------------------------------------------------


def test_writes_a_folder_dataset_with_manifest(tmp_path, generator_dir):
    plan = make_test_plan(tmp_path / "plan.jsonl")
    summary = run(plan, generator_dir, tmp_path / "set", batch_size=3)
    assert summary["generated"] == 10 and summary["images_per_s"] > 0
    assert_consistent(tmp_path / "set", 10)
    record = manifest(tmp_path / "set")[0]
    assert record["id"] == "toy_train_00000_s0" and record["source"] == "toy_train_00000" and record["seed"] == 0
    assert record["image"] == "images/toy_train_00000_s0.png" and record["size"] == [32, 32]
    assert record["generator"]["name"] == "builtin" and record["steps"] == 4 and record["seconds"] > 0
    for name in ("classes.json", "synthesis.json", "synthesize.config.yaml", "summary.json"):
        assert (tmp_path / "set" / name).is_file()

    # The set is a folder: dataset, and each mask is the conditioning mask at the image's size.
    synthetic = open_dataset(f"folder:{tmp_path / 'set'}")
    real = open_dataset(TOY).split("train")
    assert synthetic.classes == open_dataset(TOY).classes
    split = synthetic.split("train")
    assert len(split) == 10
    sample = split[split.index_of("toy_train_00003_s7")]
    assert sample.image.shape == (32, 32, 3)
    np.testing.assert_array_equal(sample.label, resize_mask(real.label(3), (32, 32)))


def test_a_crop_entry_renders_that_window_of_its_source_mask(tmp_path, generator_dir):
    """A plan entry with "source" and "crop" conditions on the window of the mask: the sample's label is the crop
    resized to the working size, its id the entry's, its source the mask, and the crop is in its meta."""
    plan = tmp_path / "plan.jsonl"
    plan.write_text('{"id": "toy_train_00003@road", "source": "toy_train_00003", "crop": [8, 4, 16, 20], "seeds": [5]}\n'
                    '{"id": "toy_train_00003", "seeds": [6]}\n')
    run(plan, generator_dir, tmp_path / "set", batch_size=2)
    records = {record["id"]: record for record in manifest(tmp_path / "set")}
    cropped = records["toy_train_00003@road_s5"]
    assert cropped["source"] == "toy_train_00003" and cropped["meta"] == {"crop": [8, 4, 16, 20]}
    assert "meta" not in records["toy_train_00003_s6"]
    real = open_dataset(TOY).split("train").label(3)
    label = np.asarray(Image.open(tmp_path / "set" / cropped["mask"]))
    np.testing.assert_array_equal(label, resize_mask(real[8:24, 4:24], (32, 32)))
    assert not np.array_equal(label, resize_mask(real, (32, 32)))


def test_a_crop_outside_its_mask_is_refused_before_the_generator_opens(tmp_path):
    plan = tmp_path / "plan.jsonl"
    plan.write_text('{"id": "a@road", "source": "toy_train_00000", "crop": [20, 0, 16, 16], "seeds": [0]}\n')
    with pytest.raises(SegsynthError, match=r"a@road_s0: crop \[20, 0, 16, 16\].*outside mask toy_train_00000 \(32x32\)"):
        run(plan, tmp_path / "no_generator_here", tmp_path / "set")
    assert not (tmp_path / "set").exists()


def test_strength_renders_each_sample_from_its_masks_own_image(tmp_path, generator_dir):
    """--strength: each sample starts from the real image of its mask (the crop's window of it for a crop entry),
    so it stays near that image; the setting is in the set's generator identity and every record."""
    plan = tmp_path / "plan.jsonl"
    plan.write_text('{"id": "toy_train_00002", "seeds": [1, 2]}\n'
                    '{"id": "toy_train_00004@c", "source": "toy_train_00004", "crop": [0, 0, 16, 16], "seeds": [3]}\n')
    run(plan, generator_dir, tmp_path / "near", steps=10, strength=0.2)
    run(plan, generator_dir, tmp_path / "noise", steps=10)
    real = open_dataset(TOY).split("train")
    sources = {"toy_train_00002_s1": real[2].image, "toy_train_00002_s2": real[2].image,
               "toy_train_00004@c_s3": resize_image(real[4].image[:16, :16], (32, 32))}
    near, noise = images(tmp_path / "near"), images(tmp_path / "noise")
    for sample_id, source in sources.items():
        distance = np.abs(near[sample_id].astype(float) - source).mean()
        assert distance < 0.5 * np.abs(noise[sample_id].astype(float) - source).mean(), sample_id
    assert all(record["generator"]["strength"] == 0.2 for record in manifest(tmp_path / "near"))
    assert json.loads((tmp_path / "near" / "synthesis.json").read_text())["generator"]["strength"] == 0.2
    assert "strength" not in manifest(tmp_path / "noise")[0]["generator"]
    with pytest.raises(SegsynthError, match="made with a different generator"):
        run(plan, generator_dir, tmp_path / "near", steps=10, strength=0.3)


def test_strength_is_refused_where_there_is_no_source_image(tmp_path, generator_dir):
    plan = make_test_plan(tmp_path / "plan.jsonl", uniform=1, limit=1)
    config = SynthesizeConfig(data=TOY, plan=str(plan), generator=f"builtin:{generator_dir}", out=str(tmp_path / "o"),
                              strength=0.5)
    with pytest.raises(SegsynthError, match="cannot start from source images; drop --strength"):
        check_source_images(SimpleNamespace(takes_source_images=False), config)
    config.data = "synthetic-raw:masks"
    with pytest.raises(SegsynthError, match="a generated mask set has no images"):
        check_source_images(SimpleNamespace(takes_source_images=True), config)
    with pytest.raises(SegsynthError, match="strength"):
        SynthesizeConfig(data=TOY, plan=str(plan), generator="builtin:x", out="o", strength=0.0)


def test_rerun_skips_finished_samples(tmp_path, generator_dir):
    plan = make_test_plan(tmp_path / "plan.jsonl")
    run(plan, generator_dir, tmp_path / "set")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "set" / "images").iterdir()}
    summary = run(plan, generator_dir, tmp_path / "set")
    assert summary["generated"] == 0 and summary["already_done"] == 10
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "set" / "images").iterdir()} == before


def test_a_grown_plan_renders_only_the_new_samples(tmp_path, generator_dir):
    run(make_test_plan(tmp_path / "small.jsonl", limit=2), generator_dir, tmp_path / "set")
    summary = run(make_test_plan(tmp_path / "big.jsonl", limit=5), generator_dir, tmp_path / "set")
    assert summary["already_done"] == 4 and summary["generated"] == 6
    assert_consistent(tmp_path / "set", 10)


# --- determinism --------------------------------------------------------------------------------


def test_pixels_do_not_depend_on_batch_size(tmp_path, generator_dir):
    plan = make_test_plan(tmp_path / "plan.jsonl", uniform=2, limit=3)
    run(plan, generator_dir, tmp_path / "b1", batch_size=1)
    run(plan, generator_dir, tmp_path / "b4", batch_size=4)
    assert_same_pixels(images(tmp_path / "b1"), images(tmp_path / "b4"))


def test_distinct_seeds_give_distinct_images(tmp_path, generator_dir):
    plan = make_test_plan(tmp_path / "plan.jsonl", uniform=2, limit=1)
    run(plan, generator_dir, tmp_path / "set")
    pictures = list(images(tmp_path / "set").values())
    assert np.abs(pictures[0] - pictures[1]).mean() > 1


def test_shards_are_disjoint_and_cover_the_plan():
    samples = list(range(23))
    for world in (1, 2, 3, 4):
        shards = [shard(samples, rank, world) for rank in range(world)]
        flat = [s for part in shards for s in part]
        assert sorted(flat) == samples and len(flat) == len(set(flat))


def _synthesize_command(plan, generator_dir, out, *extra) -> list[str]:
    return ["--data", TOY, "--plan", str(plan), "--generator", f"builtin:{generator_dir}", "--out", str(out),
            "--no-progress", *extra]


def test_two_torchrun_processes_match_one_process(tmp_path, generator_dir):
    plan = make_test_plan(tmp_path / "plan.jsonl", uniform=2, limit=5)
    run(plan, generator_dir, tmp_path / "one", batch_size=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "segsynth", "synthesize", *_synthesize_command(plan, generator_dir, tmp_path / "two", "--batch-size", "3")]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_consistent(tmp_path / "two", 10)
    assert [r["id"] for r in manifest(tmp_path / "two")] == [r["id"] for r in manifest(tmp_path / "one")]  # plan order
    assert_same_pixels(images(tmp_path / "one"), images(tmp_path / "two"))
    assert "synthesized 10 image(s)" in result.stdout


# --- kill -9 and recovery ------------------------------------------------------------------------


def test_sigkill_loses_at_most_the_batches_in_flight_and_resume_completes(tmp_path, generator_dir):
    plan = make_test_plan(tmp_path / "plan.jsonl", uniform=3, limit=6)  # 18 samples
    out = tmp_path / "set"
    reference = tmp_path / "reference"
    run(plan, generator_dir, reference, batch_size=2, steps=40)
    command = [sys.executable, "-m", "segsynth", "synthesize",
               *_synthesize_command(plan, generator_dir, out, "--batch-size", "2", "--steps", "40")]
    for kill_after_lines in (1, 7):
        process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 90
        while time.time() < deadline and process.poll() is None:
            path = out / "manifest.jsonl"
            if path.is_file() and path.read_text().count("\n") >= kill_after_lines:
                break
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        # Right after the kill: every visible PNG is complete (temp names are hidden), the manifest parses.
        for folder in ("images", "masks"):
            for path in (out / folder).glob("*.png"):
                Image.open(path).load()
        lines = (out / "manifest.jsonl").read_text().splitlines()
        for line in lines[:-1]:
            json.loads(line)
    summary = run(plan, generator_dir, out, batch_size=5, steps=40)
    assert summary["already_done"] >= 7 and summary["generated"] > 0  # the kills landed mid-run
    assert summary["already_done"] + summary["generated"] == 18
    assert_consistent(out, 18)
    assert not [p for d in ("images", "masks") for p in (out / d).glob(".*")]  # no temp files left
    assert_same_pixels(images(reference), images(out))


def test_rerun_cleans_orphans_temps_and_torn_lines(tmp_path, generator_dir):
    plan = make_test_plan(tmp_path / "plan.jsonl", uniform=2, limit=3)
    out = tmp_path / "set"
    run(plan, generator_dir, out)
    records = (out / "manifest.jsonl").read_text().splitlines()
    # A kill after the files but before the manifest line, a kill mid-append, and a kill mid-write.
    (out / "manifest.jsonl").write_text("\n".join(records[:-1]) + "\n" + records[-1][:25])
    (out / "images" / ".toy_train_00000_s9.png.abc.tmp").write_bytes(b"partial")
    (out / "masks" / "stray.png").write_bytes(b"not a png")
    summary = run(plan, generator_dir, out)
    assert summary["generated"] == 1
    assert_consistent(out, 6)
    assert not (out / "images" / ".toy_train_00000_s9.png.abc.tmp").exists()


def test_leftover_rank_manifests_are_merged(tmp_path, generator_dir):
    plan = make_test_plan(tmp_path / "plan.jsonl", uniform=1, limit=4)
    out = tmp_path / "set"
    run(plan, generator_dir, out)
    records = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join(records[:2]) + "\n")
    (out / "manifest.rank1.jsonl").write_text("\n".join(records[2:]) + "\n")
    summary = run(plan, generator_dir, out)
    assert summary["generated"] == 0
    assert_consistent(out, 4)


# --- bad input: clear errors before any compute --------------------------------------------------------


def test_plan_naming_a_missing_mask_fails_before_the_generator_opens(tmp_path):
    plan = tmp_path / "plan.jsonl"
    plan.write_text('{"id": "toy_train_00000", "seeds": [0]}\n{"id": "no_such_mask", "seeds": [1]}\n')
    with pytest.raises(SegsynthError, match="no_such_mask.*not in split|not in split.*no_such_mask"):
        run(plan, tmp_path / "no_generator_here", tmp_path / "set")
    assert not (tmp_path / "set").exists()


def test_plan_from_another_split_is_refused(tmp_path, generator_dir):
    plan = make_test_plan(tmp_path / "plan.jsonl", split="val", limit=2)
    with pytest.raises(SegsynthError, match="not in split 'train'"):
        run(plan, generator_dir, tmp_path / "set")


def test_generator_folder_without_its_files(tmp_path):
    plan = make_test_plan(tmp_path / "plan.jsonl")
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    (broken / "unet" / "config.json").write_text("{}")
    with pytest.raises(SegsynthError, match="missing segsynth_generator.json.*diffusion_pytorch_model.safetensors"):
        run(plan, broken, tmp_path / "set")
    with pytest.raises(SegsynthError, match="does not exist"):
        run(plan, tmp_path / "nowhere", tmp_path / "set")


def test_output_holding_another_plans_samples_is_refused(tmp_path, generator_dir):
    run(make_test_plan(tmp_path / "a.jsonl", limit=2), generator_dir, tmp_path / "set")
    other = make_test_plan(tmp_path / "b.jsonl", limit=2, seed=100)
    with pytest.raises(SegsynthError, match="different plan"):
        run(other, generator_dir, tmp_path / "set")
    assert len(manifest(tmp_path / "set")) == 4  # nothing was touched


def test_output_made_with_other_settings_is_refused(tmp_path, generator_dir):
    plan = make_test_plan(tmp_path / "plan.jsonl", limit=2)
    run(plan, generator_dir, tmp_path / "set")
    with pytest.raises(SegsynthError, match="steps"):
        run(plan, generator_dir, tmp_path / "set", steps=7)


def test_output_folder_that_is_not_a_synthetic_set_is_refused(tmp_path, generator_dir):
    (tmp_path / "set" / "images").mkdir(parents=True)
    (tmp_path / "set" / "images" / "precious.png").write_bytes(b"user data")
    with pytest.raises(SegsynthError, match="not a segsynth synthetic set"):
        run(make_test_plan(tmp_path / "plan.jsonl"), generator_dir, tmp_path / "set")
    assert (tmp_path / "set" / "images" / "precious.png").exists()


def test_generator_trained_on_other_classes_is_refused(tmp_path):
    from segsynth.generators.testing import save_tiny_builtin

    folder = tmp_path / "gen"
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "data" / "images" / f"{i}.png")
        Image.fromarray(np.full((32, 32), i, np.uint8)).save(tmp_path / "data" / "masks" / f"{i}.png")
    (tmp_path / "data" / "classes.json").write_text(json.dumps({"classes": ["a", "b"]}))
    save_tiny_builtin(folder, data=f"folder:{tmp_path / 'data'}", iterations=1)
    with pytest.raises(SegsynthError, match="trained on classes"):
        run(make_test_plan(tmp_path / "plan.jsonl"), folder, tmp_path / "set")


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    from segsynth.cli import main

    plan = make_test_plan(tmp_path / "plan.jsonl")
    code = main(["synthesize", *_synthesize_command(plan, tmp_path / "missing", tmp_path / "set")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path, generator_dir):
    import fcntl

    plan = make_test_plan(tmp_path / "plan.jsonl", limit=1)
    (tmp_path / "set").mkdir()
    with open(tmp_path / "set" / ".synthesize.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running synthesize holds it
        with pytest.raises(SegsynthError, match="another `segsynth synthesize` is writing"):
            run(plan, generator_dir, tmp_path / "set")
    assert run(plan, generator_dir, tmp_path / "set")["generated"] == 2  # free again once released
