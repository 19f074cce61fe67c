"""`segsynth plan`: the uniform plan, the plan file format and its validation."""

from __future__ import annotations

import json

import pytest

from segsynth.cli import main
from segsynth.io import SegsynthError
from segsynth.formats.plan import assign_seeds, read_plan
from segsynth.plan import PlanConfig, make_plan

TOY = "toy:n=12,n_val=4,size=32"


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_uniform_plan_gives_k_distinct_seeds_per_mask_in_split_order(tmp_path):
    out = make_plan(PlanConfig(data=TOY, out=str(tmp_path / "plan.jsonl"), uniform=3, seed=10))
    entries = lines(out)
    assert [e["id"] for e in entries] == [f"toy_train_{i:05d}" for i in range(12)]
    assert all(len(e["seeds"]) == 3 for e in entries)
    seeds = [s for e in entries for s in e["seeds"]]
    assert seeds == list(range(10, 10 + 36))  # distinct across the plan: no two samples share noise
    assert (tmp_path / "plan.jsonl.config.yaml").is_file()


def test_limit_takes_the_first_masks_and_keeps_their_seeds(tmp_path):
    full = lines(make_plan(PlanConfig(data=TOY, out=str(tmp_path / "full.jsonl"), uniform=2)))
    small = lines(make_plan(PlanConfig(data=TOY, out=str(tmp_path / "small.jsonl"), uniform=2, limit=4)))
    assert small == full[:4]


def test_plan_of_another_split(tmp_path):
    entries = lines(make_plan(PlanConfig(data=TOY, out=str(tmp_path / "p.jsonl"), uniform=1, split="val")))
    assert [e["id"] for e in entries] == [f"toy_val_{i:05d}" for i in range(4)]


def test_cli_plan_writes_the_file(tmp_path):
    out = tmp_path / "plan.jsonl"
    assert main(["plan", "--data", TOY, "--uniform", "2", "--limit", "3", "--out", str(out)]) == 0
    assert [e["seeds"] for e in lines(out)] == [[0, 1], [2, 3], [4, 5]]


def test_plan_needs_a_mode(tmp_path, capsys):
    assert main(["plan", "--data", TOY, "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "--uniform" in capsys.readouterr().err


def test_assign_seeds_is_cumulative_for_uneven_counts():
    assert assign_seeds([1, 3, 0, 2], 5) == [[5], [6, 7, 8], [], [9, 10]]


def test_read_plan_keeps_extra_keys(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "seeds": [1, 2], "hardness": 0.5}\n{"id": "b", "seeds": [3]}\n')
    entries = read_plan(path)
    assert [(e.id, e.seeds, e.extra) for e in entries] == [("a", [1, 2], {"hardness": 0.5}), ("b", [3], {})]


@pytest.mark.parametrize("text, message", [
    ('{"id": "a", "seeds": [1]}\n{"id": "a", "seeds": [2]}\n', "appears twice"),
    ('{"id": "a", "seeds": []}\n', "non-empty list"),
    ('{"id": "a", "seeds": [1, 1]}\n', "repeated seeds"),
    ('{"id": "a", "seeds": ["1"]}\n', "integers"),
    ('{"seeds": [1]}\n', "\"id\""),
    ('', "empty"),
    ('{"id": "a@x", "source": "a", "crop": [0, 0, 8], "seeds": [1]}\n', "must be \\[top, left, height, width\\]"),
    ('{"id": "a@x", "source": "a", "crop": [0, -1, 8, 8], "seeds": [1]}\n', "top/left >= 0"),
    ('{"id": "a@x", "source": "a", "crop": [0, 0, 0, 8], "seeds": [1]}\n', "height/width >= 1"),
    ('{"id": "a@x", "source": "", "seeds": [1]}\n', "must name a mask id"),
    ('{"id": "t", "kind": "text", "prompt": "a road", "crop": [0, 0, 8, 8], "seeds": [1]}\n', "belong to mask entries"),
])
def test_read_plan_rejects_bad_plans(tmp_path, text, message):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(SegsynthError, match=message):
        read_plan(path)


def test_a_crop_entry_names_its_mask_and_round_trips(tmp_path):
    from segsynth.formats.plan import plan_requests, write_plan

    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "m@pole", "source": "m", "crop": [1, 2, 3, 4], "seeds": [7], "target_class": "pole"}\n'
                    '{"id": "m", "seeds": [8]}\n')
    entries = read_plan(path)
    assert (entries[0].source, entries[0].crop, entries[0].extra) == ("m", [1, 2, 3, 4], {"target_class": "pole"})
    requests = plan_requests(entries, path)
    assert [(r.id, r.source, r.crop) for r in requests] == [("m@pole_s7", "m", (1, 2, 3, 4)), ("m_s8", "m", None)]
    write_plan(tmp_path / "again.jsonl", entries)
    assert read_plan(tmp_path / "again.jsonl")[0].to_json() == entries[0].to_json()


def test_read_plan_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(SegsynthError, match="segsynth plan"):
        read_plan(tmp_path / "nope.jsonl")


# --- the text plan ---------------------------------------------------------------------------


def test_text_plan_gives_one_text_entry_per_caption_with_n_seeds(tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"id": "toy_train_00001", "caption": "sky at the top"}\n'
                        '{"id": "toy_train_00003", "caption": "a road across the bottom"}\n')
    out = make_plan(PlanConfig(data=TOY, out=str(tmp_path / "text.jsonl"), captions=str(captions), per_caption=2,
                               seed=5))
    assert lines(out) == [
        {"id": "toy_train_00001", "seeds": [5, 6], "kind": "text", "prompt": "sky at the top"},
        {"id": "toy_train_00003", "seeds": [7, 8], "kind": "text", "prompt": "a road across the bottom"}]
    assert [e.kind for e in read_plan(out)] == ["text", "text"]
    # the CLI flags
    assert main(["plan", "--data", TOY, "--captions", str(captions), "--per-caption", "1", "--out",
                 str(tmp_path / "cli.jsonl")]) == 0
    assert [e["seeds"] for e in lines(tmp_path / "cli.jsonl")] == [[0], [1]]


def test_text_plan_ids_are_file_name_safe_and_distinct():
    from segsynth.plan import safe_ids

    assert safe_ids(["a/b c", "a_b_c", ".hidden", "ok-1.x"]) == ["a_b_c", "a_b_c-2", "hidden", "ok-1.x"]


@pytest.mark.parametrize("text, message", [
    ('{"id": "toy_train_00001", "caption": "sky"}\n{"id": "nope_7", "caption": "sky"}\n',
     r"captions.jsonl: 1 id\(s\) are not masks of this split: 'nope_7' \(line 2\)"),
    ('{"id": "toy_train_00001", "caption": "  "}\n', r"captions.jsonl:1: the caption of 'toy_train_00001' is empty"),
])
def test_text_plan_refuses_bad_captions_files(tmp_path, text, message):
    captions = tmp_path / "captions.jsonl"
    captions.write_text(text)
    with pytest.raises(SegsynthError, match=message):
        make_plan(PlanConfig(data=TOY, out=str(tmp_path / "p.jsonl"), captions=str(captions), per_caption=1))
    assert not (tmp_path / "p.jsonl").exists()


def test_text_plan_needs_per_caption_and_only_one_mode(tmp_path, capsys):
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"id": "toy_train_00001", "caption": "sky"}\n')
    with pytest.raises(SegsynthError, match="--captions needs --per-caption N >= 1"):
        make_plan(PlanConfig(data=TOY, out=str(tmp_path / "p.jsonl"), captions=str(captions)))
    assert main(["plan", "--data", TOY, "--uniform", "1", "--captions", str(captions), "--per-caption", "1",
                 "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "choose exactly one plan mode (--uniform K, --stats FILE, --stats FILE --targeted, --captions FILE " \
           "--per-caption N, --class-prompts N); got uniform, text" in capsys.readouterr().err


def test_cli_captions_writes_one_caption_per_mask(tmp_path, capsys):
    assert main(["captions", "--data", TOY, "--out", str(tmp_path / "c")]) == 0
    records = lines(tmp_path / "c" / "captions.jsonl")
    assert [r["id"] for r in records] == [f"toy_train_{i:05d}" for i in range(12)]
    assert all(r["caption"].strip() for r in records) and "plan --captions" in capsys.readouterr().out
