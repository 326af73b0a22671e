"""Typed configs: dataclasses filled from YAML/JSON dicts and `key=value` overrides, with one-line errors.

Configs are data. Everything that builds a config from outside input goes through `from_dict` or
`apply_overrides`, so an unknown field or a value of the wrong type is reported the same way everywhere:
naming the source, the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Iterable, TypeVar

import yaml

from dnascale.errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a (simple) annotation, converting the few safe cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: expected {annotation}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return from_dict(annotation, value, where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Any, source: str) -> T:
    """Build dataclass `cls` from a mapping; unknown or mistyped fields raise ConfigError naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"{source}: unknown field {unknown[0]!r} for {cls.__name__} (known: {', '.join(sorted(types_))})"
        )
    values = {name: _coerce(value, types_[name], f"{source}: {name}") for name, value in data.items()}
    try:
        config = cls(**values)
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def apply_overrides(config: T, overrides: Iterable[str], source: str = "override") -> T:
    """Return a copy of `config` with `field=value` (or `nested.field=value`) overrides; values parse as YAML."""
    data = dataclasses.asdict(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source} {item!r}: expected field=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"{source} {item!r}: value is not valid YAML") from None
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{source} {item!r}: {part!r} is not a nested config of {type(config).__name__}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(
                f"{source} {item!r}: unknown field {leaf!r} for {type(config).__name__} (known: {', '.join(sorted(node))})"
            )
        node[leaf] = value
    return from_dict(type(config), data, source)


def load_yaml(path: str) -> dict:
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    return data or {}
