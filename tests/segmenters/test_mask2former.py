"""Mask2Former: presets, semantic inference, the weighted set-prediction loss (equal to transformers' with unit
weights; ignore pixels do not count), pretrained folders, and training / resume / every recipe / evaluate /
stats / filter through the segmenter table."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fakes import PYTHON, REPO, TOY_SPEC, subprocess_env
from segsynth.data import open_dataset
from segsynth.io import SegsynthError, read_jsonl
from segsynth.segmenters import SEGMENTERS, create_segmenter, load_segmenter
from segsynth.segmenters.losses import pixel_losses, training_loss
from segsynth.segmenters.mask2former import (MASK2FORMER_VARIANTS, Mask2FormerSegmenter, layer_loss,
                                             mask2former_config, semantic_log_probs, set_prediction_loss,
                                             targets_from_labels)
from segsynth.stage_configs import EvalConfig, FilterConfig, StatsConfig, TrainConfig
from segsynth.training.loop import train
from synthetic_sets import write_synthetic_set

M2F_TRAIN = dict(model="mask2former-tiny", iterations=4, batch_size=2, workers=0, save_every=2, warmup=2,
                 log_every=1, device="cpu", lr=1e-3)


def images(batch=2, height=32, width=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=generator).float()


# --- presets and inference -------------------------------------------------------------------


def test_presets_are_table_rows_and_the_paper_configs_build():
    assert set(MASK2FORMER_VARIANTS) <= set(SEGMENTERS)
    assert SEGMENTERS["mask2former-small"].losses == ("ce", "ce-ignore-unknown")
    for name in ("mask2former-swin-t", "mask2former-swin-l"):  # configs only: the big models are not built here
        config = mask2former_config(name, {"num_labels": 150})
        assert config.num_queries == 100 and config.hidden_dim == 256 and config.decoder_layers == 10
        assert config.backbone_config.model_type == "swin" and config.backbone_config.out_features[-1] == "stage4"
    assert mask2former_config("mask2former-swin-l", {}).backbone_config.embed_dim == 192


def test_small_preset_is_about_segformer_small_sized():
    mask2former = sum(p.numel() for p in create_segmenter("mask2former-small", 11).parameters())
    segformer = sum(p.numel() for p in create_segmenter("segformer-small", 11).parameters())
    assert 0.8 < mask2former / segformer < 1.2


def test_tiny_forward_predict_and_loss():
    torch.manual_seed(0)
    model = create_segmenter("mask2former-tiny", 5, classes=list("abcde"))
    assert isinstance(model, Mask2FormerSegmenter) and model.num_classes == 5
    assert model.model.config.id2label[4] == "e"
    model.eval()
    x = images()
    log_probs = model(x)
    assert log_probs.shape == (2, 5, 8, 12)  # mask resolution: stride 4
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(2, 8, 12))  # a distribution per pixel
    assert model.predict(x).shape == (2, 5, 32, 48) and model.predict(x, size=(20, 30)).shape == (2, 5, 20, 30)
    model.train()
    labels = torch.randint(0, 5, (2, 32, 48))
    loss = model(x, labels, torch.ones(2, 32, 48))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    # every trainable parameter gets a gradient (DistributedDataParallel needs that)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_semantic_scores_are_queries_class_probabilities_times_masks():
    class_logits = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]])  # 2 queries, 2 classes + no-object
    mask_logits = torch.tensor([[[[5.0, -5.0]], [[-5.0, 5.0]]]])  # query 0 covers pixel 0, query 1 pixel 1
    log_probs = semantic_log_probs(class_logits, mask_logits)
    scores = torch.einsum("qc,qhw->chw", class_logits[0].softmax(-1)[:, :2], mask_logits[0].sigmoid())
    torch.testing.assert_close(log_probs[0].exp(), scores / scores.sum(0))
    assert log_probs[0].argmax(0).tolist() == [[0, 1]]


def test_pixel_loss_is_the_cross_entropy_of_the_normalised_scores():
    """What stats and filter score for a Mask2Former: -log(s_y / sum_c s_c) at label size."""
    torch.manual_seed(0)
    model = create_segmenter("mask2former-tiny", 4).eval()
    x, labels = images(), torch.randint(0, 4, (2, 32, 48))
    labels[0, 0, :5] = 255
    with torch.no_grad():
        outputs = model._outputs(x)
        masks = torch.nn.functional.interpolate(outputs.masks_queries_logits, size=(32, 48), mode="bilinear",
                                                align_corners=False)
        scores = torch.einsum("bqc,bqhw->bchw", outputs.class_queries_logits.softmax(-1)[..., :-1], masks.sigmoid())
    expected = -torch.log(scores.gather(1, labels.clamp_max(3)[:, None].long())[:, 0] / scores.sum(1))
    expected[labels == 255] = 0
    torch.testing.assert_close(pixel_losses(model, x, labels), expected, rtol=1e-4, atol=1e-5)


# --- the loss ---------------------------------------------------------------------------------


def test_unit_weights_reproduce_transformers_loss_exactly():
    torch.manual_seed(0)
    model = create_segmenter("mask2former-tiny", 5)
    labels = torch.randint(0, 3, (2, 32, 48))
    labels[:, :16] = 4
    outputs = model._outputs(images(), auxiliary=True)
    classes, masks, _ = targets_from_labels(labels, None)
    torch.manual_seed(5)
    reference = model.model.get_loss(model.model.get_loss_dict(
        outputs.masks_queries_logits, outputs.class_queries_logits, masks, classes, outputs.auxiliary_logits))
    torch.manual_seed(5)
    ours = set_prediction_loss(outputs, labels, torch.ones(2, 32, 48), model.model.config)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_targets_are_the_classes_present_with_weight():
    labels = torch.tensor([[[0, 0, 2, 255], [1, 1, 2, 255]]])
    weights = torch.tensor([[[1.0, 1.0, 0.5, 1.0], [0.0, 0.0, 0.5, 1.0]]])  # class 1 has only zero weights
    classes, masks, weight_maps = targets_from_labels(labels, weights)
    assert classes[0].tolist() == [0, 2]
    assert masks[0][1].tolist() == [[0, 0, 1, 0], [0, 0, 1, 0]]
    assert weight_maps[0].tolist() == [[1.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.5, 0.0]]


@pytest.mark.parametrize("ignore_as", ["label-255", "zero-weight"])
def test_ignored_pixels_get_no_gradient(ignore_as):
    """Mask logits inside an ignored block get no gradient (transformers' loss treats them as negatives)."""
    torch.manual_seed(0)
    config = mask2former_config("mask2former-tiny", {"num_labels": 3})
    labels = torch.randint(0, 3, (1, 24, 24))
    weights = torch.ones(1, 24, 24)
    if ignore_as == "label-255":
        labels[:, 4:20, 4:20] = 255
    else:
        weights[:, 4:20, 4:20] = 0.0
    class_logits = torch.randn(1, 8, 4, requires_grad=True)
    mask_logits = torch.randn(1, 8, 24, 24, requires_grad=True)
    classes, masks, weight_maps = targets_from_labels(labels, weights)
    loss = layer_loss(class_logits, mask_logits, classes, masks, weight_maps, 1.0, config)
    loss.backward()
    inside = mask_logits.grad[0, :, 6:18, 6:18]
    outside = mask_logits.grad[0, :, :3]
    assert inside.abs().max() == 0 and outside.abs().max() > 0

    # transformers' own loss, same targets but 255 = "in no mask", pushes every query down there
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    mask_logits.grad = None
    reference = Mask2FormerLoss(config, {})(mask_logits, class_logits, masks, classes)
    (reference["loss_mask"] + reference["loss_dice"]).backward()
    assert mask_logits.grad[0, :, 6:18, 6:18].abs().max() > 0


def test_ignore_unknown_leaves_queries_on_ignore_pixels_unjudged():
    """--loss ce-ignore-unknown: an unmatched query whose mask lies on ignore pixels gets no "no object" push
    (the reference loss gives it one); without ignore pixels both losses are the same number."""
    torch.manual_seed(0)
    config = mask2former_config("mask2former-tiny", {"num_labels": 3})
    labels = torch.zeros(1, 24, 24, dtype=torch.long)
    labels[:, :, 12:] = 1
    class_logits = torch.randn(1, 8, 4)
    mask_logits = torch.full((1, 8, 24, 24), -12.0)
    mask_logits[0, :2, :, :12], mask_logits[0, 2:4, :, 12:] = 12.0, 12.0  # queries 0-3 on the labelled classes

    def layer(labels, ignore_unknown):
        logits = class_logits.clone().requires_grad_(True)
        torch.manual_seed(1)
        layer_loss(logits, mask_logits, *targets_from_labels(labels, None), 1.0, config, ignore_unknown).backward()
        return logits.grad[0]

    torch.testing.assert_close(layer(labels, True), layer(labels, False))  # nothing ignored: the reference loss

    hidden = labels.clone()
    hidden[:, 6:18, 6:18] = 255  # e.g. a building the filter (or drop_classes) ignored whole
    mask_logits[0, 7] = -12.0
    mask_logits[0, 7, 8:16, 8:16] = 12.0  # query 7 found something there
    unknown, reference = layer(hidden, True), layer(hidden, False)
    assert reference[7].abs().max() > 1e-3  # the reference tells it "no object"
    assert unknown[7].abs().max() < 1e-3 * reference[7].abs().max()
    assert unknown[5].abs().max() > 1e-4  # an unmatched query off the ignore block is judged as before
    torch.testing.assert_close(unknown[5], reference[5])


def test_ignore_unknown_is_a_training_loss_for_both_kinds(tmp_path):
    for model in ("mask2former-tiny", "segformer-tiny"):
        assert training_loss(TrainConfig(data=TOY_SPEC, out="unused", model=model, loss="ce-ignore-unknown"))
    out = tmp_path / "out"
    train(TrainConfig(data=TOY_SPEC, out=str(out), loss="ce-ignore-unknown", **{**M2F_TRAIN, "iterations": 2,
                                                                               "eval_split": ""}))
    assert json.loads((out / "checkpoint" / "segsynth.json").read_text())["state"]["finished"] is True


def test_fractional_weights_change_the_mask_terms():
    torch.manual_seed(0)
    config = mask2former_config("mask2former-tiny", {"num_labels": 3})
    labels = torch.randint(0, 3, (2, 16, 16))
    class_logits, mask_logits = torch.randn(2, 8, 4), torch.randn(2, 8, 16, 16)

    def loss(weights):
        torch.manual_seed(1)
        return layer_loss(class_logits, mask_logits, *targets_from_labels(labels, weights), 1.0, config)

    half = torch.ones(2, 16, 16)
    half[:, :, :8] = 0.2
    assert loss(torch.ones(2, 16, 16) * 0.5) == pytest.approx(loss(None).item())  # a uniform scale is normalised out
    assert loss(half).item() != pytest.approx(loss(None).item())


def test_per_pixel_losses_are_refused_before_compute():
    config = TrainConfig(data=TOY_SPEC, out="unused", model="mask2former-tiny", loss="reliable")
    with pytest.raises(SegsynthError, match="--loss reliable needs a segmenter with per-pixel logits; mask2former-tiny"):
        training_loss(config)
    model = create_segmenter("mask2former-tiny", 3)
    with pytest.raises(SegsynthError, match="own set-prediction loss"):
        model(images(1, 32, 32), torch.zeros(1, 32, 32, dtype=torch.long), None, lambda *args: 0)


# --- pretrained -----------------------------------------------------------------------------


def test_pretrained_mask2former_folder_keeps_everything_but_the_class_head(tmp_path):
    """A save_pretrained folder (the hub-id code path): all weights kept, the class head re-made for 4 classes."""
    torch.manual_seed(0)
    source = create_segmenter("mask2former-tiny", 9)
    source.save(tmp_path / "pretrained")
    model = create_segmenter("mask2former-tiny", 4, pretrained=str(tmp_path / "pretrained"), classes=list("wxyz"))
    assert model.num_classes == 4 and model.model.config.id2label[3] == "z"
    ours, theirs = model.state_dict(), source.state_dict()
    assert ours["model.class_predictor.weight"].shape[0] == 5  # 4 classes + no-object
    kept = [k for k in theirs if "class_predictor" not in k and "criterion" not in k]
    assert len(kept) > 100
    for key in kept:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    model(images(1, 32, 32), torch.randint(0, 4, (1, 32, 32))).backward()  # trains with the new head
    same = create_segmenter("mask2former-tiny", 9, pretrained=str(tmp_path / "pretrained"))
    for key, value in theirs.items():
        torch.testing.assert_close(same.state_dict()[key], value, rtol=0, atol=0)


def test_pretrained_swin_classifier_becomes_the_backbone(tmp_path):
    """An image-classification Swin (e.g. ImageNet weights on the hub): the preset's head around its backbone."""
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    swin = SwinForImageClassification(SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4],
                                                 window_size=4, num_labels=7))
    swin.save_pretrained(tmp_path / "swin", safe_serialization=True)
    model = create_segmenter("mask2former-tiny", 3, pretrained=str(tmp_path / "swin"))
    backbone = model.model.model.pixel_level_module.encoder
    for key, value in swin.swin.state_dict().items():
        if not key.startswith("layernorm"):
            torch.testing.assert_close(backbone.swin.state_dict()[key], value, rtol=0, atol=0)
    assert model.model.config.num_queries == MASK2FORMER_VARIANTS["mask2former-tiny"]["head"]["num_queries"]
    assert model.predict(images(1, 32, 32)).shape == (1, 3, 32, 32)


def test_pretrained_of_another_kind_is_refused(tmp_path):
    create_segmenter("segformer-tiny", 3).save(tmp_path / "segformer")
    with pytest.raises(SegsynthError, match="a 'segformer' model, not a mask2former or swin one"):
        create_segmenter("mask2former-tiny", 3, pretrained=str(tmp_path / "segformer"))
    create_segmenter("mask2former-tiny", 3).save(tmp_path / "m2f")
    with pytest.raises(SegsynthError, match="a 'mask2former' model, not a segformer one"):
        create_segmenter("segformer-tiny", 3, pretrained=str(tmp_path / "m2f"))
    with pytest.raises(SegsynthError, match="cannot load pretrained weights 'segsynth-tests/no-such-model'"):
        create_segmenter("mask2former-tiny", 3, pretrained="segsynth-tests/no-such-model")


# --- through the stages ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def m2f_trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("m2f") / "run"
    train(TrainConfig(data=TOY_SPEC, out=str(out), **M2F_TRAIN))
    return out


def test_training_checkpoint_round_trip(m2f_trained):
    out = m2f_trained
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "segsynth.json"]
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)
    metrics = json.loads((out / "metrics_val.json").read_text())
    assert metrics["pixels"] == 4 * 32 * 32 and 0 <= metrics["miou"] <= 100
    model, meta = load_segmenter(out / "checkpoint")
    assert isinstance(model, Mask2FormerSegmenter) and meta["model"] == "mask2former-tiny"
    again, _ = load_segmenter(out / "checkpoint")
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


class Crash(Exception):
    pass


def test_resume_matches_uninterrupted(m2f_trained, tmp_path, monkeypatch):
    """Crash right after the iteration-2 checkpoint, resume: the same weights and optimizer state as uninterrupted
    (the loss's random points and Swin's drop path are drawn from the per-iteration seed)."""
    import segsynth.training.loop as train_module

    out = tmp_path / "run"
    original = train_module.save_checkpoint

    def save_then_crash(*args, **kwargs):
        original(*args, **kwargs)
        raise Crash

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train(TrainConfig(data=TOY_SPEC, out=str(out), **M2F_TRAIN))
    monkeypatch.setattr(train_module, "save_checkpoint", original)
    train(TrainConfig(data=TOY_SPEC, out=str(out), **{**M2F_TRAIN, "resume": True}))
    for name in ("model.safetensors", "optimizer.safetensors"):
        resumed, whole = load_file(str(out / "checkpoint" / name)), load_file(str(m2f_trained / "checkpoint" / name))
        assert resumed.keys() == whole.keys()
        for key in whole:
            assert torch.equal(resumed[key], whole[key]), (name, key)


def test_evaluate_stats_and_filter_through_the_table(m2f_trained, tmp_path):
    from segsynth.methods.freemask.filter import filter_synthetic
    from segsynth.methods.freemask.stats import compute_class_stats
    from segsynth.training.evaluate import evaluate

    metrics = evaluate(EvalConfig(checkpoint=str(m2f_trained), data=TOY_SPEC, out=str(tmp_path / "m.json"), device="cpu"))
    assert metrics["miou"] == json.loads((m2f_trained / "metrics_val.json").read_text())["miou"]
    stats = compute_class_stats(StatsConfig(segmenter=str(m2f_trained), out=str(tmp_path / "stats.json"), device="cpu"))
    means = [m for m in stats["mean_loss"] if m is not None]
    assert means and all(np.isfinite(means)) and min(means) > 0
    synthetic = write_synthetic_set(tmp_path / "syn", open_dataset(TOY_SPEC))
    summary = filter_synthetic(FilterConfig(synthetic=str(synthetic), segmenter=str(m2f_trained),
                                            stats=str(tmp_path / "stats.json"), lanes=1, device="cpu"))
    records = list(read_jsonl(synthetic / "manifest.jsonl"))
    assert all(r.get("filtered_mask") for r in records) and summary


@pytest.mark.parametrize("recipe", ["synthetic", "joint", "pretrain-finetune", "replace"])
def test_every_synthetic_recipe_trains(tmp_path, recipe):
    synthetic = write_synthetic_set(tmp_path / "syn", open_dataset(TOY_SPEC))
    extra = {"pretrain_iterations": 1} if recipe == "pretrain-finetune" else {}
    out = tmp_path / "out"
    train(TrainConfig(data=TOY_SPEC, out=str(out), recipe=recipe, synthetic=[str(synthetic)],
                      **{**M2F_TRAIN, "iterations": 2, "eval_split": "", **extra}))
    assert json.loads((out / "checkpoint" / "segsynth.json").read_text())["state"]["finished"] is True


@pytest.mark.slow  # ~15 s of process start-up; test_tiny_forward_predict_and_loss checks what DDP needs (every
# trainable parameter gets a gradient) in the default suite
def test_torchrun_two_processes(tmp_path):
    """Two ranks: DistributedDataParallel finds a gradient for every parameter, the number of target masks
    is averaged over ranks, the val split is sharded and summed."""
    out = tmp_path / "ddp"
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "segsynth",
               "train", "--data", "toy:n=8,n_val=3,size=32x48", "--out", str(out), "--model", "mask2former-tiny",
               "--iterations", "2", "--batch-size", "1", "--workers", "0", "--save-every", "1", "--warmup", "1",
               "--device", "cpu", "--log-every", "1"]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    meta = json.loads((out / "checkpoint" / "segsynth.json").read_text())
    assert meta["model"] == "mask2former-tiny" and meta["state"]["finished"] is True
    assert json.loads((out / "metrics_val.json").read_text())["pixels"] == 3 * 32 * 48
