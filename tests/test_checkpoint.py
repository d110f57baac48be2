from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_params, write_params

from medseg.config import load_params
from medseg.config.sections import TrainConfig
from medseg.training.checkpoint import (
    CheckpointWriter,
    StopSignals,
    load_checkpoint,
    params_hash,
    restore_rng,
    rng_state,
    save_checkpoint,
)


@pytest.fixture
def cfg(tmp_path: Path) -> TrainConfig:
    return load_params(write_params(tmp_path / "p.yaml", tiny_params()), TrainConfig)


def test_round_trip_loads_with_weights_only(tmp_path: Path):
    gen = np.random.default_rng(5)
    state = {"params_hash": "abc", "epoch": 3, "w": torch.arange(4.0), "rng": rng_state(gen)}
    save_checkpoint(tmp_path / "ck" / "c.pt", state)
    # the file is plain tensors and values: the safe loader reads it
    raw = torch.load(tmp_path / "ck" / "c.pt", weights_only=True)
    assert raw["epoch"] == 3
    loaded = load_checkpoint(tmp_path / "ck" / "c.pt", "abc")
    assert loaded is not None and torch.equal(loaded["w"], state["w"])
    expected = gen.random(3)
    restore_rng(loaded["rng"], gen)
    assert np.array_equal(gen.random(3), expected)
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["c.pt"]  # no temporary left


def test_checkpoint_of_other_params_is_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"params_hash": "old"})
    assert load_checkpoint(path, "new") is None
    assert not path.exists()
    assert "other train params" in caplog.text


def test_unreadable_checkpoint_is_removed(tmp_path: Path):
    path = tmp_path / "c.pt"
    path.write_bytes(b"not a checkpoint")
    (tmp_path / ".c.pt.tmp-123").write_bytes(b"half")  # a save killed midway
    assert load_checkpoint(path, "x") is None
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint(tmp_path: Path):
    assert load_checkpoint(tmp_path / "absent.pt", "x") is None


def test_params_hash(cfg: TrainConfig, tmp_path: Path):
    data = tmp_path / "train.npz"
    data.write_bytes(b"1234")
    base = params_hash(cfg, [data])
    assert params_hash(cfg, [data]) == base
    assert params_hash(dataclasses.replace(cfg, lr=cfg.lr / 2), [data]) != base
    # where and how fast the work runs does not change its result
    same = dataclasses.replace(cfg, device="cpu", workers=2, cache="none")
    assert params_hash(same, [data]) == base
    data.write_bytes(b"1235")
    assert params_hash(cfg, [data]) != base


def test_params_hash_covers_the_code(cfg: TrainConfig, tmp_path: Path):
    data = tmp_path / "train.npz"
    data.write_bytes(b"1234")
    code = tmp_path / "pkg"
    (code / "sub").mkdir(parents=True)
    (code / "losses.py").write_text("W = 0.5\n")
    (code / "sub" / "x.py").write_text("pass\n")
    base = params_hash(cfg, [data], code)
    assert params_hash(cfg, [data], code) == base
    (code / "losses.py").write_text("W = 0.7\n")  # a code change: the checkpoint is not resumed
    assert params_hash(cfg, [data], code) != base
    assert params_hash(cfg, [data]) != params_hash(cfg, [data], code)  # default: the package


def test_sigterm_sets_the_flag_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("background", [False, True])
def test_writer_saves_the_state_of_the_moment_of_the_call(tmp_path: Path, background: bool):
    path = tmp_path / "ck" / "c.pt"
    writer = CheckpointWriter(path, background=background)
    weights = torch.arange(6.0)
    history = [({"loss": 1.0}, {"best_epoch": 1})]
    state = {"params_hash": "h", "model": {"w": weights}, "history": history, "epoch": 1}
    writer.save(state)
    weights.add_(100.0)  # training goes on at once: the file must not see it
    history.append(({"loss": 0.5}, {"best_epoch": 2}))
    writer.wait()
    loaded = load_checkpoint(path, "h")
    assert loaded is not None and torch.equal(loaded["model"]["w"], torch.arange(6.0))
    assert loaded["history"] == [({"loss": 1.0}, {"best_epoch": 1})]
    assert writer.blocked_s >= 0 and writer.write_s > 0
    writer.save({**state, "epoch": 2})  # the next save waits for the previous write
    writer.wait()
    assert load_checkpoint(path, "h")["epoch"] == 2


def test_writer_hands_a_background_error_to_wait(tmp_path: Path):
    (tmp_path / "file").write_text("")
    writer = CheckpointWriter(tmp_path / "file" / "c.pt", background=True)  # a file as folder
    writer.save({"params_hash": "h"})
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # reported once
