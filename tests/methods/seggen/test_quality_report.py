"""The mask-quality stage: statistics of a mask set, the alignment score of its renderings, the grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fakes import TOY_SPEC
from segsynth.cli import main
from segsynth.data import open_dataset
from segsynth.io import SegsynthError
from segsynth.methods.seggen.quality_report import CAPTION_WIDTH, TILE_HEIGHT, write_mask_quality
from segsynth.segmenters import load_checkpoint_for
from segsynth.stage_configs import MaskQualityConfig
from segsynth.training.evaluate import confusion_over_split, metrics_from_confusion
from synthetic_sets import write_synthetic_set


def test_report_alignment_and_grid(tmp_path, trained, capsys):
    run, _ = trained
    real = open_dataset(TOY_SPEC)
    # A "mask set" that copies the real masks, and its "rendering" that copies the real images: the statistics
    # must match the real set's and the alignment must equal the segmenter's mIoU on the real training split.
    masks = write_synthetic_set(tmp_path / "masks", real)
    rendered = write_synthetic_set(tmp_path / "rendered", open_dataset(f"synthetic-raw:{masks}"))
    config = MaskQualityConfig(masks=str(masks), data=TOY_SPEC, out=str(tmp_path / "q"), rendered=[str(rendered)],
                               segmenter=str(run), grid_rows=3, device="cpu")
    report = write_mask_quality(config)

    assert report["num_generated"] == report["num_real"] == len(real.split("train"))
    assert report["kl_real_generated"] == pytest.approx(0.0, abs=1e-9)
    model, _, _ = load_checkpoint_for(run, real.classes, "toy", "")
    expected = {split: metrics_from_confusion(confusion_over_split(model, real.split(split), real.num_classes, "cpu",
                                                                   progress=False), real.classes)["miou"]
                for split in ("train", "val")}
    alignment = report["alignment"]
    assert alignment["rendered_miou"] == pytest.approx(expected["train"], abs=0.01)
    assert alignment["real_miou"] == pytest.approx(expected["val"], abs=0.01)
    assert alignment["rendered_images"] == len(real.split("train"))
    assert json.loads((tmp_path / "q" / "mask_quality.json").read_text())["alignment"] == alignment
    assert "## Alignment" in (tmp_path / "q" / "mask_quality.md").read_text()
    grid = np.asarray(Image.open(tmp_path / "q" / "mask_quality_grid.png"))
    assert grid.shape == (3 * (TILE_HEIGHT + 2), CAPTION_WIDTH + 3 * TILE_HEIGHT, 3)  # 32x32 tiles -> 128x128

    # The verb prints the report.
    assert main(["mask-quality", "--masks", str(masks), "--data", TOY_SPEC, "--out", str(tmp_path / "cli")]) == 0
    assert "class-pixel frequency KL" in capsys.readouterr().out


def test_bad_inputs_are_refused(tmp_path):
    masks = write_synthetic_set(tmp_path / "masks", open_dataset(TOY_SPEC))
    with pytest.raises(SegsynthError, match="--rendered needs --segmenter"):
        write_mask_quality(MaskQualityConfig(masks=str(masks), data=TOY_SPEC, out=str(tmp_path / "q"),
                                             rendered=[str(masks)]))
    other = write_synthetic_set(tmp_path / "other", open_dataset(TOY_SPEC))
    info = json.loads((other / "classes.json").read_text())
    (other / "classes.json").write_text(json.dumps({**info, "classes": ["a"] + info["classes"][1:]}))
    with pytest.raises(SegsynthError, match=f"{other}/classes.json: classes differ"):
        write_mask_quality(MaskQualityConfig(masks=str(other), data=TOY_SPEC, out=str(tmp_path / "q")))
