"""Configs: dataclass defaults < YAML < flags; unknown keys refused with the valid ones listed."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from segsynth.cli import build_parser
from segsynth.config import (
    add_config_arguments, build_config, config_from_args, field, load_yaml, save_config, to_dict,
)
from segsynth.training.evaluate import EvalConfig
from segsynth.io import SegsynthError
from segsynth.training.loop import TrainConfig


@dataclass
class Demo:
    name: str = field(help="a required name")
    count: int = field(1, help="how many")
    rate: float = field(0.5, help="a rate")
    flag: bool = field(False, help="a switch")
    sizes: list[int] = field([], help="numbers")
    tags: list[str] = field(["x"], help="words")
    maybe: str | None = field(None, help="optional")
    where: Path = field(Path("."), help="a path")


def test_defaults_and_fresh_mutable_defaults():
    a, b = build_config(Demo, {"name": "a"}), build_config(Demo, {"name": "b"})
    assert a.count == 1 and a.rate == 0.5 and a.flag is False and a.sizes == [] and a.tags == ["x"]
    a.tags.append("y")
    assert b.tags == ["x"]  # no shared default list


def test_unknown_key_lists_valid_keys():
    with pytest.raises(SegsynthError) as error:
        build_config(Demo, {"name": "n", "colour": "red", "cuont": 3}, source="config file run.yaml")
    message = str(error.value)
    assert message.startswith("config file run.yaml: unknown key(s) colour, cuont for Demo")
    assert "valid keys: count, flag, maybe, name, rate, sizes, tags, where" in message


def test_unknown_train_key_lists_train_keys():
    with pytest.raises(SegsynthError) as error:
        build_config(TrainConfig, {"data": "toy", "out": "o", "learning_rate": 0.1})
    message = str(error.value)
    assert "unknown key(s) learning_rate for TrainConfig" in message
    for name in ("lr", "iterations", "batch_size", "crop", "resume"):
        assert name in message


def test_missing_required_key():
    with pytest.raises(SegsynthError, match="name"):
        build_config(Demo, {})


@pytest.mark.parametrize("key, value, expected", [
    ("count", "3", 3), ("count", 4.0, 4),
    ("rate", "6e-4", 6e-4), ("rate", 2, 2.0),  # YAML reads 6e-4 (no dot) as a string
    ("flag", "yes", True), ("flag", "off", False), ("flag", "1", True), ("flag", True, True),
    ("sizes", "32,48", [32, 48]), ("sizes", ["32", 48], [32, 48]), ("sizes", 7, [7]), ("sizes", ["1,2", "3"], [1, 2, 3]),
    ("tags", "a,b", ["a,b"]),  # only number lists split on commas
    ("maybe", "none", None), ("maybe", None, None), ("maybe", "x", "x"),
    ("where", "some/dir", Path("some/dir")),
])
def test_coercion(key, value, expected):
    assert getattr(build_config(Demo, {"name": "n", key: value}), key) == expected


@pytest.mark.parametrize("key, value", [
    ("count", "many"), ("count", "1.5"), ("count", 2.5), ("rate", "fast"), ("flag", "maybe"), ("sizes", ["a"]),
])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(SegsynthError, match=f"key '{key}': cannot read {value!r}"):
        build_config(Demo, {"name": "n", key: value})


def test_hyphenated_keys_are_accepted():
    assert build_config(TrainConfig, {"data": "toy", "out": "o", "batch-size": 3}).batch_size == 3


def test_load_yaml_errors(tmp_path):
    with pytest.raises(SegsynthError, match="does not exist"):
        load_yaml(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(SegsynthError, match="bad.yaml is not valid YAML"):
        load_yaml(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- lr\n- 0.1\n")
    with pytest.raises(SegsynthError, match="must hold a mapping of keys to values, got list"):
        load_yaml(listed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_yaml(empty) == {}


def parse_train(argv):
    return config_from_args(TrainConfig, build_parser().parse_args(["train", *argv]))


def test_precedence_defaults_yaml_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: toy:n=8\nout: runs/a\nlr: 6e-4\niterations: 100\ncrop: [32, 48]\nresume: true\n")
    config = parse_train(["--config", str(path), "--iterations", "7", "--crop", "16,24", "--no-resume"])
    assert config.data == "toy:n=8" and config.out == "runs/a"  # from YAML
    assert config.lr == pytest.approx(6e-4)  # from YAML, coerced
    assert config.iterations == 7 and config.crop == [16, 24] and config.resume is False  # flags win
    assert config.batch_size == TrainConfig.__dataclass_fields__["batch_size"].default  # default kept
    repeated = parse_train(["--data", "toy", "--out", "o", "--crop", "16", "--crop", "24", "--resume"])
    assert repeated.crop == [16, 24] and repeated.resume is True


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: toy\nout: o\nepochs: 3\n")
    with pytest.raises(SegsynthError, match=f"config file {path}: unknown key\\(s\\) epochs for TrainConfig; valid keys"):
        parse_train(["--config", str(path)])


def test_saved_config_round_trips(tmp_path):
    config = TrainConfig(data="toy:n=8", out=str(tmp_path / "o"), crop=[16, 24], pretrained=None, lr=1e-4)
    save_config(config, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# resolved TrainConfig; rerun with: --config config.yaml")
    assert build_config(TrainConfig, load_yaml(tmp_path / "config.yaml")) == config
    assert parse_train(["--config", str(tmp_path / "config.yaml")]) == config
    evaluation = EvalConfig(checkpoint="c", data="toy", size=[8, 8])
    save_config(evaluation, tmp_path / "eval.yaml")
    assert build_config(EvalConfig, load_yaml(tmp_path / "eval.yaml")) == evaluation


def test_to_dict_stringifies_paths():
    assert to_dict(build_config(Demo, {"name": "n", "where": "a/b"}))["where"] == "a/b"


def test_every_field_gets_a_flag_with_help():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Demo, positional=("name",))
    args = parser.parse_args(["nm", "--count", "2", "--flag", "--sizes", "1", "--sizes", "2"])
    assert config_from_args(Demo, args) == Demo(name="nm", count=2, flag=True, sizes=[1, 2])
    help_text = parser.format_help()
    for f in dataclasses.fields(Demo):
        assert f.metadata["help"] in help_text
    assert "(default: 0.5)" in help_text
