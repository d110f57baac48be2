"""What a change did: params and metrics of the workspace against a base revision, as Markdown.

The same report is written by ``medseg report --base main`` on a developer's machine and by the
pull-request workflow (``.github/workflows/pr-report.yml``) into the job summary and a PR comment.
Metrics files are small and kept in git (``cache: false``), so the base side needs no ``dvc pull``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError


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
    """

    base: str
    base_sha: str
    params: list[Row]
    metrics: list[Row]
    stale: list[str]
    missing: list[str]
    errors: list[tuple[str, str, str]]


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
    errors = [
        (_side(rev, base), path, str(err))
        for result in (params, metrics)
        for rev, by_path in result.get("errors", {}).items()
        for path, err in (by_path.items() if isinstance(by_path, dict) else [("", by_path)])
    ]
    return Report(
        base=base,
        base_sha=base_sha,
        params=_rows(params.get("diff", {})),
        metrics=_rows(metrics.get("diff", {})),
        stale=stale,
        missing=missing,
        errors=errors,
    )


_ABSENT = ("deleted", "not in cache")


def _stale_and_missing(status: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Split `dvc status` entries into stages with real changes and stages only lacking files."""

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
    for metrics (with the change ``new - old`` for numbers), then any warnings."""
    base = f"`{report.base}` ({report.base_sha[:8]})"
    lines = [f"## medseg report: workspace vs {base}", ""]
    lines += ["### Params", ""]
    if report.params:
        lines += ["| file | param | base | workspace |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {r.path} | {r.key} | {_param(r.old)} | {_param(r.new)} |" for r in report.params
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
            f"| {r.path} | {r.key} | {_cell(r.old)} | {_cell(r.new)} | {_change(r.old, r.new)} |"
            for r in report.metrics
        ]
    else:
        lines.append("No metric changed.")
    if report.stale:
        lines += [
            "",
            f"> **Warning**: stages not up to date with `dvc.lock`: {', '.join(report.stale)}. "
            "Their metrics may not come from the current code and params; run `dvc repro`.",
        ]
    if report.missing:
        lines += [
            "",
            f"> Note: outputs absent from the workspace (not pulled or not run): "
            f"{', '.join(report.missing)}. Metrics come from the committed files.",
        ]
    for side, path, message in report.errors:
        lines += ["", f"> **Warning**: could not read {path or 'params/metrics'} at {side}: "]
        lines[-1] += message.replace("\n", " ")
    return "\n".join(lines) + "\n"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _param(value: Any) -> str:
    return "-" if value is None else str(value).replace("|", "\\|")


def _cell(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and abs(value) >= 1e-3:
        return f"{value:.4f}"
    return _param(value)


def _change(old: Any, new: Any) -> str:
    if not (_number(old) and _number(new)):
        return "-"
    delta = new - old
    return f"{delta:+.4f}" if isinstance(delta, float) else f"{delta:+d}"
