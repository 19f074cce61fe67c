"""SegGen captions: mask descriptions, captions files, and the make_captions stage (mask, file and BLIP-2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from segsynth.data import open_dataset
from segsynth.io import SegsynthError
from segsynth.methods.seggen.captions import (
    CaptionConfig,
    caption_from_mask,
    make_captions,
    pluralise,
    read_captions,
    write_captions,
)

TOY = "toy:n=6,n_val=2,size=48x64"
CLASSES = ("sky", "building", "road", "car", "sign")
SKY, BUILDING, ROAD, CAR, SIGN = range(5)


def street() -> np.ndarray:
    """60 x 90: sky over the top quarter, road under the bottom quarter, a building on the left, two cars."""
    label = np.full((60, 90), 255, np.uint8)
    label[:15] = SKY
    label[45:] = ROAD
    label[15:45, :30] = BUILDING
    label[30:40, 35:50] = CAR
    label[30:40, 55:70] = CAR
    label[20:22, 80:82] = SIGN  # 4 pixels, under 1%: not named
    return label


# --- captions from masks -----------------------------------------------------------------


def test_a_street_is_described_by_area_place_and_count():
    assert caption_from_mask(street(), CLASSES) == (
        "sky across the top, road across the bottom, building on the left, two cars in the middle")


def test_one_piece_is_not_counted_and_small_classes_are_small():
    label = street()
    label[30:40, 55:70] = 255  # one car left: 150 pixels, under 5% of the image
    label[3:8, 70:85] = SIGN  # inside the sky, at the top right
    caption = caption_from_mask(label, CLASSES)
    assert "small car in the middle" in caption and "cars" not in caption
    assert caption.endswith("small sign at the top right")


def test_pieces_are_counted_up_to_several_but_stuff_is_never_counted():
    label = np.full((40, 100), ROAD, np.uint8)
    for x in range(5, 100, 20):  # five separate cars
        label[25:35, x:x + 10] = CAR
    label[:10, :40] = SKY  # sky in two pieces, split by a building
    label[:10, 40:60] = BUILDING
    label[:10, 60:] = SKY
    caption = caption_from_mask(label, CLASSES)
    assert "several cars at the bottom" in caption
    assert "sky across the top" in caption and "two sky" not in caption


def test_tall_classes_go_down_and_corners_are_named():
    label = np.full((60, 60), ROAD, np.uint8)
    label[:, 50:56] = BUILDING  # a tall strip on the right: 10% of the image
    label[:12, :12] = SKY
    caption = caption_from_mask(label, CLASSES)
    assert "building down the right" in caption and "sky at the top left" in caption


def test_empty_and_tiny_masks_still_get_a_caption():
    assert caption_from_mask(np.full((10, 10), 255, np.uint8), CLASSES) == "an unlabelled scene"
    label = np.full((100, 100), 255, np.uint8)
    label[0, 0] = CAR  # 0.01%: below the threshold, but the only class there is
    assert caption_from_mask(label, CLASSES) == "small car at the top left"


@pytest.mark.parametrize("name, plural", [
    ("car", "cars"), ("person", "people"), ("bus", "buses"), ("traffic light", "traffic lights"),
    ("chest of drawers", "chests of drawers"), ("pony", "ponies"), ("toy", "toys"), ("bench", "benches"),
])
def test_pluralise(name, plural):
    assert pluralise(name) == plural


def test_class_names_with_underscores_read_as_words():
    label = np.zeros((20, 20), np.uint8)
    label[5:8, 2:5] = label[12:15, 12:15] = 1
    assert "two small sign symbols" in caption_from_mask(label, ("road", "sign_symbol"))


# --- captions files ------------------------------------------------------------------------

IDS = ["a", "b", "c"]


def write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_read_json_and_jsonl_captions(tmp_path):
    as_json = write(tmp_path, "c.json", json.dumps({"a": "a red car", "b": "a road"}))
    assert read_captions(as_json, IDS) == {"a": "a red car", "b": "a road"}
    as_jsonl = write(tmp_path, "c.jsonl", '{"id": "a", "caption": "a red car"}\n\n{"id": "c", "text": "sky"}\n')
    assert read_captions(as_jsonl, IDS) == {"a": "a red car", "c": "sky"}
    assert read_captions(as_jsonl, None) == {"a": "a red car", "c": "sky"}


def test_write_captions_round_trips(tmp_path):
    captions = {"b": "straße im regen", "a": "two cars"}
    write_captions(tmp_path / "out" / "captions.jsonl", captions)
    assert list(read_captions(tmp_path / "out" / "captions.jsonl", IDS).items()) == list(captions.items())


@pytest.mark.parametrize("name, content, message", [
    ("c.jsonl", '{"id": "a", "caption": "x"}\n{"id": "zz", "caption": "y"}\n{"id": "q", "caption": "z"}\n',
     "2 id\\(s\\) are not masks of this split: 'zz' \\(line 2\\), 'q' \\(line 3\\)"),
    ("c.json", json.dumps({f"x{i}": "t" for i in range(8)}),
     "8 id\\(s\\) are not masks.*'x4' \\(line 1\\) and 3 more"),
    ("c.jsonl", '{"id": "a", "caption": "x"}\n{"id": "b", "caption": "  "}\n', "c.jsonl:2: the caption of 'b' is empty"),
    ("c.json", '{\n"a": "x",\n"b": ""\n}', "c.json:3: the caption of 'b' is empty"),
    ("c.jsonl", b'{"id": "a", "caption": "x"}\n{"id": "b", "caption": "caf\xe9"}\n', "c.jsonl:2: not UTF-8"),
    ("c.jsonl", '{"id": "a", "caption": "x"}\n{"id": "b", "caption": \n', "c.jsonl:2: not valid JSON"),
    ("c.json", '{"a": "x",\n "b": "y",\n}', "c.json:3: not valid JSON"),
    ("c.jsonl", '{"id": "a", "caption": "x"}\n{"id": "b"}\n', "c.jsonl:2: .*\"id\" string and a \"caption\""),
    ("c.jsonl", '{"id": "a", "caption": "x"}\n{"id": "b", "caption": "y"}\n{"id": "a", "caption": "z"}\n',
     "c.jsonl:3: id 'a' already has a caption \\(line 1\\)"),
    ("c.json", '{"a": "x",\n "a": "y"}', "c.json:1: id 'a' appears twice"),
    ("c.json", '{"a": 3}', "the caption of 'a' must be a string"),
    ("c.json", '["a", "b"]', "must be one JSON object"),
    ("c.txt", "a: x\n", "name it .json .* or .jsonl"),
])
def test_bad_captions_files_are_refused_with_file_and_line(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(SegsynthError, match=message) as error:
        read_captions(path, IDS)
    assert str(path) in str(error.value)


def test_missing_captions_file(tmp_path):
    with pytest.raises(SegsynthError, match="file not found"):
        read_captions(tmp_path / "none.json", IDS)


# --- the stage ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    return open_dataset(TOY)


def read_output(path: Path) -> dict[str, str]:
    return {record["id"]: record["caption"] for record in map(json.loads, path.read_text().splitlines())}


def test_make_captions_from_masks(tmp_path, toy):
    path = make_captions(CaptionConfig(data=TOY, out=str(tmp_path / "caps")))
    assert path == tmp_path / "caps" / "captions.jsonl"
    split = toy.split("train")
    assert read_output(path) == {split.ids[i]: caption_from_mask(split[i].label, toy.classes) for i in range(len(split))}
    saved = yaml.safe_load((tmp_path / "caps" / "captions.config.yaml").read_text())
    assert saved["captioner"] == "mask" and saved["data"] == TOY


def test_make_captions_from_a_file_keeps_split_order(tmp_path, toy):
    ids = toy.split("train").ids
    given = write(tmp_path, "given.json", json.dumps({i: f"caption of {i}" for i in reversed(ids)}))
    path = make_captions(CaptionConfig(data=TOY, out=str(tmp_path / "caps"), captioner="file", captions=str(given)))
    assert list(read_output(path).items()) == [(i, f"caption of {i}") for i in ids]


def test_make_captions_refuses_incomplete_files_and_mixed_arguments(tmp_path, toy):
    ids = toy.split("train").ids
    partial = write(tmp_path, "given.json", json.dumps({i: "x" for i in ids[:-2]}))
    with pytest.raises(SegsynthError, match=f"no caption for 2 of the 6 masks .*{ids[-2]}"):
        make_captions(CaptionConfig(data=TOY, out=str(tmp_path / "a"), captioner="file", captions=str(partial)))
    with pytest.raises(SegsynthError, match="--captioner file needs --captions"):
        make_captions(CaptionConfig(data=TOY, out=str(tmp_path / "b"), captioner="file"))
    with pytest.raises(SegsynthError, match="--captions is only read with --captioner file"):
        make_captions(CaptionConfig(data=TOY, out=str(tmp_path / "c"), captions=str(partial)))
    assert not (tmp_path / "a").exists()


def test_unknown_captioner_names_the_options(tmp_path):
    with pytest.raises(SegsynthError, match="--captioner .*no_such_model: not mask or file, and not a folder holding a BLIP-2"):
        make_captions(CaptionConfig(data=TOY, out=str(tmp_path / "c"), captioner=str(tmp_path / "no_such_model"),
                                    device="cpu"))


def save_tiny_blip2(folder: Path) -> Path:
    """A random BLIP-2 (ViT, Q-Former, OPT, each one layer wide 32) and a byte-level GPT-2 tokenizer, saved."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, GPT2Tokenizer
    from transformers.models.blip.image_processing_blip import BlipImageProcessor

    from segsynth.generators.testing import byte_level_vocab

    symbols = [s for s in byte_level_vocab() if not s.endswith("</w>") and not s.startswith("<|")]
    vocab = {symbol: index for index, symbol in enumerate(symbols + ["<|endoftext|>"])}
    end = vocab["<|endoftext|>"]
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                              eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, num_query_tokens=4)  # adds the <image> token
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=32, vocab_size=64),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=37, num_hidden_layers=1, num_attention_heads=2,
                         word_embed_proj_dim=32, vocab_size=len(tokenizer), max_position_embeddings=64,
                         bos_token_id=end, eos_token_id=end, pad_token_id=end),
        num_query_tokens=4, image_token_index=image_token)
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_make_captions_with_blip2_resumes_and_captions_every_image(tmp_path, toy):
    model = save_tiny_blip2(tmp_path / "blip2")
    out = tmp_path / "caps"
    config = CaptionConfig(data=TOY, out=str(out), captioner=str(model), max_new_tokens=4, batch_size=4,
                           device="cpu")
    ids = toy.split("train").ids
    # A run killed after its first caption (and mid-way through a line) left this behind:
    header = {"captioner": str(model), "data": TOY, "split": "train", "max_new_tokens": 4}
    out.mkdir()
    (out / "captions.jsonl.partial").write_text(
        json.dumps({"header": header}) + "\n" + json.dumps({"id": ids[0], "caption": "kept from before"}) + '\n{"id"')
    captions = read_output(make_captions(config))
    assert list(captions) == ids and all(text.strip() for text in captions.values())
    assert captions[ids[0]] == "kept from before"
    assert not (out / "captions.jsonl.partial").exists()
    # With another captioner setting the partial captions are not reused.
    (out / "captions.jsonl.partial").write_text(
        json.dumps({"header": {**header, "max_new_tokens": 9}}) + "\n"
        + json.dumps({"id": ids[0], "caption": "kept from before"}) + "\n")
    assert read_output(make_captions(config))[ids[0]] != "kept from before"
