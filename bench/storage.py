"""Benchmark of the case store format: flat shards against zarr and one file per case.

Generates ``--cases`` cases of mixed sizes (each side drawn from 256..1024, seeded), each a
float32 image (1 x H x W), a uint8 mask and a uint8 FOV (H x W), holds them in memory, and
writes them in every format:

- ``shards``: `medseg.io.shards` (a few flat files, a JSON index, read through ``mmap``);
- ``zarr per case``: zarr v3, one group, a subgroup per case holding its three arrays, each
  array one shard (the sharding codec) of 256x256 inner chunks, zarr's default zstd, consolidated
  metadata so that opening reads one file;
- ``zarr stack``: zarr v3, the cases zero-padded into three (N, ..., S, S) arrays, one shard per
  32 cases (a shard is written whole, so the writer holds 32 padded cases), same inner chunks and
  codec; chunks left all zero by the padding are not stored;
- ``npy``: one ``.npy`` file per array of each case, read with ``np.load(mmap_mode="r")``;
- ``npz``: one compressed ``.npz`` per case (zlib; a read inflates the whole array).

For each: write time (every file flushed with ``fsync``), bytes on disk (allocated blocks) and
files; then, each in a fresh process, the time to open the store and learn every case's size,
random 128x128 patches of image, mask and FOV from random cases (the same windows for every
format, copied into a batch buffer as training does), and a sequential pass reading every case
whole (every byte touched), with that process's peak RSS growth (``VmHWM``: the per-process
``ru_maxrss``). The shards reader calls ``release(i)`` after each case, as the pipeline does.
Reads come from the page cache unless ``--cold``, which evicts the files first
(``posix_fadvise``). Byte sums of what was read must agree between formats. zarr is skipped,
with a note, when it is not installed. Prints a Markdown table with ratios against shards.

    python bench/storage.py                      # 300 cases, in a temporary folder
    python bench/storage.py --cases 1000 --out /scratch/bench --cold
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medseg.io.shards import CaseStore, ShardWriter

NAMES = ("image", "mask", "fov")
PATCH = 128
CHUNK = 256  # zarr inner chunk side; zarr wrote and read whole cases faster than with 128
STACK_SHARD_CASES = 32
SPLIT = "train"

Case = dict[str, np.ndarray]


def make_case(seed: int, i: int) -> Case:
    """Case ``i``: a normalised image (1 x H x W float32), its vessel-like mask and disc FOV
    (H x W uint8, 0/1); H and W drawn from 256..1024."""
    rng = np.random.default_rng([seed, i])
    h, w = (int(s) for s in rng.integers(256, 1025, size=2))
    yy, xx = np.ogrid[0:h, 0:w]
    fov = ((yy - h / 2) / (0.48 * h)) ** 2 + ((xx - w / 2) / (0.48 * w)) ** 2 < 1.0
    phase = rng.uniform(0, 2 * np.pi, size=2)
    lines = np.abs(np.sin(xx / 11.0 + phase[0]) * np.cos(yy / 17.0 + phase[1])) < 0.06
    image = rng.normal(0.0, 0.3, size=(h, w)).astype(np.float32)
    image += np.where(lines, -1.5, 0.5).astype(np.float32)
    image[~fov] = 0.0
    return {
        "image": image[None],
        "mask": (lines & fov).astype(np.uint8),
        "fov": fov.astype(np.uint8),
    }


def case_id(i: int) -> str:
    return f"case{i:06d}"


def byte_sum(a: np.ndarray) -> int:
    """The sum of ``a``'s bytes: touches every byte, the same for every format."""
    return int(np.ascontiguousarray(a).view(np.uint8).sum(dtype=np.uint64))


# ---- the formats: a writer (add, close) and a reader (sizes, patch, whole, done) ----


class Writer(Protocol):
    def add(self, i: int, case: Case) -> None: ...
    def close(self) -> None: ...


class Reader(Protocol):
    sizes: list[tuple[int, int]]

    def patch(self, i: int, top: int, left: int, out: Case) -> None: ...
    def whole(self, i: int) -> Iterator[np.ndarray]: ...
    def done(self, i: int) -> None: ...


class ShardsWriter:
    def __init__(self, folder: Path) -> None:
        self.writer = ShardWriter(folder, SPLIT)

    def add(self, i: int, case: Case) -> None:
        h, w = case["mask"].shape
        self.writer.add(case_id(i), case, height=h, width=w)

    def close(self) -> None:
        self.writer.close()


class ShardsReader:
    def __init__(self, folder: Path) -> None:
        self.store = CaseStore.open(folder, SPLIT)
        self.sizes = [(int(c["height"]), int(c["width"])) for c in self.store.cases]

    def patch(self, i: int, top: int, left: int, out: Case) -> None:
        ys, xs = slice(top, top + PATCH), slice(left, left + PATCH)
        out["image"][...] = self.store.get(i, "image")[:, ys, xs]
        out["mask"][...] = self.store.get(i, "mask")[ys, xs]
        out["fov"][...] = self.store.get(i, "fov")[ys, xs]

    def whole(self, i: int) -> Iterator[np.ndarray]:
        return (self.store.get(i, name) for name in NAMES)

    def done(self, i: int) -> None:
        self.store.release(i)


class NpyWriter:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def add(self, i: int, case: Case) -> None:
        for name in NAMES:
            np.save(self.folder / f"{case_id(i)}.{name}.npy", case[name])

    def close(self) -> None:
        pass


class NpyReader:
    """Opens a case's files at each read, as a dataset over many files must."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        images = sorted(folder.glob("*.image.npy"))
        self.ids = [p.name.removesuffix(".image.npy") for p in images]
        self.sizes = [np.load(p, mmap_mode="r").shape[1:] for p in images]

    def _load(self, i: int, name: str) -> np.ndarray:
        return np.load(self.folder / f"{self.ids[i]}.{name}.npy", mmap_mode="r")

    def patch(self, i: int, top: int, left: int, out: Case) -> None:
        ys, xs = slice(top, top + PATCH), slice(left, left + PATCH)
        out["image"][...] = self._load(i, "image")[:, ys, xs]
        out["mask"][...] = self._load(i, "mask")[ys, xs]
        out["fov"][...] = self._load(i, "fov")[ys, xs]

    def whole(self, i: int) -> Iterator[np.ndarray]:
        return (self._load(i, name) for name in NAMES)

    def done(self, i: int) -> None:
        pass


class NpzWriter:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def add(self, i: int, case: Case) -> None:
        np.savez_compressed(self.folder / f"{case_id(i)}.npz", **case)

    def close(self) -> None:
        pass


class NpzReader:
    def __init__(self, folder: Path) -> None:
        self.paths = sorted(folder.glob("*.npz"))
        self.sizes = []
        for p in self.paths:  # the shape from the member's header, without inflating it
            with zipfile.ZipFile(p) as zf, zf.open("image.npy") as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0
                if major > 1:
                    read = np.lib.format.read_array_header_2_0
                shape = read(f)[0]
            self.sizes.append(tuple(shape[1:]))

    def patch(self, i: int, top: int, left: int, out: Case) -> None:
        ys, xs = slice(top, top + PATCH), slice(left, left + PATCH)
        with np.load(self.paths[i]) as z:
            out["image"][...] = z["image"][:, ys, xs]
            out["mask"][...] = z["mask"][ys, xs]
            out["fov"][...] = z["fov"][ys, xs]

    def whole(self, i: int) -> Iterator[np.ndarray]:
        with np.load(self.paths[i]) as z:
            yield from (z[name] for name in NAMES)

    def done(self, i: int) -> None:
        pass


def _zarr() -> Any:
    import zarr

    warnings.filterwarnings("ignore", message="Consolidated metadata")
    return zarr


def _up(n: int) -> int:
    return -(-n // CHUNK) * CHUNK


class ZarrCaseWriter:
    def __init__(self, folder: Path) -> None:
        self.zarr = _zarr()
        self.store = self.zarr.storage.LocalStore(folder)
        self.root = self.zarr.open_group(self.store, mode="w")

    def add(self, i: int, case: Case) -> None:
        h, w = case["mask"].shape
        group = self.root.create_group(case_id(i), attributes={"height": h, "width": w})
        for name in NAMES:
            a = case[name]
            lead = (1,) * (a.ndim - 2)
            z = group.create_array(
                name,
                shape=a.shape,
                dtype=a.dtype,
                fill_value=0,
                chunks=(*lead, CHUNK, CHUNK),
                shards=(*lead, _up(h), _up(w)),
            )
            z[...] = a

    def close(self) -> None:
        self.zarr.consolidate_metadata(self.store)


class ZarrCaseReader:
    """Looks a case's arrays up at each read (from the consolidated metadata)."""

    def __init__(self, folder: Path) -> None:
        self.root = _zarr().open_group(folder, mode="r", use_consolidated=True)
        self.ids = sorted(k for k, _ in self.root.groups())
        self.sizes = [tuple(self.root[f"{k}/mask"].shape) for k in self.ids]

    def patch(self, i: int, top: int, left: int, out: Case) -> None:
        ys, xs = slice(top, top + PATCH), slice(left, left + PATCH)
        key = self.ids[i]
        out["image"][...] = self.root[f"{key}/image"][:, ys, xs]
        out["mask"][...] = self.root[f"{key}/mask"][ys, xs]
        out["fov"][...] = self.root[f"{key}/fov"][ys, xs]

    def whole(self, i: int) -> Iterator[np.ndarray]:
        return (self.root[f"{self.ids[i]}/{name}"][...] for name in NAMES)

    def done(self, i: int) -> None:
        pass


class ZarrStackWriter:
    """Pads each case to the largest side and writes 32 cases (one shard) at a time; the sizes
    (every side 256..1024) are known up front, as they must be to create the arrays."""

    def __init__(self, folder: Path, n: int, side: int = 1024) -> None:
        self.zarr = _zarr()
        self.root = self.zarr.open_group(self.zarr.storage.LocalStore(folder), mode="w")
        self.side, self.sizes, self.batch = _up(side), [], []
        k, s = STACK_SHARD_CASES, self.side
        self.arrays = {
            name: self.root.create_array(
                name,
                shape=(n, *lead, s, s),
                dtype=dtype,
                fill_value=0,
                chunks=(1, *lead, CHUNK, CHUNK),
                shards=(k, *lead, s, s),
            )
            for name, dtype, lead in (("image", "f4", (1,)), ("mask", "u1", ()), ("fov", "u1", ()))
        }

    def add(self, i: int, case: Case) -> None:
        self.sizes.append(list(case["mask"].shape))
        self.batch.append(case)
        if len(self.batch) == STACK_SHARD_CASES:
            self._flush()

    def _flush(self) -> None:
        if not self.batch:
            return
        start = len(self.sizes) - len(self.batch)
        for name, z in self.arrays.items():
            block = np.zeros((len(self.batch), *z.shape[1:]), dtype=z.dtype)
            for b, case in enumerate(self.batch):
                h, w = case["mask"].shape
                block[b, ..., :h, :w] = case[name]
            z[start : start + len(self.batch)] = block
        self.batch = []

    def close(self) -> None:
        self._flush()
        self.root.attrs["sizes"] = self.sizes


class ZarrStackReader:
    def __init__(self, folder: Path) -> None:
        root = _zarr().open_group(folder, mode="r")
        self.arrays = {name: root[name] for name in NAMES}
        self.sizes = [tuple(s) for s in root.attrs["sizes"]]

    def patch(self, i: int, top: int, left: int, out: Case) -> None:
        ys, xs = slice(top, top + PATCH), slice(left, left + PATCH)
        out["image"][...] = self.arrays["image"][i, :, ys, xs]
        out["mask"][...] = self.arrays["mask"][i, ys, xs]
        out["fov"][...] = self.arrays["fov"][i, ys, xs]

    def whole(self, i: int) -> Iterator[np.ndarray]:
        h, w = self.sizes[i]
        return (self.arrays[name][i, ..., :h, :w] for name in NAMES)

    def done(self, i: int) -> None:
        pass


@dataclass(frozen=True)
class Format:
    name: str
    writer: Callable[[Path, int], Writer]
    reader: Callable[[Path], Reader]
    needs_zarr: bool = False


FORMATS = {
    f.name: f
    for f in (
        Format("shards", lambda d, n: ShardsWriter(d), ShardsReader),
        Format("zarr per case", lambda d, n: ZarrCaseWriter(d), ZarrCaseReader, True),
        Format("zarr stack", ZarrStackWriter, ZarrStackReader, True),
        Format("npy", lambda d, n: NpyWriter(d), NpyReader),
        Format("npz", lambda d, n: NpzWriter(d), NpzReader),
    )
}


# ---- the reading process ----


def read_patches(reader: Reader, plan: np.ndarray, seconds: float) -> dict[str, Any]:
    """Copy the windows of ``plan`` (rows of case, top, left) into a batch buffer, stopping
    after ``seconds``; return the count, the time and the byte sum."""
    out: Case = {
        "image": np.empty((1, PATCH, PATCH), np.float32),
        "mask": np.empty((PATCH, PATCH), np.uint8),
        "fov": np.empty((PATCH, PATCH), np.uint8),
    }
    total, n, start = 0, 0, time.perf_counter()
    for i, top, left in plan.tolist():
        reader.patch(i, top, left, out)
        reader.done(i)
        total += sum(byte_sum(a) for a in out.values())
        n += 1
        if time.perf_counter() - start > seconds:
            break
    return {"patches": n, "patch_s": time.perf_counter() - start, "patch_sum": total}


def read_all(reader: Reader) -> dict[str, Any]:
    """Read every case whole, touching every byte; return the time and the byte sum."""
    total, start = 0, time.perf_counter()
    for i in range(len(reader.sizes)):
        total += sum(byte_sum(a) for a in reader.whole(i))
        reader.done(i)
    return {"pass_s": time.perf_counter() - start, "pass_sum": total}


def reset_peak_rss() -> None:
    """Bring the peak RSS down to the current RSS (Linux), so that what imports and opening
    allocated and freed does not hide the growth that follows."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_kib() -> int:
    """This process's peak RSS: ``VmHWM`` where Linux gives it, else ``ru_maxrss``. A child
    process's ``ru_maxrss`` starts at its parent's RSS at the fork (it survives ``exec``), so
    with this benchmark's parent holding every case it would hide the reader's growth."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(fmt: str, phase: str, folder: Path, plan: Path, seconds: float) -> None:
    """The reading process: open ``folder`` as ``fmt`` and run ``phase``; print JSON."""
    if FORMATS[fmt].needs_zarr:
        _zarr()  # the import is not part of opening
    start = time.perf_counter()
    reader = FORMATS[fmt].reader(folder)
    result: dict[str, Any] = {"open_s": time.perf_counter() - start}
    reset_peak_rss()
    before = peak_rss_kib()
    if phase == "patches":
        result.update(read_patches(reader, np.load(plan), seconds))
    else:
        result.update(read_all(reader))
    result["rss_growth_kib"] = peak_rss_kib() - before
    print(json.dumps(result))


# ---- the driver ----


def files_of(folder: Path) -> list[Path]:
    return [Path(r) / f for r, _, fs in os.walk(folder) for f in fs]


def sync(folder: Path) -> None:
    for path in files_of(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict(folder: Path) -> None:
    """Drop the (clean, synced) pages of the files from the page cache."""
    for path in files_of(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write(fmt: Format, cases: list[Case], folder: Path) -> dict[str, Any]:
    if folder.exists():
        shutil.rmtree(folder)  # this benchmark's own store from an earlier run in --out
    folder.mkdir(parents=True)
    start = time.perf_counter()
    writer = fmt.writer(folder, len(cases))
    for i, case in enumerate(cases):
        writer.add(i, case)
    writer.close()
    sync(folder)
    files = files_of(folder)
    return {
        "write_s": time.perf_counter() - start,
        "files": len(files),
        "disk_bytes": sum(p.stat().st_blocks * 512 for p in files),
    }


def run_worker(args: argparse.Namespace, fmt: str, phase: str, folder: Path, plan: Path) -> dict:
    if args.cold:
        evict(folder)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", fmt, phase, str(folder)]
    cmd += ["--plan", str(plan), "--patch-seconds", str(args.patch_seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{fmt} {phase} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[-1])


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{usable} cores usable (nproc), {os.cpu_count()} online; {model}; load {load}"


def versions() -> str:
    out = f"Python {platform.python_version()}, numpy {np.__version__}"
    with contextlib.suppress(ImportError):
        out += f", zarr {_zarr().__version__}"
    return out


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}×" if base else "-"


def table(rows: dict[str, dict[str, Any]], n: int) -> str:
    base = rows["shards"]
    cols = [
        ("files", lambda r: r["files"], "{:.0f}"),
        ("MB on disk", lambda r: r["disk_bytes"] / 1e6, "{:.0f}"),
        ("write s ↓", lambda r: r["write_s"], "{:.2f}"),
        ("open ms ↓", lambda r: r["open_s"] * 1e3, "{:.1f}"),
        ("patches/s ↑", lambda r: r["patches"] / r["patch_s"], "{:.0f}"),
        ("full pass cases/s ↑", lambda r: n / r["pass_s"], "{:.0f}"),
        ("pass peak RSS growth MB ↓", lambda r: r["rss_growth_kib"] / 1024, "{:.1f}"),
    ]
    lines = ["| format | " + " | ".join(c[0] for c in cols) + " |"]
    lines.append("| --- |" + " ---: |" * len(cols))
    for name, r in rows.items():
        cells = []
        for _, get, spec in cols:
            cell = spec.format(get(r))
            if name != "shards":
                cell += f" ({ratio(get(r), get(base))})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench(args: argparse.Namespace, root: Path) -> None:
    notes = []
    formats = [FORMATS[name] for name in args.formats]
    if any(f.needs_zarr for f in formats):
        try:
            _zarr()
        except ImportError:
            notes.append("zarr is not installed (`pip install zarr`): its rows are skipped")
            formats = [f for f in formats if not f.needs_zarr]

    start = time.perf_counter()
    cases = [make_case(args.seed, i) for i in range(args.cases)]
    sizes = [c["mask"].shape for c in cases]
    raw = sum(a.nbytes for c in cases for a in c.values())
    rng = np.random.default_rng(args.seed)
    which = rng.integers(len(cases), size=args.patches)
    plan = np.array(
        [
            [i, rng.integers(sizes[i][0] - PATCH + 1), rng.integers(sizes[i][1] - PATCH + 1)]
            for i in which.tolist()
        ],
        dtype=np.int64,
    )
    plan_path = root / "plan.npy"
    np.save(plan_path, plan)
    print(
        f"generated {len(cases)} cases ({raw / 1e6:.0f} MB raw) in "
        f"{time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )

    rows: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        folder = root / fmt.name.replace(" ", "_")
        row = write(fmt, cases, folder)
        row.update(run_worker(args, fmt.name, "patches", folder, plan_path))
        row.update(run_worker(args, fmt.name, "pass", folder, plan_path))
        rows[fmt.name] = row
        print(f"{fmt.name}: {row}", file=sys.stderr)
        if not args.out:
            shutil.rmtree(folder)  # the disk holds one format at a time

    for key in ("pass_sum", "patch_sum"):
        sums = {
            name: r[key]
            for name, r in rows.items()
            if key == "pass_sum" or r["patches"] == args.patches
        }
        if len(set(sums.values())) > 1:
            sys.exit(f"the formats read different bytes ({key}): {sums}")
    short = [f"{name} ({r['patches']})" for name, r in rows.items() if r["patches"] < args.patches]
    if short:
        notes.append(
            f"patches cut off after {args.patch_seconds:g} s: "
            + ", ".join(short)
            + "; their byte sums are not compared"
        )

    print(f"\nCommand: `{shlex.join(['python', *sys.argv])}`")
    print(f"Machine: {machine()}; {versions()}")
    cache = "evicted from the page cache before each reading process" if args.cold else "warm"
    print(
        f"Data: {len(cases)} cases, sides 256..1024 (seed {args.seed}), {raw / 1e6:.0f} MB raw; "
        f"{args.patches} random {PATCH}x{PATCH} patches; reads {cache}; ratios against shards.\n"
    )
    print(table(rows, len(cases)))
    for note in notes:
        print(f"\nNote: {note}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=300, help="cases to generate (300)")
    parser.add_argument(
        "--out", type=Path, help="work folder, its stores kept; default: a temporary one, removed"
    )
    parser.add_argument("--patches", type=int, default=2000, help="random patches (2000)")
    parser.add_argument(
        "--patch-seconds",
        type=float,
        default=4.0,
        help="stop a format's patch reads after this long (4)",
    )
    parser.add_argument("--cold", action="store_true", help="read with the files not cached")
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=list(FORMATS),
        default=list(FORMATS),
        metavar="FORMAT",
        help=f"formats to run, shards first (all: {', '.join(FORMATS)})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.worker and args.formats[0] != "shards":
        parser.error("--formats: the first must be shards (the ratios are against it)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        fmt, phase, folder = args.worker
        worker(fmt, phase, Path(folder), args.plan, args.patch_seconds)
        return
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        bench(args, args.out)
        return
    root = Path(tempfile.mkdtemp(prefix="medseg-storage-"))
    try:
        bench(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
