"""Strict typed configuration: every field of a config dataclass is coerced to, or refused by, its declared type.

One helper for every config dataclass of tpblocks (run, train, data, optim, scheduler, trainer, parallel,
layer_parallel, wandb, model). Values arrive from Hydra/YAML (``abc`` is a str, ``64.0`` a float, ``null`` None),
from environment interpolations (always str) or from Python. The rules, per declared type:

  int      an int, a float that is integral (``64.0``) or a string spelling one; never a bool
  float    an int, a float or a string spelling one; finite (NaN and inf are refused)
  bool     True/False or the strings true/false (any case); ``no``, ``maybe``, 1 are refused, never truthy
  str      a str (an int/float becomes its text: ``name=2024``)
  Literal  one of the listed values
  X | None None, or an X
  tuple[str, ...] / dict   a list/tuple / a mapping

A refusal is one ``ValueError`` line naming the field, the value and the expected type:
``train.max_steps='abc' must be an integer``. Checking happens in each dataclass's ``__post_init__``
(``check_fields(self, "train")``), so ``ModelConfig(hidden_size="64")`` from Python is checked like a Hydra override.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from functools import cache
from typing import Any, Literal, Union

_NO_VALUE = object()


def require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``: the one spelling of a config check."""
    if not ok:
        raise ValueError(message)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or null"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        tp, "a list" if origin is tuple else getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or ``_NO_VALUE`` when it is not one."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            return None if type(None) in typing.get_args(tp) else _NO_VALUE
        for arg in typing.get_args(tp):
            if arg is not type(None) and (got := _coerce(value, arg)) is not _NO_VALUE:
                return got
        return _NO_VALUE
    if origin is Literal:
        plain = isinstance(value, str | int) and not isinstance(value, bool)
        return value if plain and value in typing.get_args(tp) else _NO_VALUE
    if tp is bool:
        if isinstance(value, bool):
            return value
        lowered = value.strip().lower() if isinstance(value, str) else None
        return {"true": True, "false": False}.get(lowered, _NO_VALUE)
    if tp is int:
        return _as_int(value)
    if tp is float:
        return _as_float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else _NO_VALUE
    if origin is tuple:
        return tuple(str(v) for v in value) if isinstance(value, list | tuple) else _NO_VALUE
    if tp is dict or origin is dict:
        return dict(value) if isinstance(value, dict) else _NO_VALUE
    return value  # a nested config object or another type: the dataclass checks it itself


def _as_int(value: Any) -> Any:
    if isinstance(value, bool):
        return _NO_VALUE
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            value = _as_float(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return _NO_VALUE


def _as_float(value: Any) -> Any:
    if isinstance(value, bool):
        return _NO_VALUE
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return _NO_VALUE
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return _NO_VALUE


def field_name(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def check_fields(obj: Any, section: str = "") -> None:
    """Coerce every field of the (frozen) dataclass ``obj`` to its declared type in place, or raise a
    ``ValueError`` naming ``section.field``, the value and the expected type. Call first in ``__post_init__``."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        got = _coerce(value, hints[f.name])
        if got is _NO_VALUE:
            shown = "null" if value is None else repr(value)
            raise ValueError(f"{field_name(section, f.name)}={shown} must be {_describe(hints[f.name])}")
        if got is not value:
            object.__setattr__(obj, f.name, got)


def check_known(cls: type, values: dict, section: str) -> None:
    """Refuse keys of ``values`` that are not fields of ``cls`` (a typo would otherwise be silently ignored)."""
    refuse_unknown(values, {f.name for f in dataclasses.fields(cls)}, section)


def refuse_unknown(values: dict, known: Iterable[str], section: str, hint: str = "") -> None:
    """The one unknown-key check: ``section has unknown key(s) [...]; known keys: [...]`` (+ ``hint``)."""
    known = sorted(known)
    unknown = sorted(set(values) - set(known))
    message = f"{section or 'the config'} has unknown key(s) {unknown}; known keys: {known}"
    require(not unknown, f"{message} {hint}" if hint else message)


def from_mapping(cls: type, values: dict | None, section: str) -> Any:
    """Build the config dataclass ``cls`` from a plain mapping (e.g. an OmegaConf block), unknown keys refused."""
    require(values is None or isinstance(values, dict), f"{section} must be a mapping of keys, got {values!r}")
    values = dict(values or {})
    check_known(cls, values, section)
    return cls(**values)
