"""attention:DIR and attention-sd:BASE: text requests -> image + attention pseudo-mask + confidence + heat map."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from segsynth.data import open_dataset
from segsynth.generators import GeneratorSettings, open_generator
from segsynth.generators.base import Condition, Request
from segsynth.io import SegsynthError
from segsynth.plan import make_plan
from segsynth.stage_configs import PlanConfig, SynthesizeConfig, TrainTextGeneratorConfig
from segsynth.synthesize import synthesize

TOY = "toy:n=6,n_val=2,size=32"
# The tiny model: 32x32 pictures packed to 16x16, cross-attention on its second level (8x8) and the middle.
SMALL = {"resolutions": [8], "self_attention_resolution": 8}


@pytest.fixture(scope="module")
def text_generator(tmp_path_factory):
    from segsynth.generators.builtin_text import train_text_generator

    out = tmp_path_factory.mktemp("attention") / "generator"
    return train_text_generator(TrainTextGeneratorConfig(
        data=TOY, out=str(out), iterations=2, size=[32, 32], channels=[32, 64], layers_per_block=1, text_width=32,
        batch_size=2, warmup=1, log_every=1, sample_steps=2, device="cpu"))


@pytest.fixture(scope="module")
def dataset():
    return open_dataset(TOY)


def open_attention(spec, dataset, **settings):
    generator = open_generator(spec, GeneratorSettings(device="cpu", **settings))
    generator.check_dataset(dataset.classes, dataset.palette)
    return generator


def text_request(prompt, seed=0, class_words=None, sample_id="a"):
    words = tuple((name, tuple(w)) for name, w in (class_words or {}).items())
    return Request(f"{sample_id}_s{seed}", "text", seed, prompt=prompt, class_words=words)


def test_samples_have_an_attention_label_confidence_and_heat_map(text_generator, dataset, monkeypatch):
    import segsynth.generators.attention_generator as attention_generator

    captured = []  # the class maps each sample's pseudo-mask is made from
    make_scores = attention_generator.class_scores
    monkeypatch.setattr(attention_generator, "class_scores", lambda cross, *rest: (
        captured.append({res: maps.clone() for res, maps in cross.items()}), make_scores(cross, *rest))[1])
    generator = open_attention(f"attention:{text_generator}", dataset, pseudo_mask_settings=SMALL)
    requests = [text_request("a photo of sky, road, car", 3, {"sky": ["sky"], "road": ["road"], "car": ["car"]}),
                text_request("a photo of tree, building", 4, sample_id="b")]  # class words found by name
    generator.check_requests(requests)
    samples = generator.generate([Condition(r, None, r.prompt) for r in requests])
    for sample, allowed in zip(samples, ({0, 2, 5}, {1, 4})):
        assert sample.image.shape == (32, 32, 3) and sample.image.dtype == np.uint8
        assert sample.label.shape == (32, 32) and sample.weight.shape == (32, 32)
        assert set(np.unique(sample.label)) <= allowed | {255}  # only the prompt's classes, or ignore
        assert set(np.unique(sample.label)) & allowed  # and some pixels of them
        assert 0.0 <= sample.weight.min() and sample.weight.max() <= 1.0
        assert np.all(sample.weight[sample.label == 255] == 0)  # no background class in toy: ignored, weight 0
        assert sample.extras["attention"].shape == (32, 32, 3)
        raw = sample.extras["raw_label"]  # no band, no threshold: every pixel its top class, agreeing with the label
        assert set(np.unique(raw)) <= allowed and np.array_equal(raw[sample.label != 255], sample.label[sample.label != 255])
        assert sample.meta["preset"] == "dataset-diffusion"
    assert samples[1].meta["classes"] == ["building", "tree"]
    # Batch-independent: the second request alone gives the same image and the same attention maps. (Not
    # compared: the label. This 2-iteration model attends almost alike to every word, so per-pixel margins
    # between classes are ~1e-8 and float rounding that differs with the batch size flips many of them.)
    alone = generator.generate([Condition(requests[1], None, requests[1].prompt)])[0]
    # Images: equal up to float rounding, which differs with the batch size on some CPUs (BLAS kernels):
    # at most one 8-bit level on a few pixels; another seed or prompt differs on nearly every pixel.
    gap = np.abs(alone.image.astype(int) - samples[1].image.astype(int))
    assert gap.max() <= 1 and (gap > 0).mean() < 0.01
    assert len(captured) == 3 and captured[2].keys() == captured[1].keys()
    for res in captured[1]:
        assert torch.allclose(captured[2][res], captured[1][res], rtol=0, atol=1e-6)
        assert not torch.allclose(captured[0][res][:2], captured[1][res], rtol=0, atol=1e-6)  # another sample differs
    identity = generator.identity()
    assert identity["name"] == "attention" and identity["pseudo_mask"]["resolutions"] == [8]
    assert identity["background"] == "ignore"


def test_confidence_none_writes_no_weight_and_threshold_zero_labels_every_pixel(text_generator, dataset):
    generator = open_attention(f"attention:{text_generator}", dataset, pseudo_mask="diffumask",
                               pseudo_mask_settings={**SMALL, "confidence": "none", "background_threshold": 0.0})
    request = text_request("a photo of sky, road", 1)
    sample = generator.generate([Condition(request, None, request.prompt)])[0]
    assert sample.weight is None
    assert set(np.unique(sample.label)) <= {0, 2} and (sample.label != 255).all()


def test_synthesize_a_class_prompt_plan_writes_weights_and_extras(text_generator, tmp_path):
    plan = make_plan(PlanConfig(data=TOY, out=str(tmp_path / "plan.jsonl"), class_prompts=1, limit=3))
    out = tmp_path / "set"
    summary = synthesize(SynthesizeConfig(data=TOY, plan=str(plan), generator=f"attention:{text_generator}",
                                          out=str(out), device="cpu", progress=False, pseudo_mask_settings=SMALL))
    assert summary["generated"] == 3
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for record in records:
        assert record["kind"] == "text" and record["prompt"].startswith("a photo of ")
        weight = np.array(Image.open(out / record["weight"]))
        heat = np.array(Image.open(out / record["extras"]["attention"]))
        assert weight.shape == (32, 32) and heat.shape == (32, 32, 3)
        assert record["meta"]["classes"] and record["meta"]["preset"] == "dataset-diffusion"
    assert len(list((out / "weights").glob("*.png"))) == 3
    assert len(list((out / "extras" / "attention").glob("*.png"))) == 3


def test_bad_requests_and_settings_are_named_before_any_compute(text_generator, dataset, tmp_path):
    generator = open_attention(f"attention:{text_generator}", dataset, pseudo_mask_settings=SMALL)
    with pytest.raises(SegsynthError, match="'zebra' is not in the text generator's vocabulary"):
        generator.check_requests([text_request("a photo of zebra", class_words={"car": ["zebra"]})])
    with pytest.raises(SegsynthError, match="names none of the dataset's classes"):
        generator.check_requests([text_request("a photo of a photo")])
    with pytest.raises(SegsynthError, match="not classes of the dataset"):
        generator.check_requests([text_request("a photo of sky", class_words={"cloud": ["sky"]})])
    with pytest.raises(SegsynthError, match="'road' is not in the prompt"):
        generator.check_requests([text_request("a photo of sky", class_words={"road": ["road"]})])
    with pytest.raises(SegsynthError, match="text prompts only"):
        generator.check_requests([Request("m_s0", "mask", 0, source="m")])
    with pytest.raises(SegsynthError, match=r"no cross-attention at resolution\(s\) \[4\].*it has \[8\]"):
        open_attention(f"attention:{text_generator}", dataset, pseudo_mask_settings={**SMALL, "resolutions": [4]})
    with pytest.raises(SegsynthError, match="unknown pseudo-mask preset 'best'"):
        open_attention(f"attention:{text_generator}", dataset, pseudo_mask="best")

    # A UNet without cross-attention layers has no word attention to read.
    from diffusers import UNet2DConditionModel

    broken = tmp_path / "no-cross"
    shutil.copytree(text_generator, broken)
    shutil.rmtree(broken / "unet")
    UNet2DConditionModel(sample_size=(16, 16), in_channels=12, out_channels=12, block_out_channels=(32, 32),
                         layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None, norm_num_groups=8,
                         cross_attention_dim=32).save_pretrained(broken / "unet")
    with pytest.raises(SegsynthError, match="no cross-attention layers"):
        open_attention(f"attention:{broken}", dataset, pseudo_mask_settings=SMALL)


def test_attention_sd_labels_tiny_stable_diffusion_samples(controlnet_dirs, dataset):
    base, _ = controlnet_dirs
    generator = open_attention(f"attention-sd:{base}", dataset, steps=2, pseudo_mask="diffumask",
                               pseudo_mask_settings={"resolutions": [8]})
    assert generator.working_size(None) == (32, 32)  # the tiny UNet's 16x16 latents x the VAE's factor 2
    requests = [text_request("a photo of sky and road", 5, {"sky": ["sky"], "road": ["road"]}),
                text_request("a car", 6, sample_id="b")]
    generator.check_requests(requests)
    samples = generator.generate([Condition(r, None, r.prompt) for r in requests])
    assert set(np.unique(samples[0].label)) <= {0, 2, 255} and set(np.unique(samples[1].label)) <= {5, 255}
    for sample in samples:
        assert sample.image.shape == (32, 32, 3) and sample.label.shape == (32, 32) and sample.weight.shape == (32, 32)
        assert sample.extras["attention"].shape == (32, 32, 3)
    assert generator.identity()["name"] == "attention-sd"
    with pytest.raises(SegsynthError, match="not in the prompt"):
        generator.check_requests([text_request("a photo of sky", class_words={"road": ["road"]})])
    with pytest.raises(SegsynthError, match=r"no cross-attention at resolution\(s\) \[16, 32, 64\]"):
        open_attention(f"attention-sd:{base}", dataset, pseudo_mask="diffumask")  # SD1.5's 16/32/64 at 512 px

    # Attention on a real image: noised once, one UNet call, per-class maps at the asked resolutions.
    image = dataset.split("val")[0].image
    class_ids, cross, _ = generator.attention_of_image(image, requests[0], 0.5, 0, [8])
    assert class_ids == [0, 2] and tuple(cross[8].shape) == (2, 8, 8) and torch.isfinite(cross[8]).all()
