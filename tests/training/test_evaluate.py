"""Evaluation: the confusion-matrix mIoU against hand-computed numbers, and `evaluate` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fakes import TOY_SPEC
from segsynth.data.base import Sample, Split
from segsynth.training.evaluate import (
    EvalConfig, confusion_matrix, confusion_over_split, evaluate, format_metrics, metrics_from_confusion,
)
from segsynth.io import SegsynthError

CLASSES = ("a", "b", "c", "d")

# Five valid pixels and one ignore pixel; the prediction there (class d) must not count.
LABEL = np.array([[0, 0, 1],
                  [1, 2, 255]], np.uint8)
PRED = np.array([[0, 1, 1],
                 [2, 2, 3]], np.uint8)
# rows = ground truth, columns = prediction
EXPECTED_CONFUSION = np.array([[1, 1, 0, 0],
                               [0, 1, 1, 0],
                               [0, 0, 1, 0],
                               [0, 0, 0, 0]])


def test_confusion_matrix_by_hand():
    np.testing.assert_array_equal(confusion_matrix(PRED, LABEL, 4), EXPECTED_CONFUSION)


def test_metrics_by_hand():
    metrics = metrics_from_confusion(EXPECTED_CONFUSION, CLASSES)
    # IoU = I / (row + column - I): a 1/(2+1-1), b 1/(2+2-1), c 1/(1+2-1); d absent from both -> NaN
    per_class = metrics["per_class"]
    assert per_class["a"] == pytest.approx(50.0)
    assert per_class["b"] == pytest.approx(100 / 3)
    assert per_class["c"] == pytest.approx(50.0)
    assert math.isnan(per_class["d"])
    assert metrics["miou"] == pytest.approx((50 + 100 / 3 + 50) / 3)  # d left out of the mean
    assert metrics["aacc"] == pytest.approx(60.0)  # 3 of 5 valid pixels
    assert metrics["macc"] == pytest.approx((50 + 50 + 100) / 3)
    assert metrics["pixels"] == 5


def test_class_predicted_but_absent_from_labels_counts_as_zero():
    label = np.zeros((2, 2), np.uint8)
    pred = np.array([[0, 0], [0, 1]], np.uint8)
    metrics = metrics_from_confusion(confusion_matrix(pred, label, 3), ("x", "y", "z"))
    assert metrics["per_class"]["x"] == pytest.approx(75.0)
    assert metrics["per_class"]["y"] == 0.0  # a false positive class: IoU 0, and it is in the mean
    assert math.isnan(metrics["per_class"]["z"])
    assert metrics["miou"] == pytest.approx(37.5)
    assert metrics["macc"] == pytest.approx(75.0)  # accuracy only over classes with ground truth


def test_all_ignore_gives_nan_not_error():
    label = np.full((2, 2), 255, np.uint8)
    metrics = metrics_from_confusion(confusion_matrix(np.zeros((2, 2), np.uint8), label, 2), ("x", "y"))
    assert math.isnan(metrics["miou"]) and math.isnan(metrics["aacc"]) and metrics["pixels"] == 0


def test_format_metrics_marks_missing_classes():
    text = format_metrics(metrics_from_confusion(EXPECTED_CONFUSION, CLASSES))
    assert text.splitlines()[0] == "mIoU 44.44  aAcc 60.00  mAcc 66.67"
    assert "n/a" in text.splitlines()[4] and text.splitlines()[4].strip().startswith("d")


class FixedModel(torch.nn.Module):
    """Predicts from a lookup: the class of each pixel is the image's red channel (a fake segmenter)."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.sizes = []

    def predict(self, images, size):
        self.sizes.append(tuple(images.shape[-2:]))
        logits = torch.nn.functional.one_hot(images[:, 0].long(), self.num_classes).permute(0, 3, 1, 2).float()
        return torch.nn.functional.interpolate(logits, size=size, mode="nearest")


def fake_split(pairs):
    samples = [Sample(f"s{i}", np.repeat(pred[..., None], 3, axis=2), label) for i, (pred, label) in enumerate(pairs)]
    return Split("val", [s.id for s in samples], lambda i: samples[i])


def test_confusion_is_summed_over_the_whole_split():
    """mmseg's IoUMetric: intersections and unions summed over images, not per-image IoUs averaged."""
    other_label = np.array([[3, 3, 3], [3, 3, 0]], np.uint8)
    other_pred = np.array([[3, 3, 0], [0, 0, 0]], np.uint8)
    split = fake_split([(PRED, LABEL), (other_pred, other_label), (PRED[:, :2], LABEL[:, :2])])
    confusion = confusion_over_split(FixedModel(4), split, 4, "cpu", batch_size=2, progress=False)
    expected = (confusion_matrix(PRED, LABEL, 4) + confusion_matrix(other_pred, other_label, 4)
                + confusion_matrix(PRED[:, :2], LABEL[:, :2], 4))
    np.testing.assert_array_equal(confusion, expected)
    # shards (as DDP ranks take them) add up to the whole
    parts = [confusion_over_split(FixedModel(4), split, 4, "cpu", indices=idx, progress=False)
             for idx in ([0, 2], [1])]
    np.testing.assert_array_equal(parts[0] + parts[1], expected)


def test_inference_size_and_resize_back():
    pred = np.kron(np.array([[0, 1], [2, 1]], np.uint8), np.ones((4, 4), np.uint8))  # 8 x 8 blocks
    model = FixedModel(3)
    confusion = confusion_over_split(model, fake_split([(pred, pred)]), 3, "cpu", size=(4, 4), progress=False)
    assert model.sizes == [(4, 4)]  # inference ran at the requested size ...
    assert confusion.sum() == 64 and np.trace(confusion) == 64  # ... and was scored at the label's size


def test_evaluate_matches_end_of_training_metrics(trained, tmp_path):
    out, _ = trained
    from_training = json.loads((out / "metrics_val.json").read_text())
    result = tmp_path / "metrics.json"
    metrics = evaluate(EvalConfig(checkpoint=str(out), data=TOY_SPEC, split="val", out=str(result), device="cpu",
                                  batch_size=3))
    assert metrics["miou"] == pytest.approx(from_training["miou"], abs=1e-9)
    assert metrics["per_class"] == pytest.approx(from_training["per_class"], nan_ok=True)
    assert metrics["images"] == 4 and metrics["pixels"] == 4 * 32 * 32 and metrics["split"] == "val"
    assert metrics["checkpoint"] == str(out / "checkpoint")
    assert json.loads(result.read_text())["miou"] == metrics["miou"]
    assert (tmp_path / "metrics.config.yaml").is_file()


def test_evaluate_at_another_size(trained, tmp_path):
    out, _ = trained
    metrics = evaluate(EvalConfig(checkpoint=str(out / "checkpoint"), data=TOY_SPEC, split="test",
                                  out=str(tmp_path / "m.json"), size=[48, 48], device="cpu"))
    assert metrics["pixels"] == 4 * 32 * 32 and 0 <= metrics["miou"] <= 100


def test_checkpoint_for_other_number_of_classes(trained, folder_root, tmp_path):
    out, _ = trained
    with pytest.raises(SegsynthError) as error:
        evaluate(EvalConfig(checkpoint=str(out), data=f"folder:{folder_root}", split="val",
                            out=str(tmp_path / "m.json"), device="cpu"))
    message = str(error.value)
    assert str(out / "checkpoint") in message
    assert "the segmenter has 9 classes" in message and "has 3" in message
    assert "evaluate on the dataset the model was trained for" in message
    assert not (tmp_path / "m.json").exists()


def test_evaluate_missing_split_or_checkpoint(trained, tmp_path):
    out, _ = trained
    with pytest.raises(SegsynthError, match="has no split 'validation'; it has: train, val, test"):
        evaluate(EvalConfig(checkpoint=str(out), data=TOY_SPEC, split="validation", device="cpu"))
    with pytest.raises(SegsynthError, match="no segsynth checkpoint here"):
        evaluate(EvalConfig(checkpoint=str(tmp_path), data=TOY_SPEC, device="cpu"))
