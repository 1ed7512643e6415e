"""Configs in the torchtune style: a YAML file of a dataclass's fields, then `key=value` overrides on the command line
(`lr=1e-5`, `data.paths=[a.txt,b.txt]`). Every key is checked: an unknown one, or a value of the wrong type, is one
sentence that names the valid keys or the expected type. A float key takes any finite number as a user writes it
(1e-5, 2E-5, 5e-05, .5: YAML alone reads an exponent without a dot as text)."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml

from errors import UserError


def load_config(cls, path: str | Path | None = None, overrides: list[str] = ()):
    """An instance of the dataclass `cls` from a YAML file and `key=value` overrides (overrides win)."""
    values = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise UserError(f"Config file {path} does not exist; pass one of the files in configs/.") from None
        except yaml.YAMLError as e:
            raise UserError(f"Config file {path} is not valid YAML ({str(e).splitlines()[0]}); fix the file.") from None
        if not isinstance(values, dict):
            raise UserError(f"Config file {path} must hold a mapping of keys to values.")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"Override {item!r} is not of the form key=value (e.g. lr=1e-5).")
        *parents, last = key.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"Override {item!r}: {part} is not a section.")
        node[last] = yaml.safe_load(text) if text else None
    return _build(cls, values, "")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"Unknown config key {prefix}{unknown[0]}; valid keys are: {', '.join(sorted(known))}.")
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise UserError(f"Config key {prefix}{name} must be a section of keys.")
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def _check(value, kind, key: str):
    """The value, if it fits the annotated type (an int is a float too); else a UserError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is dict:  # a section of free keys (the one who takes it checks their names)
        if not isinstance(value, dict):
            raise UserError(f"Config key {key} must be a section of keys.")
        return {k: _check(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_check(v, args[0], key) for v in value]
    if kind is float and isinstance(value, str):  # YAML reads 1e-5, 2E-5, 5e-05 (no dot) as text
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UserError(f"Config key {key} must be a finite number, not {value!r}.")
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"Config key {key} must be {kind.__name__}, not {value!r}.")
    return value


def parse_length(text: str) -> int:
    """A context length from the command line: tokens, or thousands of 1,024 with a k ("4k" = 4096)."""
    text = text.strip().lower()
    try:
        return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
    except ValueError:
        raise UserError(f"Cannot read the length {text!r}: it is not a number of tokens like 4096 or 4k.") from None
