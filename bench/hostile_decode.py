"""Peak memory and time of decoding each hostile file, against the decode limit.

Makes every file of the hostile corpus (tests/hostile_files.py: DICOM with huge headers,
deflate bombs, codestreams that disagree with their header or are truncated, PNG/TIFF/GIF with
huge sizes or page counts, truncated plain files) plus a few genuine controls, then reads each
one with `medseg.io.reader.read` in a fresh Python process, and prints a Markdown table: the
outcome, the peak RSS the read added over the process's RSS after importing the reader, the
time of the read, and both against the limit (``max_pixels`` samples; ``max_bytes`` is the
bound on the bytes held of one file).

    python bench/hostile_decode.py                      # the corpus limit, 2**20 samples
    python bench/hostile_decode.py --limit 200000000    # medseg's default limit
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from medseg.io.limits import ReadOptions

REPO = Path(__file__).resolve().parents[1]

# Run in the fresh process: the RSS after importing the reader (its peak then reset through
# /proc/self/clear_refs, Linux), then the peak RSS after reading.
_CHILD = """
import json, sys, time
from pathlib import Path
from medseg.errors import MedsegError
from medseg.io.reader import ReadOptions, read
def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
start = time.perf_counter()
try:
    shape = list(read(sys.argv[1], ReadOptions(max_pixels=int(sys.argv[2]))).shape)
    outcome = "read " + "x".join(map(str, shape))
except MedsegError as err:
    outcome = "refused: " + str(err).split(": ", 1)[1][:70]
seconds = time.perf_counter() - start
print(json.dumps({"outcome": outcome, "seconds": seconds, "kib": status("VmHWM") - before}))
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


def measure(path: Path, limit: int) -> dict[str, object]:
    """Read ``path`` in a fresh process; its outcome, seconds and added peak RSS (KiB)."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(limit)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        return {"outcome": f"CRASHED (exit {done.returncode})", "seconds": 0.0, "kib": 0}
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


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
    print(f"limit: {limit:,} samples; bytes held of one file at most {options.max_bytes:,}\n")
    print("| file class | size on disk | outcome | peak RSS added | of max_bytes | time |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as folder:
        for name, make in makers.items():
            if args.only and name not in args.only:
                continue
            sub = Path(folder) / name
            sub.mkdir()
            path = make(sub)
            r = measure(path, limit)
            mib = int(r["kib"]) / 1024  # type: ignore[call-overload]
            share = int(r["kib"]) * 1024 / options.max_bytes  # type: ignore[call-overload]
            print(
                f"| {name} | {path.stat().st_size:,} B | {r['outcome']} | {mib:.1f} MiB | "
                f"{share:.2f} | {float(r['seconds']) * 1000:.0f} ms |"  # type: ignore[arg-type]
            )


if __name__ == "__main__":
    main()
