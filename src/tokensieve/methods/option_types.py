"""Checking a method's options against the types its dataclass fields declare.

Run when a method is constructed, so ``FastV(keep="0.5")`` or ``FastV(keep=True)`` fails there with a
message that names the option and the type it takes, before any model is involved.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from ..recipe import Recipe

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "True or False", Path: "a path",
          Recipe: "a Recipe", dict: "a dict", type(None): "None"}


def check_option_types(method: Any) -> None:
    """Raise TypeError for the first option of ``method`` (a dataclass) whose value its annotation refuses."""
    hints = typing.get_type_hints(type(method))
    for field in dataclasses.fields(method):
        if field.name.startswith("_"):
            continue
        value = getattr(method, field.name)
        kind = hints[field.name]
        if not _accepts(kind, value):
            raise TypeError(f"{method.name}: {field.name} must be {_describe(kind)}, got {type(value).__name__} {value!r}")


def _accepts(kind: Any, value: Any) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_accepts(args[0], v) for v in value)
        return len(args) == len(value) and all(_accepts(a, v) for a, v in zip(args, value))
    if kind is Any:
        return True
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, origin or kind)


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        inner = _describe(args[0]) if args else "values"
        return f"a tuple of {inner.removeprefix('a ').removeprefix('an ')}s"
    return _NAMES.get(kind, getattr(kind, "__name__", str(kind)))
