"""The pydantic glue under :mod:`training.config`: the section base class, a library dataclass's fields as section
fields, and pydantic's validation errors as :class:`ConfigError` messages that name the dotted key.

pydantic checks every value against its annotation -- also inside the stdlib dataclasses of ``vlm`` and
``data_pipelines`` used as (parts of) sections, whose own ``__post_init__`` checks then run -- and converts only
where nothing is lost (int -> float, YAML 1.1's ``3e-4`` string -> float, ``"7"`` -> 7; ``2.5`` is no int).
Unknown keys are errors. ``vlm`` and ``data_pipelines`` do not import pydantic: their dataclasses stay plain.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import re
import types
import typing
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names the dotted key, the value and what was
    expected."""


# ---------------------------------------------------------------------------------------------- raising


def invalid(key: str, message: str) -> PydanticCustomError:
    """The error a section's validator raises about ``key`` (dotted, relative to the section; "" for itself)."""
    return PydanticCustomError("config", "{message}", {"key": key, "message": message})


def expected(key: str, what: str, value: Any) -> PydanticCustomError:
    return invalid(key, f"expected {what}, got {value!r}")


_LIBRARY_MESSAGE = re.compile(r"^(\w+)\.(\w+):? (.*)$", re.S)


def library_error(error: Exception, prefix: str = "") -> PydanticCustomError:
    """A library dataclass's error (``"LoaderConfig.batch_size must be an int >= 1, got 0"``) as an error of the
    field it names, under ``prefix`` (``"pairs"`` -> ``pairs.batch_size: must be an int >= 1, got 0``)."""
    text = str(error)
    match = _LIBRARY_MESSAGE.match(text)
    if match is None:
        return invalid(prefix, text)
    return invalid(f"{prefix}.{match[2]}" if prefix else match[2], match[3])


# ---------------------------------------------------------------------------------------------- sections


class _SectionMeta(type(BaseModel)):
    """Direct construction (``OptimConfig(lr="fast")``) raises ConfigError too. Sections nested in a mapping are
    built by pydantic itself and never come through here (their errors reach the outermost caller, with the key)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as e:
            raise ConfigError(describe(e, cls, cls.__name__)) from None


class Section(BaseModel, metaclass=_SectionMeta):
    """Base of the config sections: typed fields, unknown keys rejected, assignments checked too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    def to_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: Any, prefix: str = "") -> Any:
        """The section from a mapping (all of it: merge partial mappings onto defaults first, see :func:`merge`)."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(describe(e, cls, prefix)) from None


def dataclass_fields(
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
    defaults: Optional[dict[str, Any]] = None,
    optional: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The fields of the library dataclass ``cls`` as ``pydantic.create_model`` field definitions: the same names,
    types and defaults, so a section made of them cannot fall out of step with the library. ``defaults`` replaces
    some defaults; ``optional`` fields also take None (their default, if they had none)."""
    defaults = defaults or {}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    stray = (set(exclude) | set(defaults) | set(optional)) - names
    if stray:
        raise TypeError(f"{cls.__name__} has no fields {sorted(stray)}")
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude:
            continue
        hint = StrictBool if hints[f.name] is bool else hints[f.name]  # YAML has booleans: 1 or "yes" is a mistake
        hint = Optional[hint] if f.name in optional else hint
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory)
        else:
            default = None if f.name in optional else ...
        out[f.name] = (hint, default)
    return out


def merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``: mappings merge key by key (a partial section keeps its other values), anything
    else replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------- errors


def type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(hint))
    if origin in (list, tuple, collections.abc.Sequence):
        return f"list of {type_name(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint) or isinstance(hint, type) and issubclass(hint, BaseModel):
        return f"a mapping ({hint.__name__})"
    return getattr(hint, "__name__", str(hint))


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _without_none(hint: Any) -> Any:
    if _is_union(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else Union[tuple(args)]
    return hint


def _field_hints(cls: Any) -> dict[str, Any]:
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return {name: f.annotation for name, f in cls.model_fields.items()}
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    return {}


def _walk(root: type, loc: tuple) -> tuple[list, Any, Optional[Any]]:
    """pydantic's location -> (the key's parts, the type there, the union on the way if any). pydantic adds a tag
    per union member to the location; those are dropped (a union here holds no sections, so nothing is lost)."""
    parts: list = []
    current: Any = root
    union = None
    for item in loc:
        if union is not None:  # inside a union member: keep list positions only
            if isinstance(item, int):
                parts.append(item)
            continue
        current = _without_none(current)
        if _is_union(current):
            union = current
            continue
        parts.append(item)
        if isinstance(item, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        else:
            current = _field_hints(current).get(item)
    return parts, current, union


def dotted(parts: list, prefix: str = "") -> str:
    out = prefix
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "":
            out = f"{out}.{part}" if out else str(part)
    return out


def _message(error: dict, root: type, prefix: str) -> tuple[str, str]:
    """(dotted key, one line) for one pydantic error."""
    parts, _, union = _walk(root, error["loc"])
    key = dotted(parts, prefix)
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "config":
        key = dotted([*parts, *ctx["key"].split(".")], prefix) if ctx["key"] else key
        return key, f"{key}: {ctx['message']}"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        parent_parts, parent, _ = _walk(root, error["loc"][:-1])
        where = dotted(parent_parts, prefix)
        known = sorted(_field_hints(_without_none(parent)))
        return key, f"unknown config key {key}; known keys{' of ' + where if where else ''}: {known}"
    if kind in ("missing", "missing_argument", "missing_keyword_argument"):
        return key, f"missing config key {key}"
    if kind in ("value_error", "assertion_error") and isinstance(ctx.get("error"), Exception):
        text = str(ctx["error"])  # a library dataclass's own check: "SyntheticConfig.max_count must be ..."
        match = _LIBRARY_MESSAGE.match(text)
        if match is not None:
            key = dotted([*parts, match[2]], prefix)
            text = match[3]
        return key, f"{key}: {text}"
    value = error.get("input")
    if union is not None:
        return key, f"{key}: expected {type_name(union)}, got {value!r}"
    if kind == "too_short":
        return key, f"{key}: expected at least {ctx.get('min_length')} item(s), got {value!r}"
    text = re.sub(r"^Input should (be )?", "expected ", error["msg"])
    if kind.endswith("_parsing") or kind == "int_from_float":  # "expected a valid integer, got a number with ..."
        head, _, why = text.partition(", ")
        text = f"{head} ({why.removeprefix('got ')})" if why else head
    return key, f"{key}: {text}, got {value!r}"


def describe(error: ValidationError, root: type, prefix: str = "") -> str:
    """Every problem of a failed validation, one line each, keys dotted (``data.pairs.sources[0].weight``)."""
    lines: dict[str, str] = {}
    for e in error.errors(include_url=False):
        key, line = _message(e, root, prefix)
        lines.setdefault(key, line)  # one line per key (a union's members each report the same value)
    return "\n".join(lines.values())
