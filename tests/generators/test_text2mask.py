"""text2mask:DIR -- a colour-mask text generator whose samples are decoded to labels by its stored palette."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from segsynth.data import open_dataset
from segsynth.formats.manifest import read_manifest
from segsynth.formats.plan import PlanEntry, write_plan
from segsynth.generators import open_generator
from segsynth.generators.base import Condition, Request
from segsynth.generators.builtin_text import TrainTextGeneratorConfig, train_text_generator
from segsynth.generators.builtin_text.model import encode_images
from segsynth.io import SegsynthError
from segsynth.methods.seggen.colour import encode_mask, separated_palette
from segsynth.stage_configs import SynthesizeConfig
from segsynth.synthesize import synthesize

TOY = "toy:n=6,n_val=2,size=32"
TINY = dict(size=[32, 32], channels=[32, 64], layers_per_block=1, text_width=32, batch_size=2, warmup=1,
            log_every=1, sample_steps=2, device="cpu")


@pytest.fixture(scope="module")
def mask_generator_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("text2mask") / "generator"
    return train_text_generator(TrainTextGeneratorConfig(data=TOY, out=str(out), target="colour-mask", iterations=2,
                                                         decode_max_distance=90.0, **TINY))


def test_folder_stores_the_separated_palette_and_samples_decode_by_it(mask_generator_dir, monkeypatch):
    classes = open_dataset(TOY).classes
    meta = json.loads((mask_generator_dir / "segsynth_generator.json").read_text())
    assert meta["colour_coding"]["choice"] == "separated"
    assert meta["colour_coding"]["palette"] == separated_palette(len(classes)).tolist()
    generator = open_generator(f"text2mask:{mask_generator_dir}")
    assert generator.identity()["name"] == "text2mask" and generator.identity()["decoding"]["palette"]
    assert meta["colour_coding"]["max_distance"] == generator.max_distance == 90.0

    # The model's output is decoded by the stored palette: feed a known colour map through `run`.
    label = np.zeros((32, 32), np.uint8)
    label[:, 16:] = 2
    label[:4] = 255
    colours = encode_mask(label, generator.coding_palette)
    monkeypatch.setattr(generator, "denoise", lambda prepared, on_step=None: encode_images(
        torch.from_numpy(colours).permute(2, 0, 1)[None].float()))
    condition = Condition(Request("c_s0", "text", 0, prompt="sky at the top"), None, "sky at the top")
    prepared = generator.prepare([condition])
    [drawn] = generator.run(prepared)
    assert drawn.label is None  # decoding is left to `finish` (synthesize's writer thread)
    [sample] = generator.finish(prepared, [drawn])
    assert np.array_equal(sample.label, label)
    assert np.array_equal(sample.image, colours) and np.array_equal(sample.extras["colour_mask"], colours)
    assert sample.meta["prompt"] == "sky at the top"


def test_synthesize_writes_a_mask_set_with_decoded_labels_and_colour_maps(mask_generator_dir, tmp_path):
    plan = write_plan(tmp_path / "text.jsonl", [PlanEntry("street", [0, 1], kind="text", prompt="road across the bottom"),
                                                PlanEntry("sky", [2], kind="text", prompt="sky at the top")])
    out = tmp_path / "masks"
    synthesize(SynthesizeConfig(data=TOY, plan=str(plan), generator=f"text2mask:{mask_generator_dir}", out=str(out),
                                batch_size=2, device="cpu", progress=False))
    records = read_manifest(out)
    assert [r["id"] for r in records] == ["sky_s2", "street_s0", "street_s1"]
    num_classes = len(open_dataset(TOY).classes)
    mask_set = open_dataset(f"synthetic-raw:{out}").split("train")
    for index, record in enumerate(records):
        assert record["kind"] == "text" and record["source"] is None and record["generator"]["name"] == "text2mask"
        assert record["meta"]["prompt"] == record["prompt"] != ""
        sample = mask_set[index]
        assert sample.id == record["id"] and sample.label.shape == (32, 32)
        assert set(np.unique(sample.label)) <= set(range(num_classes)) | {255}
        assert np.array_equal(np.asarray(Image.open(out / record["extras"]["colour_mask"])), sample.image)


def test_rendering_a_mask_set_records_caption_and_both_generators(mask_generator_dir, builtin_dir, tmp_path):
    """MaskSyn as files: text -> mask set, then a mask -> image generator renders it (--data synthetic-raw:SET)."""
    from segsynth.plan import PlanConfig, make_plan

    text_plan = write_plan(tmp_path / "text.jsonl", [PlanEntry("street", [0, 1], kind="text", prompt="a photo of road")])
    masks = tmp_path / "masks"
    synthesize(SynthesizeConfig(data=TOY, plan=str(text_plan), generator=f"text2mask:{mask_generator_dir}",
                                out=str(masks), device="cpu", progress=False))
    mask_set = f"synthetic-raw:{masks}"
    plan = make_plan(PlanConfig(data=mask_set, out=str(tmp_path / "render.jsonl"), uniform=1, seed=100))
    rendered = tmp_path / "rendered"
    synthesize(SynthesizeConfig(data=mask_set, plan=str(plan), generator=f"builtin:{builtin_dir}", out=str(rendered),
                                device="cpu", progress=False))
    mask_records = {r["id"]: r for r in read_manifest(masks)}
    records = read_manifest(rendered)
    assert [r["id"] for r in records] == ["street_s0_s100", "street_s1_s101"]
    for record in records:
        source = record["meta"]["source"]
        assert record["generator"]["name"] == "builtin" and source["generator"]["name"] == "text2mask"
        assert source == {"set": str(masks.resolve()), "id": record["source"], "prompt": "a photo of road",
                          "generator": mask_records[record["source"]]["generator"]}
        rendered_mask = np.asarray(Image.open(rendered / record["mask"]))
        assert np.array_equal(rendered_mask, np.asarray(Image.open(masks / mask_records[record["source"]]["mask"])))


def test_an_image_target_folder_is_refused(mask_generator_dir, tmp_path):
    image_target = shutil.copytree(mask_generator_dir, tmp_path / "image-target")
    meta_path = image_target / "segsynth_generator.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "target": "image"}))
    with pytest.raises(SegsynthError, match=f"{meta_path}: target 'image'; text2mask:DIR needs .*colour-mask"):
        open_generator(f"text2mask:{image_target}")
    meta_path.write_text(json.dumps({**meta, "colour_coding": None}))
    with pytest.raises(SegsynthError, match="no \"colour_coding\" palette"):
        open_generator(f"text2mask:{image_target}")


def test_a_text_plan_given_to_a_mask_to_image_generator_is_refused(tmp_path):
    from segsynth.run import TOY_GENERATOR

    plan = write_plan(tmp_path / "text.jsonl", [PlanEntry("street", [0], kind="text", prompt="a road")])
    with pytest.raises(SegsynthError, match=f"{plan}: has text request\\(s\\), but generator builtin:.* takes only "
                                            "mask requests"):
        synthesize(SynthesizeConfig(data="toy:n=4,n_val=2,size=64x80", plan=str(plan),
                                    generator=f"builtin:{TOY_GENERATOR}", out=str(tmp_path / "o"), device="cpu",
                                    progress=False))


def test_decode_max_distance_defaults_to_the_colour_codings():
    from segsynth.methods.seggen.colour import MAX_DISTANCE

    assert TrainTextGeneratorConfig(data="x", out="y").decode_max_distance == MAX_DISTANCE


@pytest.mark.parametrize("text, message", [
    ('{"id": "toy_train_00000", "caption": "sky"}\n{"id": "street_9", "caption": "sky"}\n',
     r"captions.jsonl: 1 id\(s\) are not masks of this split: 'street_9' \(line 2\)"),
    ('{"id": "toy_train_00000", "caption": ""}\n', r"captions.jsonl:1: the caption of 'toy_train_00000' is empty"),
])
def test_training_refuses_captions_files_with_unknown_ids_or_empty_captions(tmp_path, text, message):
    captions = tmp_path / "captions.jsonl"
    captions.write_text(text)
    with pytest.raises(SegsynthError, match=message):
        train_text_generator(TrainTextGeneratorConfig(data=TOY, out=str(tmp_path / "g"), target="colour-mask",
                                                      prompts=str(captions), iterations=1, **TINY))
