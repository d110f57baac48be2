"""The worst cases of a per-image table, for review (`medseg report`, `medseg plots`)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import yaml
from conftest import REPO

from medseg.review.cases import per_image_tables, read_table, worst_cases
from medseg.review.report import Report, to_markdown


def _table(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["case_id", "dice", "hd95"])


def test_worst_first_by_hd95_then_dice_with_cases_lacking_hd95_last():
    table = _table(
        [("a", 0.9, 3.0), ("b", 0.5, 40.0), ("c", 0.2, math.nan), ("d", 0.7, 40.0), ("e", 0.8, 1.0)]
    )
    cases = worst_cases(table, n=4, overlays="results/evaluate/overlays")
    # b and d tie at HD95 40: the lower Dice first; c has no HD95: after every case with one
    assert [c.case_id for c in cases] == ["b", "d", "a", "e"]
    assert cases[0].overlay == "results/evaluate/overlays/b.png"
    assert cases[0].hd95 == 40.0 and cases[0].base_dice is None
    assert [c.case_id for c in worst_cases(table)][-1] == "c"


def test_without_boundary_distances_the_lowest_dice_first_and_base_scores_joined():
    now = pd.DataFrame({"case_id": ["x", "y", "z"], "dice": [0.8, 0.3, 0.6]})
    base = pd.DataFrame({"case_id": ["x", "y"], "dice": [0.7, 0.9]})
    cases = worst_cases(now, base)
    assert [(c.case_id, c.dice, c.base_dice, c.hd95) for c in cases] == [
        ("y", 0.3, 0.9, None), ("z", 0.6, None, None), ("x", 0.8, 0.7, None),
    ]  # fmt: skip


def test_classes_are_rows_of_their_own():
    now = pd.DataFrame({"case_id": ["1", "1"], "class": ["liver", "kidney"], "dice": [0.9, 0.4]})
    base = pd.DataFrame({"case_id": ["1", "1"], "class": ["liver", "kidney"], "dice": [0.5, 0.6]})
    cases = worst_cases(now, base)
    assert [(c.label, c.dice, c.base_dice) for c in cases] == [
        ("kidney", 0.4, 0.6),
        ("liver", 0.9, 0.5),
    ]


def test_the_report_shows_the_worst_cases_with_before_after_and_overlay():
    cases = worst_cases(
        _table([("01_test", 0.61, 12.5), ("02_test", 0.8, 2.0)]),
        _table([("01_test", 0.75, 4.0), ("02_test", 0.8, 2.0)]),
        overlays="results/evaluate/overlays",
    )
    report = Report("main", "0" * 40, [], [], [], [], [], {"results/evaluate/per_image.csv": cases})
    lines = to_markdown(report).splitlines()
    start = lines.index("### Worst cases: results/evaluate/per_image.csv")
    assert lines[start + 2].startswith("| case | dice | base | change | HD95 | base | change |")
    assert lines[start + 4] == (
        "| 01_test | 0.6100 | 0.7500 | -0.1400 | 12.5000 | 4.0000 | +8.5000 | "
        "`results/evaluate/overlays/01_test.png` |"
    )


def test_the_tables_come_from_dvc_yaml(tmp_path: Path):
    assert per_image_tables(REPO) == ["results/evaluate/per_image.csv"]
    assert per_image_tables(tmp_path) == []
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"s": {"cmd": "x", "outs": [{"out/per_image.csv": {}}, "o"]}}})
    )
    assert per_image_tables(tmp_path) == ["out/per_image.csv"]
    assert read_table(None) is None and read_table("a,b\n1,2\n") is None
    assert list(read_table("case_id,dice\n007,0.5\n")["case_id"]) == ["007"]  # ids stay text
