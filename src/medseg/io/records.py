"""Small files read with bounds: a params file (YAML) and the JSON records and specs written
beside data and weights. Neither is large, so anything far larger is refused before it is
parsed, and YAML aliases are counted before they expand.

``params.yaml`` is read as DVC reads it (``dvc.utils.serialize.parse_yaml``: ruamel.yaml's safe
loader, YAML 1.2), so that the value a stage used is the one ``dvc params diff`` and ``dvc exp
show`` report: ``1e-3`` is a float, ``yes`` and ``on`` are strings, ``017`` is 17. PyYAML reads
YAML 1.1 and disagrees on each of these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import MappingNode, Node, SequenceNode

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
        return _yaml_loader().load(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise MedsegError(f"params file {path} is not UTF-8 text ({err.reason})") from None
    except _TooLarge as err:
        raise MedsegError(f"params file {path}: {err}; not a params file") from None
    except YAMLError as err:
        # one line: the parser's has several, and names the text it was given as a stream
        problem = cut(" ".join(str(err).replace('in "<unicode string>", ', "").split()), 300)
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


class _TooLarge(YAMLError):
    """A document beyond the bounds on alias expansion or nesting."""


class _BoundedComposer(Composer):  # type: ignore[misc]
    """ruamel.yaml's composer that refuses a document whose alias expansion or nesting is too
    large, before any Python object is constructed."""

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {}, set(), 0)
        return node


def _yaml_loader() -> YAML:
    """DVC's params loader (``YAML(typ="safe")``), in pure Python so that the bounded composer
    is the one used (the C parser composes on its own); the same resolver, the same values."""
    yaml = YAML(typ="safe", pure=True)
    yaml.Composer = _BoundedComposer
    return yaml


def _expanded_size(node: Node, sizes: dict[int, int], path: set[int], depth: int) -> int:
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
    if isinstance(node, SequenceNode):
        children: list[Node] = list(node.value)
    elif isinstance(node, MappingNode):
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
