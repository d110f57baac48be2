"""Hostile and unlucky outputs and paths (issue 11, items 3, 4 and 6): a full or read-only disk,
an output folder that holds an input, a killed run, a user's file in --out, links out of the data
root, case ids equal but for letter case. Each test runs the real stage ``main`` or the real
``medseg predict`` and checks the exit code, the one-line message, that nothing half-written is
left and that the user's files are unchanged.

Disk-full and read-only cases use a small tmpfs and run only as root (where mount works).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import psutil
import pytest
from conftest import REPO, make_bundle, run, tiny_params, write_params

from medseg.errors import run_cli
from medseg.io.atomic import output_failure
from medseg.io.images import write_png
from medseg.io.layouts import scan_cases

# --- helpers ---------------------------------------------------------------------------------


def _stage(name: str) -> ModuleType:
    """The real stage script ``stages/<name>.py`` as a module (its ``main``)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, str]:
    """Every file and link under ``root`` -> its SHA-256 (a link: where it points)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _dataset(root: Path, n: int, side: int = 64, seed: int = 0) -> Path:
    """A folders-layout data set of ``n`` noise images (incompressible) with masks."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_png(root / "images" / f"c{i:03d}.png", rng.integers(0, 256, (side, side), np.uint8))
        write_png(root / "masks" / f"c{i:03d}.png", rng.random((side, side)) > 0.5)
    return root


def _params(path: Path, root: Path, **convert: object) -> Path:
    params = tiny_params(
        data={"root": str(root), "layout": "folders"},
        convert={"fov_fallback": "whole_image", "workers": 1, **convert},
    )
    return write_params(path, params)


def _one_error_line(stderr: str, *names: str) -> str:
    """The single ``error:`` line of ``stderr``; no traceback, every one of ``names`` in it."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def _convert_subprocess(params: Path, out: Path, **kw: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "stages" / "convert.py"), "--params", str(params)]
    return subprocess.run(
        [*cmd, "--out", str(out)], capture_output=True, text=True, timeout=120, **kw
    )


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs at ``tmp_path/disk``; skipped unless the test runs as root and mount works."""
    if not _can_mount():
        pytest.skip("needs root and mount (a 1 MiB tmpfs for the disk-full and read-only cases)")
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed: {proc.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# --- 3. errors tell the truth ----------------------------------------------------------------


def test_disk_full_stops_convert_even_under_skip_and_names_the_output(
    tmp_path: Path, small_disk: Path
):
    root = _dataset(tmp_path / "raw", 20, side=256)  # 20 x 64 KiB of noise: more than 1 MiB
    params = _params(tmp_path / "params.yaml", root, on_error="skip", workers=2)
    before = _tree(root)
    out = small_disk / "converted"
    proc = _convert_subprocess(params, out)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr, str(out), os.strerror(errno.ENOSPC), "free space")
    assert "could not be converted" not in line  # not blamed on an input
    assert list(small_disk.iterdir()) == []  # neither the output nor its temporary folder
    assert _tree(root) == before


def test_read_only_output_disk_is_named_as_such(tmp_path: Path, small_disk: Path):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    root = _dataset(tmp_path / "raw", 3)
    params = _params(tmp_path / "params.yaml", root, on_error="skip")
    before = _tree(root)
    proc = _convert_subprocess(params, small_disk / "converted")
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, str(small_disk / "converted"), os.strerror(errno.EROFS))
    assert list(small_disk.iterdir()) == []
    assert _tree(root) == before


def test_an_output_folder_without_write_permission_is_named(tmp_path: Path):
    """Mode 0555 binds a normal user; root is bound by the immutable attribute instead."""
    root = _dataset(tmp_path / "raw", 3)
    params = _params(tmp_path / "params.yaml", root, on_error="skip")
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
            pytest.skip("as root, needs chattr +i (an ext2/3/4 or similar file system)")
    else:
        locked.chmod(0o555)
    try:
        before = _tree(root)
        proc = _convert_subprocess(params, locked / "converted")
        assert proc.returncode == 2, proc.stderr
        reason = os.strerror(errno.EPERM if os.geteuid() == 0 else errno.EACCES)
        _one_error_line(proc.stderr, str(locked / "converted"), reason, "writable")
        assert list(locked.iterdir()) == []
        assert _tree(root) == before
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        locked.chmod(0o755)


def test_a_cross_device_rename_is_an_output_failure(tmp_path: Path, small_disk: Path):
    """A real EXDEV (a rename from the tmpfs to the test folder) is named as the output's."""
    (small_disk / "x").write_text("x")
    with pytest.raises(OSError) as info:
        os.rename(small_disk / "x", tmp_path / "x")
    assert info.value.errno == errno.EXDEV
    failure = output_failure(info.value, tmp_path / "out")
    assert failure is not None
    assert str(failure).startswith(f"{tmp_path / 'out'}: {os.strerror(errno.EXDEV)}")


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize(
    "sig",
    [
        signal.SIGTERM,
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
        pytest.param(signal.SIGKILL, marks=pytest.mark.slow),
    ],
)
def test_killing_convert_kills_its_workers_and_leaves_no_output(tmp_path: Path, sig: int):
    root = tmp_path / "raw"
    _dataset(root, 1, side=512)
    for i in range(1, 400):  # many cases, cheaply: links to one case
        os.link(root / "images" / "c000.png", root / "images" / f"c{i:03d}.png")
        os.link(root / "masks" / "c000.png", root / "masks" / f"c{i:03d}.png")
    params = _params(tmp_path / "params.yaml", root, workers=2, fov_fallback="threshold")
    before = _tree(root)
    out = tmp_path / "converted"
    cmd = [sys.executable, str(REPO / "stages" / "convert.py"), "--params", str(params)]
    proc = subprocess.Popen([*cmd, "--out", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until both workers are converting
            workers = _children(proc.pid)
            written = list(tmp_path.glob(".converted.tmp-*/images/*.png"))
            if len(workers) >= 2 and written:
                break
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        else:
            pytest.fail("convert did not start its workers")
        os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    psutil.wait_procs(workers, timeout=10)
    assert all(_gone(w) for w in workers), "a worker outlived convert"
    assert not out.exists()
    if sig == signal.SIGKILL:  # no cleanup possible: the next run removes the leftover
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + sig
        _one_error_line(stderr, f"stopped by {signal.Signals(sig).name}")
        assert list(tmp_path.glob(".converted.tmp-*")) == []
    assert _tree(root) == before


# --- 4. nothing the user had is lost ---------------------------------------------------------


@pytest.mark.parametrize("where", ["root", "parent", "inside"])
def test_convert_refuses_an_output_that_is_holds_or_lies_in_data_root(
    tmp_path: Path, capsys, where: str
):
    root = _dataset(tmp_path / "data" / "raw", 2)
    params = _params(tmp_path / "params.yaml", root)
    out = {"root": root, "parent": root.parent, "inside": root / "converted"}[where]
    before = _tree(tmp_path / "data")
    assert run_cli(_stage("convert").main, ["--params", str(params), "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, str(out), "data.root", "Choose")
    assert _tree(tmp_path / "data") == before
    assert not (root / "converted").exists()


def test_later_stages_refuse_an_output_that_holds_their_input(tmp_path: Path, capsys):
    converted = tmp_path / "data" / "converted"
    converted.mkdir(parents=True)
    (converted / "manifest.csv").write_text("case_id\n")
    params = write_params(tmp_path / "params.yaml", tiny_params())
    before = _tree(tmp_path / "data")
    argv = ["--params", str(params), "--converted", str(converted), "--out", str(tmp_path / "data")]
    assert run_cli(_stage("preprocess").main, argv) == 2
    _one_error_line(capsys.readouterr().err, "--converted", str(converted))
    argv = ["--params", str(params), "--data", str(converted), "--model", str(tmp_path / "m")]
    assert run_cli(_stage("evaluate").main, [*argv, "--out", str(converted / "eval")]) == 2
    _one_error_line(capsys.readouterr().err, "--data", "lies inside")
    assert _tree(tmp_path / "data") == before


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_permissions_of_the_umask(tmp_path: Path, umask: int):
    root = _dataset(tmp_path / "raw", 2)
    params = _params(tmp_path / "params.yaml", root)
    old = os.umask(umask)
    try:
        out = tmp_path / "converted"
        assert run_cli(_stage("convert").main, ["--params", str(params), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "images").stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("manifest.csv", "report.json", "images/c000.png"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# --- medseg predict --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medseg.spec import ModelSpec

    folder = tmp_path_factory.mktemp("model") / "models"
    make_bundle(folder, ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], 1, 1))
    return folder


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "eye.png"
    path.parent.mkdir()
    write_png(path, np.random.default_rng(0).integers(0, 256, (40, 48, 3), np.uint8))
    return path


def _predict_cli(*args: str | Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "medseg"
    cmd = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "import medseg.cli as c; c.main()"]
    )
    return subprocess.run(
        [*cmd, "predict", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def _predict(*args: str | Path) -> int:
    from medseg.cli import main

    with pytest.raises(SystemExit) as info:
        main(["predict", "--window", "64", *map(str, args)])
    return int(info.value.code or 0)


@pytest.mark.slow
def test_the_predict_cli_refuses_to_replace_a_users_file(tmp_path: Path, model: Path, image: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eye.png").write_bytes(b"the user's own file")
    before = _tree(out)
    proc = _predict_cli("--model", model, "--out", out, "--window", "64", image)
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, str(out / "eye.png"), "--overwrite")
    assert _tree(out) == before  # nothing replaced, no temporary folder left


def test_predict_never_replaces_a_file_it_did_not_write(
    tmp_path: Path, model: Path, image: Path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eye.png").write_bytes(b"the user's own file")
    (out / "notes.txt").write_text("keep")
    before = _tree(out)
    assert _predict("--model", model, "--out", out, image) == 2
    _one_error_line(capsys.readouterr().err, str(out / "eye.png"), "--overwrite")
    assert _tree(out) == before  # nothing replaced, no temporary folder left
    assert _predict("--model", model, "--out", out, "--overwrite", image) == 0
    assert (out / "eye.png").read_bytes()[:4] == b"\x89PNG"
    assert _predict("--model", model, "--out", out, image) == 0  # its own file: replaced
    (out / "eye.png").write_bytes(b"changed by the user")
    assert _predict("--model", model, "--out", out, image) == 2
    _one_error_line(capsys.readouterr().err, str(out / "eye.png"))
    assert (out / "eye.png").read_bytes() == b"changed by the user"
    assert (out / "notes.txt").read_text() == "keep"


def test_predict_into_a_mount_point(model: Path, image: Path, small_disk: Path):
    """Temporary files go inside --out: a rename out of its parent would cross file systems."""
    assert _predict("--model", model, "--out", small_disk, "--probabilities", image) == 0
    names = sorted(p.relative_to(small_disk).as_posix() for p in small_disk.rglob("*"))
    assert names == [".medseg-predict.json", "eye.png", "probabilities", "probabilities/eye.png"]


def test_predict_removes_the_leftovers_of_a_killed_run(tmp_path: Path, model: Path, image: Path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    out = tmp_path / "out"
    killed = out / f".medseg-predict.tmp-{dead.stdout.strip()}-abcd"
    killed.mkdir(parents=True)
    (killed / "eye.png").write_bytes(b"half")
    running = out / f".medseg-predict.tmp-{os.getppid()}-live"  # a live process's: kept
    running.mkdir()
    assert _predict("--model", model, "--out", out, image) == 0
    assert not killed.exists() and running.exists()
    assert sorted(p.name for p in out.iterdir() if p != running) == [
        ".medseg-predict.json", "eye.png",
    ]  # fmt: skip


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_predict_outputs_get_the_permissions_of_the_umask(
    tmp_path: Path, model: Path, image: Path, umask: int
):
    old = os.umask(umask)
    try:
        assert _predict("--model", model, "--out", tmp_path / "o", "--probabilities", image) == 0
    finally:
        os.umask(old)
    for name, mode in (("", 0o777), ("probabilities", 0o777), ("eye.png", 0o666),
                       ("probabilities/eye.png", 0o666)):  # fmt: skip
        assert (tmp_path / "o" / name).stat().st_mode & 0o777 == mode & ~umask, name


# --- 6. paths --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["folders", "drive", "manifest"])
def test_a_link_out_of_data_root_is_refused_naming_it(tmp_path: Path, capsys, layout: str):
    secret = tmp_path / "elsewhere" / "patient.png"
    secret.parent.mkdir()
    write_png(secret, np.full((64, 64), 9, np.uint8))
    root = tmp_path / "raw"
    if layout == "drive":
        for folder, name in (("images", "01_test.png"), ("1st_manual", "01_manual1.png")):
            (root / "test" / folder).mkdir(parents=True)
            write_png(root / "test" / folder / name, np.ones((64, 64), bool))
        link = root / "training" / "images" / "21_training.png"
        (root / "training" / "1st_manual").mkdir(parents=True)
        write_png(root / "training" / "1st_manual" / "21_manual1.png", np.ones((64, 64), bool))
    else:
        _dataset(root, 2)
        link = root / "images" / "evil.png"
        write_png(root / "masks" / "evil.png", np.ones((64, 64), bool))
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret)
    if layout == "manifest":
        rows = [f"images/{n},masks/{n}" for n in ("c000.png", "c001.png", "evil.png")]
        (root / "manifest.csv").write_text("image,mask\n" + "\n".join(rows) + "\n")
    params = write_params(
        tmp_path / "params.yaml",
        tiny_params(data={"root": str(root), "layout": layout},
                    convert={"fov_fallback": "whole_image", "workers": 1}),
    )  # fmt: skip
    before = _tree(tmp_path)
    out = tmp_path / "converted"
    assert run_cli(_stage("convert").main, ["--params", str(params), "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, str(link), "outside data.root")
    assert not out.exists()
    assert _tree(tmp_path) == before


@pytest.mark.slow
def test_links_into_the_dvc_cache_are_inside(tmp_path: Path):
    """``cache.type: symlink`` turns every tracked file into a link into .dvc/cache: fine."""
    project = tmp_path / "project"
    root = _dataset(project / "data", 2)
    run(project, "git", "init", "-q")
    run(project, "dvc", "init", "-q")
    run(project, "dvc", "config", "cache.type", "symlink")
    run(project, "dvc", "add", "-q", "data")
    assert (root / "images" / "c000.png").is_symlink()
    scan = scan_cases(root, "folders")
    assert not scan.problems and len(scan.cases) == 2


def test_case_ids_equal_but_for_letter_case_are_refused(tmp_path: Path, capsys):
    root = _dataset(tmp_path / "raw", 2)
    for sub in ("images", "masks"):
        shutil.copy(root / sub / "c001.png", root / sub / "C001.png")
    params = _params(tmp_path / "params.yaml", root, on_error="skip")
    before = _tree(root)
    out = tmp_path / "converted"
    assert run_cli(_stage("convert").main, ["--params", str(params), "--out", str(out)]) == 2
    _one_error_line(
        capsys.readouterr().err, str(root / "images" / "C001.png"),
        str(root / "images" / "c001.png"), "letter case",
    )  # fmt: skip
    assert not out.exists()
    assert _tree(root) == before


def test_ids_equal_but_for_case_in_two_splits_are_qualified(tmp_path: Path):
    root = tmp_path / "raw"
    _dataset(root / "train", 1)
    _dataset(root / "test", 1)
    for sub in ("images", "masks"):
        (root / "test" / sub / "c000.png").rename(root / "test" / sub / "C000.png")
    ids = sorted(c.case_id for c in scan_cases(root, "folders").cases)
    assert ids == ["test_C000", "train_c000"]
    manifest = pd.DataFrame({"case_id": ids})
    assert manifest["case_id"].str.casefold().is_unique
