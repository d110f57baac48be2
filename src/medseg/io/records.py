"""Small files read with bounds: a params file (YAML) and the JSON records and specs written
beside data and weights. Neither is large, so anything far larger is refused before it is
parsed, and YAML aliases are counted before they expand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from medseg.errors import MedsegError, cut

# Bounds on a params file: it is a few kilobytes, so anything far larger is not one. Aliases
# (``*name``) are resolved by reference, but the code that walks the values (messages, records,
# `dataclasses.asdict`) expands them: a "billion laughs" file of nested aliases would eat memory.
MAX_PARAMS_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # nodes after alias expansion
MAX_YAML_DEPTH = 64


def read_yaml(path: Path) -> Any:
    """A small YAML file, read with bounds on its size, alias expansion and nesting.

    Raises:
        MedsegError: the file cannot be read, is too large, not YAML, or expands too far.
    """
    data = _read_at_most(path, MAX_PARAMS_BYTES, "params file")
    try:
        loader = _BoundedLoader(data.decode("utf-8"))
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except UnicodeDecodeError as err:
        raise MedsegError(f"params file {path} is not UTF-8 text ({err.reason})") from None
    except _TooLarge as err:
        raise MedsegError(f"params file {path}: {err}; not a params file") from None
    except yaml.YAMLError as err:
        problem = cut(" ".join(str(err).split()), 300)  # one line: the parser's has several
        raise MedsegError(f"params file {path} is not valid YAML: {problem}") from None
    except RecursionError:  # nesting deeper than the parser's own stack
        raise MedsegError(f"params file {path}: values nested too deeply") from None
    except ValueError as err:  # an integer of thousands of digits: Python refuses to convert it
        raise MedsegError(f"params file {path} cannot be read: {cut(str(err), 120)}") from None


# A spec or record (JSON written beside data or weights) is a few hundred bytes.
MAX_RECORD_BYTES = 1 << 20


def _read_at_most(path: Path, limit: int, what: str) -> bytes:
    """The bytes of ``path``, refused (naming it as ``what``) when it holds more than ``limit``:
    no more than that is read."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise MedsegError(f"cannot read the {what} {path}: {err.strerror}") from err
    if len(data) > limit:
        raise MedsegError(f"{what} {path}: larger than {limit >> 20} MiB; not a {what}")
    return data


def read_json(path: Path, what: str) -> Any:
    """A small JSON file (a spec or a record), bounded in size before it is parsed.

    Raises:
        MedsegError: naming the file: unreadable, too large or not JSON.
    """
    data = _read_at_most(path, MAX_RECORD_BYTES, what)
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as err:
        detail = type(err).__name__ if isinstance(err, RecursionError) else str(err)
        raise MedsegError(f"{path}: not a valid {what} ({cut(detail, 120)})") from None


class _TooLarge(yaml.YAMLError):
    """A document beyond the bounds on alias expansion or nesting."""


# libyaml's parser where PyYAML was built with it: 15x faster, and it bounds nesting itself
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _BoundedLoader(_SafeLoader):  # type: ignore[misc]
    """PyYAML's safe loader that refuses a document whose alias expansion or nesting is too
    large, before any Python object is constructed."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {}, set(), 0)
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], path: set[int], depth: int) -> int:
    """Nodes under ``node`` with every alias expanded (memoised by node, so the count itself
    costs one visit per distinct node)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in path:
        raise _TooLarge("an alias refers to a node that contains it (recursive alias)")
    if depth > MAX_YAML_DEPTH:
        raise _TooLarge(f"values nested deeper than {MAX_YAML_DEPTH} levels")
    path.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, sizes, path, depth + 1)
        if size > MAX_YAML_NODES:
            raise _TooLarge(
                f"more than {MAX_YAML_NODES} values once aliases are expanded (an alias bomb?)"
            )
    path.discard(key)
    sizes[key] = size
    return size
