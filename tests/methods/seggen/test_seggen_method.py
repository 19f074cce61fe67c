"""`segsynth run --method seggen` end to end on tiny settings: MaskSyn and ImgSyn sets, mask quality, every arm."""

from __future__ import annotations

import pytest

from segsynth.formats.manifest import read_manifest
from segsynth.formats.plan import read_plan
from segsynth.io import SegsynthError
from segsynth.methods.seggen.method import ARMS
from segsynth.run import resolve_run_config, run

TINY_SEGGEN = dict(method="seggen", data="toy:n=12,n_val=4,size=32x40", seeds=[0], generator="train",
                   images_per_mask=1, grids=2, device="cpu",
                   train=dict(iterations=6, batch_size=4, warmup=1, workers=1),  # loader workers inside parallel ones
                   train_generator=dict(size=[32, 40], channels=[32, 64], layers_per_block=1, iterations=2,
                                        max_minutes=0.0, batch_size=4),
                   train_text_generator=dict(size=[16, 20], channels=[32, 64], text_width=32, iterations=2,
                                             max_minutes=0.0, batch_size=4, warmup=1),
                   synthesize=dict(steps=2, batch_size=12))


def test_seggen_run_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    results = run(resolve_run_config({**TINY_SEGGEN, "out": str(out)}))

    assert list(results["arms"]) == list(ARMS)
    for name, arm in results["arms"].items():
        assert 0.0 <= arm["mean"] <= 100.0, name
    # One caption per real mask -> one generated mask each -> one MaskSyn image each; ImgSyn K = 1 per real mask.
    assert len(read_manifest(out / "synthetic" / "masks")) == 12
    sizes = {name: len(read_manifest(out / "synthetic" / name)) for name in ("imgsyn-a", "imgsyn-b", "masksyn-a",
                                                                             "masksyn-b")}
    assert sizes == {"imgsyn-a": 6, "imgsyn-b": 6, "masksyn-a": 6, "masksyn-b": 6}
    halves = [read_plan(out / "plans" / f"imgsyn-{half}.jsonl") for half in ("a", "b")]
    assert not {e.id for e in halves[0]} & {e.id for e in halves[1]}  # halves are disjoint
    # MaskSyn samples name their caption and both generators.
    record = read_manifest(out / "synthetic" / "masksyn-b")[0]
    assert record["generator"]["name"] == "builtin" and record["meta"]["source"]["generator"]["name"] == "text2mask"
    assert record["meta"]["source"]["prompt"]
    # Mask quality with the alignment score, and its grid.
    quality = out / "mask_quality"
    assert (quality / "mask_quality.md").is_file() and (quality / "mask_quality_grid.png").is_file()
    assert "rendered_miou" in (quality / "mask_quality.json").read_text()
    assert (out / "arms" / "masksyn-replace" / "seed0" / "config.yaml").read_text().count("replace_from: pool") == 1

    # A second run trains nothing again: every stage is done (synthesis finds every sample in its manifest).
    capsys.readouterr()
    again = run(resolve_run_config({**TINY_SEGGEN, "out": str(out)}))
    printed = capsys.readouterr()
    assert again["arms"] == results["arms"]
    assert "[skip] train text -> mask generator" in printed.out + printed.err
    assert all(summary["generated"] == 0 for name, summary in again["synthetic"].items()), again["synthetic"]


def test_seggen_config_sections_and_arms():
    config = resolve_run_config({"method": "seggen"})
    assert config.arms == list(ARMS) and config.train_text_generator["size"] == [32, 40]
    with pytest.raises(SegsynthError, match=r"section 'train_text_generator': unknown key\(s\) target"):
        resolve_run_config({"method": "seggen", "train_text_generator": {"target": "image"}})
    with pytest.raises(SegsynthError, match="unknown arm.*options: real, imgsyn-replace"):
        resolve_run_config({"method": "seggen", "arms": ["joint-raw-uniform"]})


def test_seggen_run_with_a_trained_text_to_mask_generator(tmp_path):
    """`text_mask_generator: text2mask:DIR` (or text2mask-sd:DIR) draws MaskSyn's masks with a generator trained
    before: the run trains none of its own."""
    first = tmp_path / "first"
    run(resolve_run_config({**TINY_SEGGEN, "out": str(first), "arms": ["masksyn-replace"]}))
    trained = first / "text2mask"
    second = tmp_path / "second"
    run(resolve_run_config({**TINY_SEGGEN, "out": str(second), "arms": ["masksyn-replace"],
                            "text_mask_generator": f"text2mask:{trained}"}))
    assert not (second / "text2mask").exists()
    masks = read_manifest(second / "synthetic" / "masks")
    assert len(masks) == 12 and masks[0]["generator"]["name"] == "text2mask"
    # The same generator, plan and seeds draw the same masks as the run that trained it.
    assert [m["id"] for m in masks] == [m["id"] for m in read_manifest(first / "synthetic" / "masks")]
    assert (second / "synthetic" / "masks" / masks[0]["mask"]).read_bytes() == \
        (first / "synthetic" / "masks" / read_manifest(first / "synthetic" / "masks")[0]["mask"]).read_bytes()


@pytest.mark.parametrize("spec", ["builtin:runs/x", "text2mask", "text2mask-sd:", "attention:runs/x"])
def test_text_mask_generator_must_be_train_or_a_text_to_mask_spec(tmp_path, spec):
    with pytest.raises(SegsynthError, match="text_mask_generator"):
        resolve_run_config({**TINY_SEGGEN, "out": str(tmp_path), "text_mask_generator": spec})
