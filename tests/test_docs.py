"""The documentation says what the code does: the params reference, the links, the help text."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from medseg.config import load_all_params, reference
from medseg.errors import MedsegError
from medseg.io.records import read_yaml

PARAMS_DOC = REPO / "docs" / "params.md"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# reST markup that must not reach a terminal: ``literal``, `interpreted`, :role:`x`
REST_MARKUP = re.compile(r"`|:(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|ref|doc|term):")


# --- docs/params.md and docs/params.schema.json: made from the key declarations ---------------


def test_the_params_reference_is_the_one_the_declarations_make():
    """docs/params.md is generated (python -m medseg.config.reference), never edited by hand."""
    assert PARAMS_DOC.read_text(encoding="utf-8") == reference.params_markdown(), (
        "docs/params.md is stale: run python -m medseg.config.reference"
    )


def test_the_params_schema_is_the_one_the_declarations_make():
    assert (REPO / "docs" / "params.schema.json").read_text(encoding="utf-8") == (
        reference.schema_text()
    ), "docs/params.schema.json is stale: run python -m medseg.config.reference"


def test_the_shipped_params_file_holds_the_declared_defaults():
    """The default the reference shows is what a fresh clone runs with, type included."""
    shipped = read_yaml(REPO / "params.yaml")
    wrong = []
    for name, cls in reference.sections().items():
        assert sorted(shipped[name]) == sorted(cls.__pydantic_fields__), f"{name}: keys"
        for key, info in cls.__pydantic_fields__.items():
            want, got = reference.shipped(info), shipped[name][key]
            if (type(want), want) != (type(got), got):
                wrong.append(f"{name}.{key}: declared {want!r}, params.yaml {got!r}")
    assert wrong == []


def test_the_schema_accepts_the_shipped_params_and_refuses_what_loading_refuses(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(reference.params_schema())
    shipped = read_yaml(REPO / "params.yaml")
    assert list(validator.iter_errors(shipped)) == []
    for section, key, value in [
        ("train", "lrr", 0.1), ("train", "epochs", "ten"), ("preprocess", "channel", "red"),
        ("evaluate", "threshold", 1.5), ("train", "patch_size", 50), ("train", "amp_cpu", "yes"),
    ]:  # fmt: skip
        bad = copy.deepcopy(shipped)
        bad[section][key] = value
        assert list(validator.iter_errors(bad)), f"{section}.{key}: {value!r} passes the schema"
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(bad, sort_keys=False))
        with pytest.raises(MedsegError, match=rf"{section}\.{key}"):
            load_all_params(path)
    planned = copy.deepcopy(shipped)
    planned["train"]["patch_size"] = 64
    assert list(validator.iter_errors(planned)) == []
    del planned["train"]["lr"]
    assert list(validator.iter_errors(planned)), "a missing key passes the schema"


def test_params_yaml_points_editors_at_the_schema():
    first = (REPO / "params.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=docs/params.schema.json"


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
