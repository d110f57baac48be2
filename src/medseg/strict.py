"""Frozen dataclasses built strictly from plain mappings (a params section, a JSON record):
an unknown, missing or mistyped key is an error that names it (``train.lr``), so a typo never
silently falls back to a default."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from medseg.errors import MedsegError, cut, shown

T = TypeVar("T")


def parse(
    cls: type[T], raw: Any, prefix: str = "", source: str = "params", defaults: bool = False
) -> T:
    """Build dataclass ``cls`` from a plain mapping, strictly.

    Args:
        cls: a dataclass type whose fields have simple annotations (int, float, str, bool,
            ``X | None``, ``list[X]`` or nested dataclasses).
        raw: the mapping, as read from YAML.
        prefix: dotted key of ``raw`` within the file, for messages (``"train."``).
        source: the file name, for messages.
        defaults: a key absent from ``raw`` takes its field's default (a record written before
            the key existed, e.g. a model bundle's); without one it is still missing.

    Raises:
        MedsegError: naming the first unknown, missing or mistyped key.
    """
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise MedsegError(f"{source}: {where} must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted((k for k in raw if k not in names), key=str)
    if unknown:
        raise MedsegError(
            f"{source}: unknown key {prefix}{cut(str(unknown[0]), 60)}; known keys in {where}: "
            f"{', '.join(names)}"
        )
    given = [n for n in names if n in raw]
    missing = [n for n in names if n not in raw and not (defaults and _has_default(cls, n))]
    if missing:
        raise MedsegError(f"{source}: missing key {prefix}{missing[0]}")
    values = {n: _coerce(hints[n], raw[n], f"{prefix}{n}", source) for n in given}
    try:
        return cls(**values)
    except MedsegError as err:
        raise MedsegError(f"{source}: {str(err).removeprefix('params: ')}") from None


def _has_default(cls: type, name: str) -> bool:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return not (
        field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    )


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, prefix=f"{key}.", source=source)  # type: ignore[arg-type]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        first, *rest = inner
        try:
            return _coerce(first, value, key, source)
        except MedsegError:
            for other in rest:  # float | str: a later type takes what the first refuses
                with contextlib.suppress(MedsegError):
                    return _coerce(other, value, key, source)
            raise
    if origin is dict:
        if not isinstance(value, dict):
            raise MedsegError(f"{source}: {key} must be a mapping, got {shown(value)}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise MedsegError(f"{source}: {key} must be a list, got {shown(value)}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise MedsegError(
            f"{source}: {key} must be of type {tp.__name__}, got {shown(value)} "
            f"({type(value).__name__})"
        )
    if tp is float:
        return _finite(value, key, source)
    return value


def _finite(value: int | float, key: str, source: str) -> float:
    """A finite float: NaN or infinity would pass every range check written as ``not a < x``,
    or poison a run (an infinite learning rate, a NaN threshold)."""
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise MedsegError(f"{source}: {key} must be a finite number, got {shown(value)}")
    return number
