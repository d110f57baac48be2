"""Peak memory and time of decoding each hostile file, against the decode limit.

Makes every file of the hostile corpus (tests/hostile_files.py: DICOM with huge headers,
deflate bombs, codestreams that disagree with their header or are truncated, PNG/TIFF/GIF with
huge sizes or page counts, truncated plain files) plus a few genuine controls, then reads each
one with `medseg.io.reader.read` in a fresh Python process, and prints a Markdown table: the
outcome, the peak RSS the read added (the process's peak, `harness.run`, less that of a process
that only imports the reader), the time of the read, and both against the limit (``max_pixels``
samples; ``max_bytes`` is the bound on the bytes held of one file).

    python bench/hostile_decode.py                      # the corpus limit, 2**20 samples
    python bench/hostile_decode.py --limit 200000000    # medseg's default limit
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from harness import machine, run, table
from PIL import Image

from medseg.io.limits import ReadOptions

REPO = Path(__file__).resolve().parents[1]

# Run in the fresh process: import the reader, then read the file (or, given "-", nothing).
_CHILD = """
import json, sys, time
from medseg.errors import MedsegError
from medseg.io.reader import ReadOptions, read
if sys.argv[1] != "-":
    start = time.perf_counter()
    try:
        shape = list(read(sys.argv[1], ReadOptions(max_pixels=int(sys.argv[2]))).shape)
        outcome = "read " + "x".join(map(str, shape))
    except MedsegError as err:
        outcome = "refused: " + str(err).split(": ", 1)[1][:70]
    print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - start}))
"""


def _corpus() -> object:
    """tests/hostile_files.py, loaded by its path (the tests own it; there is no package)."""
    spec = importlib.util.spec_from_file_location("hostile_files", REPO / "tests/hostile_files.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grey_png(folder: Path, limit: int) -> Path:
    """A genuine grey PNG of about ``limit`` pixels (noise, so it does not compress away)."""
    side = int(limit**0.5)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "at_limit.png")
    return folder / "at_limit.png"


def measure(path: Path | str, limit: int) -> tuple[str, float, int]:
    """Read ``path`` in a fresh process: its outcome, seconds and peak RSS (bytes)."""
    done = run([sys.executable, "-c", _CHILD, path, str(limit)], check=False)
    if done.returncode != 0:
        return f"CRASHED (exit {done.returncode})", 0.0, done.peak_rss
    if path == "-":
        return "", 0.0, done.peak_rss
    found = json.loads(next(line for _, line in reversed(done.lines) if line.startswith("{")))
    return found["outcome"], found["seconds"], done.peak_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="max_pixels (samples)")
    parser.add_argument("--only", nargs="*", default=None, help="file classes to run")
    args = parser.parse_args()
    corpus = _corpus()
    limit = args.limit or corpus.LIMIT  # type: ignore[attr-defined]
    makers = {name: make for name, (make, _) in corpus.HOSTILE.items()}  # type: ignore[attr-defined]
    makers["control_deflated_dicom"] = corpus.dicom_deflated_ok  # type: ignore[attr-defined]
    makers["control_png_at_limit"] = lambda folder: _grey_png(folder, limit)
    options = ReadOptions(max_pixels=limit)
    baseline = measure("-", limit)[2]
    print(f"limit: {limit:,} samples; bytes held of one file at most {options.max_bytes:,}")
    print(f"a process that only imports the reader peaks at {baseline / 2**20:.1f} MiB")
    print(machine() + "\n")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, make in makers.items():
            if args.only and name not in args.only:
                continue
            sub = Path(folder) / name
            sub.mkdir()
            path = make(sub)
            outcome, seconds, peak = measure(path, limit)
            added = max(peak - baseline, 0)
            size, mib = f"{path.stat().st_size:,} B", f"{added / 2**20:.1f} MiB"
            share, ms = f"{added / options.max_bytes:.2f}", f"{seconds * 1000:.0f} ms"
            rows.append((name, size, outcome, mib, share, ms))
            print(f"{name}: {outcome}", flush=True)
    headers = ("file class", "size on disk", "outcome", "peak RSS added", "of max_bytes", "time")
    print("\n" + table(headers, rows))


if __name__ == "__main__":
    main()
