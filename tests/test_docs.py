"""The documentation says what the code does: the params reference, the links, the help text."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from medseg.config import Params

PARAMS_DOC = REPO / "docs" / "params.md"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# reST markup that must not reach a terminal: ``literal``, `interpreted`, :role:`x`
REST_MARKUP = re.compile(r"`|:(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|ref|doc|term):")


# --- docs/params.md against config.py and params.yaml ---------------------------------------


def _cells(row: str) -> list[str]:
    """The cells of a Markdown table row; ``\\|`` is a pipe inside a cell (``float \\| None``)."""
    inner = row.strip().removeprefix("|").removesuffix("|")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def parse_params_doc(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """Section -> key -> (type, default) from the tables of ``docs/params.md``.

    A row belongs to the params table when its first cell is one key in backticks; it sits
    under the ``## <section>`` heading above it and has four cells: key, type, default, meaning,
    type and default each one code span.
    """
    doc: dict[str, dict[str, tuple[str, str]]] = {}
    section = None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("## "):
            section = line[3:].strip()
            continue
        if not line.startswith("|"):
            continue
        cells = _cells(line)
        key = re.fullmatch(r"`(\w+)`", cells[0])
        if key is None:
            continue  # the header and separator rows
        where = f"docs/params.md:{number}"
        assert section is not None, f"{where}: a params row before any '## <section>' heading"
        assert len(cells) == 4, f"{where}: expected key | type | default | meaning"
        spans = [re.fullmatch(r"`([^`]+)`", c) for c in cells[1:3]]
        assert all(spans), f"{where}: type and default must each be one `code span`"
        entries = doc.setdefault(section, {})
        assert key[1] not in entries, f"{where}: {section}.{key[1]} is documented twice"
        entries[key[1]] = (spans[0][1], spans[1][1])  # type: ignore[index]
    return doc


def _sections() -> dict[str, type]:
    """params.yaml section name -> its dataclass, as the fields of ``config.Params`` map them."""
    return typing.get_type_hints(Params)


def _annotation(field: dataclasses.Field) -> str:
    # config.py has `from __future__ import annotations`: the annotation as written
    return field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")


@pytest.fixture(scope="module")
def documented() -> dict[str, dict[str, tuple[str, str]]]:
    return parse_params_doc(PARAMS_DOC.read_text(encoding="utf-8"))


def test_the_params_doc_has_a_table_for_every_section_and_no_other(documented):
    assert sorted(documented) == sorted(_sections())


def test_every_param_is_documented_and_no_documented_param_is_gone(documented):
    fields = {f"{n}.{f.name}" for n, cls in _sections().items() for f in dataclasses.fields(cls)}
    keys = {f"{n}.{k}" for n, entries in documented.items() for k in entries}
    assert sorted(fields - keys) == [], "params missing from docs/params.md"
    assert sorted(keys - fields) == [], "docs/params.md documents params that are gone"


def test_documented_types_are_the_config_annotations(documented):
    wrong = [
        f"{name}.{field.name}: doc {documented[name][field.name][0]!r}, "
        f"config.py {_annotation(field)!r}"
        for name, cls in _sections().items()
        for field in dataclasses.fields(cls)
        if field.name in documented.get(name, {})
        and documented[name][field.name][0] != _annotation(field)
    ]
    assert wrong == []


def test_documented_defaults_are_the_shipped_params_yaml(documented):
    """The default column is params.yaml's value (what a clone runs with), type included."""
    shipped = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    wrong = []
    for name, keys in documented.items():
        for key, (_, default) in keys.items():
            value = yaml.safe_load(default)
            expected = shipped.get(name, {}).get(key, "<not in params.yaml>")
            if (type(value), value) != (type(expected), expected):
                wrong.append(f"{name}.{key}: doc {default}, params.yaml {expected!r}")
    assert wrong == []


def test_the_params_doc_parser_reads_escaped_pipes_and_refuses_a_short_row():
    table = "## data\n| key | type |\n| --- |\n| `seg` | `str \\| None` | `null` | y |\n"
    assert parse_params_doc(table) == {"data": {"seg": ("str | None", "null")}}
    with pytest.raises(AssertionError, match=re.escape("key | type | default | meaning")):
        parse_params_doc("## data\n| `seg` | `str` | y |\n")


# --- links -----------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading[1])
            name, n = base, 0
            while name in found:  # GitHub numbers repeated headings: x, x-1, x-2
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def _prose_lines(text: str) -> list[str]:
    # only fenced code is dropped: a heading's inline code is part of its anchor
    return re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.MULTILINE | re.DOTALL).splitlines()


def links(path: Path) -> list[str]:
    prose = _prose(path.read_text(encoding="utf-8"))
    return LINK.findall(prose) + REF_LINK.findall(prose)


def test_the_link_finder_skips_code_and_urls_are_told_apart():
    assert slug("Large structures (organs, lesions)") == "large-structures-organs-lesions"
    assert slug("Real data: your own folders, a CSV, DICOM") == (
        "real-data-your-own-folders-a-csv-dicom"
    )
    prose = _prose("[a](docs/x.md#y) `[b](no.md)`\n```\n[c](no.md)\n```\n[d]: ../e.py\n")
    assert LINK.findall(prose) + REF_LINK.findall(prose) == ["docs/x.md#y", "../e.py"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_an_existing_file_and_heading(doc: Path):
    broken = []
    for target in links(doc):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        relative = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else None
        if relative is None or not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no heading #{anchor} in {relative})")
    assert not broken, f"{doc.relative_to(REPO)}: broken links: {broken}"


def test_every_doc_is_linked_from_the_readme():
    readme = {t.partition("#")[0] for t in links(REPO / "README.md")}
    docs = {p.relative_to(REPO).as_posix() for p in DOCS[1:]}
    assert not docs - readme, f"not linked from README.md: {sorted(docs - readme)}"


# --- medseg --help ---------------------------------------------------------------------------


def _help(*args: str) -> str:
    script = Path(sys.executable).with_name("medseg")  # the installed console script
    done = subprocess.run(
        [str(script), *args, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_medseg_help_and_every_subcommand_help_are_plain_text():
    top = _help()
    choices = re.search(r"\{([\w,-]+)\}", top)
    assert choices is not None, top
    commands = choices[1].split(",")
    assert {"check-params", "predict", "report"} <= set(commands)
    for args, text in [((), top)] + [((c,), _help(c)) for c in commands]:
        markup = REST_MARKUP.findall(text)
        command = " ".join(("medseg", *args, "--help"))
        assert not markup, f"{command} shows reST markup {markup}:\n{text}"


def test_the_module_map_is_the_tree():
    """docs/development.md's repository layout names every module of src/medseg, in its
    package, and nothing that is not there: the map a newcomer reads is the tree."""
    text = (REPO / "docs" / "development.md").read_text()
    block = text[text.index("src/medseg/ ") : text.index("\ntests/ ")]
    listed: set[str] = set()
    package = ""
    for line in block.splitlines()[1:]:
        if not line.startswith("  ") or not line.strip():
            continue
        name = line.split()[0]
        if line.startswith("    "):  # a module of the package above, or a continued line
            if name.endswith((".py", ".yaml")):
                listed.add(package + name)
        elif name.endswith("/"):
            package = name
            listed.add(name + "__init__.py")
        else:
            package = ""
            listed.add(name)
    tree = {
        p.relative_to(REPO / "src" / "medseg").as_posix()
        for p in (REPO / "src" / "medseg").rglob("*")
        if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts
    }
    tree.discard("__init__.py")
    assert listed == tree, (
        f"in the tree, not the map: {sorted(tree - listed)}; "
        f"in the map, not the tree: {sorted(listed - tree)}"
    )
