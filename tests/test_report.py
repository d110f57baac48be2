"""`medseg report`: params and metrics against a base revision, on real git + DVC repositories."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, dvc_env, ran, run, write_params
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from medseg.errors import MedsegError
from medseg.review.report import Report, Row, compare, md_code, to_markdown


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _metrics(project: Path, path: str) -> dict[str, Any]:
    return _flatten(json.loads((project / path).read_text()))


def test_report_shows_the_changed_param_and_every_changed_metric(reproduced: Path):
    metric_files = ("results/evaluate/metrics.json", "results/train/metrics.json")
    before = {path: _metrics(reproduced, path) for path in metric_files}
    run(reproduced, "git", "checkout", "-q", "-b", "higher-lr")
    params = yaml.safe_load((reproduced / "params.yaml").read_text())
    old_lr = params["train"]["lr"]
    params["train"]["lr"] = 0.02
    write_params(reproduced / "params.yaml", params)
    assert ran(run(reproduced, "dvc", "repro")) == ["train", "evaluate"]
    run(reproduced, "git", "commit", "-qam", "higher lr")
    after = {path: _metrics(reproduced, path) for path in metric_files}

    proc = run(reproduced, "medseg", "report", "--base", "main")
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("## medseg report: workspace vs `main` (")
    param_rows = [line for line in lines if line.startswith("| params.yaml |")]
    assert param_rows == [f"| params.yaml | train.lr | {old_lr} | 0.02 |"]
    assert "Warning" not in proc.stdout  # everything was rerun and committed

    metric_rows = {
        tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line
        for line in lines
        if line.startswith("| results/")
    }
    changed = {
        (path, key)
        for path in metric_files
        for key, value in after[path].items()
        if before[path].get(key) != value
    }
    assert changed, "a tenfold learning rate left every metric unchanged"
    assert set(metric_rows) == changed
    for path, key in changed:
        old, new = before[path][key], after[path][key]
        cells = [cell.strip() for cell in metric_rows[path, key].strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(old, abs=5e-5)
        assert float(cells[3]) == pytest.approx(new, abs=5e-5)
        assert float(cells[4]) == pytest.approx(new - old, abs=1e-4)

    out = reproduced / "review" / "report.md"
    run(reproduced, "medseg", "report", "--base", "main", "-o", str(out))
    assert out.read_text() == proc.stdout

    # the pull-request workflow's own Report step, run as GitHub would, writes the same tables
    run(reproduced, "git", "remote", "add", "origin", str(reproduced))
    run(reproduced, "git", "fetch", "-q", "origin")
    summary = reproduced.parent / "summary.md"
    script = workflow_step("Report")["run"].replace("${{ github.base_ref }}", "main")
    run(reproduced, "bash", "-euo", "pipefail", "-c", script,
        env=dvc_env(GITHUB_STEP_SUMMARY=str(summary)))  # fmt: skip
    assert summary.read_text() == proc.stdout.replace("`main`", "`origin/main`", 1)


def workflow_step(name: str) -> dict[str, Any]:
    """The step called ``name`` of the pull-request workflow's only job."""
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "pr-report.yml").read_text())
    assert "pull_request" in workflow[True]  # PyYAML reads the key `on` as a boolean
    (job,) = workflow["jobs"].values()
    steps = {step.get("name", step.get("uses")): step for step in job["steps"]}
    assert steps["actions/checkout@v4"]["with"]["fetch-depth"] == 0  # the base branch is needed
    return steps[name]


def test_report_warns_when_params_changed_without_a_rerun(reproduced: Path):
    params = yaml.safe_load((reproduced / "params.yaml").read_text())
    params["evaluate"]["overlap"] = 0.5
    write_params(reproduced / "params.yaml", params)
    report = compare(reproduced, base="main")
    assert report.params == [Row("params.yaml", "evaluate.overlap", 0.25, 0.5)]
    assert report.metrics == []
    assert report.stale == ["evaluate"]
    assert report.missing == []
    text = to_markdown(report)
    assert "No metric changed." in text
    assert "stages not up to date with `dvc.lock`: evaluate." in text


def test_unknown_base_is_one_clear_error(project: Path):
    with pytest.raises(MedsegError, match="base revision 'no-such-branch' is not known"):
        compare(project, base="no-such-branch")
    proc = run(project, "medseg", "report", "--base", "no-such-branch", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: base revision 'no-such-branch'")
    assert "Traceback" not in proc.stderr


def test_a_folder_without_dvc_is_one_clear_error(tmp_path: Path):
    with pytest.raises(MedsegError, match="not inside a DVC repository"):
        compare(tmp_path)


def test_markdown_of_known_values():
    report = Report(
        base="main",
        base_sha="0123456789abcdef",
        params=[Row("params.yaml", "train.encoder", "resnet18", "resnet34")],
        metrics=[
            Row("m.json", "dice", 0.5, 0.625),
            Row("m.json", "n_images", 20, 18),
            Row("m.json", "new_score", None, 0.75),
        ],
        stale=[],
        missing=["synthesize"],
        errors=[("main", "m.json", "unable to read")],
    )
    assert to_markdown(report).splitlines() == [
        "## medseg report: workspace vs `main` (01234567)",
        "",
        "### Params",
        "",
        "| file | param | base | workspace |",
        "| --- | --- | --- | --- |",
        "| params.yaml | train.encoder | resnet18 | resnet34 |",
        "",
        "### Metrics",
        "",
        "| file | metric | base | workspace | change |",
        "| --- | --- | --- | --- | --- |",
        "| m.json | dice | 0.5000 | 0.6250 | +0.1250 |",
        "| m.json | n_images | 20 | 18 | -2 |",
        "| m.json | new_score | - | 0.7500 | - |",
        "",
        "> Note: outputs absent from the workspace (not pulled or not run): synthesize. "
        "Metrics come from the committed files.",
        "",
        "> **Warning**: could not read m.json at main: `unable to read`",
    ]


# --- escaping: a value cannot inject markup into a pull-request comment (issue 11) ----------

HOSTILE = [
    "x\n# heading",
    "x\r\n| a | b |\n| --- | --- |",
    "a|b",
    "a\\|b",
    "[link](https://evil.example)",
    "![img](https://evil.example/x.png)",
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    "www.evil.example",
    "https://evil.example",
    "mail@evil.example",
    "**bold** _em_ ~~strike~~",
    "`code` `` ` ``",
    "&lt;b&gt;",
    "x\u2028# heading\u2029y\x85z\x0bw\x0c",
    "\\",
    "|",
    "`",
    " ",
    "",
    "a" * 500,
]


def _hostile_report(value: str) -> Report:
    return Report(
        base=value,
        base_sha="0123456789abcdef",
        params=[Row(value, value, value, value), Row("params.yaml", "train.lr", 0.1, 0.2)],
        metrics=[Row(value, value, value, 0.5)],
        stale=[value],
        missing=[value],
        errors=[(value, value, value)],
    )


def _tokens(markdown: str) -> list:
    """Every token, inline ones included, of ``markdown`` rendered as CommonMark + GFM tables,
    with raw HTML allowed (as GitHub allows some), so that injected HTML shows as a token."""
    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    out = []
    for token in md.parse(markdown):
        out.append(token)
        out.extend(token.children or [])
    return out


def _check_inert(value: str) -> None:
    text = to_markdown(_hostile_report(value))
    assert len(text.splitlines()) == len(to_markdown(_hostile_report("x")).splitlines())
    tokens = _tokens(text)
    kinds = [t.type for t in tokens]
    for forbidden in ("link_open", "image", "html_inline", "html_block", "em_open", "s_open"):
        assert forbidden not in kinds, (forbidden, text)
    assert kinds.count("heading_open") == 3 and kinds.count("strong_open") == 2
    assert kinds.count("table_open") == 2 and kinds.count("tr_open") == 5  # 2 heads, 3 rows
    cells: list[int] = []
    for token in tokens:
        if token.type == "tr_open":
            cells.append(0)
        elif token.type in ("th_open", "td_open"):
            cells[-1] += 1
    assert cells == [4, 4, 4, 5, 5]  # params: head, 2 rows; metrics: head, 1 row
    # GitHub's table parser (cmark-gfm) reads "\\\\|" as an escaped backslash and a cell
    # border, where markdown-it does not: every pipe must follow exactly one backslash
    assert all(run == "\\|" for run in re.findall(r"\\*\|", md_code(value)))
    plain = " ".join(t.content for t in tokens if t.type == "text")
    for autolinked in ("www.", "://", "@"):  # GitHub links these in plain text by itself
        assert autolinked not in plain


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_value_cannot_inject_markup(value: str):
    _check_inert(value)


@pytest.mark.parametrize("value", ["a|b", "<b>x</b>", "[x](y)", "`tick`", "a  b", "#1"])
def test_an_escaped_value_still_reads_as_itself(value: str):
    tokens = _tokens(to_markdown(_hostile_report(value)))
    row = tokens[[t.type for t in tokens].index("tbody_open") :]
    shown = [t.content for t in row if t.type == "code_inline"][:4]  # path, key, old, new
    assert shown == [value] * 4


@settings(max_examples=150, deadline=None)
@given(
    value=st.text(
        alphabet=st.sampled_from(list("|\\`*_~[]()<>!#&:/@.- \n\r\t\x00\x85\u2028w"))
        | st.characters(),
        max_size=60,
    )
)
def test_any_string_renders_inert(value: str):
    _check_inert(value)
