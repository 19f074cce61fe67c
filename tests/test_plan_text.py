"""`segsynth plan --class-prompts N`: text entries from the real images' class sets (image-level labels only)."""

from __future__ import annotations

import json

import pytest

from segsynth.cli import main
from segsynth.data import open_dataset
from segsynth.formats.plan import plan_requests, read_plan
from segsynth.io import SegsynthError
from segsynth.plan import PlanConfig, make_plan

TOY = "toy:n=6,n_val=2,size=32"


def test_class_prompts_name_each_real_images_classes_with_distinct_seeds(tmp_path):
    out = make_plan(PlanConfig(data=TOY, out=str(tmp_path / "plan.jsonl"), class_prompts=2, seed=5))
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    split = open_dataset(TOY).split("train")
    classes = open_dataset(TOY).classes
    assert [e["id"] for e in entries] == list(split.ids)
    for entry, index in zip(entries, range(len(split))):
        label = split[index].label
        present = [classes[c] for c in range(len(classes)) if (label == c).mean() >= 0.005]
        assert entry["kind"] == "text" and entry["prompt"] == "a photo of " + ", ".join(present)
        assert entry["class_words"] == {name: [name] for name in present}
    assert [s for e in entries for s in e["seeds"]] == list(range(5, 5 + 2 * len(split)))
    # read back as text requests carrying their class words
    requests = plan_requests(read_plan(out), out)
    assert requests[0].kind == "text" and requests[0].source is None
    assert requests[0].words_by_class() == entries[0]["class_words"]
    # deterministic
    again = make_plan(PlanConfig(data=TOY, out=str(tmp_path / "again.jsonl"), class_prompts=2, seed=5))
    assert again.read_text() == out.read_text()


def test_class_prompts_is_one_plan_mode_among_the_others(tmp_path, capsys):
    with pytest.raises(SegsynthError, match="exactly one plan mode.*--class-prompts"):
        make_plan(PlanConfig(data=TOY, out=str(tmp_path / "p.jsonl"), class_prompts=1, uniform=1))
    assert main(["plan", "--data", TOY, "--out", str(tmp_path / "cli.jsonl"), "--class-prompts", "1",
                 "--limit", "3"]) == 0
    assert "3 images for 3 entries" in capsys.readouterr().out
