from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io.shards import CaseStore, ShardWriter


def _write(folder: Path, n: int = 5, shard_bytes: int = 1 << 30) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = []
    writer = ShardWriter(folder, "train", shard_bytes=shard_bytes)
    for i in range(n):
        h, w = int(rng.integers(5, 60)), int(rng.integers(5, 60))
        arrays = {
            "image": rng.normal(size=(2, h, w)).astype(np.float32),
            "mask": rng.integers(0, 3, (h, w)).astype(np.uint8),
            "rows": np.arange(h, dtype=np.int32),
        }
        writer.add(f"c{i}", arrays, height=h, width=w)
        cases.append(arrays)
    writer.close()
    return cases


@pytest.mark.parametrize("ram", [False, True])
def test_round_trip_of_cases_of_any_size(tmp_path: Path, ram: bool):
    cases = _write(tmp_path, shard_bytes=20_000)  # several shards
    store = CaseStore.open(tmp_path, "train", ram=ram)
    assert len(store.shards) > 1 and store.ids == [f"c{i}" for i in range(5)]
    for i, arrays in enumerate(cases):
        assert store.names(i) == ["image", "mask", "rows"]
        for name, arr in arrays.items():
            got = store.get(i, name)
            assert got.dtype == arr.dtype and np.array_equal(got, arr)
            assert not got.flags.writeable
        assert store.meta(i)["height"] == arrays["mask"].shape[0]
        store.release(i)
        assert np.array_equal(store.get(i, "image"), arrays["image"])  # still readable
    assert store.nbytes() == sum(a.nbytes for c in cases for a in c.values())
    assert store.nbytes(("mask",)) == sum(c["mask"].nbytes for c in cases)


def test_a_mapped_store_pickles_without_its_pixels(tmp_path: Path):
    cases = _write(tmp_path)
    store = CaseStore.open(tmp_path, "train")
    store.get(0, "image")
    blob = pickle.dumps(store)
    assert len(blob) < 10_000  # the index, not the pixels: DataLoader workers reopen the shards
    again = pickle.loads(blob)
    assert np.array_equal(again.get(3, "mask"), cases[3]["mask"])


def test_an_empty_split_has_no_shard(tmp_path: Path):
    ShardWriter(tmp_path, "val").close()
    store = CaseStore.open(tmp_path, "val")
    assert len(store) == 0 and store.shards == [] and store.nbytes() == 0


def test_missing_truncated_and_foreign_files_are_named(tmp_path: Path):
    with pytest.raises(MedsegError, match=r"train\.json: missing; run the preprocess stage"):
        CaseStore.open(tmp_path, "train")
    _write(tmp_path)
    shard = tmp_path / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(MedsegError, match=r"train-00000\.bin: missing or shorter"):
        CaseStore.open(tmp_path, "train")
    (tmp_path / "train.json").write_text('{"cases": []}')
    with pytest.raises(MedsegError, match="not a medseg-shards index"):
        CaseStore.open(tmp_path, "train")
