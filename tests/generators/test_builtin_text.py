"""The builtin text generator: word tokens, the saved folder, resume, determinism, guidance, and that it learns."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import segsynth.generators.training_loop as training_loop
from segsynth.data import Sample, open_dataset
from segsynth.generators.base import Condition, GeneratorSettings, Request
from segsynth.generators.builtin_text import (
    BuiltinTextGenerator,
    TrainTextGeneratorConfig,
    WordTokenizer,
    class_prompt,
    present_classes,
    target_image,
    train_text_generator,
)
from segsynth.io import SegsynthError

TOY = "toy:n=8,n_val=4,size=32"
TINY = dict(size=[32, 32], channels=[32, 64], layers_per_block=1, text_width=32, batch_size=2, warmup=2,
            log_every=1, sample_steps=3, device="cpu")


@pytest.fixture(scope="module")
def text_generator_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "generator"
    return train_text_generator(TrainTextGeneratorConfig(data=TOY, out=str(out), iterations=3, **TINY))


# --- the tokenizer ----------------------------------------------------------------------


def test_a_class_name_is_one_token_and_token_index_finds_it(tmp_path):
    classes = ["sky", "traffic light", "wall-brick", "sign_symbol"]
    prompts = ["a photo of sky, traffic light", "A Photo of wall-brick, sign_symbol"]
    tokenizer = WordTokenizer.build(prompts, phrases=classes)
    assert tokenizer.max_length == 8  # longest prompt: 6 words + <bos>/<eos>, rounded up to 8
    for name in classes:
        assert len(tokenizer.words(name)) == 1, name
    ids = tokenizer(["a photo of sky, traffic light", "sky"]).tolist()
    assert ids[0][0] == tokenizer.bos_id and ids[0][6] == tokenizer.ids["traffic light"] and ids[0][7] == tokenizer.eos_id
    assert ids[1] == [tokenizer.bos_id, tokenizer.ids["sky"], tokenizer.eos_id] + [tokenizer.pad_id] * 5
    assert tokenizer.token_index("a photo of sky, traffic light", "traffic light") == [6]
    assert tokenizer.token_index("a photo of sky, traffic light", "Traffic  Light") == [6]
    assert tokenizer.token_index("sky, SKY", "sky") == [1, 3]  # lowercased; every occurrence
    assert tokenizer.token_index("a photo of sky", "wall-brick") == []
    with pytest.warns(UserWarning, match="!"):
        assert tokenizer.decode(tokenizer(["A PHOTO of sign_symbol!"])[0]) == "a photo of sign_symbol <unk>"
    with pytest.raises(SegsynthError, match="not in the generator's vocabulary"):
        tokenizer.token_index("a photo of sky", "zebra")
    tokenizer.save(tmp_path / "tokenizer")
    assert WordTokenizer.load(tmp_path / "tokenizer") == tokenizer


def test_unknown_words_become_unk_and_are_reported():
    tokenizer = WordTokenizer.build(["a photo of sky"])
    with pytest.warns(UserWarning, match="zebra"):
        ids = tokenizer(["a photo of zebra"])[0].tolist()
    assert ids[4] == tokenizer.unk_id and tokenizer.unknown_words == {"zebra"}
    with pytest.warns(UserWarning, match="longer than"):
        assert tokenizer(["sky " * 20]).shape == (1, tokenizer.max_length)


# --- prompts and targets ----------------------------------------------------------------


def test_class_prompts_list_present_classes_in_class_order():
    label = np.full((20, 20), 2, np.uint8)
    label[:10] = 0
    label[0, 0] = 1  # 1 pixel of 400: under 0.5%, left out
    label[19, 19] = 255
    assert present_classes(label, 3) == [0, 2]
    assert class_prompt(["sky", "road"]) == "a photo of sky, road" and class_prompt([]) == ""


def test_colour_mask_target_uses_the_coding_palette_with_ignore_last():
    palette = [(0, 0, 0), (10, 20, 30), (255, 255, 255)]  # classes 0 and 1, then the ignore colour
    sample = Sample("s", np.zeros((2, 2, 3), np.uint8), np.array([[0, 1], [255, 1]], np.uint8))
    colours = target_image(sample, "colour-mask", palette)
    assert colours[0, 1].tolist() == [10, 20, 30] and colours[0, 0].tolist() == [0, 0, 0]
    assert colours[1, 0].tolist() == [255, 255, 255]
    assert target_image(sample, "image", palette) is not None
    with pytest.raises(SegsynthError, match="options: image, colour-mask"):
        target_image(sample, "depth", palette)


def test_captions_file_must_cover_every_training_sample(tmp_path):
    captions = tmp_path / "captions.jsonl"
    ids = open_dataset(TOY).split("train").ids
    captions.write_text("".join(json.dumps({"id": i, "caption": "a street"}) + "\n" for i in ids[:-1]))
    with pytest.raises(SegsynthError, match=f"no caption for 1 of the 8 .*{ids[-1]}"):
        train_text_generator(TrainTextGeneratorConfig(data=TOY, out=str(tmp_path / "g"), prompts=str(captions),
                                                      iterations=1, **TINY))
    with pytest.raises(SegsynthError, match="'classes' or the path"):
        train_text_generator(TrainTextGeneratorConfig(data=TOY, out=str(tmp_path / "g"), prompts="nope.jsonl", **TINY))


def test_colour_masks_from_captions_train_and_load(tmp_path):
    captions = tmp_path / "captions.jsonl"
    ids = open_dataset(TOY).split("train").ids
    captions.write_text("".join(json.dumps({"id": i, "caption": f"street number {n} with a car"}) + "\n"
                                for n, i in enumerate(ids)))
    folder = train_text_generator(TrainTextGeneratorConfig(data=TOY, out=str(tmp_path / "g"), target="colour-mask",
                                                           prompts=str(captions), iterations=1, **TINY))
    meta = json.loads((folder / "segsynth_generator.json").read_text())
    assert meta["target"] == "colour-mask" and meta["prompts"] == "captions" and meta["prompt_template"] is None
    tokenizer = BuiltinTextGenerator(folder).tokenizer
    assert {"street", "7", "car", "sky"} <= set(tokenizer.tokens)  # caption words, and every class name


# --- the trained folder -------------------------------------------------------------------


def test_trained_folder_is_diffusers_style_and_loads(text_generator_dir):
    folder = text_generator_dir
    for name in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json",
                 "segsynth_generator.json", "train_log.jsonl", "training_state/optimizer.safetensors"):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / "segsynth_generator.json").read_text())
    assert meta["format"] == "segsynth-builtin-text-generator/1" and meta["target"] == "image"
    assert meta["classes"] == list(open_dataset(TOY).classes) and meta["size"] == [32, 32]
    assert meta["prompts"] == "classes" and meta["training"] == {**meta["training"], "iterations": 3, "finished": True}
    assert meta["vocab_size"] == len(WordTokenizer.load(folder / "tokenizer"))
    generator = BuiltinTextGenerator(folder)
    assert generator.working_size(None) == (32, 32) and generator.steps == 3 and generator.guidance == 3.0
    assert generator.identity()["fingerprint"] and generator.request_kinds == ("text",) and generator.uses_prompts
    # the prompt reaches the UNet through cross-attention layers an attention capture can replace
    assert any(name.endswith("attn2.processor") for name in generator.unet.attn_processors)
    assert len(generator.tokenizer.token_index("a photo of sky, road, car", "car")) == 1


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    settings = dict(data=TOY, iterations=5, save_every=2, **TINY)
    straight = train_text_generator(TrainTextGeneratorConfig(out=str(tmp_path / "straight"), **settings))

    class Killed(Exception):
        pass

    original = training_loop._report_speed

    def kill_after_three(name, done_here, *rest):
        if done_here == 3:  # after the save at iteration 2, before the next one
            raise Killed
        return original(name, done_here, *rest)

    monkeypatch.setattr(training_loop, "_report_speed", kill_after_three)
    with pytest.raises(Killed):
        train_text_generator(TrainTextGeneratorConfig(out=str(tmp_path / "resumed"), **settings))
    monkeypatch.setattr(training_loop, "_report_speed", original)
    resumed = train_text_generator(TrainTextGeneratorConfig(out=str(tmp_path / "resumed"), resume=True, **settings))

    meta = json.loads((resumed / "segsynth_generator.json").read_text())
    assert meta["training"]["resumed_at"] == 2 and meta["training"]["iterations"] == 5
    for weights in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                    "training_state/weights.safetensors", "training_state/optimizer.safetensors"):
        expected, got = load_file(straight / weights), load_file(resumed / weights)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), weights
    logged = [json.loads(line)["iteration"] for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]
    with pytest.raises(SegsynthError, match=r"settings differ .*\(lr\)"):
        train_text_generator(TrainTextGeneratorConfig(out=str(tmp_path / "resumed"), resume=True,
                                                      **{**settings, "lr": 1e-3}))


# --- sampling -------------------------------------------------------------------------------


def test_sampling_is_deterministic_and_batch_independent(text_generator_dir):
    generator = BuiltinTextGenerator(text_generator_dir)
    prompts, seeds = ["a photo of sky, road", "a photo of car", "a photo of tree"], [10, 11, 12]
    together = generator.sample_prompts(prompts, seeds)
    alone = [generator.sample_prompts([p], [s])[0] for p, s in zip(prompts, seeds)]
    for a, b in zip(together, alone):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
    again = generator.sample_prompts(prompts[:1], seeds[:1])[0]
    np.testing.assert_array_equal(again.image, alone[0].image)
    assert together[0].image.shape == (32, 32, 3) and together[0].image.dtype == np.uint8
    assert together[0].label.shape == (32, 32) and (together[0].label == 255).all()
    assert together[0].meta == {"prompt": prompts[0]}
    assert not np.array_equal(together[0].image, together[1].image)


def test_guidance_changes_the_sample_and_each_step_calls_the_hook(text_generator_dir):
    plain = BuiltinTextGenerator(text_generator_dir, GeneratorSettings(guidance=1.0, steps=4))
    guided = BuiltinTextGenerator(text_generator_dir, GeneratorSettings(guidance=5.0, steps=4))
    prompt, seed = "a photo of sky, road", 3
    assert not np.array_equal(plain.sample_prompts([prompt], [seed])[0].image,
                              guided.sample_prompts([prompt], [seed])[0].image)
    calls = []
    prepared = guided.prepare([_condition(prompt, seed)])  # the plan's path: conditions -> prepare
    sample = guided.denoise(prepared, on_step=lambda index, timestep: calls.append((index, int(timestep))))
    assert sample.shape == (1, 12, 16, 16)
    assert [index for index, _ in calls] == [0, 1, 2, 3]
    assert [t for _, t in calls] == sorted((t for _, t in calls), reverse=True)


def _condition(prompt: str, seed: int) -> Condition:
    return Condition(Request(f"p_s{seed}", "text", seed, prompt=prompt), None, prompt)


def test_generator_refuses_bad_folders_settings_and_requests(text_generator_dir, tmp_path):
    with pytest.raises(SegsynthError, match="does not exist"):
        BuiltinTextGenerator(tmp_path / "nothing")
    broken = shutil.copytree(text_generator_dir, tmp_path / "broken")
    (broken / "text_encoder" / "model.safetensors").unlink()
    (broken / "tokenizer" / "vocab.json").unlink()
    with pytest.raises(SegsynthError, match="missing text_encoder/model.safetensors, tokenizer/vocab.json"):
        BuiltinTextGenerator(broken)
    with pytest.raises(SegsynthError, match="not consistency-distilled"):
        BuiltinTextGenerator(text_generator_dir, GeneratorSettings(scheduler="lcm"))
    with pytest.raises(SegsynthError, match="takes no controlnet"):
        BuiltinTextGenerator(text_generator_dir, GeneratorSettings(controlnet="x"))
    generator = BuiltinTextGenerator(text_generator_dir)
    with pytest.raises(SegsynthError, match="text prompts only"):
        generator.check_requests([Request("m_s0", "mask", 0, source="m")])
    with pytest.raises(SegsynthError, match="trained on classes"):
        generator.check_dataset(["a", "b"], [(0, 0, 0), (1, 1, 1)])


# --- it learns its prompts --------------------------------------------------------------------


def _red_or_blue_dataset(root, count=16, size=16):
    """Every image is flat red (class "red") or flat blue (class "blue"): the prompt alone decides the colour."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        image = np.zeros((size, size, 3), np.uint8)
        image[..., 0 if i % 2 == 0 else 2] = 255
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(np.full((size, size), i % 2, np.uint8)).save(root / "masks" / f"{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": ["red", "blue"]}))
    return f"folder:{root}"


def test_the_prompt_decides_the_colour_after_brief_training(tmp_path):
    # 100 iterations at 16x16 (~8 s): the red-minus-blue margin was 230-360 over seeds 0-4 (60 iterations: 10-150)
    data = _red_or_blue_dataset(tmp_path / "data")
    folder = train_text_generator(TrainTextGeneratorConfig(
        data=data, out=str(tmp_path / "g"), size=[16, 16], channels=[32, 64], layers_per_block=1, iterations=100,
        batch_size=8, lr=1e-3, warmup=10, ema_decay=0.9, log_every=50, save_every=1000, sample_steps=8, device="cpu"))
    generator = BuiltinTextGenerator(folder)
    red, blue = (sample.image.astype(float) for sample in generator.sample_prompts(
        ["a photo of red", "a photo of blue"], [5, 5]))
    redness = [(image[..., 0] - image[..., 2]).mean() for image in (red, blue)]
    assert redness[0] - redness[1] > 100, redness


def test_a_run_that_spends_its_time_budget_is_finished(tmp_path):
    folder = train_text_generator(TrainTextGeneratorConfig(data=TOY, out=str(tmp_path / "g"), iterations=1000,
                                                           max_minutes=1e-7, **TINY))
    training = json.loads((folder / "segsynth_generator.json").read_text())["training"]
    assert training["finished"] and training["stopped_by"] == "max_minutes" and training["iterations"] < 1000


def test_class_word_keys_leave_only_class_tokens_and_bos_to_attend_to(tmp_path):
    from segsynth.generators.builtin_text.model import key_mask

    folder = train_text_generator(TrainTextGeneratorConfig(data=TOY, out=str(tmp_path / "g"), iterations=2,
                                                           keys="class-words", text_layers=0, **TINY))
    meta = json.loads((folder / "segsynth_generator.json").read_text())
    generator = BuiltinTextGenerator(folder)
    tokenizer = generator.tokenizer
    assert meta["keys"] == "class-words" and generator.keys == "class-words"
    assert [tokenizer.tokens[i] for i in meta["class_token_ids"]] == list(open_dataset(TOY).classes)
    ids = tokenizer(["a photo of sky, car", ""])
    mask = generator.key_mask(ids)
    kept = [[tokenizer.tokens[int(t)] for t, m in zip(row, mask_row) if m] for row, mask_row in zip(ids, mask)]
    assert kept == [["<bos>", "sky", "car"], ["<bos>"]]
    assert key_mask(ids, "all", meta["class_token_ids"], tokenizer.bos_id) is None
    with pytest.raises(SegsynthError, match="options: all, class-words"):
        key_mask(ids, "nouns", meta["class_token_ids"], tokenizer.bos_id)
    # the mask reaches the UNet: masking a class token out changes the prediction, keys 'all' ignore no token
    states = generator.text_encoder(input_ids=ids[:1]).last_hidden_state
    noisy = torch.randn(1, 12, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = generator.unet(noisy, 500, encoder_hidden_states=states, encoder_attention_mask=mask[:1]).sample
        unmasked = generator.unet(noisy, 500, encoder_hidden_states=states).sample
    assert not torch.allclose(masked, unmasked)
    sample = generator.sample_prompts(["a photo of sky, car"], [1])[0]
    assert sample.image.shape == (32, 32, 3)


def test_class_word_keys_need_class_prompts(tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": i, "caption": "a road"}) + "\n" for i in open_dataset(TOY).split("train").ids))
    with pytest.raises(SegsynthError, match="--keys class-words needs --prompts classes"):
        train_text_generator(TrainTextGeneratorConfig(data=TOY, out=str(tmp_path / "g"), iterations=2,
                                                      keys="class-words", prompts=str(captions), **TINY))
