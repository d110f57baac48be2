from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.io.atomic import TMP, atomic_dir, atomic_file, write_json, write_text


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


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path):
    path = tmp_path / "m.json"
    write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash midway")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_temporary_names_are_unique_and_beside_the_file(tmp_path: Path):
    path = tmp_path / "m.txt"
    with atomic_file(path) as first, atomic_file(path, suffix=".onnx") as second:
        assert first != second and first.parent == second.parent == tmp_path
        assert first.name.startswith(f".m.txt{TMP}{os.getpid()}-") and second.suffix == ".onnx"
        first.write_text("one")
        second.write_text("two")
    assert path.read_text() == "one"  # the outer block finished last
    assert [p.name for p in tmp_path.iterdir()] == ["m.txt"]


def test_a_killed_write_leaves_no_partial_file_and_the_next_removes_its_temporary(
    tmp_path: Path,
):
    path = tmp_path / "table.csv"
    write_text(path, "old\n")
    script = (
        "import os, sys, time\n"
        "from medseg.io.atomic import atomic_file\n"
        "with atomic_file(sys.argv[1]) as tmp:\n"
        "    with open(tmp, 'w') as f:\n"
        "        f.write('half'); f.flush()\n"
        "        print('writing', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "writing\n"
    child.kill()  # SIGKILL: no cleanup runs
    child.wait()
    assert path.read_text() == "old\n"  # never the half-written file
    stray = [p.name for p in tmp_path.iterdir() if p.name != "table.csv"]
    assert len(stray) == 1 and stray[0].startswith(f".table.csv{TMP}{child.pid}-")
    write_text(path, "new\n")
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]
    assert path.read_text() == "new\n"
