from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io.shards import CaseStore, ShardWriter, write_view


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


def test_a_view_reads_cases_of_other_stores_without_a_copy(tmp_path: Path):
    (tmp_path / "data").mkdir()
    train = _write(tmp_path / "data", n=4, shard_bytes=20_000)  # several shards
    writer = ShardWriter(tmp_path / "data", "val")
    writer.add("v0", {"image": np.full((1, 3, 4), 7.0, np.float32)}, height=3, width=4)
    writer.close()
    stores = [CaseStore.open(tmp_path / "data", split) for split in ("train", "val")]
    tmp, final = tmp_path / "cv" / ".fold0.tmp", tmp_path / "cv" / "fold0"
    tmp.mkdir(parents=True)
    write_view(tmp, "train", [(stores[1], 0), (stores[0], 3), (stores[0], 1)], final=final)
    tmp.rename(final)  # as atomic_dir does: the paths hold in the final folder
    view = CaseStore.open(final, "train")
    assert view.ids == ["v0", "c3", "c1"]
    assert [p.suffix for p in final.iterdir()] == [".json"]  # an index only, no shard
    assert all(name.startswith("../../data/") for name in view.shards)
    assert view.get(0, "image").tolist() == [[[7.0] * 4] * 3]
    for i, source in ((1, 3), (2, 1)):
        for name, arr in train[source].items():
            assert np.array_equal(view.get(i, name), arr)
    assert view.meta(1)["height"] == train[3]["image"].shape[1]
    shards = {p.resolve() for p in stores[0].files()[1:] + stores[1].files()[1:]}
    assert {p.resolve() for p in view.files()[1:]} == shards
