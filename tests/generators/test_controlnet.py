"""The ControlNet backends with tiny random SD / SDXL components saved to tmp and loaded by path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segsynth.data import open_dataset, palettes
from segsynth.generators import GeneratorSettings, open_generator
from segsynth.generators.base import Request
from segsynth.generators.controlnet import class_colours, class_prompt
from segsynth.io import SegsynthError
from segsynth.plan import PlanConfig, make_plan
from segsynth.synthesize import SynthesizeConfig, synthesize

TOY = "toy:n=12,n_val=4,size=32"


def toy_masks(count=3):
    split = open_dataset(TOY).split("train")
    return [split.label(i) for i in range(count)]


def open_tiny(controlnet_dirs, **settings):
    base, controlnet = controlnet_dirs
    settings = {"controlnet": str(controlnet), "resolution": (32, 32), "steps": 2, **settings}
    generator = open_generator(f"controlnet:{base}", GeneratorSettings(**settings))
    dataset = open_dataset(TOY)
    generator.check_dataset(dataset.classes, dataset.palette)
    return generator


def same_pixels(a, b) -> bool:
    return max(np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(a, b)) <= 1.0


def write_folder_dataset(root, classes):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "images" / f"m{i}.png")
        Image.fromarray(np.full((32, 32), i % len(classes), np.uint8)).save(root / "masks" / f"m{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": classes}))
    return f"folder:{root}"


# --- the generator ------------------------------------------------------------------------------


def test_synthesize_with_sd_controlnet_prompts_with_present_class_names(tmp_path, controlnet_dirs):
    base, controlnet = controlnet_dirs
    plan = make_plan(PlanConfig(data=TOY, out=str(tmp_path / "plan.jsonl"), uniform=1, limit=2))
    summary = synthesize(SynthesizeConfig(data=TOY, plan=str(plan), generator=f"controlnet:{base}", out=str(tmp_path / "set"),
                                          controlnet=str(controlnet), resolution=[32, 32], steps=2, batch_size=2,
                                          negative_prompt="blurry", progress=False))
    assert summary["generated"] == 2
    records = [json.loads(line) for line in (tmp_path / "set" / "manifest.jsonl").read_text().splitlines()]
    dataset = open_dataset(TOY)
    assert records[0]["prompt"] == class_prompt(dataset.split("train").label(0), dataset.classes)
    assert records[0]["generator"]["name"] == "controlnet" and records[0]["generator"]["negative_prompt"] == "blurry"
    assert records[0]["guidance"] == 7.5 and records[0]["steps"] == 2 and records[0]["size"] == [32, 32]
    assert np.asarray(Image.open(tmp_path / "set" / records[0]["image"])).shape == (32, 32, 3)


def test_controlnet_pixels_do_not_depend_on_the_batch(controlnet_dirs):
    generator = open_tiny(controlnet_dirs)
    masks = toy_masks(3)
    prompts = [generator.prompt(Request("x_s0", "mask", 0, source="x"), m, open_dataset(TOY).classes) for m in masks]
    together = generator.render_masks(masks, prompts, [5, 6, 7])
    alone = [generator.render_masks([m], [p], [s])[0] for m, p, s in zip(masks, prompts, [5, 6, 7])]
    assert same_pixels(together, alone)
    assert together[0].shape == (32, 32, 3) and together[0].dtype == np.uint8


@pytest.mark.parametrize("scheduler", ["dpm++", "unipc", "ddim", "euler"])
def test_every_scheduler_samples(controlnet_dirs, scheduler):
    generator = open_tiny(controlnet_dirs, scheduler=scheduler)
    assert generator.identity()["scheduler"] == scheduler
    images = generator.render_masks(toy_masks(1), ["sky"], [0])
    assert images[0].shape == (32, 32, 3)


def test_lcm_lora_switches_to_lcm_defaults_and_stays_deterministic(tmp_path, controlnet_dirs):
    from segsynth.generators.testing import save_lcm_lora

    lora = save_lcm_lora(controlnet_dirs[0], tmp_path / "lcm-lora")
    generator = open_tiny(controlnet_dirs, lcm_lora=str(lora), steps=None)
    identity = generator.identity()
    assert (identity["scheduler"], identity["steps"], identity["guidance"]) == ("lcm", 6, 1.5)
    assert identity["lcm_lora"]["fingerprint"]
    masks = toy_masks(2)
    together = generator.render_masks(masks, ["sky", "road"], [1, 2])
    alone = [generator.render_masks([m], [p], [s])[0] for m, p, s in zip(masks, ["sky", "road"], [1, 2])]
    assert same_pixels(together, alone)


def test_sdxl_controlnet_generates(tmp_path):
    from segsynth.generators.testing import save_tiny_controlnet_models

    base, controlnet = save_tiny_controlnet_models(tmp_path, sdxl=True)
    generator = open_generator(f"controlnet-sdxl:{base}", GeneratorSettings(controlnet=str(controlnet), resolution=(32, 32), steps=2))
    dataset = open_dataset(TOY)
    generator.check_dataset(dataset.classes, dataset.palette)
    masks = toy_masks(2)
    together = generator.render_masks(masks, ["sky", "road"], [3, 4])
    alone = [generator.render_masks([m], [p], [s])[0] for m, p, s in zip(masks, ["sky", "road"], [3, 4])]
    assert same_pixels(together, alone)
    assert generator.identity()["name"] == "controlnet-sdxl"


def test_default_working_size_keeps_aspect_at_512_short_side(controlnet_dirs):
    generator = open_tiny(controlnet_dirs, resolution=None)
    height, width = generator.working_size((180, 240))
    assert height == 512 and abs(width - 512 * 240 / 180) <= generator.size_multiple
    assert height % generator.size_multiple == 0 and width % generator.size_multiple == 0


# --- colour maps and prompts ---------------------------------------------------------------------------


def test_ade20k_classes_get_the_ade20k_palette():
    table = class_colours(palettes.ADE20K_CLASSES, palettes.ADE20K_PALETTE, "ade20k")
    np.testing.assert_array_equal(table[:150], np.asarray(palettes.ADE20K_PALETTE, np.uint8))
    assert tuple(table[255]) == (0, 0, 0)  # ignore is black


def test_camvid_classes_map_onto_ade20k_names():
    table = class_colours(palettes.CAMVID_CLASSES, palettes.CAMVID_PALETTE, "ade20k")
    ade = dict(zip(palettes.ADE20K_CLASSES, palettes.ADE20K_PALETTE))
    expected = {"sky": "sky", "pavement": "sidewalk", "sign_symbol": "signboard", "pedestrian": "person",
                "bicyclist": "bicycle", "car": "car"}
    for name, ade_name in expected.items():
        assert tuple(table[palettes.CAMVID_CLASSES.index(name)]) == ade[ade_name]


def test_a_class_without_colour_is_an_error_naming_it_and_the_fix():
    with pytest.raises(SegsynthError, match=r"flibbertigibbet.*--colour-map"):
        class_colours(["sky", "flibbertigibbet"], [(0, 0, 0), (1, 1, 1)], "ade20k")


def test_colour_map_file_overrides_by_name_or_rgb(tmp_path):
    path = tmp_path / "colours.json"
    path.write_text(json.dumps({"flibbertigibbet": "tree", "sky": [1, 2, 3]}))
    table = class_colours(["sky", "flibbertigibbet"], [(0, 0, 0), (1, 1, 1)], str(path))
    assert tuple(table[0]) == (1, 2, 3)
    assert tuple(table[1]) == palettes.ADE20K_PALETTE[palettes.ADE20K_CLASSES.index("tree")]
    path.write_text(json.dumps({"flibbertigibbet": [300, 0, 0]}))
    with pytest.raises(SegsynthError, match="r, g, b"):
        class_colours(["sky", "flibbertigibbet"], [(0, 0, 0), (1, 1, 1)], str(path))


def test_dataset_colour_map_uses_the_dataset_palette():
    table = class_colours(["a", "b"], [(10, 20, 30), (40, 50, 60)], "dataset")
    assert tuple(table[1]) == (40, 50, 60)


def test_missing_colour_fails_synthesize_before_compute(tmp_path, controlnet_dirs):
    base, controlnet = controlnet_dirs
    data = write_folder_dataset(tmp_path / "data", ["sky", "flibbertigibbet"])
    plan = make_plan(PlanConfig(data=data, out=str(tmp_path / "plan.jsonl"), uniform=1))
    with pytest.raises(SegsynthError, match="flibbertigibbet"):
        synthesize(SynthesizeConfig(data=data, plan=str(plan), generator=f"controlnet:{base}", out=str(tmp_path / "set"),
                                    controlnet=str(controlnet), resolution=[32, 32], progress=False))
    assert not (tmp_path / "set").exists()


def test_class_prompt_lists_present_classes_in_class_order():
    mask = np.array([[3, 3, 0], [255, 10, 10]], np.uint8)
    assert class_prompt(mask, palettes.CAMVID_CLASSES) == "sky, road, bicyclist"


def test_captions_file_gives_the_prompts_and_must_cover_the_plan(tmp_path, controlnet_dirs):
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"id": "toy_train_00000", "caption": "a rainy street"}\n')
    generator = open_tiny(controlnet_dirs, captions=str(captions))
    request = Request("toy_train_00000_s0", "mask", 0, source="toy_train_00000")
    assert generator.prompt(request, toy_masks(1)[0], open_dataset(TOY).classes) == "a rainy street"
    with pytest.raises(SegsynthError, match="no caption for 1 mask"):
        generator.check_requests([request, Request("toy_train_00001_s0", "mask", 0, source="toy_train_00001")])
    # a caption the plan carries wins over the file
    planned = Request("toy_train_00001_s0", "mask", 0, source="toy_train_00001", prompt="a sunny road")
    generator.check_requests([planned])
    assert generator.prompt(planned, toy_masks(1)[0], open_dataset(TOY).classes) == "a sunny road"


# --- bad settings and folders ---------------------------------------------------------------------------


def test_controlnet_folder_without_weights(tmp_path, controlnet_dirs):
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text("{}")
    with pytest.raises(SegsynthError, match="missing diffusion_pytorch_model.safetensors"):
        open_generator(f"controlnet:{controlnet_dirs[0]}", GeneratorSettings(controlnet=str(tmp_path / "cn")))


def test_base_model_folder_that_does_not_exist(tmp_path, controlnet_dirs):
    with pytest.raises(SegsynthError, match="no such folder"):
        open_generator(f"controlnet:{tmp_path / 'sd15'}", GeneratorSettings(controlnet=str(controlnet_dirs[1])))


def test_base_model_folder_without_model_index(tmp_path, controlnet_dirs):
    (tmp_path / "sd").mkdir()
    with pytest.raises(SegsynthError, match="model_index.json"):
        open_generator(f"controlnet:{tmp_path / 'sd'}", GeneratorSettings(controlnet=str(controlnet_dirs[1])))


def test_controlnet_generator_needs_a_controlnet(controlnet_dirs):
    with pytest.raises(SegsynthError, match="needs --controlnet"):
        open_generator(f"controlnet:{controlnet_dirs[0]}", GeneratorSettings())


def test_lcm_scheduler_needs_an_lcm_lora(controlnet_dirs):
    with pytest.raises(SegsynthError, match="needs --lcm-lora"):
        open_generator(f"controlnet:{controlnet_dirs[0]}", GeneratorSettings(controlnet=str(controlnet_dirs[1]), scheduler="lcm"))


def test_unknown_scheduler_lists_the_options(controlnet_dirs):
    with pytest.raises(SegsynthError, match="dpm\\+\\+, unipc, ddim, euler"):
        open_generator(f"controlnet:{controlnet_dirs[0]}", GeneratorSettings(controlnet=str(controlnet_dirs[1]), scheduler="heun"))
