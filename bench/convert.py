"""Benchmark of the convert stage: throughput in cases per second, one process vs all cores.

Converts, in one run and with the same code path as the stage (`convert_dataset`):

1. the real DRIVE set (40 cases, LZW TIFF + GIF masks), when it is found;
2. a generated folder of DICOM files (16-bit grey, 512x512, a third each uncompressed, RLE and
   JPEG 2000 lossless; PNG masks; the FOV made from the image),

each with ``convert.workers = 1`` and with every core, and prints a Markdown table with the speed
ratio measured in the same run, the CPU time spent (this process and its workers: what the pool
costs beyond the work itself), the load average, and the speed-up that pure CPU work gets from
the same number of processes at that moment (other processes share the cores).

    python bench/convert.py
    python bench/convert.py --drive ../shared/datasets/DRIVE --dicom-cases 300 --repeat 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from harness import machine, rounds, table
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from medseg.config.sections import ConvertConfig, DataConfig
from medseg.convert.dataset import convert_dataset
from medseg.io.images import write_png
from medseg.pool import worker_count

REPO = Path(__file__).resolve().parents[1]


def make_dicom_set(root: Path, n: int, size: int = 512) -> None:
    """``n`` DICOM phantoms (a bright disc with vessel-like dark lines) and their masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del template.WindowCenter, template.WindowWidth
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    syntaxes = [None, RLELossless, JPEG2000Lossless]
    for i in range(n):
        rng = np.random.default_rng(i)
        lines = np.abs(np.sin((xx + rng.integers(0, size)) / 9.0 + yy / 40.0)) < 0.08
        image = np.where(disc, 30000 + rng.normal(0, 800, disc.shape), 200)
        image = np.where(lines & disc, image - 9000, image).clip(0, 65535).astype(np.uint16)
        ds = copy.deepcopy(template)
        ds.Rows = ds.Columns = size
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 16, 15
        ds.PixelData = image.tobytes()
        syntax = syntaxes[i % len(syntaxes)]
        if syntax is not None:
            ds.compress(syntax)
        ds.save_as(root / "images" / f"im{i:04d}.dcm")
        write_png(root / "masks" / f"im{i:04d}.png", lines & disc)


def _spin(seconds: float) -> int:
    """Burn ``seconds`` of CPU time in pure Python."""
    start, n = time.process_time(), 0
    while time.process_time() - start < seconds:
        n += 1
    return n


def attainable_speedup(workers: int, seconds: float = 1.0) -> float:
    """How much faster ``workers`` processes get through pure CPU work than one, right now.

    On idle cores this is about ``workers``; where other jobs hold the cores it is lower, and no
    parallel program can do better: the ceiling for the conversion figures of the same run.
    """
    walls = []
    for n in (1, workers):
        start = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(n) as pool:
            pool.map(_spin, [seconds] * (2 * workers))
        walls.append(time.perf_counter() - start)
    return walls[0] / walls[1]


def time_convert(
    data: DataConfig, cfg: ConvertConfig, out: Path, repeat: int
) -> tuple[int, float, float]:
    """(cases converted, best wall seconds of ``repeat`` runs, fewest CPU seconds of a run,
    this process's and its workers')."""
    cases: list[int] = []
    timing = rounds(lambda: cases.append(len(convert_dataset(data, cfg, out))), repeat, warmup=0)
    return cases[-1], timing.min, timing.cpu_min


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drive", type=Path, default=REPO.parent / "shared/datasets/DRIVE")
    parser.add_argument("--dicom-cases", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting; the best counts")
    args = parser.parse_args()
    cores = worker_count(0, 10**6)
    base = ConvertConfig(None, None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="medseg-bench-convert-") as tmp_name:
        tmp = Path(tmp_name)
        sets: list[tuple[str, DataConfig]] = []
        if args.drive.is_dir():
            sets.append(("DRIVE (TIFF + GIF)", DataConfig(str(args.drive), "drive")))
        else:
            print(f"DRIVE not found at {args.drive}: skipped")
        start = time.perf_counter()
        make_dicom_set(tmp / "dicom", args.dicom_cases)
        print(f"generated {args.dicom_cases} DICOM files in {time.perf_counter() - start:.1f} s")
        sets.append(
            (f"generated DICOM ({args.dicom_cases})", DataConfig(str(tmp / "dicom"), "folders"))
        )
        for name, data in sets:
            times = {}
            for workers in (1, cores):
                cfg = dataclasses.replace(base, workers=workers)
                n, seconds, cpu = time_convert(data, cfg, tmp / "out", args.repeat)
                times[workers] = seconds
                rows.append((name, n, workers, seconds, cpu, n / seconds, times[1] / seconds))
    print(f"\nconvert throughput ({cores} workers usable; best of {args.repeat})\n{machine()}\n")
    headers = ("data set", "cases", "workers", "wall s", "CPU s", "cases/s", "speed-up vs 1 worker")
    print(table(headers, [
        (name, n, workers, f"{seconds:.2f}", f"{cpu:.2f}", f"{rate:.1f}", f"{ratio:.2f}x")
        for name, n, workers, seconds, cpu, rate, ratio in rows
    ]))  # fmt: skip
    ceiling = attainable_speedup(cores)
    print(f"\nspeed-up of pure CPU work with {cores} processes right now: {ceiling:.2f}x")


if __name__ == "__main__":
    main()
