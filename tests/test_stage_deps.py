"""Every stage's `deps` in every pipeline file (dvc.yaml, and the opt-in crossval pipeline that
`medseg crossval` writes as crossval/dvc.yaml) cover every medseg module its script imports,
directly or through other medseg modules, so that a change in any of them reruns the stage."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

SRC = REPO / "src"
# pipeline file -> the path it has when DVC runs it (its paths are relative to that folder)
PIPELINES = {"dvc.yaml": "dvc.yaml", "src/medseg/crossval_dvc.yaml": "crossval/dvc.yaml"}


def _stages() -> dict[str, tuple[Path, dict[str, Any]]]:
    """``file:stage`` -> (the folder its paths are relative to, the stage; a foreach stage's
    ``do`` template, whose ``${item}`` parts name no module)."""
    out = {}
    for name, runs_as in PIPELINES.items():
        for stage, spec in yaml.safe_load((REPO / name).read_text())["stages"].items():
            out[f"{runs_as}:{stage}"] = ((REPO / runs_as).parent, spec.get("do", spec))
    return out


STAGES = _stages()


def _module_file(name: str) -> Path | None:
    """The file of a ``medseg`` module (``medseg.io.images`` -> src/medseg/io/images.py)."""
    base = SRC / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """The ``medseg`` modules ``path`` imports anywhere (also inside functions), with the
    packages they live in (importing ``medseg.io.images`` runs ``medseg/io/__init__.py``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name == "medseg" or name.startswith("medseg."):
                parts = name.split(".")
                found.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return {name for name in found if _module_file(name) is not None}


def imported_files(script: Path) -> set[Path]:
    """Every medseg source file ``script`` imports, transitively."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in _imports(todo.pop()):
            path = _module_file(name)
            assert path is not None
            if path not in seen:
                seen.add(path)
                todo.append(path)
    return seen


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


def _in_repo(wdir: Path, path: str) -> str:
    """A dvc.yaml path (relative to its folder) relative to the repository root."""
    return Path(os.path.relpath(os.path.normpath(wdir / path), REPO)).as_posix()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_list_every_module_its_script_imports(stage: str):
    wdir, spec = STAGES[stage]
    script = re.search(r"python (\S*stages/\S+\.py)", spec["cmd"])
    assert script, f"{stage}: cmd does not run a stages/ script"
    deps = [str(next(iter(d)) if isinstance(d, dict) else d) for d in spec["deps"]]
    assert script.group(1) in deps, f"{stage}: its own script is not a dep"
    deps = [_in_repo(wdir, d) for d in deps]
    missing = sorted(
        os.path.relpath(p, wdir)
        for p in imported_files(REPO / _in_repo(wdir, script.group(1)))
        if not _covered(p, deps)
    )
    assert not missing, (
        f"{stage}: add to deps: {', '.join(missing)} (python tests/test_stage_deps.py does)"
    )


def test_every_pipeline_file_is_checked():
    """A new dvc.yaml must be added to `PIPELINES`; the top one is the only one DVC collects in
    a clone (the opt-in pipeline is written on demand, see test_crossval.py)."""
    found = {
        p.relative_to(REPO).as_posix()
        for p in REPO.rglob("dvc.yaml")
        if not any(part.startswith(".") for part in p.relative_to(REPO).parts)
    }
    assert found == {"dvc.yaml"}
    assert all((REPO / name).is_file() for name in PIPELINES)


def test_the_import_walk_finds_indirect_imports():
    """The checker itself: stages/convert.py reaches io/images.py only through the convert
    package (its __init__, then convert/case.py)."""
    files = {p.relative_to(REPO).as_posix() for p in imported_files(REPO / "stages/convert.py")}
    assert {
        "src/medseg/convert/__init__.py",
        "src/medseg/convert/case.py",
        "src/medseg/io/images.py",
        "src/medseg/errors.py",
    } <= files


@pytest.mark.parametrize("stage", ["synthesize", "convert", "preprocess"])
def test_editing_a_loss_reruns_no_stage_before_train(stage: str):
    """The stages that do not train neither import `medseg.training.losses` (nor torch's other parts
    through it) nor list it as a dep, so DVC reruns only train and evaluate on a loss edit."""
    wdir, spec = STAGES[f"dvc.yaml:{stage}"]
    deps = [_in_repo(wdir, str(next(iter(d)) if isinstance(d, dict) else d)) for d in spec["deps"]]
    losses = REPO / "src/medseg/training/losses.py"
    assert not _covered(losses, deps), f"{stage}: losses.py is a dep"
    assert losses not in imported_files(REPO / f"stages/{stage}.py")


def test_no_module_imports_itself_through_others():
    """No import cycle among the medseg modules, counting every import (also inside functions
    and under ``if TYPE_CHECKING``): a cycle makes the import order matter and ties two modules
    into one. A package's ``__init__`` may import its own modules."""
    graph = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {n for n in _imports(path) if not name.startswith(n + ".") and n != name}
    cycles = []
    for start in graph:
        todo, seen = list(graph[start]), set()
        while todo:
            name = todo.pop()
            if name == start:
                cycles.append(start)
                break
            if name not in seen:
                seen.add(name)
                todo.extend(graph.get(name, ()))
    assert not cycles, f"modules in an import cycle: {', '.join(sorted(cycles))}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_list_no_module_its_script_does_not_import(stage: str):
    """The other direction: a listed medseg file the script never reaches (or a folder none of
    whose files it reaches) reruns the stage for nothing, e.g. training on an overlay-colour
    edit. Folders stand for the modules of a package the stage imports whole (``io/``: every
    stage reads through it)."""
    wdir, spec = STAGES[stage]
    script = re.search(r"python (\S*stages/\S+\.py)", spec["cmd"])
    assert script
    used = imported_files(REPO / _in_repo(wdir, script.group(1)))
    deps = [_in_repo(wdir, str(next(iter(d)) if isinstance(d, dict) else d)) for d in spec["deps"]]
    stale = [
        d for d in deps if d.startswith("src/medseg") and not any(_covered(p, [d]) for p in used)
    ]
    assert not stale, (
        f"{stage}: not imported, remove from deps: {', '.join(stale)} "
        "(python tests/test_stage_deps.py does)"
    )


def test_overlay_colours_are_evaluates_alone():
    """Editing the overlay colours (the evaluate stage's module) reruns evaluate and nothing
    before it: training scores through `medseg.scoring`, never through the stage's module."""
    module = REPO / "src/medseg/evaluation/evaluate.py"
    for stage, (wdir, spec) in STAGES.items():
        deps = [
            _in_repo(wdir, str(next(iter(d)) if isinstance(d, dict) else d)) for d in spec["deps"]
        ]
        listed = _covered(module, deps)
        assert listed == stage.endswith((":evaluate", ":folds", ":ensemble")), stage


def _defined_names(path: Path) -> set[str]:
    """Names a module binds itself at its top level (defs, classes, assignments, third-party
    imports); names it imports from other medseg modules are not its own."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        body = node.body + node.orelse if isinstance(node, ast.If) else [node]
        for n in body:
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(n.name)
            elif isinstance(n, ast.Assign | ast.AnnAssign | ast.AugAssign):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                names.update(x.id for t in targets for x in ast.walk(t) if isinstance(x, ast.Name))
            elif isinstance(n, ast.ImportFrom) and not (n.module or "").startswith("medseg"):
                names.update(a.asname or a.name for a in n.names)
            elif isinstance(n, ast.Import):
                names.update((a.asname or a.name).split(".")[0] for a in n.names)
    return names


def test_every_name_is_imported_from_its_home():
    """One import path per name: ``from medseg.X import n`` only where X defines n (or n is a
    submodule of package X), in the library, the stages, the tests and the benchmarks. A
    re-export gives a name two homes, and the second one drifts."""
    wrong = []
    for folder in ("src", "stages", "tests", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.ImportFrom) and node.level == 0):
                    continue
                module = node.module or ""
                if module != "medseg" and not module.startswith("medseg."):
                    continue
                home = _module_file(module)
                assert home is not None, f"{path}: no module {module}"
                own = _defined_names(home)
                for alias in node.names:
                    if alias.name not in own and _module_file(f"{module}.{alias.name}") is None:
                        wrong.append(f"{path.relative_to(REPO)}: {module}.{alias.name}")
    assert not wrong, "import these from the module that defines them: " + "; ".join(wrong)


def minimal_deps(script: Path) -> list[str]:
    """The medseg deps of a stage script, as `write_deps` lists them: a package folder where the
    script imports every module of it (and ``io/``, which every stage reads through), else
    each module, relative to the repository."""
    files = imported_files(script)
    out: list[str] = []
    covered: set[Path] = set()
    for package in sorted({p.parent for p in files if p.parent != SRC / "medseg"}):
        modules = set(package.rglob("*.py"))
        if modules <= files or package == SRC / "medseg" / "io":
            out.append(package.relative_to(REPO).as_posix())
            covered |= modules
    out += [p.relative_to(REPO).as_posix() for p in sorted(files - covered)]
    return out


def write_deps() -> None:
    """Rewrite the medseg part of every stage's ``deps`` in every pipeline file from what its
    script imports (`minimal_deps`); other deps (data, the script) keep their place."""
    for name, runs_as in PIPELINES.items():
        prefix = os.path.relpath(REPO, (REPO / runs_as).parent)
        prefix = "" if prefix == "." else prefix + "/"
        lines = (REPO / name).read_text().splitlines(keepends=True)
        out, script, i = [], None, 0
        while i < len(lines):
            found = re.search(r"python (\S*stages/\S+\.py)", lines[i])
            script = found.group(1) if found else script
            out.append(lines[i])
            i += 1
            if script is None or not re.match(r"\s+deps:\s*$", lines[i - 1]):
                continue
            items = []
            while i < len(lines) and re.match(r"\s+- ", lines[i]):
                items.append(lines[i])
                i += 1
            indent = items[0][: items[0].index("-")]
            kept = [line for line in items if "src/medseg" not in line]
            deps = minimal_deps(REPO / script.removeprefix(prefix))
            out += kept + [f"{indent}- {prefix}{d}\n" for d in deps]
            script = None
        (REPO / name).write_text("".join(out))


if __name__ == "__main__":  # python tests/test_stage_deps.py: rewrite the deps lists
    write_deps()


LONG_FUNCTION = 60  # lines of a function's body (its docstring aside)


def test_no_function_is_long_without_saying_why():
    """A function whose body passes `LONG_FUNCTION` lines says why in its docstring (a line
    that starts "Long"), and no module passes 500 lines: a newcomer reads a concern in one
    short file."""
    long, large = [], []
    for path in sorted((SRC / "medseg").rglob("*.py")) + sorted((REPO / "stages").glob("*.py")):
        text = path.read_text()
        if text.count("\n") > 500:
            large.append(path.relative_to(REPO).as_posix())
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node) or ""
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            length = body[-1].end_lineno - body[0].lineno + 1 if body else 0  # type: ignore[operator]
            if length > LONG_FUNCTION and not any(
                line.strip().startswith("Long") for line in doc.splitlines()
            ):
                long.append(f"{path.relative_to(REPO)}:{node.name} ({length} lines)")
    assert not long, "shorten, or say why in the docstring: " + "; ".join(long)
    assert not large, "over 500 lines: " + ", ".join(large)
