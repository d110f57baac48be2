"""Plots that render offline: `medseg plots` and `dvc plots show` with the offline template,
opened in headless Chromium with the network cut off.

The workspace is a real git + DVC repository with the project's dvc.yaml and custom confusion
template, and plot files written the way train and evaluate write them: dvclive's own curves,
the evaluate tally's ROC, PR and confusion tables, overlay and probability PNGs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest
from conftest import REPO, run
from dvc_render.base import Renderer

from medseg.cli import main
from medseg.errors import MedsegError
from medseg.review.plots import TEMPLATE, collect, inline_script, write_report

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; .ci/run does)"
)

# what the evaluate stage writes besides its tables: one PNG per test case of each kind
IMAGES = [f"results/evaluate/{kind}/{case}.png" for kind in ("overlays", "probabilities")
          for case in ("01_test", "02_test")]  # fmt: skip


def _charts(root: Path) -> list[str]:
    """dvc.yaml's charts, in its order: a curve per dvclive file, then evaluate's tables."""
    curves = sorted(root.glob("results/train/plots/metrics/**/*.tsv"))
    tables = [root / "results/evaluate" / name for name in ("roc.csv", "pr.csv", "confusion.csv")]
    return [p.relative_to(root).as_posix() for p in curves + tables]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed git + DVC repository with the project's dvc.yaml, .gitignore and custom
    plot templates, and as plot data the pipeline's own committed outputs: dvclive's training
    curves and evaluate's ROC, PR and confusion tables. The overlay and probability images,
    DVC-cached outputs that git ignores, are small PNGs written here."""
    root = tmp_path_factory.mktemp("plots") / "project"
    root.mkdir()
    run(root, "git", "init", "-q", "-b", "main")
    run(root, "dvc", "init", "-q")
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(
        REPO / ".dvc/plots", root / ".dvc/plots", ignore=shutil.ignore_patterns("*.html")
    )
    images = shutil.ignore_patterns("overlays", "probabilities")  # a developer's full-size ones
    shutil.copytree(REPO / "results", root / "results", ignore=images)
    rng = np.random.default_rng(0)
    for name in IMAGES:
        (root / name).parent.mkdir(exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / name)
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "plots")
    assert len(_charts(root)) >= 7  # 4+ curves, 3 tables
    return root


class _Rendered(HTMLParser):
    """Per element id: how many Vega mark SVGs and canvases lie inside it; every ``<img>`` src."""

    VOID = frozenset(("area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                      "source", "track", "wbr"))  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str | None] = []
        self.marks: dict[str, int] = {}
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        drawn = (tag == "svg" and "marks" in (a.get("class") or "").split()) or tag == "canvas"
        if drawn:
            for owner in {i for i in self.stack if i}:
                self.marks[owner] = self.marks.get(owner, 0) + 1
        if tag not in self.VOID:
            self.stack.append(a.get("id") or a.get("data-plot"))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.VOID and self.stack:
            self.stack.pop()


def _open_offline(page: Path, tmp: Path) -> tuple[_Rendered, list[str]]:
    """Open ``page`` in headless Chromium with every host name unresolvable and a dead proxy;
    return the DOM after the scripts ran and every URL the page itself requested (from the
    net log: requests keyed to the page's file:// site; Chromium's own background calls to
    its update and time services are keyed otherwise and are not the page's)."""
    assert CHROMIUM is not None
    log = tmp / "net.json"
    proc = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp / 'profile'}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--proxy-server=127.0.0.1:9", f"--log-net-log={log}",
            "--virtual-time-budget=10000", "--dump-dom", page.as_uri(),
        ],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    dom = _Rendered()
    dom.feed(proc.stdout)
    net = json.loads(log.read_text())
    start = net["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = [
        event["params"]["url"]
        for event in net["events"]
        if event["type"] == start
        and event["params"].get("network_isolation_key", "").startswith("file://")
    ]
    return dom, urls


def _left_the_machine(urls: list[str]) -> list[str]:
    return [url for url in urls if not url.startswith(("file:", "data:"))]


def test_report_inlines_every_plot_and_names_no_url(workspace: Path, tmp_path: Path):
    out = tmp_path / "report.html"
    with pytest.raises(SystemExit) as exit_:
        main(["plots", "--repo", str(workspace), "-o", str(out)])
    assert exit_.value.code == 0
    page = out.read_text()
    assert "<script" not in page
    # every src/href is inline data or a place in the page; the only URLs are SVG's XML
    # namespace names
    assert re.findall(r'(?:src|href)="(?!data:|#)', page) == []
    assert set(re.findall(r"https?://[^\"' ]+", page)) <= {
        "http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink",
    }  # fmt: skip
    assert sorted(re.findall(r'data-plot="([^"]+)"', page)) == sorted(_charts(workspace))
    assert re.findall(r'alt="([^"]+)"', page) == IMAGES
    # the worst cases of per_image.csv, each linked to its overlay's figure in the page
    table = pd.read_csv(
        workspace / "results" / "evaluate" / "per_image.csv", dtype={"case_id": str}
    )
    if "hd95" in table:  # the largest boundary distance first, then the lowest Dice
        table = table.assign(neg_hd95=-table["hd95"])
    order = ["neg_hd95", "dice", "case_id"] if "hd95" in table else ["dice", "case_id"]
    worst = table.sort_values(order)["case_id"].tolist()[:10]
    section = page[page.index("Worst cases: results/evaluate/per_image.csv") :]
    assert re.findall(r"<tr><td>([^<]+)</td>", section)[: len(worst)] == worst
    links = re.findall(r'href="#([^"]+)"', section)
    assert len(links) == len([c for c in worst if f"results/evaluate/overlays/{c}.png" in IMAGES])
    assert links and all(f'<figure id="{link}">' in page for link in links)


@needs_chromium
def test_report_renders_every_chart_offline(workspace: Path, tmp_path: Path):
    out = tmp_path / "report.html"
    write_report(out, workspace)
    dom, urls = _open_offline(out, tmp_path)
    charts = _charts(workspace)
    assert {name: dom.marks.get(name, 0) for name in charts} == dict.fromkeys(charts, 1)
    assert len(dom.images) == len(IMAGES)
    assert all(src.startswith("data:image/png;base64,") for src in dom.images)
    assert _left_the_machine(urls) == []


@needs_chromium
def test_dvc_plots_show_with_the_offline_template_renders_offline(workspace: Path, tmp_path: Path):
    with pytest.raises(SystemExit) as exit_:
        main(["plots", "--repo", str(workspace), "--dvc-template"])
    assert exit_.value.code == 0
    try:
        config = run(workspace, "dvc", "config", "--local", "plots.html_template").stdout
        assert config.strip() == TEMPLATE
        assert run(workspace, "git", "status", "--porcelain").stdout == ""  # all git-ignored
        run(workspace, "dvc", "plots", "show", "-o", str(tmp_path / "dvc_plots"))
    finally:  # the module's other tests see the repository as committed
        run(workspace, "dvc", "config", "--local", "--unset", "plots.html_template")
    page = tmp_path / "dvc_plots" / "index.html"
    assert "cdn.jsdelivr.net" not in page.read_text()
    dom, urls = _open_offline(page, tmp_path)
    charts = re.findall(r"vegaEmbed\('#([^']+)'", page.read_text())
    assert len(charts) == len(_charts(workspace))
    assert {chart: dom.marks.get(chart, 0) for chart in charts} == dict.fromkeys(charts, 1)
    assert len(dom.images) == len(IMAGES)
    assert _left_the_machine(urls) == []


@needs_chromium
def test_a_fresh_clone_keeps_dvcs_cdn_page_which_stays_blank_offline(
    workspace: Path, tmp_path: Path
):
    """The negative control: DVC's own page, as a fresh clone writes it (no config.local, no
    template file: `dvc plots show` must still work), draws no chart offline, and the net log
    catches its attempts to reach the CDN."""
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(workspace), str(clone))
    run(clone, "dvc", "plots", "show")
    page = clone / "dvc_plots" / "index.html"
    dom, urls = _open_offline(page, tmp_path)
    embedded = re.findall(r"vegaEmbed\('#([^']+)'", page.read_text())
    # plus a blank one for each image folder, which a clone lacks until `dvc pull`
    assert {Renderer.remove_special_chars(name) for name in _charts(workspace)} <= set(embedded)
    assert dom.marks == {}
    # the same clone through medseg: the charts, and the image folders named as not pulled
    plots = collect(clone)
    assert sorted(chart.name for chart in plots.charts) == sorted(_charts(workspace))
    assert plots.images == []
    assert any("overlays" in line for line in plots.missing)
    assert {url.split("/npm/")[0] for url in _left_the_machine(urls)} == {
        "https://cdn.jsdelivr.net"
    }


def test_report_without_plot_data_is_a_user_error(tmp_path: Path):
    run(tmp_path, "git", "init", "-q")
    run(tmp_path, "dvc", "init", "-q")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(MedsegError, match=r"no plot data in the workspace.*dvc repro") as err:
        write_report(tmp_path / "report.html", tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(MedsegError, match="not inside a DVC repository"):
        write_report(tmp_path / "report.html", tmp_path.parent)


def test_inline_script_cannot_end_its_element_early():
    element = inline_script("var s = '</script><!-- </SCRIPT>'; var r = /<\\/script/;")
    assert element.startswith("<script>") and element.endswith("</script>")
    inner = element[len("<script>") : -len("</script>")]
    assert re.search(r"</script|<!--", inner, re.IGNORECASE) is None
