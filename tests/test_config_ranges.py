"""The range table: every verb's config fields fed with values outside their declared Range.

The cases are generated from the config dataclasses (stage_configs.py) and their `Range`s, so a new
field is covered as soon as it exists: a number or list field without a Range fails
`test_every_number_and_list_field_declares_its_range`, and one with a Range gets its out-of-range
values below. Each value goes through the command line (as a user types it), a YAML config and the
Python API; the CLI must print one line `segsynth VERB: error: ...` naming the flag and the allowed
values, exit 2, and write nothing.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest
import yaml

from segsynth import stage_configs
from segsynth.cli import POSITIONAL, VERBS, main
from segsynth.config import Range, _non_optional, build_config
from segsynth.io import SegsynthError
from segsynth.stage_configs import RUN_SECTIONS, SETTINGS_SECTIONS, RunConfig


def _is_list(kind) -> bool:
    return typing.get_origin(_non_optional(kind)) in (list, typing.List)


def _item_kind(kind):
    return (typing.get_args(_non_optional(kind)) or (str,))[0] if _is_list(kind) else _non_optional(kind)


def _valid_item(allowed: Range, kind):
    if kind is str:
        return allowed.choices[0] if allowed.choices else "x"
    value = allowed.low if allowed.low is not None else 0
    if allowed.low_open:
        value = value + (1 if kind is int else 0.5)
    if allowed.multiple:
        value = math.ceil(value / allowed.multiple) * allowed.multiple
    return kind(value)


def bad_values(allowed: Range, kind, far: bool = False) -> list:
    """Values just outside `allowed` (with `far`: far outside too), each refused by the Range itself."""
    item_kind = _item_kind(kind)
    items: list = []
    if item_kind in (int, float):
        step = 1 if item_kind is int else 0.001
        if allowed.low is not None:
            items += [allowed.low if allowed.low_open else allowed.low - step] + ([-10**12] if far else [])
        if allowed.high is not None:
            items += [allowed.high if allowed.high_open else allowed.high + step] + ([10**12] if far else [])
        if allowed.multiple:
            items.append(_valid_item(allowed, item_kind) + 1)
        if item_kind is float:
            items += [math.nan] + ([math.inf, -math.inf] if far else [])
        items = [item_kind(v) if not (isinstance(v, float) and not math.isfinite(v)) else v for v in items]
    elif allowed.choices or allowed.pattern:
        items.append("no-such-option")
    if not _is_list(kind):
        return [v for v in dict.fromkeys(items) if allowed.problem(v, kind)]
    length = min([n for n in allowed.lengths if n > 0] or [1])
    values = [[item] * length for item in dict.fromkeys(items)]
    if allowed.lengths:
        values.append([_valid_item(allowed, item_kind)] * (max(allowed.lengths) + 1))
    return [v for v in values if allowed.problem(v, kind)]


def ranged_fields(cls) -> list[tuple[str, Range, typing.Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, f.metadata["range"], hints[f.name]) for f in dataclasses.fields(cls) if "range" in f.metadata]


def _cases():
    """(verb, config class, run section or None, field name, its out-of-range values), one per field."""
    for verb, (_, cls, _) in VERBS.items():
        for name, allowed, kind in ranged_fields(cls):
            yield pytest.param(verb, cls, None, name, bad_values(allowed, kind), id=f"{verb}-{name}")
    for section, (cls, owned) in RUN_SECTIONS.items():
        for name, allowed, kind in ranged_fields(cls):
            if name not in owned:
                yield pytest.param("run", cls, section, name, bad_values(allowed, kind), id=f"run-{section}.{name}")


def _settings_cases():
    """(verb, config class, settings field, key, its out-of-range values) for the settings sections."""
    for verb, (_, cls, _) in VERBS.items():
        for f in dataclasses.fields(cls):
            if f.name in SETTINGS_SECTIONS:
                for name, allowed, kind in ranged_fields(SETTINGS_SECTIONS[f.name]):
                    yield pytest.param(verb, cls, f.name, name, bad_values(allowed, kind), id=f"{verb}-{f.name}.{name}")


CASES = list(_cases())
SETTINGS_CASES = list(_settings_cases())


def _required(cls, tmp_path: Path) -> dict:
    """Values for the fields without a default: paths under tmp_path (never created: the check comes first)."""
    return {f.name: ("toy" if f.name == "data" else str(tmp_path / f.name)) for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def _required_arguments(verb: str, cls, work: Path) -> list[str]:
    """The required fields as the verb takes them: positional (`segsynth report RUN`) or --flag=value."""
    positional = POSITIONAL.get(verb, ())
    return [text if key in positional else f"--{key.replace('_', '-')}={text}"
            for key, text in _required(cls, work).items()]


def _flag_arguments(flag: str, value) -> list[str]:
    if isinstance(value, list):
        if value and isinstance(value[0], str):
            return [f"{flag}={item}" for item in value]  # string lists: one flag per item
        return [f"{flag}={','.join(str(item) for item in value)}"]
    return [f"{flag}={value}"]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_cases_cover_every_verb_and_section():
    verbs = {case.values[0] for case in CASES}
    sections = {case.values[2] for case in CASES if case.values[2]}
    assert verbs == set(VERBS) and sections == set(RUN_SECTIONS)
    assert len(CASES) > 150 and sum(len(case.values[4]) for case in CASES) > 300


def test_every_number_and_list_field_declares_its_range():
    """A new int, float or list-of-numbers field needs a Range (and choice-like strings should have one)."""
    missing = []
    for cls in ({cls for _, cls, _ in VERBS.values()} | {cls for cls, _ in RUN_SECTIONS.values()} |
                set(SETTINGS_SECTIONS.values())):
        for f in dataclasses.fields(cls):
            kind = _non_optional(typing.get_type_hints(cls)[f.name])
            if kind in (int, float) or (_is_list(f.type if not isinstance(f.type, str) else kind)
                                        and _item_kind(kind) in (int, float)):
                if "range" not in f.metadata:
                    missing.append(f"{cls.__name__}.{f.name}")
    assert missing == []


def test_every_ranged_field_has_out_of_range_values_and_the_api_refuses_far_ones_too():
    for cls in {cls for _, cls, _ in VERBS.values()}:
        for name, allowed, kind in ranged_fields(cls):
            assert bad_values(allowed, kind), f"{cls.__name__}.{name}"
            for value in bad_values(allowed, kind, far=True):
                with pytest.raises(SegsynthError, match=f"{cls.__name__}.{name} = .* {name} must be "):
                    cls(**_required(cls, Path("unused")), **{name: value})


@pytest.mark.parametrize("verb, cls, section, name, values", CASES)
def test_out_of_range_value_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, verb, cls, section, name, values):
    work = tmp_path / "work"
    work.mkdir()
    before = _listing(tmp_path)
    for number, value in enumerate(values):
        # 1. The command line, as a user types it.
        if section is None:
            flag = next(f.metadata.get("flag") for f in dataclasses.fields(cls) if f.name == name) or \
                "--" + name.replace("_", "-")
            argv = [verb] + _required_arguments(verb, cls, work) + _flag_arguments(flag, value)
        else:
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            argv = ["run", f"--out={work / 'run'}", f"--{section.replace('_', '-')}", f"{name}={text}"]
        assert main(argv) == 2, value
        err = capsys.readouterr().err
        assert err.startswith(f"segsynth {verb}: error: ") and err.count("\n") == 1, err
        assert f"{name} must be " in err, err
        assert _listing(tmp_path) == before

        # 2. The Python API: the dataclass itself refuses it.
        with pytest.raises(SegsynthError, match=f"{cls.__name__}.{name} = .* {name} must be "):
            cls(**_required(cls, work), **{name: value})

        # 3. A YAML config (for run: a section of one), for the first value.
        if number == 0:
            config = tmp_path / "config.yaml"
            content = {**_required(cls, work), name: value} if section is None else \
                {"out": str(work / "run"), section: {name: value}}
            config.write_text(yaml.safe_dump(content))
            assert main([verb, "--config", str(config)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"segsynth {verb}: error: config file {config}") and err.count("\n") == 1, err
            assert f"{name} = " in err and f"{name} must be " in err, err
            config.unlink()
            assert _listing(tmp_path) == before


@pytest.mark.parametrize("verb, cls, settings, name, values", SETTINGS_CASES)
def test_out_of_range_settings_key_is_refused_with_the_config(tmp_path, capsys, verb, cls, settings, name, values):
    """A settings section (synthesize's and attention-quality's pseudo_mask_settings, plan's and
    train-text-generator's prompt_augmentation) is checked as the config is made, not when it is used."""
    assert {case.values[0] for case in SETTINGS_CASES} == {"synthesize", "attention-quality", "plan",
                                                           "train-text-generator"}
    work = tmp_path / "work"
    work.mkdir()
    before = _listing(tmp_path)
    for value in values:
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        argv = [verb] + _required_arguments(verb, cls, work)
        argv += [f"--{settings.replace('_', '-')}", f"{name}={text}"]
        assert main(argv) == 2, value
        err = capsys.readouterr().err
        flag = "--" + settings.replace("_", "-")
        assert err.startswith(f"segsynth {verb}: error: {flag}: {name} = ") and err.count("\n") == 1, err
        assert f"{name} must be " in err and _listing(tmp_path) == before
        with pytest.raises(SegsynthError, match=f"{cls.__name__}: key '{settings}': {name} = .* {name} must be "):
            cls(**_required(cls, work), **{settings: {name: value}})


@pytest.mark.parametrize("argv, needle", [
    (["filter", "--synthetic", "S", "--segmenter", "C", "--alpha", "0"], "--alpha 0.0 is too small: alpha must be a number in (0, 100]"),
    (["train", "--data", "toy", "--out", "O", "--iterations", "0"], "--iterations 0 is too small: iterations must be an integer in 1..1000000000"),
    (["plan", "--data", "toy", "--out", "P", "--stats", "S", "--budget=-5"], "--budget -5 is too small: budget must be an integer in 0..100000000"),
    (["train", "--data", "toy", "--out", "O", "--crop", "100000,100000"], "--crop 100000,100000 has item 100000 that is too large"),
    (["train", "--data", "toy", "--out", "O", "--seed", "99999999999"], "--seed 99999999999 is too large: seed must be an integer in 0..2147483647"),
    (["train", "--data", "toy", "--out", "O", "--cache-gb", "inf"], "--cache-gb inf is not a finite number"),
    (["train", "--data", "toy", "--out", "O", "--log-every", "0"], "--log-every 0 is too small"),
    (["train-generator", "--data", "toy", "--out", "O", "--size", "100,128"], "H and W must be multiples of 8 (space-to-depth x2 and 2 UNet downsamplings"),
    (["run", "--train", "iterations=0"], "--train: iterations = 0 is too small"),
    (["run", "--seeds", "1", "--seeds", "1"], "give distinct seeds"),
], ids=["filter-alpha-ignores-everything", "untrained-checkpoint", "negative-budget", "huge-crop", "seed-overflow",
        "infinite-cache", "log-every-zero-divides", "generator-size-not-a-multiple", "run-section", "same-seed-twice"])
def test_the_issue_examples_are_refused_before_any_work(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_names_mirrored_in_stage_configs_match_their_tables():
    """stage_configs cannot import torch, so it repeats a few table's names; they must stay equal."""
    from segsynth.generators import TRAINERS
    from segsynth.generators.schedulers import ALIASES, SCHEDULERS
    from segsynth.methods.attn2mask.pseudo_mask import PRESETS
    from segsynth.run import METHODS, PRESETS as RUN_PRESETS
    from segsynth.segmenters import SEGMENTERS
    from segsynth.training.recipes import RECIPES

    assert stage_configs.SEGMENTER_NAMES == tuple(SEGMENTERS)
    assert stage_configs.RECIPE_NAMES == tuple(RECIPES)
    assert set(stage_configs.SCHEDULER_NAMES) == set(SCHEDULERS) | set(ALIASES)
    assert stage_configs.PSEUDO_MASK_PRESETS == tuple(PRESETS)
    assert stage_configs.METHOD_NAMES == tuple(METHODS)
    assert stage_configs.GENERATOR_KIND_NAMES == tuple(stage_configs.GENERATOR_KINDS) == tuple(TRAINERS)
    preset_range = next(f.metadata["range"] for f in dataclasses.fields(RunConfig) if f.name == "preset")
    assert set(preset_range.choices) == {name for _, name in RUN_PRESETS}


def test_defaults_and_run_presets_are_in_range():
    """Every default, and every size a run preset sets, passes the table (the API builds configs from them)."""
    from segsynth.run import PRESETS, resolve_run_config

    for cls in {cls for _, cls, _ in VERBS.values()}:
        cls(**_required(cls, Path("unused")))
    for kind, preset in PRESETS:
        data = "toy" if kind == "toy" else "camvid:/nowhere"
        for method in stage_configs.METHOD_NAMES:
            resolve_run_config({"preset": preset, "data": data, "method": method})


def test_range_words():
    assert Range(1, 10).describe(int) == "an integer in 1..10"
    assert Range(0.0, 1.0, low_open=True).describe(float) == "a number in (0, 1]"
    assert Range(3, 77, also=(0,)).describe(int) == "0 or an integer in 3..77"
    assert Range(8, 64, lengths=(0, 2), shape="H,W").describe(list[int]) == "a list of 0 or 2 integers each in 8..64 (H,W)"
    assert Range(choices=("a", "b")).describe(str | None) == "one of: a, b (or none)"
    assert Range(3, 77, also=(0,)).problem(0, int) is None and Range(3, 77, also=(0,)).problem(2, int) == "is too small"
    assert Range(0.0).problem(True, float) == "is not a number"  # a YAML `yes` is not a number
    with pytest.raises(SegsynthError, match="config file c.yaml: iterations = 0 is too small"):
        build_config(stage_configs.TrainConfig, {"data": "toy", "out": "o", "iterations": 0}, "config file c.yaml")


def test_a_run_whose_pretrain_split_leaves_a_stage_without_iterations(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "run"), "--train", "iterations=1"]) == 2
    err = capsys.readouterr().err
    assert "pretrain_fraction 0.5 of pretrain-finetune-filtered-hardness's train iterations 1" in err
    assert "raise train iterations or change pretrain_fraction" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()
