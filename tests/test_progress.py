"""Progress bars and log lines: the real synthesize stage script run on a terminal (a pseudo
terminal) shows its bar; in a pipe, as under CI or `dvc repro > log`, it shows none; either way
each log line starts with its time."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

from conftest import REPO, tiny_params, write_params

STAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO medseg: wrote 6 synthetic cases", re.M)
BAR = re.compile(r"synthesize: 100%\|.*\| 6/6")


def _command(tmp_path: Path) -> list[str]:
    params = write_params(tmp_path / "params.yaml", tiny_params())
    script = str(REPO / "stages" / "synthesize.py")
    return [sys.executable, script, "--params", str(params), "--out", str(tmp_path / "out")]


def _on_terminal(command: list[str]) -> str:
    """What ``command`` writes to standard output and error when both are a terminal."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # EIO: the child's side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    assert proc.wait(timeout=120) == 0
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def test_a_terminal_shows_the_bar_and_stamped_log_lines(tmp_path: Path):
    text = _on_terminal(_command(tmp_path))
    assert BAR.search(text), text
    assert STAMPED.search(text), text


def test_a_pipe_gets_stamped_log_lines_and_no_bar(tmp_path: Path):
    proc = subprocess.run(_command(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not BAR.search(proc.stderr) and "\r" not in proc.stderr and "%|" not in proc.stderr
    assert STAMPED.search(proc.stderr), proc.stderr
    assert proc.stdout == ""
