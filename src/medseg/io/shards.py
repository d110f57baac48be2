"""Case stores: the preprocess stage's output, one split as a few large flat shard files.

Each case keeps its own size: its arrays (image, mask, FOV, ...) are written one after the other
into the current shard file, each aligned to 64 bytes, and an index (``<split>.json``) records
where each array starts, its dtype and shape, and the case's small facts (id, size). A new shard
starts when the current one passes `SHARD_BYTES`, so a split of any size is a handful of files
(DVC handles a few large files well, hundreds of thousands of small ones badly).

Reading maps the shards into memory (``mmap``): an array is a view, no bytes move until a pixel
is touched, and `CaseStore.release` hands a case's pages back after use, so that streaming a split
of any size keeps the resident memory of one case. `CaseStore.open` with ``ram=True`` reads the
shards into memory instead (small splits; the same views, the same results).

An index may also name shards of another folder by a relative path (`write_view`): a view of
cases chosen from other splits, such as a cross-validation fold, that copies no array.

The format was chosen by measurement over zarr and one file per case: docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import json
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from medseg.errors import MedsegError

SHARD_BYTES = 1 << 30  # a new shard file starts after this many bytes
ALIGN = 64
FORMAT = "medseg-shards"
VERSION = 1


def index_path(folder: str | Path, split: str) -> Path:
    """The index file of ``split`` in ``folder``."""
    return Path(folder) / f"{split}.json"


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.bin"


class ShardWriter:
    """Appends cases to the shards of one split; `close` writes the index.

    Args:
        folder: where the shards and the index go (created beforehand).
        split: the split's name, the prefix of every file.
        shard_bytes: size after which a new shard starts.
    """

    def __init__(self, folder: str | Path, split: str, shard_bytes: int = SHARD_BYTES) -> None:
        self.folder, self.split, self.shard_bytes = Path(folder), split, shard_bytes
        self.cases: list[dict[str, Any]] = []
        self.shards: list[str] = []
        self._file: BinaryIO | None = None
        self._pos = 0

    def add(self, case_id: str, arrays: dict[str, np.ndarray], **meta: Any) -> None:
        """Append one case.

        Args:
            case_id: its id, unique in the split.
            arrays: name -> array of any dtype and shape, written C-contiguous.
            meta: JSON-serialisable facts kept in the index (e.g. the original size).
        """
        if self._file is None or self._pos >= self.shard_bytes:
            self._next_shard()
        assert self._file is not None
        entry: dict[str, Any] = {"id": case_id, "shard": len(self.shards) - 1, "arrays": {}}
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            pad = -self._pos % ALIGN
            self._file.write(b"\0" * pad)
            self._pos += pad
            entry["arrays"][name] = [self._pos, arr.dtype.str, list(arr.shape)]
            self._file.write(arr.tobytes())  # one case at a time: memory stays bounded
            self._pos += arr.nbytes
        entry.update(meta)
        self.cases.append(entry)

    def _next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        name = shard_name(self.split, len(self.shards))
        self.shards.append(name)
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 (closed in close())
        self._pos = 0

    def close(self) -> None:
        """Finish the last shard and write the index (an empty split has no shard)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        _write_index(self.folder, self.split, self.shards, self.cases)


def _write_index(folder: Path, split: str, shards: list[str], cases: list[dict[str, Any]]) -> None:
    index = {"format": FORMAT, "version": VERSION, "shards": shards, "cases": cases}
    index_path(folder, split).write_text(json.dumps(index), encoding="utf-8")


def write_view(
    folder: str | Path,
    split: str,
    cases: Sequence[tuple[CaseStore, int]],
    final: str | Path | None = None,
) -> None:
    """Write ``folder/<split>.json``: an index of cases of other stores that points into their
    shards by relative paths, so `CaseStore.open` reads them without a copy of any array.

    Args:
        folder: where the index goes (existing).
        split: the view's split name.
        cases: (store, case number) pairs, in the view's order.
        final: the folder the view will live in, when ``folder`` is a temporary one that is
            renamed there afterwards (`medseg.io.atomic.atomic_dir`); the paths are relative to
            it. Default: ``folder``.
    """
    home = Path(final if final is not None else folder).absolute()
    shards: list[str] = []
    position: dict[str, int] = {}
    entries: list[dict[str, Any]] = []
    for store, i in cases:
        entry = copy.deepcopy(store.cases[i])
        shard = store.folder.absolute() / store.shards[int(entry["shard"])]
        name = Path(os.path.relpath(shard, home)).as_posix()
        if name not in position:
            position[name] = len(shards)
            shards.append(name)
        entry["shard"] = position[name]
        entries.append(entry)
    _write_index(Path(folder), split, shards, entries)


@dataclass(frozen=True)
class _Array:
    shard: int
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class CaseStore:
    """The cases of one split, read from its shards (memory-mapped, or held in RAM).

    Use `open`. Arrays come back read-only; copy before changing them.
    """

    def __init__(self, folder: Path, split: str, index: dict[str, Any], ram: bool) -> None:
        self.folder, self.split, self.ram = folder, split, ram
        self.shards: list[str] = list(index["shards"])
        self.cases: list[dict[str, Any]] = index["cases"]
        self.ids: list[str] = [str(c["id"]) for c in self.cases]
        self._arrays = [
            {
                name: _Array(int(c["shard"]), int(off), np.dtype(dt), tuple(int(s) for s in shape))
                for name, (off, dt, shape) in c["arrays"].items()
            }
            for c in self.cases
        ]
        self._buffers: list[Any] | None = None

    @classmethod
    def open(cls, folder: str | Path, split: str, ram: bool = False) -> CaseStore:
        """Open ``folder/<split>.json`` and its shards.

        Raises:
            MedsegError: the index is missing or not a case store index, or a shard is missing
                or shorter than the index says.
        """
        folder = Path(folder)
        path = index_path(folder, split)
        if not path.is_file():
            raise MedsegError(f"{path}: missing; run the preprocess stage first")
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise MedsegError(f"{path}: not a readable case index ({err})") from err
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise MedsegError(
                f"{path}: not a {FORMAT} index (written by an older medseg?); rerun the "
                "preprocess stage (`dvc repro preprocess`)"
            )
        store = cls(folder, split, index, ram)
        store._check_sizes(path)
        return store

    def _check_sizes(self, index: Path) -> None:
        ends = [0] * len(self.shards)
        for arrays in self._arrays:
            for a in arrays.values():
                ends[a.shard] = max(ends[a.shard], a.offset + a.nbytes)
        for name, end in zip(self.shards, ends, strict=True):
            shard = self.folder / name
            if not shard.is_file() or shard.stat().st_size < end:
                raise MedsegError(
                    f"{shard}: missing or shorter than {index} says; rerun the preprocess stage"
                )

    def __len__(self) -> int:
        return len(self.cases)

    def __getstate__(self) -> dict[str, Any]:
        # mapped shards are reopened in the process that unpickles (DataLoader workers)
        state = dict(self.__dict__)
        if not self.ram:
            state["_buffers"] = None
        return state

    def _buffer(self, shard: int) -> Any:
        if self._buffers is None:
            self._buffers = [None] * len(self.shards)
        buf = self._buffers[shard]
        if buf is None:
            path = self.folder / self.shards[shard]
            with open(path, "rb") as f:
                if self.ram:
                    buf = f.read()
                elif os.fstat(f.fileno()).st_size == 0:
                    buf = b""
                else:
                    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._buffers[shard] = buf
        return buf

    def names(self, i: int) -> list[str]:
        """The names of case ``i``'s arrays."""
        return list(self._arrays[i])

    def has(self, i: int, name: str) -> bool:
        return name in self._arrays[i]

    def meta(self, i: int) -> dict[str, Any]:
        """Case ``i``'s entry in the index (id, sizes and whatever the writer added)."""
        return self.cases[i]

    def get(self, i: int, name: str) -> np.ndarray:
        """Array ``name`` of case ``i``, a read-only view into its shard."""
        a = self._arrays[i][name]
        count = int(np.prod(a.shape, dtype=np.int64))
        flat = np.frombuffer(self._buffer(a.shard), dtype=a.dtype, count=count, offset=a.offset)
        return flat.reshape(a.shape)

    def release(self, i: int) -> None:
        """Give case ``i``'s mapped pages back to the kernel (they stay in the page cache);
        streaming keeps the resident memory of the case at hand only. No-op in RAM."""
        if self.ram or self._buffers is None:
            return
        for a in self._arrays[i].values():
            buf = self._buffers[a.shard]
            if isinstance(buf, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
                start = a.offset - a.offset % mmap.PAGESIZE
                length = a.offset + a.nbytes - start
                if length > 0:
                    buf.madvise(mmap.MADV_DONTNEED, start, min(length, len(buf) - start))

    def release_all(self) -> None:
        """`release` every case at once (e.g. every few training steps)."""
        if self.ram or self._buffers is None:
            return
        for buf in self._buffers:
            if isinstance(buf, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
                buf.madvise(mmap.MADV_DONTNEED)

    def nbytes(self, names: tuple[str, ...] | None = None) -> int:
        """Bytes of the arrays (those named, or all) over every case."""
        return sum(
            a.nbytes
            for arrays in self._arrays
            for n, a in arrays.items()
            if names is None or n in names
        )

    def files(self) -> list[Path]:
        """The index and the shard files, for hashing."""
        return [index_path(self.folder, self.split), *(self.folder / s for s in self.shards)]

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))
