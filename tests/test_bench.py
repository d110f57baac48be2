"""bench/harness.py, which every benchmark uses: what it measures is what its tables claim."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO

MiB = 2**20


def _harness():
    """bench/harness.py, loaded once (the scripts import it as ``harness``)."""
    if "harness" not in sys.modules:
        spec = importlib.util.spec_from_file_location("harness", REPO / "bench" / "harness.py")
        assert spec is not None and spec.loader is not None
        sys.modules["harness"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["harness"]


harness = _harness()


def _hold(mib: int, seconds: float) -> str:
    """Python source that keeps ``mib`` MiB resident (every page written) for ``seconds``."""
    return f"b = bytearray({mib} * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep({seconds})"


def test_peak_rss_sums_the_processes_of_the_tree():
    """A parent holding 64 MiB while its child holds 96 MiB: the tree held at least 160 MiB,
    more than either process alone (which is all a single high-water mark would see)."""
    child = f"import time; {_hold(96, 1.0)}"
    spawn = f"subprocess.run([sys.executable, '-c', {child!r}])"
    parent = f"import subprocess, sys, time; {_hold(64, 0)}; {spawn}"
    done = harness.run([sys.executable, "-c", parent], interval=0.05)
    assert done.returncode == 0
    assert done.peak_rss >= 160 * MiB
    assert done.peak_rss < 160 * MiB + 200 * MiB  # the interpreters, not a runaway sum


def test_peak_rss_holds_a_peak_shorter_than_the_sampling_interval():
    """128 MiB held for an instant, then the process ends: no reading of /proc saw it."""
    done = harness.run([sys.executable, "-c", f"import time; {_hold(128, 0)}"], interval=60.0)
    assert 128 * MiB <= done.peak_rss < 128 * MiB + 100 * MiB


def test_peak_rss_is_the_commands_not_the_callers():
    """A child inherits its parent's high-water mark (``ru_maxrss``) across fork and exec: the
    harness must not report the 300 MiB this test process holds as the child's."""
    held = bytearray(300 * MiB)
    held[::4096] = b"x" * len(held[::4096])
    done = harness.run([sys.executable, "-c", "import time; time.sleep(0.5)"], interval=0.01)
    assert 0 < done.peak_rss < 100 * MiB
    del held


def test_run_returns_output_lines_in_order_and_the_exit_code():
    source = "import sys; print('one'); print('two', file=sys.stderr, flush=True); sys.exit(3)"
    done = harness.run([sys.executable, "-u", "-c", source], check=False)
    assert done.returncode == 3
    assert [line for _, line in done.lines] == ["one", "two"]
    assert done.lines[0][0] <= done.lines[1][0] and done.seconds > 0
    with pytest.raises(SystemExit, match="exit code 3"):
        harness.run([sys.executable, "-c", source])


def test_rounds_warm_up_untimed_then_time_each_call():
    calls = []
    timing = harness.rounds(lambda: calls.append(1), n=4, warmup=2)
    assert len(calls) == 6 and len(timing.wall) == len(timing.cpu) == 4
    assert timing.min <= timing.median <= timing.max
    assert timing.spread == (timing.max - timing.min) / timing.median


def test_rounds_measure_wall_and_cpu_time():
    timing = harness.rounds(lambda: subprocess.run(["sleep", "0.2"], check=True), n=2, warmup=0)
    assert 0.2 <= timing.min < 2.0
    assert timing.cpu_min < 0.15  # sleeping costs no CPU time, here or in the child


def test_turns_alternate_the_order_of_the_variants():
    order: list[str] = []
    timings = harness.turns({k: (lambda k=k: order.append(k)) for k in "abc"}, n=3, warmup=1)
    assert order == list("abc" + "abc" + "cba" + "abc")
    assert {k: len(t.wall) for k, t in timings.items()} == {"a": 3, "b": 3, "c": 3}


def test_machine_line_names_the_cpu_flags_that_decide_speed():
    flags = harness.cpu_flags()
    assert set(flags) <= set(harness.FLAGS)
    line = harness.machine()
    assert "flags:" in line and "load average" in line
    for flag in harness.FLAGS:
        assert flag in line  # present, or listed after "not"


def test_table_aligns_numbers_right_and_escapes_pipes():
    text = harness.table(
        ("name", "value", "ratio"), [("a|b", 1.5, "2.0x"), ("c", 12, ""), ("d", "n/a", "0.9x")]
    )
    assert text.splitlines() == [
        "| name | value | ratio |",
        "| --- | --- | ---: |",
        "| a\\|b | 1.500 | 2.0x |",
        "| c | 12 |  |",
        "| d | n/a | 0.9x |",
    ]
    with pytest.raises(ValueError, match="3 cells"):
        harness.table(("a", "b", "c"), [(1, 2)])


SCRIPTS = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "harness")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_starts(script):
    """Each script imports what it needs (the harness among it) and prints its usage."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{script}.py"), "--help"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_every_benchmark_uses_the_harness():
    for script in SCRIPTS:
        source = (REPO / "bench" / f"{script}.py").read_text()
        assert "from harness import" in source, script
        for private in ("ru_maxrss", "VmHWM", "psutil", '"| --- |'):
            assert private not in source, f"{script}: {private} (use bench/harness.py)"
