"""Bad input, one test per row of docs/bad_input.md.

Every test goes through `segsynth.cli.main`, as a user would, and checks the three promises:
the exit code is not 0 (2 for an error, 1 for a `check-data` report with problems), the message
names the file or key and says what to do, and nothing half-written is left behind (the output
is not created, or is left exactly as it was).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakes import H, TOY_SPEC, W, build_folder, stripes, write_image, write_json, write_mask
from segsynth.cli import main
from segsynth.data import open_dataset
from synthetic_sets import write_synthetic_set

SRC = Path(__file__).resolve().parents[1] / "src" / "segsynth"
TINY_TRAIN = ["--model", "segformer-tiny", "--iterations", "1", "--batch-size", "2", "--workers", "0",
              "--eval-split", "", "--device", "cpu"]


def fails(capsys, argv, code: int = 2) -> str:
    """Run the command; assert its exit code; return what it printed (stderr for errors, stdout for reports)."""
    assert main([str(a) for a in argv]) == code
    captured = capsys.readouterr()
    if code == 2:
        assert re.search(rf"(^|\n)segsynth {argv[0]}: error: ", captured.err), captured.err  # on a line of its own
        return captured.err
    return captured.out


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: 'left exactly as it was' is listing(before) == listing(after)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Payload:
    """A pickle that creates `path` when it is unpickled: proof that a loader never unpickles it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """A barely trained builtin generator for the toy classes."""
    from segsynth.generators.testing import save_tiny_builtin

    return save_tiny_builtin(tmp_path_factory.mktemp("bad-input-generator") / "generator", data=TOY_SPEC)


def toy_plan(path: Path, seed: int = 0, limit: int = 1) -> Path:
    assert main(["plan", "--data", TOY_SPEC, "--uniform", "1", "--limit", str(limit), "--seed", str(seed),
                 "--out", str(path)]) == 0
    return path


# --- the dataset: every verb that reads one --------------------------------------------------------


def verb_argv(verb: str, spec: str, tmp_path: Path, checkpoint: Path) -> list:
    """The verb run on `spec`, writing under tmp_path/out (which must not appear)."""
    out = tmp_path / "out"
    if verb == "check-data":
        return ["check-data", spec]
    if verb == "train":
        return ["train", "--data", spec, "--out", out, *TINY_TRAIN]
    if verb == "evaluate":
        return ["evaluate", "--checkpoint", checkpoint, "--data", spec, "--split", "train", "--out",
                out / "metrics.json", "--device", "cpu"]
    if verb == "plan":
        return ["plan", "--data", spec, "--uniform", "1", "--out", out / "plan.jsonl"]
    if verb == "train-generator":
        return ["train-generator", "--data", spec, "--out", out, "--size", "32,32", "--channels", "32,32",
                "--iterations", "1", "--batch-size", "2", "--device", "cpu"]
    if verb == "synthesize":  # the data is checked before the generator (which does not exist) is opened
        plan = tmp_path / "plan.jsonl"
        plan.write_text('{"id": "img_0", "seeds": [0]}\n')
        return ["synthesize", "--data", spec, "--plan", plan, "--generator", f"builtin:{tmp_path / 'no-generator'}",
                "--out", out, "--no-progress", "--device", "cpu"]
    raise AssertionError(verb)


def _image_without_mask(root):
    (root / "masks" / "img_1.png").unlink()
    return [str(root / "images" / "img_1.png"), "image without mask", "add the missing files or remove the unpaired ones"]


def _mask_without_image(root):
    (root / "images" / "img_1.png").unlink()
    return [str(root / "masks" / "img_1.png"), "mask without image", "add the missing files or remove the unpaired ones"]


def _empty_split(root):
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("img_0\nimg_1\n")
    (root / "splits" / "val.txt").write_text("\n")
    return [f"folder:{root}", "split 'val' is empty", "add samples or remove its folder/list"]


def _classes_json_without_classes(root):
    write_json(root / "classes.json", {"names": ["background", "cat", "dog"]})
    return [str(root / "classes.json"), 'needs "classes": a non-empty list of class names']


def _classes_json_missing(root):
    (root / "classes.json").unlink()
    return [str(root / "classes.json"), 'missing; write {"classes": ["name", ...]}']


OPENING = {
    "image-without-mask": _image_without_mask,
    "mask-without-image": _mask_without_image,
    "empty-split": _empty_split,
    "classes-json-without-classes": _classes_json_without_classes,
    "classes-json-missing": _classes_json_missing,
}
ALL_DATA_VERBS = ["check-data", "train", "evaluate", "plan", "train-generator", "synthesize"]


@pytest.mark.parametrize("verb", ALL_DATA_VERBS)
@pytest.mark.parametrize("breakage", list(OPENING))
def test_dataset_that_cannot_be_opened(tmp_path, capsys, trained, breakage, verb):
    root = build_folder(tmp_path / "data", n=5)
    needles = OPENING[breakage](root)
    err = fails(capsys, verb_argv(verb, f"folder:{root}", tmp_path, trained[0]))
    for needle in needles:
        assert needle in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", ALL_DATA_VERBS)
def test_unknown_dataset_kind(tmp_path, capsys, trained, verb):
    err = fails(capsys, verb_argv(verb, "kitti:/data/kitti", tmp_path, trained[0]))
    assert "unknown dataset kind 'kitti' in spec 'kitti:/data/kitti'" in err
    assert "kinds: camvid, ade20k, cityscapes, voc, coco-stuff, folder" in err and "(write KIND:PATH)" in err
    assert not (tmp_path / "out").exists()


def _size_mismatch(root):
    write_mask(root / "masks" / "img_2.png", stripes([1, 2], size=(H, W + 8)))
    return [str(root / "masks" / "img_2.png"), str(root / "images" / "img_2.png"), f"mask is {W + 8}x{H}",
            "masks must match their images"]


def _label_out_of_range(root):
    write_mask(root / "masks" / "img_2.png", stripes([0, 1, 7, 9]))
    return [str(root / "masks" / "img_2.png"), "[7, 9] are outside the 3 classes", "valid: 0..2",
            "fix the mask or the dataset's classes.json"]


def _rgb_mask(root):
    colours = np.zeros((H, W, 3), np.uint8)
    colours[:, : W // 2] = (128, 64, 128)
    colours[:, W // 2:] = (0, 128, 0)
    Image.fromarray(colours, mode="RGB").save(root / "masks" / "img_2.png")
    return [str(root / "masks" / "img_2.png"), "mask is an RGB colour image, but class indices are expected",
            "convert colour masks to index masks"]


def _corrupt_png_image(root):
    (root / "images" / "img_2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return [str(root / "images" / "img_2.png"), "cannot read image", "replace or remove the file"]


def _corrupt_png_mask(root):
    (root / "masks" / "img_2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return [str(root / "masks" / "img_2.png"), "cannot read mask", "replace or remove the file"]


def _truncated_jpeg(root):
    (root / "images" / "img_2.png").unlink()
    jpeg = root / "images" / "img_2.jpg"
    write_image(jpeg, seed=2)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    return [str(jpeg), "cannot read image", "replace or remove the file"]


def _not_an_image(root):
    (root / "images" / "img_2.png").write_text("<html><body>404 Not Found</body></html>\n")
    return [str(root / "images" / "img_2.png"), "cannot read image (cannot identify image file",
            "replace or remove the file"]


DECODING = {
    "size-mismatch": _size_mismatch,
    "label-out-of-class-range": _label_out_of_range,
    "rgb-mask": _rgb_mask,
    "corrupt-png-image": _corrupt_png_image,
    "corrupt-png-mask": _corrupt_png_mask,
    "truncated-jpeg": _truncated_jpeg,
    "not-an-image": _not_an_image,
}


@pytest.mark.parametrize("verb", ["check-data", "train", "evaluate", "train-generator", "synthesize"])
@pytest.mark.parametrize("breakage", list(DECODING))
def test_sample_that_cannot_be_used(tmp_path, capsys, trained, breakage, verb):
    """check-data lists every such sample and exits 1; the other verbs stop before compute with exit 2."""
    root = build_folder(tmp_path / "data", n=5)
    needles = DECODING[breakage](root)
    spec = f"folder:{root}"
    if verb == "check-data":
        report = fails(capsys, verb_argv(verb, spec, tmp_path, trained[0]), code=1)
        assert "problems: 1" in report and "split train: 5 samples, 4 decoded" in report
        for needle in needles:
            assert needle in report
        return
    err = fails(capsys, verb_argv(verb, spec, tmp_path, trained[0]))
    for needle in needles:
        assert needle in err
    assert f"run `segsynth check-data {spec}` for the full list" in err
    assert not (tmp_path / "out").exists()


# --- plans, statistics, synthetic sets ---------------------------------------------------------------


def test_plan_for_another_dataset(tmp_path, capsys):
    root = build_folder(tmp_path / "data", n=3)
    plan = tmp_path / "plan.jsonl"
    assert main(["plan", "--data", f"folder:{root}", "--uniform", "1", "--out", str(plan)]) == 0
    capsys.readouterr()
    err = fails(capsys, ["synthesize", "--data", TOY_SPEC, "--plan", plan, "--generator",
                         f"builtin:{tmp_path / 'no-generator'}", "--out", tmp_path / "set", "--no-progress"])
    assert f"{plan}: 3 mask id(s) are not in split 'train'" in err and "img_0" in err
    assert "make the plan from this dataset and split (segsynth plan --split)" in err
    assert not (tmp_path / "set").exists()


@pytest.mark.parametrize("content, needle", [
    ({"classes": ["a", "b"], "mean_loss": [1.0, 2.0], "pixels": [1, 1]},
     "statistics are for classes ['a', 'b']..., not this dataset's"),
    ({"mean_loss": [1.0]}, "not a class-stats file (no 'classes'); make one with `segsynth stats`"),
    (None, "class-stats file not found; make it with `segsynth stats --segmenter CHECKPOINT --out"),
], ids=["other-dataset", "not-stats", "missing"])
def test_stats_json_for_another_dataset(tmp_path, capsys, content, needle):
    stats = tmp_path / "stats.json"
    if content is not None:
        write_json(stats, content)
    err = fails(capsys, ["plan", "--data", TOY_SPEC, "--stats", stats, "--out", tmp_path / "plan.jsonl"])
    assert str(stats) in err and needle in err
    if content is not None and "classes" in content:
        assert "compute them with a segmenter trained on this dataset" in err
    assert not (tmp_path / "plan.jsonl").exists()


def test_synthetic_dir_from_another_plan(tmp_path, capsys, generator):
    out = tmp_path / "set"
    assert main(["synthesize", "--data", TOY_SPEC, "--plan", str(toy_plan(tmp_path / "a.jsonl")), "--generator",
                 f"builtin:{generator}", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    before = listing(out)
    other = toy_plan(tmp_path / "b.jsonl", seed=100)
    err = fails(capsys, ["synthesize", "--data", TOY_SPEC, "--plan", other, "--generator", f"builtin:{generator}",
                         "--out", out, "--no-progress", "--device", "cpu"])
    assert f"{out}: holds 1 sample(s) of a different plan" in err and str(other) in err
    assert "use a new --out, or the plan that made this folder" in err
    assert listing(out) == before


def test_synthetic_set_for_another_dataset(tmp_path, capsys):
    folder = build_folder(tmp_path / "data", n=3)
    synthetic = write_synthetic_set(tmp_path / "syn", open_dataset(f"folder:{folder}"))
    err = fails(capsys, ["train", "--data", TOY_SPEC, "--recipe", "synthetic", "--synthetic", synthetic,
                         "--out", tmp_path / "out", *TINY_TRAIN])
    assert f"{synthetic}/classes.json: classes differ from {TOY_SPEC}'s" in err
    assert "use a synthetic set made from this dataset" in err
    assert not (tmp_path / "out").exists()


def test_generator_for_other_classes(tmp_path, capsys, generator):
    root = build_folder(tmp_path / "data", n=3)
    plan = tmp_path / "plan.jsonl"
    plan.write_text('{"id": "img_0", "seeds": [0]}\n')
    err = fails(capsys, ["synthesize", "--data", f"folder:{root}", "--plan", plan, "--generator", f"builtin:{generator}",
                         "--out", tmp_path / "set", "--no-progress", "--device", "cpu"])
    assert f"{generator} was trained on classes" in err and "train a generator on this dataset's classes" in err
    assert not (tmp_path / "set").exists()


def _generator_without_weights(folder: Path, marker: Path) -> str:
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    write_json(folder / "segsynth_generator.json", {"format": "segsynth-builtin-generator/1"})
    # A pickle in place of the safetensors file: loading it would run code (here: create `marker`).
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    return "missing unet/diffusion_pytorch_model.safetensors"


def _generator_without_metadata(folder: Path, marker: Path) -> str:
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    return "missing segsynth_generator.json, unet/diffusion_pytorch_model.safetensors, scheduler/scheduler_config.json"


@pytest.mark.parametrize("breakage", [_generator_without_weights, _generator_without_metadata],
                         ids=["pickle-instead-of-safetensors", "no-metadata"])
def test_generator_dir_missing_files(tmp_path, capsys, breakage):
    folder, marker = tmp_path / "generator", tmp_path / "unpickled"
    needle = breakage(folder, marker)
    err = fails(capsys, ["synthesize", "--data", TOY_SPEC, "--plan", toy_plan(tmp_path / "plan.jsonl"),
                         "--generator", f"builtin:{folder}", "--out", tmp_path / "set", "--no-progress", "--device", "cpu"])
    assert f"{folder}: not a builtin generator, {needle}" in err
    assert "give a `segsynth train-generator --out` folder (or rerun that training)" in err
    assert not marker.exists()
    assert not (tmp_path / "set").exists()


@pytest.mark.parametrize("path, needle", [
    ("../../etc/passwd", "leaves its folder"),
    ("images/../../outside.png", "leaves its folder"),
    ("/etc/passwd", "is absolute; manifest paths must be relative to"),
])
@pytest.mark.parametrize("verb", ["check-data", "train", "filter"])
def test_manifest_path_leaving_its_folder(tmp_path, capsys, trained, verb, path, needle):
    root = write_synthetic_set(tmp_path / "syn", open_dataset(TOY_SPEC), split="val")
    lines = (root / "manifest.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["image"] = path
    (root / "manifest.jsonl").write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
    before = listing(root)
    argv = {"check-data": ["check-data", f"synthetic:{root}"],
            "train": ["train", "--data", TOY_SPEC, "--recipe", "synthetic", "--synthetic", root,
                      "--out", tmp_path / "out", *TINY_TRAIN],
            "filter": ["filter", "--synthetic", root, "--segmenter", trained[0], "--lanes", "1", "--device", "cpu"]}[verb]
    err = fails(capsys, argv)
    assert f"image of {record['id']} {path!r} {needle}" in err and str(root) in err
    if needle == "leaves its folder":
        assert "manifest paths may not contain '..'" in err
    assert listing(root) == before  # filter wrote nothing into the set (no filter.json, no masks_filtered/)
    assert not (tmp_path / "out").exists()


def test_torn_manifest_line_that_is_not_the_last(tmp_path, capsys):
    root = write_synthetic_set(tmp_path / "syn", open_dataset(TOY_SPEC), split="val")
    manifest = root / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([*lines[:-1], lines[-1][:20]]))  # torn last line: a kill mid-append
    assert main(["check-data", f"synthetic:{root}"]) == 0  # skipped: that record never counted
    assert "split train: 3 samples" in capsys.readouterr().out
    manifest.write_text("\n".join([lines[0], lines[1][:20], *lines[2:]]) + "\n")
    err = fails(capsys, ["check-data", f"synthetic:{root}"])
    assert f"{manifest}:2: not valid JSON; remove the line or regenerate the file" in err


@pytest.mark.parametrize("info, needle", [
    ({"names": ["a"]}, 'needs "classes": a non-empty list of class names'),
    (None, "missing;"),
], ids=["without-classes", "missing"])
def test_synthetic_set_classes_json(tmp_path, capsys, trained, info, needle):
    root = write_synthetic_set(tmp_path / "syn", open_dataset(TOY_SPEC), split="val")
    if info is None:
        (root / "classes.json").unlink()
    else:
        write_json(root / "classes.json", info)
    before = listing(root)
    err = fails(capsys, ["filter", "--synthetic", root, "--segmenter", trained[0], "--lanes", "1", "--device", "cpu"])
    assert str(root / "classes.json") in err and needle in err
    assert listing(root) == before


def test_busy_output_folder(tmp_path, capsys, generator):
    import fcntl

    out = tmp_path / "set"
    out.mkdir()
    with open(out / ".synthesize.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running synthesize holds it
        err = fails(capsys, ["synthesize", "--data", TOY_SPEC, "--plan", toy_plan(tmp_path / "plan.jsonl"),
                             "--generator", f"builtin:{generator}", "--out", out, "--no-progress", "--device", "cpu"])
    assert f"{out}: another `segsynth synthesize` is writing to this folder" in err
    assert "wait for it or use torchrun" in err
    assert [p.name for p in out.iterdir()] == [".synthesize.lock"]


def test_output_folder_that_is_not_a_synthetic_set(tmp_path, capsys):
    out = tmp_path / "holiday_photos"
    write_image(out / "beach.png")
    before = listing(out)
    err = fails(capsys, ["synthesize", "--data", TOY_SPEC, "--plan", toy_plan(tmp_path / "plan.jsonl"),
                         "--generator", f"builtin:{tmp_path / 'no-generator'}", "--out", out, "--no-progress"])
    assert f"{out}: exists and is not a segsynth synthetic set" in err and "choose a new or empty --out folder" in err
    assert listing(out) == before


# --- checkpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["evaluate", "stats", "train", "filter"])
def test_checkpoint_for_a_different_number_of_classes(tmp_path, capsys, trained, verb):
    out, _ = trained  # a toy checkpoint: 9 classes; the folder dataset has 3
    root = build_folder(tmp_path / "data", n=3)
    spec = f"folder:{root}"
    if verb == "evaluate":
        err = fails(capsys, ["evaluate", "--checkpoint", out, "--data", spec, "--split", "train",
                             "--out", tmp_path / "m.json", "--device", "cpu"])
        assert "the segmenter has 9 classes" in err and f"but dataset {spec} has 3" in err
        assert "evaluate on the dataset the model was trained for" in err
        assert not (tmp_path / "m.json").exists()
    elif verb == "stats":
        err = fails(capsys, ["stats", "--segmenter", out, "--data", spec, "--out", tmp_path / "s.json", "--device", "cpu"])
        assert f"{out / 'checkpoint'}: the segmenter has 9 classes" in err and f"but dataset {spec} has 3" in err
        assert "use a segmenter trained on this dataset" in err
        assert not (tmp_path / "s.json").exists()
    elif verb == "train":
        err = fails(capsys, ["train", "--data", spec, "--init-checkpoint", out, "--out", tmp_path / "out", *TINY_TRAIN])
        assert f"{out}: a segformer-tiny for classes" in err and "(3 classes)" in err
        assert "give a checkpoint trained on this dataset with this model, or leave --init-checkpoint out" in err
        assert not (tmp_path / "out").exists()
    else:
        synthetic = write_synthetic_set(tmp_path / "syn", open_dataset(spec))
        before = listing(synthetic)
        err = fails(capsys, ["filter", "--synthetic", synthetic, "--segmenter", out, "--lanes", "1", "--device", "cpu"])
        assert "the segmenter has 9 classes" in err and f"but {synthetic / 'classes.json'} has 3" in err
        assert "filter with a segmenter trained on the set's real dataset" in err
        assert listing(synthetic) == before


def test_checkpoint_weights_load_through_safetensors_only(tmp_path, capsys, trained):
    """A checkpoint whose weights are a pickle (pytorch_model.bin) is refused, never unpickled."""
    checkpoint = tmp_path / "run" / "checkpoint"
    shutil.copytree(trained[0] / "checkpoint", checkpoint)
    (checkpoint / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    err = fails(capsys, ["evaluate", "--checkpoint", checkpoint.parent, "--data", TOY_SPEC, "--out",
                         tmp_path / "m.json", "--device", "cpu"])
    assert f"{checkpoint}: no model.safetensors; segsynth loads weights from safetensors only" in err
    assert "pytorch_model.bin" in err and "Give a `segsynth train --out` folder, or retrain" in err
    assert not marker.exists() and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("damage, needle", [
    ("weights", "cannot load the segmenter"),
    ("segsynth.json", "segsynth.json: not valid JSON"),
])
def test_damaged_checkpoint(tmp_path, capsys, trained, damage, needle):
    checkpoint = tmp_path / "run" / "checkpoint"
    shutil.copytree(trained[0] / "checkpoint", checkpoint)
    if damage == "weights":
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (checkpoint / "segsynth.json").write_text('{"model": "segformer-tiny", ')
    err = fails(capsys, ["evaluate", "--checkpoint", checkpoint.parent, "--data", TOY_SPEC, "--out",
                         tmp_path / "m.json", "--device", "cpu"])
    assert str(checkpoint) in err and needle in err
    assert ("restore it or retrain" if damage == "weights" else "fix or regenerate the file") in err
    assert not (tmp_path / "m.json").exists()


# --- training -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("save_every", [1, 500])
def test_non_finite_loss_during_training(tmp_path, capsys, save_every):
    """A learning rate of 1e30 blows the weights up after one step: iteration 2's loss is NaN."""
    out = tmp_path / "run"
    err = fails(capsys, ["train", "--data", TOY_SPEC, "--out", out, "--model", "segformer-tiny", "--iterations", "4",
                         "--batch-size", "2", "--workers", "0", "--eval-split", "", "--device", "cpu",
                         "--lr", "1e30", "--warmup", "1", "--save-every", save_every])
    assert "non-finite loss (nan) at iteration 2 of 4: training diverged" in err
    assert "lower the learning rate (--lr 1e+30 now; try 1e+29)" in err
    assert f"run `segsynth check-data {TOY_SPEC}`" in err
    leftovers = sorted(p.name for p in out.iterdir())
    if save_every == 1:  # the checkpoint of iteration 1 is whole and untouched by the bad step
        assert f"the last good checkpoint (iteration 1) is intact in {out / 'checkpoint'}" in err
        assert leftovers == ["checkpoint", "config.yaml"]
        assert json.loads((out / "checkpoint" / "segsynth.json").read_text())["state"]["iteration"] == 1
    else:
        assert f"no checkpoint was saved in {out}" in err
        assert leftovers == ["config.yaml"]


def test_non_finite_loss_while_training_the_generator(tmp_path, capsys):
    out = tmp_path / "generator"
    err = fails(capsys, ["train-generator", "--data", TOY_SPEC, "--out", out, "--size", "32,32", "--channels", "32,32",
                         "--layers-per-block", "1", "--no-attention", "--iterations", "3", "--batch-size", "2",
                         "--lr", "1e30", "--warmup", "1", "--device", "cpu"])
    assert re.search(r"non-finite loss \(\w+\) at iteration \d of 3: training diverged", err)
    assert "lower the learning rate (--lr 1e+30 now; try 1e+29)" in err and f"no model was saved in {out}" in err
    assert not (out / "unet").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


# --- configs and names --------------------------------------------------------------------------------


@pytest.mark.parametrize("verb, config_class", [
    ("train", "TrainConfig"), ("evaluate", "EvalConfig"), ("stats", "StatsConfig"), ("plan", "PlanConfig"),
    ("train-generator", "TrainGeneratorConfig"), ("synthesize", "SynthesizeConfig"), ("filter", "FilterConfig"),
])
def test_config_key_that_does_not_exist(tmp_path, capsys, verb, config_class):
    config = tmp_path / "config.yaml"
    config.write_text("learning_rate: 0.1\n")
    err = fails(capsys, [verb, "--config", config])
    assert f"config file {config}: unknown key(s) learning_rate for {config_class}; valid keys: " in err
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_flag_that_does_not_exist(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", TOY_SPEC, "--out", "o", "--learning-rate", "0.1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --learning-rate 0.1" in capsys.readouterr().err


def test_unsafe_yaml_tag_in_a_config(tmp_path, capsys):
    """Configs go through yaml.safe_load: a python/* tag is refused, never constructed."""
    marker = tmp_path / "constructed"
    config = tmp_path / "config.yaml"
    config.write_text(f"data: {TOY_SPEC}\nout: {tmp_path / 'out'}\n"
                      f"seed: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    err = fails(capsys, ["train", "--config", config])
    assert f"config file {config} is not valid YAML" in err
    assert "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:builtins.open'" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--model", "deeplab-v9"], "--model deeplab-v9 is unknown: model must be one of: segformer-b0, "),
    (["--recipe", "magic"], "--recipe magic is unknown: recipe must be one of: real, synthetic, joint, "
                            "pretrain-finetune, replace"),
    (["--crop", "4"], "--crop 4 has item 4 that is too small: crop must be a list of 0 to 2 integers each in "
                      "8..8192 (H,W or one number for a square"),
    (["--iterations", "lots"], "command line: key 'iterations': cannot read 'lots' as int"),
], ids=["segmenter", "recipe", "crop", "not-a-number"])
def test_unknown_name_or_bad_value(tmp_path, capsys, flags, needle):
    out = tmp_path / "out"
    err = fails(capsys, ["train", "--data", TOY_SPEC, "--out", out, *TINY_TRAIN, *flags])
    assert needle in err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["segformer-for-mask2former", "mask2former-for-segformer", "unreadable-config"])
def test_pretrained_of_another_kind(tmp_path, capsys, kind):
    from segsynth.segmenters import create_segmenter

    folder, model, expected = tmp_path / "pretrained", "mask2former-tiny", "a 'segformer' model, not a mask2former or swin one"
    if kind == "segformer-for-mask2former":
        create_segmenter("segformer-tiny", 3).save(folder)
    elif kind == "mask2former-for-segformer":
        create_segmenter("mask2former-tiny", 3).save(folder)
        model, expected = "segformer-tiny", "a 'mask2former' model, not a segformer one"
    else:
        write_json(folder / "config.json", {"model_type": "not-a-model"})
        expected = "not a transformers model config"
    before = listing(folder)
    out = tmp_path / "out"
    err = fails(capsys, ["train", "--data", TOY_SPEC, "--out", out, *TINY_TRAIN, "--model", model,
                         "--pretrained", folder])
    assert f"--pretrained {folder}: {expected}" in err
    assert not out.exists() and listing(folder) == before


def test_per_pixel_loss_for_a_mask_classification_model(tmp_path, capsys):
    out = tmp_path / "out"
    err = fails(capsys, ["train", "--data", TOY_SPEC, "--out", out, *TINY_TRAIN, "--model", "mask2former-tiny",
                         "--loss", "reliable"])
    assert "--loss reliable needs a segmenter with per-pixel logits; mask2former-tiny trains with its own" in err
    assert not out.exists()


def test_unknown_generator_name(tmp_path, capsys):
    err = fails(capsys, ["synthesize", "--data", TOY_SPEC, "--plan", toy_plan(tmp_path / "plan.jsonl"),
                         "--generator", "magic:x", "--out", tmp_path / "set", "--no-progress"])
    assert "unknown generator 'magic' in 'magic:x'; options: builtin, latent, controlnet, controlnet-sdxl" in err
    assert not (tmp_path / "set").exists()


# --- safe loading, for the whole package ----------------------------------------------------------------


def test_no_unsafe_loader_anywhere_in_the_package():
    """Weights load through safetensors (or torch.load(weights_only=True): the TAESD .pth files of the latent
    generator's autoencoder), configs through yaml.safe_load."""
    unsafe = re.compile(r"^\s*(import|from)\s+(pickle|cloudpickle|dill|joblib)\b|pickle\.loads?\(|"
                        r"torch\.load\((?![^)]*weights_only=True\))|"
                        r"yaml\.(load|unsafe_load|full_load|load_all)\(|yaml\.(Unsafe|Full)?Loader\b|"
                        r"weights_only\s*=\s*False|use_safetensors\s*=\s*False")
    found = [f"{path.relative_to(SRC)}:{number}: {line.strip()}"
             for path in sorted(SRC.rglob("*.py")) for number, line in enumerate(path.read_text().splitlines(), 1)
             if unsafe.search(line)]
    assert found == []
    loaders = {"segmenters/segformer.py": "SegformerForSemanticSegmentation.from_pretrained(checkpoint, use_safetensors=True)",
               "generators/builtin/sample.py": "use_safetensors=True", "config.py": "yaml.safe_load(",
               "generators/text2mask_sd/sample.py": "from_pretrained(self.folder, torch_dtype=self.dtype, use_safetensors=True",
               "generators/latent/autoencoder.py": 'torch.load(path, map_location="cpu", weights_only=True)'}
    for name, call in loaders.items():
        assert call in (SRC / name).read_text(), name


# --- second round: ranges, library errors, outputs, class lists (rows 45-) ----------------------------------


def one_line(err: str) -> str:
    """The error is one line, the last one (progress bars closed before it may precede it)."""
    match = re.search(r"(^|\n|\r)(segsynth [\w-]+: error: .*)$", err, re.S)
    assert match and match.group(2).count("\n") == 1 and match.group(2).endswith("\n"), err
    return err


def _stats_file(path: Path, **change) -> Path:
    """A toy class-stats file (9 classes) with `change` applied."""
    from segsynth.data.toy import TOY_CLASSES

    stats = {"classes": list(TOY_CLASSES), "mean_loss": [1.0] * 9, "pixels": [10] * 9, "segmenter": "s", "split": "train"}
    stats.update(change)
    write_json(path, stats)
    return path


@pytest.mark.parametrize("change, needle", [
    ({"mean_loss": [-1.0] + [1.0] * 8}, "class 'sky' has 10 pixels but mean loss -1.0; a class with pixels needs a "
                                        "finite mean loss > 0"),
    ({"mean_loss": [None] + [1.0] * 8}, "class 'sky' has 10 pixels but mean loss None"),
    ({"mean_loss": [0.0] + [1.0] * 8}, "(0 would ignore every pixel of it)"),
    ({"mean_loss": [1.0] * 8}, "'mean_loss' has 8 entries for 9 classes"),
    ({"pixels": [-3] + [10] * 8}, "pixels of class 'sky' is -3, not a count >= 0"),
    ({"pixels": [0] * 9, "mean_loss": [None] * 9}, "no class has any pixel, so there is no loss to compare with"),
    ({"pixels": [0] + [10] * 8}, "class 'sky' has no pixels but a mean loss 1.0"),
    ({"classes": ["sky"] * 9}, "class 'sky' is listed twice (label ids 0 and 1)"),
], ids=["negative", "missing", "zero", "short", "negative-count", "no-pixels", "loss-without-pixels", "same-name"])
@pytest.mark.parametrize("verb", ["plan", "filter"])
def test_class_statistics_with_bad_entries(tmp_path, capsys, trained, verb, change, needle):
    stats = _stats_file(tmp_path / "stats.json", **change)
    if verb == "plan":
        err = fails(capsys, ["plan", "--data", TOY_SPEC, "--stats", stats, "--out", tmp_path / "plan.jsonl"])
        assert not (tmp_path / "plan.jsonl").exists()
    else:
        root = write_synthetic_set(tmp_path / "syn", open_dataset(TOY_SPEC), split="val")
        before = listing(root)
        err = fails(capsys, ["filter", "--synthetic", root, "--segmenter", trained[0], "--stats", stats, "--lanes", "1",
                             "--device", "cpu"])
        assert listing(root) == before
    assert str(stats) in one_line(err) and needle in err and "recompute them with `segsynth stats`" in err


def test_filtered_set_with_every_pixel_ignored(tmp_path, capsys):
    root = write_synthetic_set(tmp_path / "syn", open_dataset(TOY_SPEC), split="val")
    lines = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    for record in lines:  # what `filter --alpha 1e-9` leaves: every pixel ignore
        record.update(filtered_mask=f"masks_filtered/{record['id']}.png", ignored_fraction=1.0)
        write_mask(root / record["filtered_mask"], np.full((32, 32), 255))
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    err = fails(capsys, ["train", "--data", TOY_SPEC, "--recipe", "synthetic", "--synthetic", root,
                         "--out", tmp_path / "out", *TINY_TRAIN])
    assert f"{root}: the filter set every pixel of all 4 filtered samples to ignore" in one_line(err)
    assert "refilter with a larger --alpha" in err and "--synthetic-masks raw" in err
    assert not (tmp_path / "out").exists()


def test_training_window_without_a_labelled_pixel(tmp_path, capsys):
    root = build_folder(tmp_path / "data", n=4)
    for i in range(4):
        write_mask(root / "masks" / f"img_{i}.png", np.full((H, W), 255))  # all ignore: valid, but teaches nothing
    out = tmp_path / "out"
    err = fails(capsys, ["train", "--data", f"folder:{root}", "--out", out, "--model", "segformer-tiny",
                         "--iterations", "3", "--batch-size", "2", "--workers", "0", "--eval-split", "",
                         "--device", "cpu", "--log-every", "2"])
    assert "no labelled pixel in iterations 1..2: every pixel drawn was ignore (255) or had weight 0" in one_line(err)
    assert f"no checkpoint was saved in {out}" in err
    assert not (out / "checkpoint").exists()


def test_damaged_optimizer_state_on_resume(tmp_path, capsys, trained):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    state = out / "checkpoint" / "optimizer.safetensors"
    state.write_bytes(state.read_bytes()[:500])
    before = listing(out)
    err = fails(capsys, ["train", "--data", TOY_SPEC, "--out", out, "--resume", "--model", "segformer-tiny",
                         "--iterations", "6", "--batch-size", "2", "--workers", "0", "--save-every", "2", "--warmup",
                         "2", "--log-every", "1", "--device", "cpu"])  # the settings the checkpoint was made with
    assert f"{state}: cannot load the optimizer state (Error while deserializing header" in one_line(err)
    assert "the checkpoint is damaged: restore it, or train again into a new --out" in err
    assert listing(out) == before


def test_damaged_generator_weights(tmp_path, capsys, generator):
    folder = tmp_path / "generator"
    shutil.copytree(generator, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    err = fails(capsys, ["synthesize", "--data", TOY_SPEC, "--plan", toy_plan(tmp_path / "plan.jsonl"),
                         "--generator", f"builtin:{folder}", "--out", tmp_path / "set", "--no-progress", "--device", "cpu"])
    assert f"{folder}: cannot load the generator (" in one_line(err)
    assert "the generator folder is damaged: restore it, or rerun `segsynth train-generator`" in err
    assert not (tmp_path / "set").exists()


@pytest.mark.parametrize("where", ["plan", "stats", "config", "classes-json", "split-list"])
def test_binary_file_where_text_is_expected(tmp_path, capsys, where):
    binary = b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary"
    if where == "classes-json":
        root = build_folder(tmp_path / "data", n=2)
        target = root / "classes.json"
        target.write_bytes(binary)
        argv = ["plan", "--data", f"folder:{root}", "--uniform", "1", "--out", tmp_path / "out.jsonl"]
    elif where == "split-list":
        root = build_folder(tmp_path / "data", n=2, splits={"train": ["img_0"]})
        target = root / "splits" / "train.txt"
        target.write_bytes(binary)
        argv = ["plan", "--data", f"folder:{root}", "--uniform", "1", "--out", tmp_path / "out.jsonl"]
    else:
        target = tmp_path / {"plan": "plan.jsonl", "stats": "stats.json", "config": "config.yaml"}[where]
        target.write_bytes(binary)
        argv = {"plan": ["synthesize", "--data", TOY_SPEC, "--plan", target, "--generator", "builtin:g",
                         "--out", tmp_path / "out"],
                "stats": ["plan", "--data", TOY_SPEC, "--stats", target, "--out", tmp_path / "out.jsonl"],
                "config": ["train", "--config", target]}[where]
    err = fails(capsys, argv)
    assert f"{target}: line 1 is not UTF-8 text" in one_line(err) and "Give the file segsynth wrote" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("where", ["plan", "stats", "captions"])
def test_folder_where_a_file_is_expected(tmp_path, capsys, where):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    argv = {"plan": ["synthesize", "--data", TOY_SPEC, "--plan", folder, "--generator", "builtin:g", "--out",
                     tmp_path / "out"],
            "stats": ["plan", "--data", TOY_SPEC, "--stats", folder, "--out", tmp_path / "out.jsonl"],
            "captions": ["plan", "--data", TOY_SPEC, "--captions", folder, "--per-caption", "1", "--out",
                         tmp_path / "out.jsonl"]}[where]
    err = one_line(fails(capsys, argv))
    assert str(folder) in err and ("is a folder" in err or "name it .json" in err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.jsonl").exists()


def test_json_nested_too_deeply(tmp_path, capsys):
    stats = tmp_path / "stats.json"
    stats.write_text("[" * 100_000 + "]" * 100_000)
    err = fails(capsys, ["plan", "--data", TOY_SPEC, "--stats", stats, "--out", tmp_path / "plan.jsonl"])
    assert f"{stats}: JSON nested too deeply to read" in one_line(err)


def test_plan_seed_beyond_32_bits(tmp_path, capsys):
    plan = tmp_path / "plan.jsonl"
    plan.write_text('{"id": "toy_train_00000", "seeds": [18446744073709551616]}\n')
    err = fails(capsys, ["synthesize", "--data", TOY_SPEC, "--plan", plan, "--generator", "builtin:g",
                         "--out", tmp_path / "set", "--no-progress"])
    assert "seed 18446744073709551616 is outside 0..4294967295" in one_line(err)
    assert not (tmp_path / "set").exists()


# --- outputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["plan", "stats", "evaluate"])
@pytest.mark.parametrize("victim", ["dataset-classes-json", "checkpoint-meta", "a-folder"])
def test_out_naming_a_file_segsynth_did_not_write(tmp_path, capsys, trained, verb, victim):
    checkpoint = tmp_path / "run"
    shutil.copytree(trained[0], checkpoint)
    root = build_folder(tmp_path / "data", n=2)
    target = {"dataset-classes-json": root / "classes.json", "checkpoint-meta": checkpoint / "checkpoint" / "segsynth.json",
              "a-folder": root / "images"}[victim]
    before = {**listing(root), **listing(checkpoint)}
    argv = {"plan": ["plan", "--data", TOY_SPEC, "--uniform", "1", "--out", target],
            "stats": ["stats", "--segmenter", checkpoint, "--data", TOY_SPEC, "--out", target, "--device", "cpu"],
            "evaluate": ["evaluate", "--checkpoint", checkpoint, "--data", TOY_SPEC, "--out", target,
                         "--device", "cpu"]}[verb]
    err = one_line(fails(capsys, argv))
    if victim == "a-folder":
        assert f"{target}: is a folder; give `segsynth {verb}` --out a file path" in err
    else:
        what = {"plan": "plan file", "stats": "class-statistics file", "evaluate": "metrics file"}[verb]
        assert f"{target}: exists and is not a {what} segsynth wrote; choose another --out" in err
    assert {**listing(root), **listing(checkpoint)} == before


@pytest.mark.parametrize("verb", ["train", "train-generator", "run"])
@pytest.mark.parametrize("victim", ["dataset", "checkpoint"])
def test_out_naming_a_folder_the_verb_did_not_write(tmp_path, capsys, trained, verb, victim):
    target = build_folder(tmp_path / "data", n=2) if victim == "dataset" else tmp_path / "run"
    if victim == "checkpoint":
        shutil.copytree(trained[0] / "checkpoint", target / "checkpoint")  # a checkpoint, without train's config.yaml
    before = listing(target)
    argv = {"train": ["train", "--data", TOY_SPEC, "--out", target, *TINY_TRAIN],
            "train-generator": ["train-generator", "--data", TOY_SPEC, "--out", target, "--size", "32,32",
                                "--channels", "32,32", "--iterations", "1", "--batch-size", "2", "--device", "cpu"],
            "run": ["run", "--out", target, "--preset", "quick"]}[verb]
    if verb == "train" and victim == "checkpoint":
        return  # a train --out folder with its checkpoint is train's own (resumable): covered by the resume tests
    err = one_line(fails(capsys, argv))
    assert f"{target}: exists and holds files `segsynth {verb}` did not write" in err
    assert "choose a new or empty --out folder" in err
    assert listing(target) == before


@pytest.mark.parametrize("verb", ["train", "synthesize", "filter"])
def test_symlink_leaving_the_output_folder(tmp_path, capsys, trained, generator, verb):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me\n")
    if verb == "train":
        out = tmp_path / "out"
        out.mkdir()
        (out / "config.yaml").write_text("# resolved TrainConfig; rerun with: --config config.yaml\n")
        link = out / "metrics.jsonl"  # appended to: writing through it would change precious.txt
        link.symlink_to(outside / "precious.txt")
        argv = ["train", "--data", TOY_SPEC, "--out", out, *TINY_TRAIN]
    elif verb == "synthesize":
        out = tmp_path / "set"
        plan = toy_plan(tmp_path / "plan.jsonl")
        assert main(["synthesize", "--data", TOY_SPEC, "--plan", str(plan), "--generator", f"builtin:{generator}",
                     "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
        capsys.readouterr()
        shutil.rmtree(out / "masks")
        link = out / "masks"
        link.symlink_to(outside, target_is_directory=True)
        argv = ["synthesize", "--data", TOY_SPEC, "--plan", plan, "--generator", f"builtin:{generator}",
                "--out", out, "--no-progress", "--device", "cpu"]
    else:
        out = write_synthetic_set(tmp_path / "syn", open_dataset(TOY_SPEC), split="val")
        link = out / "masks_filtered"
        link.symlink_to(outside, target_is_directory=True)
        argv = ["filter", "--synthetic", out, "--segmenter", trained[0], "--lanes", "1", "--device", "cpu"]
    err = one_line(fails(capsys, argv))
    assert f"{link}: is a symlink to {outside.resolve()}" in err and "outside" in err
    assert "remove the link or choose another --out" in err
    assert listing(outside) == {"precious.txt": b"keep me\n"}


@pytest.mark.parametrize("verb", ["train", "plan", "filter"])
def test_second_run_into_the_same_output(tmp_path, capsys, trained, verb):
    import fcntl

    if verb == "train":
        out = tmp_path / "out"
        lock, argv = out / ".train.lock", ["train", "--data", TOY_SPEC, "--out", out, *TINY_TRAIN]
        needle = f"{out}: another `segsynth train` is writing to this folder"
    elif verb == "plan":
        out = tmp_path / "plan.jsonl"
        lock, argv = tmp_path / ".plan.jsonl.lock", ["plan", "--data", TOY_SPEC, "--uniform", "1", "--out", out]
        needle = f"{out}: another `segsynth plan` is writing this file"
    else:
        out = write_synthetic_set(tmp_path / "syn", open_dataset(TOY_SPEC), split="val")
        lock = out / ".synthesize.lock"  # the set's one lock: a synthesize writing to it holds it too
        argv = ["filter", "--synthetic", out, "--segmenter", trained[0], "--lanes", "1", "--device", "cpu"]
        needle = f"{out}: another `segsynth filter` (or a `segsynth synthesize`) is writing to this set"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the first run holds it
        before = listing(tmp_path)
        err = one_line(fails(capsys, argv))
        assert needle in err and "wait for it" in err
        assert listing(tmp_path) == before


# --- class lists ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("info, needle", [
    ({"classes": ["background", "cat", "cat"]}, "class 'cat' is listed twice (label ids 1 and 2), so per-class "
                                                "results would merge them"),
    ({"classes": ["background", "cat", "dog"], "palette": [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]]},
     '"palette" has 4 colour(s) for 3 classes; give exactly one [r, g, b] per class'),
    ({"classes": ["background", "cat", "dog"], "palette": [[0, 0, 0], [1, 1, 1], [2, 2, 300]]},
     '"palette" entry 2 (\'dog\') is [2, 2, 300], not [r, g, b] with three integers 0..255'),
    ({"classes": ["background", "cat", "dog"], "ignore_index": 1},
     '"ignore_index" 1 is also the label id of class \'cat\', which could then never be learned'),
    ({"classes": ["background", "cat", "dog"], "ignore_index": 300}, '"ignore_index" is 300; give a mask value 0..255'),
    ({"classes": [f"c{i}" for i in range(256)]}, "256 classes, but label maps hold at most 255"),
    ({"classes": ["background", "cat", "dog"], "mask_dir": "../elsewhere"}, "leaves its folder"),
], ids=["same-name-twice", "palette-length", "palette-value", "ignore-is-a-class", "ignore-out-of-range",
        "too-many-classes", "mask-dir-outside"])
@pytest.mark.parametrize("verb", ["check-data", "train"])
def test_inconsistent_class_list(tmp_path, capsys, verb, info, needle):
    root = build_folder(tmp_path / "data", n=3)
    write_json(root / "classes.json", info)
    argv = ["check-data", f"folder:{root}"] if verb == "check-data" else \
        ["train", "--data", f"folder:{root}", "--out", tmp_path / "out", *TINY_TRAIN]
    err = one_line(fails(capsys, argv))
    assert needle in err and (str(root / "classes.json") in err or "mask_dir" in err), err
    assert not (tmp_path / "out").exists()


def test_synthetic_set_whose_classes_json_disagrees_with_synthesis_json(tmp_path, capsys, trained):
    root = write_synthetic_set(tmp_path / "syn", open_dataset(TOY_SPEC), split="val")
    write_json(root / "synthesis.json", {"classes": ["a", "b"]})
    before = listing(root)
    err = one_line(fails(capsys, ["filter", "--synthetic", root, "--segmenter", trained[0], "--lanes", "1",
                                  "--device", "cpu"]))
    assert f"{root / 'classes.json'}: classes ['sky', 'building', 'road', 'sidewalk']... differ from those" in err
    assert "the set's label ids are ambiguous" in err
    assert listing(root) == before


def test_checkpoint_listing_a_class_twice(tmp_path, capsys, trained):
    checkpoint = tmp_path / "run" / "checkpoint"
    shutil.copytree(trained[0] / "checkpoint", checkpoint)
    meta = json.loads((checkpoint / "segsynth.json").read_text())
    meta["classes"][1] = meta["classes"][0]
    write_json(checkpoint / "segsynth.json", meta)
    err = one_line(fails(capsys, ["evaluate", "--checkpoint", checkpoint.parent, "--data", TOY_SPEC, "--out",
                                  tmp_path / "m.json", "--device", "cpu"]))
    assert f"{checkpoint / 'segsynth.json'}: class 'sky' is listed twice" in err
    assert not (tmp_path / "m.json").exists()


def test_threads_flag_that_is_not_auto_or_a_count(capsys, monkeypatch):
    monkeypatch.delenv("SEGSYNTH_THREADS", raising=False)
    assert main(["--threads", "many", "plan", "--data", TOY_SPEC, "--uniform", "1", "--out", "unused.jsonl"]) == 2
    assert "--threads many is unknown: threads must be auto or an integer in 1..1024" in one_line(capsys.readouterr().err)


def test_a_train_folder_killed_while_pretraining_is_still_train_s(tmp_path, capsys):
    """OUT holds only pretrain/ (its config) after a kill in the pretraining stage: a rerun may claim OUT (it
    then fails on the dataset, named here as unknown, not on the folder)."""
    out = tmp_path / "out"
    (out / "pretrain").mkdir(parents=True)
    (out / "pretrain" / "config.yaml").write_text("# resolved TrainConfig; rerun with: --config config.yaml\n")
    err = one_line(fails(capsys, ["train", "--data", "nope:x", "--out", out, *TINY_TRAIN]))
    assert "unknown dataset kind 'nope'" in err and "did not write" not in err
    assert sorted(p.name for p in out.iterdir()) == ["pretrain"]  # the lock is gone again


# --- SegGen: captions, colour maps, generated colour maps -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from segsynth.generators.testing import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("bad-input-sd"))


def _caption_verb(verb: str, captions: Path, out: Path, tiny_sd: Path) -> list:
    if verb == "plan":
        return ["plan", "--data", TOY_SPEC, "--captions", captions, "--per-caption", "1", "--out", out]
    if verb == "captions":
        return ["captions", "--data", TOY_SPEC, "--captioner", "file", "--captions", captions, "--out", out]
    if verb == "train-text-generator":
        return ["train-text-generator", "--data", TOY_SPEC, "--target", "colour-mask", "--prompts", captions,
                "--out", out, "--iterations", "1", "--device", "cpu"]
    return ["train-generator", "--kind", "text2mask-sd", "--base", tiny_sd, "--data", TOY_SPEC, "--prompts", captions,
            "--out", out, "--iterations", "1", "--device", "cpu"]


CAPTION_BREAKAGES = {
    "unknown-id": (b'{"id": "toy_train_00000", "caption": "sky"}\n{"id": "nope_7", "caption": "road"}\n',
                   r"captions.jsonl: 1 id\(s\) are not masks of this split: 'nope_7' \(line 2\)"),
    "empty-caption": (b'{"id": "toy_train_00000", "caption": "  "}\n',
                      r"captions.jsonl:1: the caption of 'toy_train_00000' is empty"),
    "not-utf8": (b'{"id": "toy_train_00000", "caption": "sky"}\n{"id": "toy_train_00001", "caption": "caf\xe9"}\n',
                 r"captions.jsonl:2: not UTF-8 text \(byte \d+\); save the file as UTF-8"),
}


@pytest.mark.parametrize("verb", ["plan", "captions", "train-text-generator", "train-generator"])
@pytest.mark.parametrize("breakage", list(CAPTION_BREAKAGES))
def test_captions_file_that_cannot_be_used(tmp_path, capsys, tiny_sd, breakage, verb):
    content, needle = CAPTION_BREAKAGES[breakage]
    captions = tmp_path / "captions.jsonl"
    captions.write_bytes(content)
    out = tmp_path / ("out.jsonl" if verb == "plan" else "out")
    err = fails(capsys, _caption_verb(verb, captions, out, tiny_sd))
    assert re.search(needle, err), err
    assert not out.exists()


COLOUR_MAP_BREAKAGES = {
    "shared-colour": ({"sky": [1, 2, 3], "building": [1, 2, 3]},
                      r"'sky' and 'building' share the colour \[1, 2, 3\], so decoding could not tell them apart; "
                      r"give each class \(and ignore\) its own colour"),
    "missing-colour": ({"sky": [1, 2, 3]}, r"no colour for class\(es\) building, .*; every class needs one"),
}


@pytest.mark.parametrize("verb", ["train-text-generator", "train-generator"])
@pytest.mark.parametrize("breakage", list(COLOUR_MAP_BREAKAGES))
def test_colour_map_that_cannot_be_decoded(tmp_path, capsys, tiny_sd, breakage, verb):
    colours, needle = COLOUR_MAP_BREAKAGES[breakage]
    classes = open_dataset(TOY_SPEC).classes
    full = {name: [10 * i, 255 - 10 * i, 7] for i, name in enumerate(classes)}
    colour_map = tmp_path / "colours.json"
    colour_map.write_text(json.dumps({**full, **colours} if breakage == "shared-colour" else colours))
    out = tmp_path / "out"
    argv = (["train-text-generator", "--target", "colour-mask"] if verb == "train-text-generator"
            else ["train-generator", "--kind", "text2mask-sd", "--base", tiny_sd])
    err = fails(capsys, argv + ["--data", TOY_SPEC, "--palette", colour_map, "--out", out, "--iterations", "1",
                                "--device", "cpu"])
    assert f"colour map {colour_map}: " in err and re.search(needle, err), err
    assert not out.exists()


def test_generated_colour_map_of_the_wrong_size(tmp_path, capsys, tiny_sd, monkeypatch):
    from segsynth.formats.manifest import read_manifest
    from segsynth.formats.plan import PlanEntry, write_plan
    from segsynth.generators.text2mask_sd.sample import SDTextToMaskGenerator

    model = tmp_path / "model"
    assert main(["train-generator", "--kind", "text2mask-sd", "--base", str(tiny_sd), "--data", TOY_SPEC,
                 "--out", str(model), "--iterations", "1", "--batch-size", "1", "--sample-steps", "1",
                 "--device", "cpu"]) == 0
    plan = write_plan(tmp_path / "masks.jsonl", [PlanEntry("street", [0, 1], kind="text", prompt="a road")])
    monkeypatch.setattr(SDTextToMaskGenerator, "run", lambda self, prepared: [
        self.colour_sample(np.zeros((16, 24, 3), np.uint8), prompt) for prompt in prepared.prompts])
    out = tmp_path / "masks"
    err = fails(capsys, ["synthesize", "--data", TOY_SPEC, "--plan", plan, "--generator", f"text2mask-sd:{model}",
                         "--out", out, "--device", "cpu", "--no-progress"])
    assert ("text2mask-sd sample street_s0: colour-coded mask is 24x16 (WxH) but 32x32 was expected; generate at "
            "the mask size, or resize with nearest-neighbour before decoding") in err
    assert read_manifest(out) == [] and not list(out.rglob("*.png"))  # no sample of the failed batch was written


# --- the latent generator's autoencoder, guidance, resume (rows 87-89) -------------------------------------

TINY_LATENT = ["--kind", "latent", "--size", "32,32", "--channels", "32,32", "--layers-per-block", "1",
               "--no-attention", "--iterations", "1", "--batch-size", "2", "--device", "cpu"]


def _taesd_breakage(tmp_path: Path, breakage: str) -> str | None:
    from segsynth.generators.testing import save_tiny_taesd

    folder = tmp_path / "ae"
    if breakage == "none":
        return None
    if breakage == "unknown-kind":
        return f"vqgan:{folder}"
    if breakage == "no-folder":
        return f"taesd:{folder}"
    if breakage == "no-pair":
        folder.mkdir()
        (folder / "weights_encoder.pth").write_bytes(b"")
        return f"taesd:{folder}"
    save_tiny_taesd(folder)
    if breakage == "damaged":
        path = folder / "tiny_encoder.pth"
        path.write_bytes(path.read_bytes()[:300])
    elif breakage == "pickle":
        with open(folder / "tiny_decoder.pth", "wb") as handle:
            pickle.dump(Payload(tmp_path / "unpickled"), handle)
    return f"taesd:{folder}"


@pytest.mark.parametrize("breakage, needle", [
    ("none", "train-generator --kind latent needs --autoencoder: taesd:DIR"),
    ("unknown-kind", "unknown autoencoder 'vqgan:"),
    ("no-folder", "ae does not exist; give a folder holding NAME_encoder.pth and NAME_decoder.pth"),
    ("no-pair", "expected one NAME_encoder.pth with its NAME_decoder.pth (a TAESD autoencoder), found weights_encoder.pth"),
    ("damaged", "tiny_encoder.pth: cannot load the autoencoder's encoder ("),
    ("pickle", "tiny_decoder.pth: cannot load the autoencoder's decoder (not a PyTorch state dict of tensors"),
])
def test_autoencoder_that_cannot_be_used(tmp_path, capsys, breakage, needle):
    spec = _taesd_breakage(tmp_path, breakage)
    out = tmp_path / "generator"
    err = fails(capsys, ["train-generator", "--data", TOY_SPEC, "--out", out, *TINY_LATENT,
                         *(["--autoencoder", spec] if spec else [])])
    assert needle in one_line(err), err
    assert not out.exists() and not (tmp_path / "unpickled").exists()


def test_guidance_without_condition_dropout(tmp_path, capsys, generator):
    out = tmp_path / "g"
    err = fails(capsys, ["train-generator", "--data", TOY_SPEC, "--out", out, "--size", "32,32", "--channels", "32,32",
                         "--iterations", "1", "--guidance", "3", "--device", "cpu"])
    assert "--guidance 3 needs a model trained with --cond-dropout > 0 (e.g. 0.1)" in err and not out.exists()
    err = fails(capsys, ["synthesize", "--data", TOY_SPEC, "--plan", toy_plan(tmp_path / "plan.jsonl"),
                         "--generator", f"builtin:{generator}", "--guidance", "2", "--out", tmp_path / "set",
                         "--no-progress", "--device", "cpu"])
    assert f"{generator}: guidance 2 needs a model trained with --cond-dropout > 0" in err
    assert "use guidance 1 or retrain with --cond-dropout 0.1" in err and not (tmp_path / "set").exists()


def test_resumed_generator_training_with_other_settings(tmp_path, capsys):
    out = tmp_path / "generator"
    flags = ["train-generator", "--data", TOY_SPEC, "--out", out, "--size", "32,32", "--channels", "32,32",
             "--layers-per-block", "1", "--no-attention", "--iterations", "1", "--batch-size", "2", "--device", "cpu"]
    assert main([str(a) for a in flags]) == 0
    capsys.readouterr()
    before = listing(out)
    err = fails(capsys, flags + ["--resume", "--iterations", "2", "--lr", "0.001"])
    assert f"{out / 'training_state'}: settings differ from the run being resumed (lr); resume with the same " \
           "settings or use a new --out" in err
    assert listing(out) == before
