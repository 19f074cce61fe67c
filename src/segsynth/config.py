"""Stage configs: one flat dataclass per stage, filled from YAML and then flags.

Precedence: dataclass defaults < `--config FILE.yaml` < command-line flags.
A key that the dataclass does not have is an error naming the key, the file
and the keys that exist. The resolved config is saved beside every output.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from segsynth.io import SegsynthError, atomic_write_text

C = TypeVar("C")


def field(default: Any = dataclasses.MISSING, *, help: str = "", flag: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field with the help text its command-line flag shows."""
    metadata = {"help": help}
    if flag:
        metadata["flag"] = flag
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SegsynthError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise SegsynthError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise SegsynthError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def build_config(cls: type[C], values: dict, source: str = "config") -> C:
    """Make `cls` from a dict, refusing keys it does not have (with the list of keys it does)."""
    names = {f.name for f in dataclasses.fields(cls)}
    normalised = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(normalised) - names)
    if unknown:
        raise SegsynthError(
            f"{source}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; valid keys: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    coerced = {key: _coerce(value, hints[key], f"{source}: key {key!r}") for key, value in normalised.items()}
    try:
        config = cls(**coerced)
    except TypeError as error:  # a required field is missing
        raise SegsynthError(f"{source}: {error}") from None
    return config


def to_dict(config: Any) -> dict:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in dataclasses.asdict(config).items()}


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), so the run can be repeated with --config."""
    header = f"# resolved {type(config).__name__}; rerun with: --config {Path(path).name}\n"
    atomic_write_text(path, header + yaml.safe_dump(to_dict(config), sort_keys=False))


# --- command-line glue -------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field (defaults left unset so YAML can fill them)."""
    parser.add_argument("--config", help="YAML file with any of the keys below (flags override it)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if default not in (None, [], "", {}):
            help_text += f" (default: {default})"
        if f.name in positional:
            parser.add_argument(f.name, help=help_text)
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        origin = typing.get_origin(kind)
        if kind is dict or origin is dict:  # a section: another stage's config keys, KEY=VALUE
            parser.add_argument(flag, dest=f.name, action="append", default=None, metavar="KEY=VALUE",
                                help=help_text + " (repeatable)")
        elif kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif origin in (list, typing.List):
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=help_text + " (repeatable)")
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    source = f"config file {args.config}" if getattr(args, "config", None) else "command line"
    return build_config(cls, values_from_args(cls, args), source)


def values_from_args(cls: type, args: argparse.Namespace) -> dict:
    """The keys the user gave, from `--config FILE` and then flags (sections merged key by key)."""
    values: dict = load_yaml(args.config) if getattr(args, "config", None) else {}
    source = f"config file {args.config}" if getattr(args, "config", None) else "command line"
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        if hints[name] is dict or typing.get_origin(hints[name]) is dict:  # flags add to the file's section
            section = values.get(name) or {}
            if not isinstance(section, dict):
                raise SegsynthError(f"{source}: key {name!r} must be a mapping of keys to values")
            values[name] = {**section, **parse_assignments(value, f"--{name.replace('_', '-')}")}
        else:
            values[name] = value
    return values


def parse_assignments(items: list[str], flag: str) -> dict:
    """["iterations=600", "crop=[96,128]"] -> {"iterations": 600, "crop": [96, 128]} (values read as YAML)."""
    parsed = {}
    for item in items:
        key, sign, text = item.partition("=")
        if not sign or not key.strip():
            raise SegsynthError(f"{flag} {item!r}: write KEY=VALUE, e.g. {flag} iterations=600")
        try:
            parsed[key.strip().replace("-", "_")] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise SegsynthError(f"{flag} {item!r}: cannot read the value {text!r}") from None
    return parsed


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Turn YAML/flag strings into the field's type, with an error naming the key."""
    origin = typing.get_origin(kind)
    arguments = typing.get_args(kind)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in arguments if a is not type(None)]
        return _coerce(value, inner[0], where)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind in (int, float, str):
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return kind(value)
        if kind is Path:
            return Path(value)
        if kind is dict or origin is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(key).replace("-", "_"): item for key, item in value.items()}
        if origin in (list, typing.List):
            items = value if isinstance(value, (list, tuple)) else [value]
            inner = arguments[0] if arguments else str
            flattened = []
            for item in items:  # "a,b" on the command line means two items for number lists
                if isinstance(item, str) and inner in (int, float) and "," in item:
                    flattened.extend(item.split(","))
                else:
                    flattened.append(item)
            return [_coerce(item, inner, where) for item in flattened]
    except (TypeError, ValueError):
        raise SegsynthError(f"{where}: cannot read {value!r} as {getattr(kind, '__name__', kind)}") from None
    return value
