"""Typed, self-validating dataclass sections: the type checks and the mapping -> dataclass conversion behind
:mod:`training.config`.

Each field's value is checked against its annotation (bool, int, float, str, Literal, Optional/Union, list, nested
sections); values convert only where that loses nothing (int -> float, numeric strings such as YAML 1.1's ``3e-4``
-> float, mappings -> sections). Errors name the dotted key (``optim.lr``) or ``Class.field``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, fields
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names the key."""


# ---------------------------------------------------------------------------------------------- type checking


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return f"a mapping ({hint.__name__})"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against the type hint (converted where lossless: int -> float, numeric strings such as
    YAML's ``3e-4`` -> float, mappings -> dataclasses). Raises ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: expected {_type_name(hint)}, got null")
        errors = []
        for alternative in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, alternative, key)
            except ConfigError as e:
                structured = typing.get_origin(alternative) is list or dataclasses.is_dataclass(alternative)
                errors.append((structured, e))
        # a list or mapping that failed inside: report the inner problem (e.g. an unknown key of a list item)
        inner = [e for structured, e in errors if structured and isinstance(value, (list, dict))]
        if len(errors) == 1 or inner:
            raise (inner or [errors[0][1]])[0]
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value in typing.get_args(hint) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(hint)}, got {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return from_dict(hint, value, key)
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a hint this module does not use
        raise TypeError(f"{key}: unsupported config type {hint!r}")
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class Section:
    """Base of the config dataclasses: type-checks every field, then runs ``validate()``."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            if not f.init:
                continue
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f"{type(self).__name__}.{f.name}"))
        self.validate()

    def validate(self) -> None:
        """Range and consistency checks (raise ConfigError naming the field and the value)."""

    def _fail(self, name: str, expected: str) -> None:
        raise ConfigError(f"{type(self).__name__}.{name}: expected {expected}, got {getattr(self, name)!r}")

    def _at_least(self, minimum: float, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < minimum):
                self._fail(name, f">= {minimum}")

    def to_dict(self) -> dict:
        return asdict(self)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build section ``cls`` from a mapping; keys not given keep their defaults. Errors name the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping ({cls.__name__}), got {data!r}")
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s}"
            + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; known keys{' of ' + prefix if prefix else ''}: {sorted(known)}"
        )
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        default = _default_of(known[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # a partial mapping updates the section's default values
            kwargs[name] = from_dict(type(default), {**_shallow(default), **value}, key)
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    missing = [n for n, f in known.items() if n not in kwargs and _default_of(f) is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing config key {prefix + '.' if prefix else ''}{missing[0]}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}: {e}" if prefix else str(e)) from None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shallow(section: Any) -> dict:
    return {f.name: getattr(section, f.name) for f in fields(section) if f.init}
