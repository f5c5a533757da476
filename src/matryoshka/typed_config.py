"""Typed configuration: dataclasses <-> plain dicts / YAML, validated with errors that name the field.

Every config in the project is a dataclass whose fields carry type hints. `from_dict` walks those
hints, so a wrong type, an unknown key or a failed `validate()` is reported as, e.g.,
``model.levels[1].channels[0]: expected int, got 'abc'`` instead of a traceback from deep inside.
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from matryoshka.atomic import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the dotted path of the field."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path or '<config>'}: {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(path, f"must not be null (expected {tp})")
        errors = []
        concrete = [option for option in options if option is not type(None)]
        if len(concrete) == 1:  # an optional field: its one type's error says what is allowed
            return _convert(value, concrete[0], path)
        for option in concrete:
            try:
                return _convert(value, option, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(path, f"{value!r} does not match {tp}: " + "; ".join(errors))
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(path, f"must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        (item_type, *rest) = get_args(tp) or (Any,)
        converted = [_convert(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
        return converted if origin is list else tuple(converted)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__}")
        key_type, value_type = get_args(tp) or (Any, Any)
        return {
            _convert(k, key_type, f"{path}.<key>"): _convert(v, value_type, f"{path}.{k}")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking keys and types; then run `validate()` if defined."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{path}.{unknown[0]}" if path else unknown[0],
            f"unknown key (known keys of {cls.__name__}: {', '.join(sorted(fields))})",
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{path}.{name}" if path else name)
    try:
        instance = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(path, str(err)) from None
    validate = getattr(instance, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            if path and not err.path.startswith(path):
                raise ConfigError(f"{path}.{err.path}" if err.path else path, str(err).split(": ", 1)[1]) from None
            raise
    return instance


def to_dict(instance: Any) -> Any:
    """Dataclass (or nested lists/dicts of them) -> plain YAML-safe Python values."""
    if dataclasses.is_dataclass(instance) and not isinstance(instance, type):
        return {f.name: to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
    if isinstance(instance, list | tuple):
        return [to_dict(v) for v in instance]
    if isinstance(instance, dict):
        return {k: to_dict(v) for k, v in instance.items()}
    return instance


def load_yaml(cls: type[T], path: str | os.PathLike) -> T:
    """Load and validate a YAML file into `cls`."""
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ConfigError("", f"{path} is not valid YAML: {err}") from None
    return from_dict(cls, data)


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(to_dict(data), sort_keys=False)


def save_yaml(instance: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, dump_yaml(instance))


def require(condition: bool, path: str, message: str) -> None:
    """Raise ConfigError(path, message) unless condition holds (for use in `validate()`)."""
    if not condition:
        raise ConfigError(path, message)


__all__ = [
    "ConfigError",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "require",
    "save_yaml",
    "to_dict",
]
