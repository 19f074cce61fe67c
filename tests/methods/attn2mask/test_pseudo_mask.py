"""Attention maps -> pseudo masks, on synthetic maps whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segsynth.io import SegsynthError
from segsynth.methods.attn2mask.pseudo_mask import (
    PRESETS,
    PseudoMaskConfig,
    attention_to_mask,
    capture_settings,
    class_scores,
    preset_config,
    score_pseudo_masks,
    scores_to_mask,
)


def blob(size, top, left, height, width, value=1.0):
    grid = torch.zeros(size, size)
    grid[top:top + height, left:left + width] = value
    return grid


def two_class_attention(noise=0.05, seed=0):
    """Class 0 fills the top-left quarter, class 1 the bottom-right quarter, at 16x16 and 8x8, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    cross = {}
    for size in (16, 8):
        half = size // 2
        maps = torch.stack([blob(size, 0, 0, half, half), blob(size, half, half, half, half)])
        cross[size] = maps + noise * torch.rand(maps.shape, generator=generator)
    expected = np.zeros((32, 32), np.uint8)
    expected[:16, :16], expected[16:, 16:] = 3, 7
    return cross, expected


@pytest.mark.parametrize("preset", ["diffumask", "daam"])
def test_blob_per_class_gives_the_blobs(preset):
    cross, expected = two_class_attention()
    config = preset_config(preset, resolutions=[16, 8])
    label, confidence = attention_to_mask(cross, None, config, (32, 32), class_ids=[3, 7], background_id=0)
    assert label.dtype == np.uint8 and label.shape == (32, 32)
    assert confidence.dtype == np.float32 and 0.0 <= confidence.min() and confidence.max() <= 1.0
    miou, per_class = score_pseudo_masks(label, expected, num_classes=8)
    assert miou > 90 and per_class[3] > 90 and per_class[7] > 90
    assert label[4, 4] == 3 and label[28, 28] == 7 and label[4, 28] == 0 and label[28, 4] == 0
    # Sure of the blob core and of the empty corner, unsure on the blob's edge.
    assert min(confidence[4, 4], confidence[4, 28]) > 0.75 > confidence[15, 8]


def test_non_square_output_and_maps():
    # a 4x8 map whose left half is the class
    cross = {4: torch.cat([torch.ones(1, 4, 4), torch.zeros(1, 4, 4)], dim=2)}
    config = PseudoMaskConfig(resolutions=[4], upsampling="bilinear", background_threshold=0.5)
    label, _ = attention_to_mask(cross, None, config, (16, 32), class_ids=[1])
    assert label.shape == (16, 32)
    assert (label[:, :14] == 1).all() and (label[:, 18:] == 0).all()


def test_uncertain_band_and_both_confidences():
    # One class; four pixels with known normalised scores (max-normalised, the max is 1.0).
    scores = torch.tensor([[[1.0, 0.65, 0.55, 0.3]]])
    dd = preset_config("dataset-diffusion")  # class >= 0.6, ignore [0.5, 0.6), background below
    label, confidence = scores_to_mask(scores, dd, class_ids=[5], background_id=0)
    assert label.tolist() == [[5, 5, 255, 0]]
    np.testing.assert_allclose(confidence, [[1.0, 0.65, 0.0, 0.7]], atol=1e-6)

    margin = preset_config("dataset-diffusion", confidence="margin")
    _, confidence = scores_to_mask(scores, margin, class_ids=[5])
    np.testing.assert_allclose(confidence, [[1.0, 0.05 / 0.4, 0.0, 0.3 / 0.6]], atol=1e-6)

    # Two classes: the margin is measured to the runner-up when it beats the threshold.
    two = torch.tensor([[[0.9]], [[0.8]]])
    label, confidence = scores_to_mask(two, margin, class_ids=[1, 2])
    assert label.tolist() == [[1]]
    np.testing.assert_allclose(confidence, [[0.1 / 0.4]], atol=1e-6)


def test_self_attention_refinement_removes_bleeding():
    # 8x8 grid; the object is columns 0-3. The cross-attention bleeds into columns 4-5.
    cross_map = torch.zeros(8, 8)
    cross_map[:, :4], cross_map[:, 4:6] = 1.0, 0.7
    # Self-attention: each pixel attends uniformly to the pixels of its own region (object or not).
    region = (torch.arange(8) < 4).repeat(8, 1).flatten()
    affinity = (region[:, None] == region[None, :]).float()
    affinity = (affinity / affinity.sum(1, keepdim=True)).view(8, 8, 8, 8)
    expected = np.zeros((8, 8), np.uint8)
    expected[:, :4] = 1

    plain = preset_config("dataset-diffusion", resolutions=[8], refine_power=0, uncertain_band=[])
    label, _ = attention_to_mask({8: cross_map[None]}, None, plain, (8, 8), class_ids=[1])
    assert (label[:, 4:6] == 1).all()  # the bleed is labelled object
    refined = preset_config("dataset-diffusion", resolutions=[8], self_attention_resolution=8)
    label, _ = attention_to_mask({8: cross_map[None]}, {8: affinity}, refined, (8, 8), class_ids=[1])
    np.testing.assert_array_equal(label, expected)


def test_refinement_is_self_attention_to_the_kth_power():
    generator = torch.Generator().manual_seed(0)
    cross = torch.rand(3, 4, 4, generator=generator)
    affinity = torch.rand(16, 16, generator=generator).softmax(dim=1)
    config = PseudoMaskConfig(resolutions=[4], refine_power=3, self_attention_resolution=4, normalisation="max")
    scores = class_scores({4: cross}, affinity.view(4, 4, 4, 4), config, (4, 4))
    expected = (torch.linalg.matrix_power(affinity, 3) @ cross.reshape(3, 16).T).T.reshape(3, 4, 4)
    torch.testing.assert_close(scores, expected / expected.flatten(1).max(1).values[:, None, None])


def test_each_resolution_normalisation_weighs_resolutions_equally():
    # The 16x16 map is 100x stronger; its blob is top-left, the 8x8 map's blob bottom-right.
    cross = {16: (100 * blob(16, 0, 0, 8, 8))[None], 8: blob(8, 4, 4, 4, 4)[None]}
    each = PseudoMaskConfig(resolutions=[16, 8], normalise_at="each-resolution", upsampling="bilinear")
    combined = PseudoMaskConfig(resolutions=[16, 8], normalise_at="combined", upsampling="bilinear")
    scores_each = class_scores(cross, None, each, (16, 16))
    scores_combined = class_scores(cross, None, combined, (16, 16))
    assert scores_each[0, 2, 2] == pytest.approx(0.5) and scores_each[0, 13, 13] == pytest.approx(0.5)
    assert scores_combined[0, 2, 2] == pytest.approx(1.0, abs=1e-2) and scores_combined[0, 13, 13] < 0.02


def test_bicubic_and_bilinear_differ_and_stay_in_range():
    cross, _ = two_class_attention(noise=0.0)
    results = {}
    for mode in ("bilinear", "bicubic"):
        config = PseudoMaskConfig(resolutions=[8], upsampling=mode, normalisation="max")
        results[mode] = class_scores(cross, None, config, (32, 32))
        assert results[mode].min() >= 0 and results[mode].max() <= 1
    assert not torch.allclose(results["bilinear"], results["bicubic"])
    expected = F.interpolate(cross[8][None], size=(32, 32), mode="bicubic", align_corners=False)[0]
    expected = expected / expected.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(results["bicubic"], expected.clamp(0, 1))


def test_presets_resolve_and_say_what_to_capture():
    for name in PRESETS:
        assert isinstance(preset_config(name), PseudoMaskConfig)
    dd = preset_config("dataset-diffusion")
    assert (dd.resolutions, dd.refine_power, dd.self_attention_resolution) == ([16], 4, 32)
    assert (dd.normalisation, dd.background_threshold, dd.uncertain_band) == ("min-max", 0.6, [0.5, 0.6])
    assert capture_settings(dd) == dict(resolutions=(16,), self_resolutions=(32,), steps=None)
    diffumask = preset_config("diffumask", steps=[0, 25])
    assert capture_settings(diffumask) == dict(resolutions=(16, 32, 64), self_resolutions=(), steps=(0, 25))
    assert 8 not in preset_config("daam").resolutions
    with pytest.raises(SegsynthError, match="options: diffumask, dataset-diffusion, daam"):
        preset_config("cutler")
    with pytest.raises(SegsynthError, match="unknown key"):
        preset_config("daam", threshold=0.3)


@pytest.mark.parametrize("overrides, message", [
    (dict(normalisation="softmax"), "normalisation must be one of: max, min-max"),
    (dict(upsampling="nearest"), "upsampling must be one of: bilinear, bicubic"),
    (dict(uncertain_band=[0.6, 0.5]), "uncertain_band"),
    (dict(background_threshold=1.5), r"background_threshold = 1.5 is too small|background_threshold = 1.5 is too large"),
    (dict(refine_power=-1), "refine_power = -1 is too small: refine_power must be an integer in 0..16"),
    (dict(resolutions=[]), r"resolutions = \[\] has 0 item\(s\)"),
])
def test_bad_config_values_are_refused(overrides, message):
    with pytest.raises(SegsynthError, match=message):
        preset_config("daam", **overrides)


def test_missing_inputs_are_named():
    cross, _ = two_class_attention()
    with pytest.raises(SegsynthError, match=r"resolution\(s\) \[32, 64\].*captured: \[8, 16\]"):
        attention_to_mask(cross, None, preset_config("diffumask"), (32, 32), class_ids=[1, 2])
    refine = preset_config("dataset-diffusion")
    with pytest.raises(SegsynthError, match="needs the self-attention"):
        attention_to_mask(cross, None, refine, (32, 32), class_ids=[1, 2])
    with pytest.raises(SegsynthError, match="resolution 32; captured: \\[8\\]"):
        attention_to_mask(cross, {8: torch.rand(8, 8, 8, 8)}, refine, (32, 32), class_ids=[1, 2])
    with pytest.raises(SegsynthError, match="2 class maps but 1 class ids"):
        attention_to_mask(cross, None, preset_config("daam", resolutions=[16]), (32, 32), class_ids=[1])


def test_score_pseudo_masks_skips_uncertain_pixels():
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, 255]], np.uint8)
    prediction = np.array([[0, 1, 1, 255], [0, 0, 1, 1]], np.uint8)
    miou, per_class = score_pseudo_masks([prediction], [truth], num_classes=3)
    # Scored pixels: all but (0, 3) (uncertain) and (1, 3) (ignored). Class 0: I=3, U=4; class 1: I=2, U=3.
    np.testing.assert_allclose(per_class[:2], [75.0, 200 / 3])
    assert np.isnan(per_class[2])
    assert miou == pytest.approx((75.0 + 200 / 3) / 2)
    with pytest.raises(SegsynthError, match="not below num_classes=2"):
        score_pseudo_masks(np.full((2, 2), 2, np.uint8), np.zeros((2, 2), np.uint8), num_classes=2)
