"""`segsynth run` end to end on tiny settings: every stage, every arm, the table, the grids, resume."""

from __future__ import annotations

import json

import pytest

from segsynth.io import SegsynthError
from segsynth.run import ARMS, resolve_run_config, run

TINY_RUN = dict(data="toy:n=24,n_val=8,size=32x40", seeds=[0], generator="train", iterations=12, batch_size=4, warmup=2, workers=0,
                uniform_k=1, generator_size=[32, 40], generator_channels=[32, 64], generator_iterations=30,
                generator_minutes=0.0, generator_batch_size=8, steps=3, synth_batch_size=8, grids=3, device="cpu")


def test_run_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    results = run(resolve_run_config({**TINY_RUN, "out": str(out)}))

    # Every arm trained, evaluated and kept its checkpoint.
    assert list(results["arms"]) == list(ARMS)
    for name, arm in results["arms"].items():
        assert 0.0 <= arm["mean"] <= 100.0, name
        assert (out / "arms" / name / "seed0" / "checkpoint" / "model.safetensors").is_file()
    # Equal synthetic image counts between the uniform and hardness sets.
    assert results["synthetic"]["uniform"]["planned"] == results["synthetic"]["hardness"]["planned"] == 24
    # Filtering happened and training read the filtered masks.
    manifest = [json.loads(l) for l in (out / "synthetic" / "hardness" / "manifest.jsonl").read_text().splitlines()]
    assert all("filtered_mask" in r for r in manifest)
    # Reports and grids.
    table = (out / "results.md").read_text()
    assert "joint-filtered-hardness" in table and "Seconds per stage" in table
    assert json.loads((out / "results.json").read_text())["arms"]["real"]["miou"]["0"] >= 0
    assert (out / "grids" / "hardness.png").is_file() and (out / "grids" / "uniform.png").is_file()
    assert (out / "run.config.yaml").is_file()

    # A second run finds everything done and redoes nothing.
    capsys.readouterr()
    again = run(resolve_run_config({**TINY_RUN, "out": str(out)}))
    assert again["arms"] == results["arms"]
    printed = capsys.readouterr().out + capsys.readouterr().err
    assert "[skip] train generator" in printed or "[skip]" in printed


def test_presets_and_unknown_arm():
    quick = resolve_run_config({"preset": "quick"})
    assert quick.data.startswith("toy:") and quick.seeds == [0]
    camvid = resolve_run_config({"preset": "default", "data": "camvid:/somewhere"})
    assert camvid.model == "segformer-small" and camvid.seeds == [0, 1]
    assert resolve_run_config({"preset": "quick", "iterations": 7}).iterations == 7  # flags beat presets
    with pytest.raises(SegsynthError, match="unknown arm"):
        resolve_run_config({"arms": ["real", "magic"]})
    with pytest.raises(SegsynthError, match="unknown preset"):
        resolve_run_config({"preset": "huge"})


def test_shipped_toy_generator_renders_toy_masks(tmp_path):
    """The package ships a builtin generator for the toy classes; `run` uses it by default on toy data."""
    import numpy as np

    from segsynth.data import open_dataset
    from segsynth.generators import open_generator
    from segsynth.run import shipped_toy_generator

    dataset = open_dataset("toy:n=4,n_val=2,size=64x80")
    spec = shipped_toy_generator(dataset)
    if spec is None:
        pytest.skip("this install has no shipped toy generator (src/segsynth/assets/toy_generator)")
    generator = open_generator(spec)
    generator.check_dataset(dataset.classes, dataset.palette)
    masks = [dataset.split("train").label(i) for i in range(2)]
    images = generator.generate(masks, ["", ""], [0, 1])
    assert [image.shape for image in images] == [(64, 80, 3)] * 2
    assert all(image.dtype == np.uint8 and image.std() > 5 for image in images)
    assert shipped_toy_generator(open_dataset("toy:n=4,size=32").__class__(
        spec="x", classes=("a",), palette=((0, 0, 0),), splits={})) is None
