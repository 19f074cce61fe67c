"""Sample selection in dataset specs: camvid:PATH?include= / exclude= / holdout= (id prefixes)."""

from __future__ import annotations

import pytest

from fakes import CAMVID_RAW, stripes, write_image, write_mask
from segsynth.cli import main
from segsynth.data import open_dataset
from segsynth.data.specs import base_spec, split_spec
from segsynth.data.validate import check_before_compute
from segsynth.io import SegsynthError

# CamVid's layout with its sequence prefixes: 0001TP at dusk, the others in daylight.
SEQUENCES = {"train": {"0001TP": 2, "0006R0": 3, "0016E5": 1}, "val": {"0016E5": 2}}


@pytest.fixture
def sequences_root(tmp_path):
    root = tmp_path / "camvid"
    for split, counts in SEQUENCES.items():
        for sequence, count in counts.items():
            for i in range(count):
                name = f"{sequence}_{i:06d}.png"
                write_image(root / split / name, seed=i)
                write_mask(root / f"{split}annot" / name, stripes(CAMVID_RAW))
    return root


def counts(dataset) -> dict[str, int]:
    return {name: len(split) for name, split in dataset.splits.items()}


def test_include_exclude_and_holdout_select_samples_by_id_prefix(sequences_root):
    spec = f"camvid:{sequences_root}"
    assert counts(open_dataset(spec)) == {"train": 6, "val": 2}
    daylight = open_dataset(f"{spec}?exclude=0001TP")
    assert counts(daylight) == {"train": 4, "val": 2}
    assert not any(i.startswith("0001TP") for i in daylight.split("train").ids)
    dusk = open_dataset(f"{spec}?include=0001TP")
    assert counts(dusk) == {"train": 2}  # val holds no 0001TP sample: dropped
    assert dusk.split("train").ids == ["0001TP_000000", "0001TP_000001"]
    assert len(dusk.pairs["train"]) == 2 and dusk.pairs["train"][1].image.name == "0001TP_000001.png"
    assert dusk.split("train")[1].label.shape == dusk.split("train").label(1).shape
    several = open_dataset(f"{spec}?include=0006R0, 0001TP")
    assert counts(several) == {"train": 5}
    held = open_dataset(f"{spec}?holdout=0001TP")
    assert list(held.splits) == ["train", "val", "holdout"] and counts(held) == {"train": 4, "val": 2, "holdout": 2}
    assert held.split("holdout").ids == dusk.split("train").ids and held.spec == f"{spec}?holdout=0001TP"
    check_before_compute(held, ["holdout"])  # the file check reads the selected pairs


def test_bad_selection_options_are_named(sequences_root):
    spec = f"camvid:{sequences_root}"
    for options, needle in [("?include=Seq05VD", "no sample id starts with 'Seq05VD' (include); ids start e.g. with "
                                                 "0001TP, 0006R0, 0016E5"),
                            ("?only=0001TP", "option 'only=0001TP': write KEY=PREFIX"),
                            ("?include=", "option 'include='"),
                            ("?", "nothing after '?'"),
                            ("?include=0001TP&exclude=0006R0", "give include or exclude, not both"),
                            ("?holdout=0001TP&holdout=0006R0", "option 'holdout' given twice")]:
        with pytest.raises(SegsynthError, match=needle.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
            open_dataset(spec + options)
    assert split_spec("toy:n=8?include=toy_val") == ("toy:n=8", {"include": ["toy_val"]})
    assert base_spec(f"{spec}?holdout=0001TP") == spec


def test_a_filtered_spec_works_in_a_verb(sequences_root, capsys):
    assert main(["check-data", f"camvid:{sequences_root}?holdout=0001TP"]) == 0
    out = capsys.readouterr().out
    assert "split holdout: 2 samples" in out and "split train: 4 samples" in out
    assert main(["check-data", f"camvid:{sequences_root}?include=nope"]) == 2
    assert "no sample id starts with 'nope'" in capsys.readouterr().err
