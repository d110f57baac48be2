"""The params reference and JSON Schema, derived from the key declarations
(`medseg.config.sections`): ``docs/params.md`` and ``docs/params.schema.json``.

``python -m medseg.config.reference`` writes both (run from the repository root);
``--check`` only says whether the committed files are current (``tests/test_docs.py`` checks
the same).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from medseg import names
from medseg.config.keys import bounds_text
from medseg.config.sections import Params
from medseg.planning.settings import KEYS as AUTO_KEYS

MARKDOWN = Path("docs/params.md")
SCHEMA = Path("docs/params.schema.json")

_HEADER = """\
# Parameters

<!-- Generated from src/medseg/config/sections.py by `python -m medseg.config.reference`;
edit the declarations there, not this file. -->

Every hyperparameter lives in `params.yaml`, one section per pipeline stage plus `data` (read by
`convert`). Each section is a frozen model in `src/medseg/config/sections.py` (`data` ->
`DataConfig`, `train` -> `TrainConfig`, ...), where each key is declared once: type, default,
allowed values, bounds and help; this page and the JSON Schema `params.schema.json` are made from
those declarations. Loading is strict: a typo, an unknown or missing key or a wrong type stops the
first stage with one line naming the key and a non-zero exit, before any output is written.
`medseg check-params` runs the same check without running anything.

`auto`, the default of the keys that say so below, leaves the value to the plan stage, which
chooses it from the training cases' fingerprint and writes it, with its reason, to `plans.json`
([plan.md](plan.md)); a value given in `params.yaml` always wins.

`params.yaml` is read as DVC reads it (YAML 1.2, ruamel.yaml's safe loader), so a stage uses the
value `dvc params diff` and `dvc exp show` report: `1e-3` is a number, `yes`, `no`, `on` and `off`
are strings (write `true` and `false`), `017` is 17. Change any key for one run with
`dvc exp run -S section.key=value`.

The **default** column is the value the shipped `params.yaml` holds (what a fresh clone runs
with); every key must be in the file all the same. The **type** column is the key's type; `None`
is written `null` in YAML. The **allowed** column is its choices or bounds.

Editors complete and check `params.yaml` against [params.schema.json](params.schema.json): the
first line of `params.yaml`, `# yaml-language-server: $schema=docs/params.schema.json`, points
the YAML language server (VS Code's YAML extension, and other editors' YAML support) at it.
"""


def sections() -> dict[str, Any]:
    """params.yaml section name -> its section class, in the file's order."""
    return dict(typing.get_type_hints(Params))


def params_markdown() -> str:
    """``docs/params.md``: the header, then per section its docstring and a table of its keys."""
    parts = [_HEADER]
    for name, cls in sections().items():
        rows = [
            "| key | type | default | allowed | what it does |",
            "| --- | --- | --- | --- | --- |",
        ]
        for key, info in cls.__pydantic_fields__.items():
            cells = [
                _code(key), _code(type_text(info.annotation)), _code(_yaml(shipped(info))),
                allowed_text(info), info.description or "",
            ]  # fmt: skip
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        parts.append(f"## {name}\n\n{inspect.cleandoc(cls.__doc__ or '')}\n\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


def params_schema() -> dict[str, Any]:
    """The JSON Schema of ``params.yaml``: every key required, none other allowed, ``auto``
    allowed where the plan chooses (`medseg.planning.settings`), defaults as shipped."""
    schema = TypeAdapter(Params).json_schema()
    for name, cls in sections().items():
        definition = schema["$defs"][cls.__name__]
        definition["required"] = list(definition["properties"])
        for key, prop in definition["properties"].items():
            prop.pop("x-unit", None)
            prop.pop("title", None)
            if f"{name}.{key}" in AUTO_KEYS and names.AUTO not in prop.get("enum", ()):
                inner = {k: v for k, v in prop.items() if k not in ("default", "description")}
                prop.clear()
                prop.update(
                    anyOf=[inner, {"const": names.AUTO}],
                    default=names.AUTO,
                    description=cls.__pydantic_fields__[key].description,
                )
    return {
        # draft 7, which editors' YAML support reads best; every keyword here is one of it
        "$schema": "http://json-schema.org/draft-07/schema#",
        **{k: v for k, v in schema.items() if k not in ("title", "description")},
        "title": "medseg params.yaml",
        "description": "Generated from src/medseg/config/sections.py; see docs/params.md.",
    }


def schema_text() -> str:
    """`params_schema` as the committed file holds it."""
    return json.dumps(params_schema(), indent=2, sort_keys=False) + "\n"


def shipped(info: Any) -> Any:
    """A key's shipped value (`medseg.config.keys.key`)."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return copy.deepcopy(extra.get("default"))


def allowed_text(info: Any) -> str:
    """The choices or bounds of a key, for the reference: ``green, gray, rgb``, ``> 0``."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if extra.get("enum"):
        return ", ".join(_code(_yaml(v)) for v in extra["enum"])
    return bounds_text(info).removesuffix(" or null")


def type_text(annotation: Any) -> str:
    """A type as the reference writes it: ``float | None``, ``list[int]``, ``bool | auto``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is list:
        return f"list[{type_text(args[0])}]"
    if origin is dict:
        return "dict"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _yaml(value: Any) -> str:
    """A value as YAML flow text: ``null``, ``true``, ``[0, 1]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _code(text: str) -> str:
    return f"`{text}`"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check``, compare) ``docs/params.md`` and ``docs/params.schema.json``."""
    parser = argparse.ArgumentParser(prog="python -m medseg.config.reference")
    parser.add_argument("--check", action="store_true", help="only say whether they are current")
    args = parser.parse_args(argv)
    stale = []
    for path, text in ((MARKDOWN, params_markdown()), (SCHEMA, schema_text())):
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        stale.append(str(path))
        if not args.check:
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print(f"stale: {', '.join(stale)}; run python -m medseg.config.reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
