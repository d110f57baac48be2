"""Plots that render with no network: DVC's plots of ``dvc.yaml`` as one self-contained page.

``dvc plots show`` writes a page whose scripts come from a CDN, so on an air-gapped machine its
charts stay blank. Two ways around it, both fed by ``vl-convert-python``, which carries Vega,
Vega-Lite and Vega-Embed inside its wheel (no JavaScript is kept in this repository):

- `write_report`: every plot DVC finds, charts rendered here to inline SVG and images inlined
  as ``data:`` URIs; the page runs no script and its Content-Security-Policy forbids any fetch.
- `install_dvc_template`: an HTML template for ``dvc plots show`` with the JavaScript inlined,
  written to a git-ignored file and named in ``.dvc/config.local`` (see `TEMPLATE`).
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg import __version__
from medseg.errors import MedsegError
from medseg.io.atomic import write_text
from medseg.review.cases import OVERLAYS, Case, per_image_tables, read_table, worst_cases

# The template's place, relative to `.dvc/` (DVC resolves `plots.html_template` from there).
# Git-ignored and set in config.local, not in the committed config: a committed setting would
# name a file that a fresh clone lacks, and DVC then reads the path itself as the template and
# fails ("HTML template has to contain '{plot_divs}'").
TEMPLATE = "plots/offline.html"

# DVC's built-in and our custom templates are Vega-Lite 5 specs (`$schema` .../v5.json).
VEGA_LITE_MAJOR = "5"

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".svg": "image/svg+xml"}  # fmt: skip


@dataclass(frozen=True)
class Chart:
    """One Vega-Lite plot: DVC's plot id and the spec with its data filled in."""

    name: str
    spec: dict[str, Any]


@dataclass(frozen=True)
class Image:
    """One image plot file: its path in the repository and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Plots:
    """What DVC found for the workspace: charts, images, and what it could not load (a plot
    whose file is absent, an image folder not pulled), one line each."""

    charts: list[Chart]
    images: list[Image]
    missing: list[str]


def vega_lite_version() -> str:
    """The newest Vega-Lite 5 release that the installed vl-convert carries (``"5.21"``)."""
    import vl_convert

    versions = [v for v in vl_convert.get_vegalite_versions() if v.split(".")[0] == VEGA_LITE_MAJOR]
    if not versions:
        raise MedsegError(
            f"vl-convert-python {_vl_convert_version()} carries no Vega-Lite {VEGA_LITE_MAJOR}"
            ".x; install a release that does (pip install 'vl-convert-python<2')"
        )
    return max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


def _vl_convert_version() -> str:
    return importlib.metadata.version("vl-convert-python")


def collect(repo_dir: str | Path = ".", targets: list[str] | None = None) -> Plots:
    """The workspace's plots as ``dvc plots show`` sees them (definitions from ``dvc.yaml``,
    custom templates from ``.dvc/plots``).

    Args:
        repo_dir: a folder inside a DVC repository.
        targets: plot files or folders to keep; default all.

    Raises:
        MedsegError: ``repo_dir`` is not in a DVC repository.
    """
    from dvc.render.match import match_defs_renderers
    from dvc_render import ImageRenderer

    repo = _open_repo(repo_dir)
    with repo:
        data = repo.plots.show(targets=targets or None)
        # out=None: DVC hands images over as base64 instead of copying them to a folder
        found = match_defs_renderers(data=data, templates_dir=repo.plots.templates_dir)
    charts, images, missing = [], [], _load_errors(data)
    for item in found:
        renderer = item.renderer
        if not renderer.datapoints:
            missing.append(renderer.name)
        elif isinstance(renderer, ImageRenderer):
            images += [
                Image(point["filename"], base64.b64decode(point["src"].split(",", 1)[1]))
                for point in renderer.datapoints
            ]
        else:
            charts.append(Chart(renderer.name, renderer.get_filled_template()))
    return Plots(charts, sorted(images, key=lambda i: i.name), missing)


def _load_errors(data: dict[str, Any]) -> list[str]:
    """DVC's errors in ``repo.plots.show`` data: a definition it could not expand (an image
    folder whose DVC-cached output is not in the workspace) or a data file it could not read."""
    errors = []
    for by_rev in data.values():
        for definition in by_rev.get("definitions", {}).get("data", {}).values():
            if "error" in definition:
                errors.append(" ".join(str(definition["error"]).split()))
        for source, loaded in by_rev.get("sources", {}).get("data", {}).items():
            if "error" in loaded:
                errors.append(" ".join(f"{source}: {loaded['error']}".split()))
    return errors


def chart_svg(spec: dict[str, Any], vl_version: str) -> str:
    """A Vega-Lite spec rendered to an SVG element, with external data requests refused."""
    import vl_convert

    svg: str = vl_convert.vegalite_to_svg(spec, vl_version=vl_version, allowed_base_urls=[])
    return re.sub(r"^<\?xml[^>]*>\s*", "", svg)


_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """body { font-family: sans-serif; margin: 1.5em; }
section { margin-bottom: 2em; }
section.chart { display: inline-block; vertical-align: top; margin-right: 2em; }
section.chart h2 { font-size: small; font-weight: normal; }
section.cases td, section.cases th { padding: 0 0.8em; text-align: left; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figure img { max-width: 480px; border: 1px solid #ccc; }
figcaption { font-size: small; }"""


def report_html(plots: Plots, title: str, cases: dict[str, list[Case]] | None = None) -> str:
    """The page: one section per chart (inline SVG), one per folder of images (``data:`` URIs),
    and for each per-image table in ``cases`` its worst cases, each linked to its overlay.

    The page contains no script and no URL to fetch; its Content-Security-Policy lets the
    browser load nothing but its own ``data:`` images.
    """
    version = vega_lite_version()
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>Written by medseg {__version__}.</p>"]
    shown = {i.name for i in plots.images}
    for name, worst in (cases or {}).items():
        body.append(_cases_section(name, worst, shown))
    for chart in plots.charts:
        body.append(
            f'<section class="chart" data-plot="{html.escape(chart.name)}">'
            f"<h2>{html.escape(chart.name)}</h2>\n{chart_svg(chart.spec, version)}\n</section>"
        )
    folders: dict[str, list[Image]] = {}
    for image in plots.images:
        folders.setdefault(str(Path(image.name).parent), []).append(image)
    for folder, images in folders.items():
        figures = "".join(
            f'<figure id="{html.escape(_anchor(i.name))}">'
            f'<img src="data:{_MIME[Path(i.name).suffix.lower()]};base64,'
            f'{base64.b64encode(i.data).decode()}" alt="{html.escape(i.name)}">'
            f"<figcaption>{html.escape(Path(i.name).name)}</figcaption></figure>"
            for i in images
        )
        body.append(f'<section class="images"><h2>{html.escape(folder)}</h2>{figures}</section>')
    if plots.missing:
        items = "".join(f"<li>{html.escape(m)}</li>" for m in plots.missing)
        body.append(
            "<section><h2>Not shown</h2><p>Not in the workspace: run <code>dvc pull</code> or "
            f"<code>dvc repro</code>.</p><ul>{items}</ul></section>"
        )
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        f"<title>{html.escape(title)}</title>\n<style>\n{_STYLE}\n</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_report(
    out: str | Path, repo_dir: str | Path = ".", targets: list[str] | None = None
) -> Plots:
    """Write the self-contained page of the workspace's plots to ``out``.

    Raises:
        MedsegError: not a DVC repository, or no plot file of ``dvc.yaml`` is in the workspace.
    """
    plots = collect(repo_dir, targets)
    if not plots.charts and not plots.images:
        raise MedsegError(
            f"no plot data in the workspace of {repo_dir}: none of the plot files of its dvc.yaml "
            "is there; run `dvc repro` or `dvc pull` first"
        )
    title = f"Plots of {Path(repo_dir).resolve().name}"
    write_text(out, report_html(plots, title, _workspace_cases(repo_dir)))
    return plots


def _workspace_cases(repo_dir: str | Path) -> dict[str, list[Case]]:
    with _open_repo(repo_dir) as repo:
        root = repo.root_dir
    found = {}
    for name in per_image_tables(root):
        path = Path(root) / name
        table = read_table(path.read_text() if path.is_file() else None)
        if table is not None:
            found[name] = worst_cases(table, overlays=(Path(name).parent / OVERLAYS).as_posix())
    return found


def _anchor(image: str) -> str:
    return "image-" + re.sub(r"[^A-Za-z0-9_.-]", "_", image)


def _cases_section(name: str, cases: list[Case], shown: set[str]) -> str:
    """A table of the worst cases, worst first; a case's overlay is a link to its figure."""
    boundary = any(c.hd95 is not None for c in cases)
    labelled = any(c.label is not None for c in cases)
    head = ["case", *(["class"] if labelled else []), "Dice", *(["HD95"] if boundary else [])]
    rows = []
    for c in cases:
        cells = [c.case_id, *([c.label or ""] if labelled else []), f"{c.dice:.4f}"]
        if boundary:
            cells.append("-" if c.hd95 is None else f"{c.hd95:.2f}")
        link = (
            f'<a href="#{html.escape(_anchor(c.overlay))}">overlay</a>'
            if c.overlay in shown
            else "-"
        )
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in cells) + f"<td>{link}</td></tr>"
        )
    header = "".join(f"<th>{h}</th>" for h in [*head, "overlay"])
    return (
        f'<section class="cases"><h2>Worst cases: {html.escape(name)}</h2>'
        f"<table><tr>{header}</tr>{''.join(rows)}</table></section>"
    )


def inline_script(source: str) -> str:
    """JavaScript as an inline ``<script>`` element: ``</script`` and ``<!--`` in the source
    would end or derail the element, so their ``<`` is written as the escape ``\\x3C``, which
    means the same inside strings, regular expressions and comments (the only places a minified
    bundle has them)."""
    source = re.sub(r"<(?=/script|!--)", r"\\x3C", source, flags=re.IGNORECASE)
    return f"<script>\n{source}\n</script>"


def dvc_template() -> str:
    """An HTML template for ``dvc plots show`` with Vega, Vega-Lite and Vega-Embed inlined.

    It has DVC's ``{plot_divs}`` and ``{refresh_tag}`` placeholders but no ``{scripts}``, so
    DVC's CDN ``<script src>`` tags are never written into the page.
    """
    import vl_convert

    # the globals DVC's page calls: `vegaEmbed('#id', spec)` in each plot's inline script
    globals_ = "window.vega = vega; window.vegaLite = vegaLite; window.vegaEmbed = vegaEmbed;"
    bundle = vl_convert.javascript_bundle(globals_, vl_version=vega_lite_version())
    versions = (
        f"Vega {vl_convert.get_vega_version()}, Vega-Lite {vega_lite_version()}, "
        f"Vega-Embed {vl_convert.get_vega_embed_version()}"
    )
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n{refresh_tag}\n'
        "<title>DVC Plot</title>\n"
        f"<!-- {versions} from vl-convert-python {_vl_convert_version()}, inlined by "
        "`medseg plots --dvc-template`: no network needed -->\n"
        f"{inline_script(bundle)}\n"
        "<style>\ntable { border-spacing: 15px; }\n</style>\n</head>\n<body>\n{plot_divs}\n"
        "</body>\n</html>\n"
    )


def install_dvc_template(repo_dir: str | Path = ".") -> Path:
    """Write `dvc_template` to ``.dvc/`` + `TEMPLATE` and set ``plots.html_template`` in
    ``.dvc/config.local``, so that plain ``dvc plots show`` writes pages that render offline.

    Returns:
        The template's path.

    Raises:
        MedsegError: ``repo_dir`` is not in a DVC repository.
    """
    repo = _open_repo(repo_dir)
    with repo:
        assert repo.dvc_dir is not None
        path = Path(repo.dvc_dir) / TEMPLATE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, dvc_template())
        with repo.config.edit("local") as conf:
            conf["plots"]["html_template"] = TEMPLATE
    return path


def _open_repo(repo_dir: str | Path) -> Any:
    """The DVC repository around ``repo_dir``, or one line saying there is none."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(str(repo_dir))
    except NotDvcRepoError as err:
        raise MedsegError(f"{repo_dir} is not inside a DVC repository (run `dvc init`)") from err
