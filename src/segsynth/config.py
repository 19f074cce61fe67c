"""Stage configs: one flat dataclass per stage, filled from YAML and then flags.

Precedence: dataclass defaults < `--config FILE.yaml` < command-line flags.
A key that the dataclass does not have is an error naming the key, the file
and the keys that exist. The resolved config is saved beside every output.

Every number, list and choice field declares its meaningful values next to its
default (`field(..., range=Range(...))`): one table, checked before any work
whichever way the config was made (flags, YAML, `segsynth run` sections, or the
Python API, through the `config_class` decorator's `__post_init__`), and the
error names the key and the allowed values.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from segsynth.io import SegsynthError, atomic_write_text, read_text

C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class Range:
    """The meaningful values of one config field.

    Numbers: `low`..`high` (inclusive unless `low_open`/`high_open`), plus the special values in
    `also` (e.g. 0 = "auto"); numbers must be finite. Strings: one of `choices` or matching `pattern`.
    Lists: an item count in `lengths` (empty: any), and every item checked as above. `shape` names
    the list's meaning in messages ("H,W (or one number for a square)")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    choices: tuple = ()
    pattern: str | None = None
    pattern_hint: str = ""  # how `pattern` reads in messages, e.g. "cuda:N"
    multiple: int | None = None
    lengths: tuple = ()
    shape: str = ""

    def problem(self, value: Any, kind: Any) -> str | None:
        """Why `value` (of the field's type `kind`) is not allowed, or None."""
        if value is None and _optional(kind):
            return None
        inner = _non_optional(kind)
        if typing.get_origin(inner) in (list, typing.List):
            if not isinstance(value, (list, tuple)):
                return "is not a list"
            if self.lengths and len(value) not in self.lengths:
                return f"has {len(value)} item(s)"
            item_kind = (typing.get_args(inner) or (str,))[0]
            return next((f"has item {item!r} that {why}" for item in value
                         if (why := self._item_problem(item, item_kind))), None)
        return self._item_problem(value, inner)

    def _item_problem(self, value: Any, kind: Any) -> str | None:
        if value in self.also and not isinstance(value, bool):
            return None
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return "is not an integer"
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return "is not a number"
            if not math.isfinite(value):
                return "is not a finite number"
        elif kind is str:
            if not isinstance(value, str):
                return "is not a string"
            if self.choices or self.pattern:
                if value in self.choices or (self.pattern and re.fullmatch(self.pattern, value)):
                    return None
                return "is unknown"
            return None
        else:
            return None
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return "is too small"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return "is too large"
        if self.multiple and value % self.multiple:
            return f"is not a multiple of {self.multiple}"
        return None

    def describe(self, kind: Any) -> str:
        """The allowed values in words, e.g. 'an integer in 1..1000000000' or 'one of: ce, reliable'."""
        inner = _non_optional(kind)
        if typing.get_origin(inner) in (list, typing.List):
            item_kind = (typing.get_args(inner) or (str,))[0]
            lengths = sorted(self.lengths)
            if not lengths:
                counts = "any number of"
            elif len(lengths) > 2 and lengths == list(range(lengths[0], lengths[-1] + 1)):
                counts = f"{lengths[0]} to {lengths[-1]}"
            else:
                counts = " or ".join(str(n) for n in lengths)
            items = self._describe_item(item_kind, plural=True)
            text = f"a list of {counts} {items}"
            return text + (f" ({self.shape})" if self.shape else "")
        text = self._describe_item(inner, plural=False)
        return text + (" (or none)" if _optional(kind) else "")

    def _describe_item(self, kind: Any, plural: bool) -> str:
        if kind is str:
            options = list(self.choices) + ([self.pattern_hint or f"a match of {self.pattern}"] if self.pattern else [])
            if not options:
                return "strings" if plural else "a string"
            return ("names, each one of: " if plural else "one of: ") + ", ".join(map(str, options))
        noun = ("integers" if plural else "an integer") if kind is int else ("numbers" if plural else "a number")
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            if self.low_open or self.high_open:
                bounds = f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
            else:
                bounds = f"in {low}..{high}" if kind is int else f"in [{low}, {high}]"
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {low}"
        elif self.high is not None:
            bounds = f"{'<' if self.high_open else '<='} {high}"
        else:
            bounds = ""
        if self.multiple:
            noun = f"multiples of {self.multiple}" if plural else f"a multiple of {self.multiple}"
        if plural and bounds:
            bounds = "each " + bounds
        special = " or ".join(str(value) for value in self.also)
        return (f"{special} or " if special else "") + f"{noun} {bounds}".strip()


def _number(value: float | None) -> str:
    if value is None:
        return ""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}"


def _optional(kind: Any) -> bool:
    return type(None) in typing.get_args(kind)


def _non_optional(kind: Any) -> Any:
    arguments = [a for a in typing.get_args(kind) if a is not type(None)]
    origin = typing.get_origin(kind)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return arguments[0]
    return kind


def field(default: Any = dataclasses.MISSING, *, help: str = "", flag: str | None = None, range: Range | None = None,
          **kwargs: Any) -> Any:
    """A dataclass field with the help text its command-line flag shows and the values it may take."""
    metadata = {"help": help}
    if flag:
        metadata["flag"] = flag
    if range is not None:
        metadata["range"] = range
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SegsynthError(f"config file {path} does not exist")
    text = read_text(path, "YAML config")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise SegsynthError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise SegsynthError(f"config file {path} is nested too deeply to read") from None
    if not isinstance(data, dict):
        raise SegsynthError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def build_config(cls: type[C], values: dict, source: str = "config") -> C:
    """Make `cls` from a dict, refusing keys it does not have (with the list of keys it does) and values
    outside their fields' ranges (naming the allowed values)."""
    coerced = coerce_values(cls, values, source)
    check_values(cls, coerced, source)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in coerced and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SegsynthError(f"{source}: required {', '.join(missing)} not given; give it on the command line (see "
                            "--help) or as a key of the --config file")
    try:
        config = cls(**coerced)
    except TypeError as error:  # a required field is missing
        raise SegsynthError(f"{source}: {error}") from None
    return config


def coerce_values(cls: type, values: dict, source: str = "config") -> dict:
    """`values` with '-' in keys read as '_' and each value turned into its field's type; unknown keys refused."""
    names = {f.name for f in dataclasses.fields(cls)}
    normalised = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(normalised) - names)
    if unknown:
        raise SegsynthError(
            f"{source}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; valid keys: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    return {key: _coerce(value, hints[key], f"{source}: key {key!r}") for key, value in normalised.items()}


def check_values(cls: type, values: dict, source: str) -> None:
    """Refuse the first value outside its field's Range, naming the key (as a flag when it came from the
    command line), the value and the allowed values."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        allowed = f.metadata.get("range")
        if allowed is None or f.name not in values:
            continue
        value = values[f.name]
        why = allowed.problem(value, hints[f.name])
        if why:
            if source == "command line":  # as it was typed
                flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
                shown = f"{flag} {','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"
            elif source == cls.__name__:
                shown = f"{cls.__name__}.{f.name} = {value!r}"
            else:
                shown = f"{source}: {f.name} = {value!r}"
            raise SegsynthError(f"{shown} {why}: {f.name} must be {allowed.describe(hints[f.name])}")
    for check in getattr(cls, "__cross_checks__", ()):  # check(values, source) -> problem or None
        problem = check({name: values.get(name, _default(cls, name)) for name in hints}, source)
        if problem:
            raise SegsynthError(f"{source}: {problem}")


def _default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None


def check_fields(config: Any) -> None:
    """Every field of a config object in its Range (the Python API's check; see `config_class`)."""
    check_values(type(config), {f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
                 type(config).__name__)


def config_class(cls: type[C]) -> type[C]:
    """@dataclass, plus a range check of every field whenever an instance is made (also by
    dataclasses.replace), so the Python API refuses what the CLI refuses."""
    cls.__post_init__ = check_fields
    return dataclasses.dataclass(cls)


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
        if f.name in positional:  # optional here: a --config file may give it; build_config asks for it if not
            parser.add_argument(f.name, nargs="?", default=None, help=help_text)
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
