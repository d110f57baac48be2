"""The worst test cases of a run, for review: which images a change made worse.

Pooled metrics can hide one image that got much worse. `medseg report` and the `medseg plots`
page list the cases of the evaluate stage's ``per_image.csv`` worst first: by the largest HD95
where the table has boundary distances (a segmentation in the wrong place), else by the lowest
Dice, each with its overlay image.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

PER_IMAGE = "per_image.csv"  # the evaluate stage's per-case table, as dvc.yaml names it
OVERLAYS = "overlays"  # its overlay folder beside that table: <case_id>.png
SHOWN = 10  # cases listed


@dataclass(frozen=True)
class Case:
    """One case (and class) of the table: its scores now and, where known, at the base.

    ``hd95`` is None where the table has no boundary distances."""

    case_id: str
    label: str | None
    dice: float
    hd95: float | None
    base_dice: float | None = None
    base_hd95: float | None = None
    overlay: str | None = None


def per_image_tables(repo_dir: str | Path) -> list[str]:
    """The ``per_image.csv`` outputs that the repository's ``dvc.yaml`` declares, relative to
    its root (the place the evaluate stage writes them is written only in ``dvc.yaml``)."""
    path = Path(repo_dir) / "dvc.yaml"
    if not path.is_file():
        return []
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    found = []
    for stage in stages.values():
        for out in stage.get("outs", []) if isinstance(stage, dict) else []:
            name = next(iter(out)) if isinstance(out, dict) else str(out)
            if Path(name).name == PER_IMAGE:
                found.append(name)
    return found


def read_table(text: str | None) -> pd.DataFrame | None:
    """A ``per_image.csv`` from its text (None, or a table without ``case_id`` and ``dice``:
    None)."""
    if not text:
        return None
    table = pd.read_csv(io.StringIO(text), dtype={"case_id": str})
    return table if {"case_id", "dice"} <= set(table.columns) else None


def worst_cases(
    table: pd.DataFrame, base: pd.DataFrame | None = None, n: int = SHOWN, overlays: str = ""
) -> list[Case]:
    """The ``n`` worst rows of a per-image table, worst first.

    Order: the largest ``hd95`` first where the table has that column (cases without one, NaN,
    after those with one), then the lowest ``dice``, then the case id, so that the order is
    the same on every run.

    Args:
        table: ``per_image.csv`` of the workspace: ``case_id``, ``dice``, optionally ``class``
            and ``hd95``.
        base: the same table at the base revision, for the before/after columns.
        n: rows kept.
        overlays: the overlay folder; each case links ``<overlays>/<case_id>.png``.
    """
    keys = ["case_id", "class"] if "class" in table.columns else ["case_id"]
    has_hd95 = "hd95" in table.columns
    order = table.assign(
        _missing=table["hd95"].isna() if has_hd95 else False,
        _hd95=-table["hd95"].fillna(0.0) if has_hd95 else 0.0,
    ).sort_values(["_missing", "_hd95", "dice", *keys], kind="stable")
    before: dict[tuple[Any, ...], Any] = {}
    if base is not None and set(keys) <= set(base.columns):
        before = {tuple(row[k] for k in keys): row for _, row in base.iterrows()}
    cases = []
    for _, row in order.head(n).iterrows():
        old = before.get(tuple(row[k] for k in keys))
        cases.append(
            Case(
                case_id=str(row["case_id"]),
                label=str(row["class"]) if "class" in keys else None,
                dice=float(row["dice"]),
                hd95=_number(row.get("hd95")) if has_hd95 else None,
                base_dice=_number(old["dice"]) if old is not None else None,
                base_hd95=_number(old.get("hd95")) if old is not None and has_hd95 else None,
                overlay=f"{overlays}/{row['case_id']}.png" if overlays else None,
            )
        )
    return cases


def _number(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number
