from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.io.atomic import atomic_dir, write_json


def test_output_appears_whole(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp != out and tmp.parent == out.parent
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # untouched until the block succeeds
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_leaves_previous_output_and_no_temporary(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_json(tmp_path: Path):
    write_json(tmp_path / "a" / "m.json", {"dice": 0.5})
    assert json.loads((tmp_path / "a" / "m.json").read_text()) == {"dice": 0.5}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["m.json"]


def test_leftovers_of_a_killed_run_are_removed(tmp_path: Path):
    stale = tmp_path / ".out.tmp-abc123"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    other = tmp_path / ".other.tmp-abc123"  # another output's: not ours to remove
    other.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-abc123", "out"]
