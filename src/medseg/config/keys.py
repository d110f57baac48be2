"""How a params key is declared once, and how a section is built from a plain mapping strictly.

Each key is one `key` declaration on a frozen pydantic dataclass (`section`): its type is the
annotation; `key` gives its default (the value the shipped ``params.yaml`` holds), allowed
values, bounds and help. From it come the checks below, the one-line messages, the reference
(``docs/params.md``) and the JSON Schema of ``params.yaml`` (`medseg.config.reference`).

Loading is strict: an unknown, missing or mistyped key is an error that names it
(``train.lr``), so a typo never silently falls back to a default. A key absent from a record
(``preprocess.json`` of a model bundle, written before the key existed) takes its
``default`` where it has one (`parse` with ``defaults=True``).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, TypeVar

import annotated_types
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from typing_extensions import dataclass_transform

from medseg.errors import MedsegError, cut, shown

T = TypeVar("T")

# strict: no "1" for 1, no 1 for true; NaN and infinity are refused (they would pass every
# range check written as ``not a < x``, or poison a run); no key the section does not declare
CONFIG = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class _Same:
    """`key`'s ``default``: the same as the shipped value."""

    def __repr__(self) -> str:
        return "SAME"


SAME: Any = _Same()
_REQUIRED: Any = object()


def key(
    shipped: Any,
    *,
    help: str,
    default: Any = _REQUIRED,
    choices: tuple[Any, ...] | None = None,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    multiple_of: int | None = None,
    unit: str = "",
) -> Any:
    """One params key, declared once.

    Args:
        shipped: the value the shipped ``params.yaml`` holds (``auto`` for a planned key): the
            default the reference and the JSON Schema show, what a fresh clone runs with.
        help: what it does, one Markdown paragraph (the reference's last column).
        default: the value where the key is absent: from a record written before the key
            existed (a model bundle's ``preprocess.json``), or from a construction in code;
            `SAME`: ``shipped``; not given: required everywhere. ``params.yaml`` must hold every
            key all the same.
        choices: the values it may take (a list of `medseg.names`).
        gt, ge, lt, le: bounds; multiple_of: a divisor; unit: said after the bounds.
    """
    extra: dict[str, Any] = {"default": shipped}
    if choices is not None:
        extra["enum"] = list(choices)
    if unit:
        extra["x-unit"] = unit
    bounds = {"gt": gt, "ge": ge, "lt": lt, "le": le, "multiple_of": multiple_of}
    kwargs: dict[str, Any] = {k: v for k, v in bounds.items() if v is not None}
    kwargs.update(description=help, json_schema_extra=extra)
    if default is _REQUIRED:
        return Field(**kwargs)
    value = shipped if default is SAME else default
    if isinstance(value, list | dict):
        return Field(default_factory=functools.partial(_copy, value), **kwargs)
    return Field(value, **kwargs)


def _copy(value: Any) -> Any:
    return type(value)(value)


@dataclass_transform(frozen_default=True, field_specifiers=(Field, key))
def section(cls: type[T]) -> type[T]:
    """A params section: a frozen, strict pydantic dataclass whose construction checks every
    key (types and bounds by pydantic, then `check_choices` and the class's own
    ``__post_init__``) and raises one `MedsegError` line naming the first bad key."""
    built: Any = pydantic_dataclass(frozen=True, config=CONFIG)(cls)
    init = built.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as err:
            raise MedsegError(f"params: {message(built, err)}") from None

    built.__init__ = __init__
    return typing.cast(type[T], built)


def check_choices(cfg: Any) -> None:
    """Refuse a value outside its key's ``choices``, naming the key."""
    for name, info in cfg.__pydantic_fields__.items():
        extra = info.json_schema_extra
        choices = extra.get("enum") if isinstance(extra, dict) else None
        value = getattr(cfg, name)
        if choices is not None and value not in choices:
            raise MedsegError(
                f"params: {cfg.SECTION}.{name} must be one of {', '.join(map(str, choices))}; "
                f"got {shown(value)}"
            )


def parse(
    cls: type[T], raw: Any, prefix: str = "", source: str = "params", defaults: bool = False
) -> T:
    """Build section ``cls`` from a plain mapping, strictly.

    Args:
        cls: a `section` class.
        raw: the mapping, as read from YAML or JSON.
        prefix: dotted key of ``raw`` within the file, for messages (``"train."``).
        source: the file name, for messages.
        defaults: a key absent from ``raw`` takes its ``default`` (a record written before
            the key existed, e.g. a model bundle's); without one it is still missing.

    Raises:
        MedsegError: naming ``source`` and the first unknown, missing, mistyped or out-of-range
            key.
    """
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise MedsegError(f"{source}: {where} must be a mapping of keys to values")
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted((k for k in raw if k not in names), key=str)
    if unknown:
        raise MedsegError(
            f"{source}: unknown key {prefix}{cut(str(unknown[0]), 60)}; known keys in {where}: "
            f"{', '.join(names)}"
        )
    fields = getattr(cls, "__pydantic_fields__", {})
    optional = {n for n, info in fields.items() if not info.is_required()} if defaults else set()
    missing = [n for n in names if n not in raw and n not in optional]
    if missing:
        raise MedsegError(f"{source}: missing key {prefix}{missing[0]}")
    try:
        return cls(**raw)
    except MedsegError as err:
        raise MedsegError(f"{source}: {str(err).removeprefix('params: ')}") from None


def message(cls: Any, err: ValidationError) -> str:
    """The first error of a section's validation as one line: ``train.lr must be ...``."""
    errors = err.errors(include_url=False)
    first = errors[0]
    name = str(first["loc"][0]) if first["loc"] else ""
    key = f"{cls.SECTION}.{name}"
    if len(errors) > 1 and all(e["loc"][:1] == first["loc"][:1] for e in errors):
        union = [e for e in errors if e["type"] == "literal_error"]
        if union and isinstance(first["input"], str):  # "yes" for a bool | "auto" key
            expected = union[0]["ctx"]["expected"].replace("'", "")
            return f"{key} must be one of {expected}; got {shown(first['input'])}"
    item = [p for p in first["loc"][1:] if isinstance(p, int)]
    return _describe(key + "".join(f"[{i}]" for i in item), first, cls.__pydantic_fields__[name])


_TYPES = {
    "int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
    "int_from_float": "int",
}  # fmt: skip


def _describe(key: str, error: Any, info: Any) -> str:
    kind, value = error["type"], error["input"]
    if kind == "finite_number" or (kind == "float_type" and _huge_int(value)):
        return f"{key} must be a finite number, got {shown(value)}"
    if kind in _TYPES:
        return f"{key} must be of type {_TYPES[kind]}, got {shown(value)} ({type(value).__name__})"
    if kind == "list_type":
        return f"{key} must be a list, got {shown(value)}"
    if kind == "dict_type":
        return f"{key} must be a mapping, got {shown(value)}"
    if kind in _BOUNDS:
        failed = next(iter(error.get("ctx") or {}), None)  # the one bound it broke: gt, le...
        return f"{key} must be {bounds_text(info, failed)}, got {shown(value)}"
    if kind == "literal_error":
        expected = error["ctx"]["expected"].replace("'", "")
        return f"{key} must be one of {expected}; got {shown(value)}"
    return f"{key}: {cut(error['msg'], 100)}, got {shown(value)}"


_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of")


def _huge_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def constraints(info: Any) -> dict[str, Any]:
    """The bounds of a key (``gt``, ``ge``, ``lt``, ``le``, ``multiple_of``), from its field or
    from the number inside its union (``float | "auto"``)."""
    found: dict[str, Any] = {}
    metadata = list(info.metadata)
    for member in typing.get_args(info.annotation):
        for inner in typing.get_args(member)[1:] if typing.get_origin(member) else ():
            metadata.extend(getattr(inner, "metadata", []))
    for item in metadata:
        for name in ("gt", "ge", "lt", "le", "multiple_of"):
            if isinstance(item, _BOUND_TYPES) and hasattr(item, name):
                found[name] = getattr(item, name)
    return found


_BOUND_TYPES = (
    annotated_types.Gt, annotated_types.Ge, annotated_types.Lt, annotated_types.Le,
    annotated_types.MultipleOf,
)  # fmt: skip


def _interval(info: Any) -> str | None:
    """``[0, 1)``: both bounds of a float key, else None."""
    bound = constraints(info)
    low = "(" if "gt" in bound else "[" if "ge" in bound else None
    high = ")" if "lt" in bound else "]" if "le" in bound else None
    number = _number_type(info) is float
    if low is None or high is None or not number:
        return None
    lo = bound.get("gt", bound.get("ge"))
    hi = bound.get("lt", bound.get("le"))
    return f"{low}{lo}, {hi}{high}"


def bounds_text(info: Any, only: str | None = None) -> str:
    """What a key's bounds allow, as the messages and the reference say it: ``in [0, 1)``,
    ``> 0``, ``a positive multiple of 32``; ``or null`` where null is allowed too. ``only``:
    the one bound to say (``gt``, ``le``, ...) where they are not an interval of floats."""
    bound = constraints(info)
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    unit = f" {extra['x-unit']}" if extra.get("x-unit") else ""
    if "multiple_of" in bound:
        return f"a positive multiple of {bound['multiple_of']}"
    interval = _interval(info)
    if interval is not None:
        text = f"in {interval}{unit}"
    else:
        ops = [(">", "gt"), (">=", "ge"), ("<", "lt"), ("<=", "le")]
        said = [(op, name) for op, name in ops if name in bound and only in (None, name)]
        text = " and ".join(f"{op} {bound[name]}" for op, name in said) + unit
    return f"{text} or null" if _optional(info) else text


def _optional(info: Any) -> bool:
    return type(None) in typing.get_args(info.annotation)


def _number_type(info: Any) -> type | None:
    for member in (info.annotation, *typing.get_args(info.annotation)):
        annotated = typing.get_origin(member) is typing.Annotated
        base = typing.get_args(member)[0] if annotated else member
        if base in (int, float):
            return typing.cast(type, base)
    return None
