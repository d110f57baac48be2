"""What a change did: params and metrics of the workspace against a base revision, as Markdown.

The same report is written by ``medseg report --base main`` on a developer's machine and by the
pull-request workflow (``.github/workflows/pr-report.yml``) into the job summary and a PR comment.
Metrics files are small and kept in git (``cache: false``), so the base side needs no ``dvc pull``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.io.records import read_json
from medseg.names import PLAN_FILE
from medseg.review.cases import OVERLAYS, Case, per_image_tables, read_table, worst_cases


@dataclass(frozen=True)
class Row:
    """One changed (or, with ``all``, unchanged) value of one file."""

    path: str
    key: str
    old: Any
    new: Any


@dataclass(frozen=True)
class Report:
    """The comparison of the workspace with ``base``.

    Attributes:
        base: the revision as given (``main``, ``origin/main``, a hash).
        base_sha: the commit it resolved to.
        params: changed params (all params with ``all=True``).
        metrics: changed metrics (all metrics with ``all=True``).
        stale: stages whose code, params, command or outputs differ from ``dvc.lock``: their
            metrics in the workspace may not come from the current code and params.
        missing: other stages whose outputs are absent (not pulled, not run): nothing stale.
        errors: files that could not be read, ``(revision, path, message)``.
        cases: per ``per_image.csv`` of ``dvc.yaml``, its worst cases in the workspace with
            their base scores (`medseg.review.cases.worst_cases`).
        plan: the workspace's ``plans.json`` settings (`medseg.planning.plan`), ``(key, value,
        source,
            reason)`` each; empty where there is none.
    """

    base: str
    base_sha: str
    params: list[Row]
    metrics: list[Row]
    stale: list[str]
    missing: list[str]
    errors: list[tuple[str, str, str]]
    cases: dict[str, list[Case]] = field(default_factory=dict)
    plan: list[tuple[str, Any, str, str]] = field(default_factory=list)


def compare(repo_dir: str | Path = ".", base: str = "main", all_rows: bool = False) -> Report:
    """Compare the params and metrics of the workspace of ``repo_dir`` with revision ``base``.

    Args:
        repo_dir: a folder inside a git + DVC repository.
        base: the git revision to compare against (a branch, tag or commit).
        all_rows: include unchanged values too.

    Raises:
        MedsegError: ``repo_dir`` is not a DVC repository or ``base`` is not a known revision.
    """
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import NoSCM
    from scmrepo.exceptions import RevError

    try:
        repo = Repo(str(repo_dir))
    except NotDvcRepoError as err:
        raise MedsegError(f"{repo_dir} is not inside a DVC repository (run `dvc init`)") from err
    with repo:
        if isinstance(repo.scm, NoSCM):
            raise MedsegError(f"{repo_dir} is not inside a git repository: nothing to compare with")
        try:
            base_sha = repo.scm.resolve_rev(base)
        except RevError as err:
            raise MedsegError(
                f"base revision {base!r} is not known to git in {repo_dir}; fetch it "
                f"(`git fetch origin {base}`) or pass another one with --base"
            ) from err
        params = repo.params.diff(a_rev=base_sha, b_rev="workspace", all=all_rows)
        metrics = repo.metrics.diff(a_rev=base_sha, b_rev="workspace", all=all_rows)
        stale, missing = _stale_and_missing(repo.status())
        cases = _worst_cases(repo, base_sha)
        plan, plan_error = _plan_rows(Path(repo.root_dir) / PLAN_FILE)
    errors = [
        (_side(rev, base), path, str(err))
        for result in (params, metrics)
        for rev, by_path in result.get("errors", {}).items()
        for path, err in (by_path.items() if isinstance(by_path, dict) else [("", by_path)])
    ]
    if plan_error:
        errors.append(("workspace", PLAN_FILE, plan_error))
    return Report(
        base=base,
        base_sha=base_sha,
        params=_rows(params.get("diff", {})),
        metrics=_rows(metrics.get("diff", {})),
        stale=stale,
        missing=missing,
        errors=errors,
        cases=cases,
        plan=plan,
    )


def _plan_rows(path: Path) -> tuple[list[tuple[str, Any, str, str]], str]:
    """The settings of a plan file, and a message where it cannot be read (none: no file)."""
    if not path.is_file():
        return [], ""
    try:
        settings = read_json(path, "plan")["settings"]
        rows = [
            (str(k), s["value"], str(s["source"]), str(s["reason"])) for k, s in settings.items()
        ]
    except (MedsegError, KeyError, TypeError, AttributeError) as err:
        return [], f"not a plan ({err})"
    return rows, ""


def _worst_cases(repo: Any, base_sha: str) -> dict[str, list[Case]]:
    """The worst cases of each per-image table of the workspace, with their base scores (the
    tables are small and kept in git, so the base side reads them from git)."""
    found = {}
    base_fs = repo.scm.get_fs(base_sha)
    for name in per_image_tables(repo.root_dir):
        path = Path(repo.root_dir) / name
        table = read_table(path.read_text() if path.is_file() else None)
        if table is None:
            continue
        base = None
        if base_fs.exists(name):
            with base_fs.open(name) as f:
                base = read_table(f.read().decode())
        found[name] = worst_cases(table, base, overlays=(Path(name).parent / OVERLAYS).as_posix())
    return found


_ABSENT = ("deleted", "not in cache")


def _stale_and_missing(status: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Split `dvc status` entries into stages with real changes and stages only lacking files.
    A stage DVC runs every time (``always_changed``: the machine stage) is neither."""

    def leaves(entry: Any) -> list[Any]:
        if isinstance(entry, dict):
            return [leaf for value in entry.values() for leaf in leaves(value)]
        if isinstance(entry, list):
            return [leaf for value in entry for leaf in leaves(value)]
        return [entry]

    stale: list[str] = []
    missing: list[str] = []
    for name, entries in status.items():
        stage = name.split(":")[-1]  # "dvc.yaml:train" for stages of other dvc.yaml files
        if all(leaf == "always changed" for leaf in leaves(entries)):
            continue
        (missing if all(leaf in _ABSENT for leaf in leaves(entries)) else stale).append(stage)
    return sorted(stale), sorted(missing)


def _side(rev: str, base: str) -> str:
    return "workspace" if rev == "workspace" else base


def _rows(diff: dict[str, dict[str, dict[str, Any]]]) -> list[Row]:
    return [
        Row(path=path, key=key, old=change.get("old"), new=change.get("new"))
        for path, changes in sorted(diff.items())
        for key, change in sorted(changes.items())
    ]


def to_markdown(report: Report) -> str:
    """The report as GitHub-flavoured Markdown: a heading, then one table for params and one
    for metrics (with the change ``new - old`` for numbers), then any warnings.

    Everything that comes from the repository (paths, keys, values, stage names, messages) may
    be written by the author of a pull request, so it is escaped (see `md_text`): it cannot start
    a line, close a table cell, or make a heading, link, image or HTML tag in the comment."""
    base = f"{md_code(report.base, table=False)} ({md_text(report.base_sha[:8], table=False)})"
    lines = [f"## medseg report: workspace vs {base}", ""]
    lines += ["### Params", ""]
    if report.params:
        lines += ["| file | param | base | workspace |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {md_text(r.path)} | {md_text(r.key)} | {_param(r.old)} | {_param(r.new)} |"
            for r in report.params
        ]
    else:
        lines.append("No param changed.")
    lines += ["", "### Metrics", ""]
    if report.metrics:
        lines += [
            "| file | metric | base | workspace | change |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {md_text(r.path)} | {md_text(r.key)} | {_cell(r.old)} | {_cell(r.new)} | "
            f"{_change(r.old, r.new)} |"
            for r in report.metrics
        ]
    else:
        lines.append("No metric changed.")
    if report.stale:
        lines += [
            "",
            f"> **Warning**: stages not up to date with `dvc.lock`: {_names(report.stale)}. "
            "Their metrics may not come from the current code and params; run `dvc repro`.",
        ]
    if report.missing:
        lines += [
            "",
            f"> Note: outputs absent from the workspace (not pulled or not run): "
            f"{_names(report.missing)}. Metrics come from the committed files.",
        ]
    if report.plan:
        lines += ["", "### Plan (plans.json, workspace)", ""]
        lines += ["| setting | value | from | reason |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {md_text(key)} | {_param(value)} | {md_text(source)} | "
            f"{md_code(reason, limit=160)} |"
            for key, value, source, reason in report.plan
        ]
    for name, cases in report.cases.items():
        lines += ["", f"### Worst cases: {md_text(name, table=False)}", ""]
        lines += _cases_table(cases)
    for side, path, message in report.errors:
        where = md_text(path, table=False) if path else "params/metrics"
        lines += ["", f"> **Warning**: could not read {where} at {md_text(side, table=False)}: "]
        lines[-1] += md_code(message, limit=300, table=False)
    return "\n".join(lines) + "\n"


# Plain text that no Markdown reads as markup: letters, digits and . - / inside, _ only between
# letters or digits (never emphasis), and no "www." (GitHub links it by itself).
_PLAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9./-]|(?<=[A-Za-z0-9])_(?=[A-Za-z0-9]))*$")
MAX_SHOWN = 80  # characters of one value in the report


def md_text(value: Any, table: bool = True) -> str:
    """``value`` for one line of the report: as is when it is plain (a path, a key, a number),
    else as an inline code span (`md_code`), which Markdown shows literally."""
    text = str(value)
    if _PLAIN.fullmatch(text) and len(text) <= MAX_SHOWN and "www." not in text.lower():
        return text
    return md_code(text, table=table)


def md_code(value: Any, limit: int = MAX_SHOWN, table: bool = True) -> str:
    """``value`` as an inline code span that stays inside its line (and its table cell, with
    ``table``).

    Steps: 1. control characters and line breaks become spaces (a code span cannot end a
    line or a row); 2. cut to ``limit`` characters; 3. in a table, ``|`` escaped as ``\\|``
    (the table splits cells before it reads code spans; a backslash just before it is replaced
    by a look-alike, so that it cannot escape the escape); 4. fenced by one backtick more than
    the longest run in the text, padded with a space where the text starts or ends with one.
    """
    text = "".join(" " if _breaks(ch) else ch for ch in str(value))
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if not text.strip():
        return '""' if not text else "`" + "\u00a0" * len(text) + "`"
    if table:
        text = re.sub(r"\\+(?=\|)", lambda m: "\u29f5" * len(m[0]), text).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _breaks(ch: str) -> bool:
    """A control character, or one that Python or Markdown may read as a line break."""
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp") or len(ch.splitlines()) == 0


def _names(names: list[str]) -> str:
    return ", ".join(md_text(n, table=False) for n in names)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _param(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool | int | float):  # str() of a number is plain text
        return str(value)
    return md_text(value)


def _cell(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and abs(value) >= 1e-3:
        return f"{value:.4f}"
    return _param(value)


def _change(old: Any, new: Any) -> str:
    if not (_number(old) and _number(new)):
        return "-"
    delta = new - old
    return f"{delta:+.4f}" if isinstance(delta, float) else f"{delta:+d}"


def _cases_table(cases: list[Case]) -> list[str]:
    """The worst cases as a table: scores in the workspace and at the base, the overlay."""
    boundary = any(c.hd95 is not None for c in cases)
    labelled = any(c.label is not None for c in cases)
    head = ["case", *(["class"] if labelled else []), "dice", "base", "change"]
    head += ["HD95", "base", "change"] if boundary else []
    lines = ["| " + " | ".join([*head, "overlay"]) + " |", "|" + " --- |" * (len(head) + 1)]
    for c in cases:
        cells = [md_text(c.case_id), *([md_text(c.label)] if labelled else [])]
        cells += [_cell(c.dice), _cell(c.base_dice), _change(c.base_dice, c.dice)]
        if boundary:
            cells += [_cell(c.hd95), _cell(c.base_hd95), _change(c.base_hd95, c.hd95)]
        cells.append(md_code(c.overlay) if c.overlay else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
