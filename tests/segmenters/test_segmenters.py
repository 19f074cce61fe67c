"""Segmenters: every preset builds, the interface holds, pretrained= loads a local save_pretrained folder."""

from __future__ import annotations

import pytest
import torch

from segsynth.io import SegsynthError
from segsynth.segmenters import SEGMENTERS, create_segmenter, load_segmenter
from segsynth.segmenters.losses import weighted_cross_entropy
from segsynth.segmenters.mask2former import MASK2FORMER_VARIANTS
from segsynth.segmenters.segformer import SEGFORMER_VARIANTS, SegFormerSegmenter

# The SegFormer paper's MiT encoders (Xie et al. 2021, Table 6).
PAPER = {
    "segformer-b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "segformer-b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "segformer-b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
    "segformer-b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "segformer-b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
    "segformer-b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
}


def images(batch=2, height=32, width=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=generator).float()


def test_every_preset_is_registered():
    assert set(SEGMENTERS) == set(SEGFORMER_VARIANTS) | set(MASK2FORMER_VARIANTS)
    assert set(PAPER) | {"segformer-small", "segformer-tiny"} == set(SEGFORMER_VARIANTS)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_variant_configs(name):
    from transformers import SegformerConfig

    hidden, depths, decoder = PAPER[name]
    config = SegformerConfig(**SEGFORMER_VARIANTS[name], num_labels=19)
    assert config.hidden_sizes == hidden and config.depths == depths and config.decoder_hidden_size == decoder
    assert config.num_labels == 19


@pytest.mark.parametrize("name", ["segformer-tiny", "segformer-small", "segformer-b0", "segformer-b1"])
def test_preset_builds_and_runs(name):
    torch.manual_seed(0)
    model = create_segmenter(name, 5, classes=["a", "b", "c", "d", "e"])
    assert isinstance(model, SegFormerSegmenter) and model.num_classes == 5
    assert model.model.config.id2label[4] == "e" and model.model.config.semantic_loss_ignore_index == 255
    if name != "segformer-tiny":
        return  # building is the check for the bigger presets; one forward pass suffices
    model.eval()
    x = images()
    logits = model(x)
    assert logits.shape == (2, 5, 8, 12)  # output stride 4
    assert model.predict(x).shape == (2, 5, 32, 48)
    assert model.predict(x, size=(20, 30)).shape == (2, 5, 20, 30)
    labels = torch.randint(0, 5, (2, 32, 48))
    loss = model(x, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_default_class_names():
    model = create_segmenter("segformer-tiny", 3)
    assert model.model.config.id2label == {0: "class_0", 1: "class_1", 2: "class_2"}


def test_unknown_segmenter_lists_options():
    with pytest.raises(SegsynthError) as error:
        create_segmenter("unet-huge", 3)
    message = str(error.value)
    assert "unknown segmenter 'unet-huge'" in message
    for name in SEGMENTERS:
        assert name in message


def test_pretrained_from_local_folder(tmp_path):
    """pretrained= goes through from_pretrained (the hub-id code path): encoder kept, head re-made for our classes."""
    torch.manual_seed(0)
    source = create_segmenter("segformer-tiny", 9)
    source.save(tmp_path / "pretrained")
    assert (tmp_path / "pretrained" / "config.json").is_file()
    assert (tmp_path / "pretrained" / "model.safetensors").is_file()

    torch.manual_seed(1)
    model = create_segmenter("segformer-tiny", 4, pretrained=str(tmp_path / "pretrained"), classes=list("wxyz"))
    assert model.num_classes == 4 and model.model.config.id2label[3] == "z"
    theirs, ours = source.state_dict(), model.state_dict()
    encoder = [key for key in theirs if ".encoder." in key or key.startswith("model.segformer.")]
    assert encoder
    for key in encoder:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    assert ours["model.decode_head.classifier.weight"].shape[0] == 4  # a new head for 4 classes
    # Same class count: the whole model, head included, comes back.
    same = create_segmenter("segformer-tiny", 9, pretrained=str(tmp_path / "pretrained"))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(same.state_dict()[key], value, rtol=0, atol=0)


def test_pretrained_folder_without_config(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(SegsynthError, match="no config.json; a pretrained model folder needs config.json"):
        create_segmenter("segformer-tiny", 3, pretrained=str(tmp_path / "weights"))


def test_pretrained_name_unavailable_offline():
    with pytest.raises(SegsynthError, match="cannot load pretrained weights 'segsynth-tests/no-such-model'"):
        create_segmenter("segformer-tiny", 3, pretrained="segsynth-tests/no-such-model")


def test_load_segmenter_refuses_non_checkpoints(tmp_path):
    with pytest.raises(SegsynthError, match="not a segsynth checkpoint"):
        load_segmenter(tmp_path)
    (tmp_path / "segsynth.json").write_text('{"model": "resnet-9000"}')
    with pytest.raises(SegsynthError, match="unknown segmenter 'resnet-9000'; options: segformer-b0"):
        load_segmenter(tmp_path)


def test_weighted_cross_entropy():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])  # 1 x 2 classes x 1 x 2 pixels
    labels = torch.tensor([[[0, 0]]])
    per_pixel = torch.nn.functional.cross_entropy(logits, labels, reduction="none")[0, 0]
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, None), per_pixel.mean())
    # weights scale each pixel, normalised by their sum
    weights = torch.tensor([[[1.0, 3.0]]])
    expected = (per_pixel[0] * 1 + per_pixel[1] * 3) / 4
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, weights), expected)
    # ignore pixels count for nothing; an all-ignore batch gives 0, not NaN
    torch.testing.assert_close(weighted_cross_entropy(logits, torch.tensor([[[0, 255]]]), None), per_pixel[0])
    assert weighted_cross_entropy(logits, torch.tensor([[[255, 255]]]), None).item() == 0.0


def test_loss_backpropagates_through_weights():
    torch.manual_seed(0)
    model = create_segmenter("segformer-tiny", 3)
    labels = torch.randint(0, 3, (1, 32, 32))
    loss = model(images(1, 32, 32), labels, torch.rand(1, 32, 32))
    loss.backward()
    assert model.model.decode_head.classifier.weight.grad is not None
