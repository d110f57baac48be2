"""What every bench/ script shares: the machine line, timing rounds, peak memory, one table.

Standard library only, and nothing of medseg, so that it measures any code the same way.

- `machine()`: one line to print above every table of timings: the CPU model, the cores this
  process may use, the CPU flags that decide the speed of a training step (`cpu_flags()`: AVX2,
  AVX-512, AVX-512 bf16, AMX bf16; without the last two, bf16 is emulated and slow) and the load
  average (other jobs on the cores inflate every wall time).
- `rounds(fn, n, warmup)` and `turns(fns, n, warmup)`: wall and CPU seconds of ``n`` calls after
  ``warmup`` untimed ones (the first calls of a process allocate and pick kernels); `turns`
  runs several variants in turn, so that a change of the machine's load hits all of them alike.
- `run(cmd)`: a command in a child process, with its wall time and the peak resident memory of
  its whole process tree (see `run` for how it is measured).
- `table(headers, rows)`: a Markdown table.

Scripts run as ``python bench/<script>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo(key: str) -> str:
    """The first ``key`` line of ``/proc/cpuinfo`` ("" where there is none)."""
    try:
        found = re.search(rf"^{key}\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        return ""
    return found.group(1).strip() if found else ""


def cpu_flags() -> tuple[str, ...]:
    """Which of `FLAGS` the CPU has."""
    have = set(_cpuinfo("flags").split())
    return tuple(flag for flag in FLAGS if flag in have)


def machine() -> str:
    """One line about the machine, to print above every table of timings."""
    flags = cpu_flags()
    lacks = [flag for flag in FLAGS if flag not in flags]
    return (
        f"machine: {_cpuinfo('model name') or platform.machine()}; "
        f"{len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs usable; "
        f"flags: {' '.join(flags) or '-'}{' (not ' + ' '.join(lacks) + ')' if lacks else ''}; "
        f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and of its children that ended."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed call: ``wall`` and ``cpu`` (`cpu_seconds`), in call order."""

    wall: tuple[float, ...]
    cpu: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median wall seconds."""
        return statistics.median(self.wall)

    @property
    def min(self) -> float:
        """Fastest wall seconds: the figure least disturbed by other jobs."""
        return min(self.wall)

    @property
    def max(self) -> float:
        """Slowest wall seconds."""
        return max(self.wall)

    @property
    def spread(self) -> float:
        """(max - min) / median of the wall seconds: how far apart the calls were."""
        return (self.max - self.min) / self.median

    @property
    def cpu_min(self) -> float:
        """Fewest CPU seconds of a call."""
        return min(self.cpu)


def rounds(fn: Callable[[], object], n: int = 3, warmup: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``n`` times timed."""
    return turns({"": fn}, n, warmup)[""]


def turns(
    fns: Mapping[str, Callable[[], object]], n: int = 3, warmup: int = 1
) -> dict[str, Timing]:
    """Each of ``fns`` ``warmup`` times untimed, then ``n`` rounds in which each runs once, the
    order reversed every other round (no variant always runs first, or right after another)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    found: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for i in range(n):
        for name in list(fns) if i % 2 == 0 else reversed(list(fns)):
            start, start_cpu = time.perf_counter(), cpu_seconds()
            fns[name]()
            found[name].append((time.perf_counter() - start, cpu_seconds() - start_cpu))
    return {
        name: Timing(tuple(w for w, _ in t), tuple(c for _, c in t)) for name, t in found.items()
    }


@dataclass(frozen=True)
class Run:
    """A finished command: wall seconds, peak RSS of its process tree (bytes), exit code, and
    its output lines (stdout and stderr together), each with the `time.perf_counter` at which it
    was read."""

    seconds: float
    peak_rss: int
    returncode: int
    lines: tuple[tuple[float, str], ...]

    @property
    def output(self) -> str:
        """The output as one string."""
        return "\n".join(line for _, line in self.lines)


def _children() -> dict[int, list[int]]:
    """Each process's children, from the parent pid in ``/proc/<pid>/stat``."""
    found: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
        found.setdefault(ppid, []).append(int(name))
    return found


def _rss(pid: int) -> int:
    """Resident bytes of one process (0 once it has ended)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants_rss(pid: int) -> int:
    """Resident bytes of all descendants of process ``pid`` (not ``pid`` itself), now."""
    children, total = _children(), 0
    todo = list(children.get(pid, ()))
    while todo:
        p = todo.pop()
        total += _rss(p)
        todo.extend(children.get(p, ()))
    return total


# Starts the command as its own child and reports that child's ru_maxrss (KiB) on fd argv[1]. A
# process inherits the high-water mark of the memory it had before exec (a child of this
# process: ours); this small interpreter's, about 7 MiB, is below any Python program's own.
_SHIM = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as err:
        print(f"{sys.argv[2]}: {err}", file=sys.stderr, flush=True)
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
os.write(int(sys.argv[1]), str(usage.ru_maxrss).encode())
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    echo: bool = False,
    check: bool = True,
    interval: float = 0.1,
) -> Run:
    """Run ``cmd`` to its end; its wall time, output and peak tree RSS.

    The peak (Linux) is the larger of: the sum of ``VmRSS`` over the command's process and all
    its descendants, read from ``/proc`` every ``interval`` seconds, which sees processes that
    run side by side (pages they share, as forked workers do, count once per process) but may
    miss a peak shorter than ``interval``; and the high-water mark of the largest single process
    (``ru_maxrss`` from ``wait4``, which covers the descendants it waited for), exact however
    short the peak. ``cmd`` runs under a small shim that reports the latter: ``ru_maxrss``
    starts from the memory a process had before its exec, and the shim's is small.

    ``echo`` prints each output line as it arrives; ``check`` exits with the output's tail if
    the command fails.
    """
    start = time.perf_counter()
    report, report_w = os.pipe()
    shim = [sys.executable, "-S", "-c", _SHIM, str(report_w), *(os.fspath(c) for c in cmd)]
    proc = subprocess.Popen(
        shim, cwd=cwd, env=env, text=True, pass_fds=(report_w,),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    os.close(report_w)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, descendants_rss(proc.pid))
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.perf_counter(), line.rstrip("\n")))
        if echo:
            print(line, end="", flush=True)
    proc.wait()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.stdout.close()
    with os.fdopen(report) as f:
        maxrss_kib = int(f.read() or 0)
    result = Run(seconds, max(peak, maxrss_kib * 1024), proc.returncode, tuple(lines))
    if check and result.returncode != 0:
        tail = "\n".join(line for _, line in lines[-40:])
        raise SystemExit(f"{tail}\n{' '.join(map(str, cmd))}: exit code {result.returncode}")
    return result


def _cell(value: object) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


_NUMBER = re.compile(r"^[-+]?[\d,.]+(e[-+]?\d+)?\s*(x|%|s|ms|MiB|GiB|MB|GB|B)?$")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats to 3 decimals (format them first for other precisions); a
    column of numbers (a unit or an ``x`` after them allowed; empty cells too) aligned right."""
    cells = [[_cell(v) for v in row] for row in rows]
    if any(len(row) != len(headers) for row in cells):
        raise ValueError(f"every row needs {len(headers)} cells")
    columns = [[row[i] for row in cells if row[i]] for i in range(len(headers))]
    right = [bool(col) and all(_NUMBER.match(c) for c in col) for col in columns]
    lines = [
        "| " + " | ".join(_cell(h) for h in headers) + " |",
        "|" + "|".join(" ---: " if r else " --- " for r in right) + "|",
        *("| " + " | ".join(row) + " |" for row in cells),
    ]
    return "\n".join(lines)
