"""Checkpoints that let a preempted training resume exactly, and stop signals that ask for one.

A checkpoint is one file written through a temporary file and a rename, so a kill at any moment
leaves either the previous checkpoint or the new one, never half of one. It holds only tensors and
plain Python values, so it loads with ``torch.load(..., weights_only=True)`` (no code runs). It
carries a hash of the train params and of the training data; a checkpoint of other params or
other data is not resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from medseg.config.sections import TrainConfig
from medseg.io.atomic import TMP, atomic_file, remove_leftovers

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FINISHED = "README.txt"
_FINISHED_TEXT = (
    "The last training run finished; its weights are in models/.\n"
    "A run stopped by a signal (preemption) leaves checkpoint.pt here, and the next run of the\n"
    "train stage resumes from it.\n"
)


def mark_finished(directory: str | Path) -> None:
    """Leave a fixed note in the checkpoint folder once the run's checkpoint has been removed.

    The folder is a cached DVC output: with this constant content it has the same hash after
    every finished run, so a clone that pulls it sees the train stage up to date (an empty
    folder would not travel through git or a remote).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / FINISHED).write_text(_FINISHED_TEXT)


def params_hash(cfg: TrainConfig, data_files: list[Path], code: Path | None = None) -> str:
    """SHA-256 of the train params, the package's code and the bytes of the data files (hex).

    ``device``, ``workers`` and ``cache`` are left out: they change where and how fast the work
    is done, not its result. The code (``code``: the medseg package by default) counts, so that
    a run preempted before a code change is not finished by the new code (the checkpoint folder
    outlives the change).
    """
    params = {k: v for k, v in asdict(cfg).items() if k not in ("device", "workers", "cache")}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    package = code or Path(__file__).resolve().parent
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(source.read_bytes())
    for path in data_files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` with `atomic_file` (temporary file, fsync, rename)."""
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


class CheckpointWriter:
    """Writes the checkpoints of one run to ``path`` with `save_checkpoint`, in the background
    when ``background`` is true (on a GPU, so that the GPU need not wait for the disk).

    A background `save` first copies every tensor of the state to host memory (and every list
    and dict that holds them), so training may change its tensors at once: the file is exactly
    the state at the moment of the call, and a resume from it is exact. A thread then writes
    it (temporary file, fsync, rename). One write at a time: a save waits for the previous one;
    `wait` waits for the last one and raises the error it met, if any.

    Attributes:
        blocked_s: seconds the caller waited in the last `save` (copy, or the whole write).
        write_s: seconds the last finished write took (in the background or not).
    """

    def __init__(self, path: str | Path, background: bool = False) -> None:
        self.path = Path(path)
        self.background = background
        self.blocked_s = 0.0
        self.write_s = 0.0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (now, or a copy of it in the background)."""
        start = time.perf_counter()
        self.wait()
        if not self.background:
            save_checkpoint(self.path, state)
            self.write_s = self.blocked_s = time.perf_counter() - start
            return
        snapshot = host_copy(state)
        self._thread = threading.Thread(target=self._write, args=(snapshot,), name="checkpoint")
        self._thread.start()
        self.blocked_s = time.perf_counter() - start

    def _write(self, state: dict[str, Any]) -> None:
        start = time.perf_counter()
        try:
            save_checkpoint(self.path, state)
        except BaseException as err:  # handed to the training thread by `wait`
            self._error = err
        self.write_s = time.perf_counter() - start

    def wait(self) -> None:
        """Wait until the last write is on disk; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def host_copy(value: Any) -> Any:
    """``value`` with every tensor copied to host memory, and every dict, list and tuple that
    holds one rebuilt: a snapshot that later changes to the original cannot reach."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [host_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(host_copy(v) for v in value)
    return value


def load_checkpoint(path: str | Path, expected_hash: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to these params and data, else None.

    A checkpoint of other params or data, or one that cannot be read, is logged and removed:
    resuming it would silently mix two experiments.
    """
    path = Path(path)
    remove_leftovers(path.parent, f".{path.name}{TMP}")  # left by a kill during a save
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: never resume from it
        log.warning("%s: unreadable checkpoint (%s); removed, training from the start", path, err)
        path.unlink(missing_ok=True)  # another process of the run may have removed it
        return None
    if not isinstance(state, dict) or state.get("params_hash") != expected_hash:
        log.warning(
            "%s: checkpoint of other train params or data; removed, training from the start", path
        )
        path.unlink(missing_ok=True)  # another process of the run may have removed it
        return None
    return state


def rng_state(generator: np.random.Generator) -> dict[str, Any]:
    """Every random state the training uses, as plain values and tensors."""
    return {
        "numpy": generator.bit_generator.state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any], generator: np.random.Generator) -> None:
    """Put back the random states saved by `rng_state`."""
    generator.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignals:
    """Within the block, SIGTERM and SIGINT only set `requested` (the loop saves, then exits).

    A cloud spot instance announces preemption with SIGTERM; the training finishes its step,
    writes a checkpoint and exits non-zero. The previous handlers come back after the block.
    Outside the main thread (where handlers cannot be set) it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            log.warning("%s received: stopping after this step to save a checkpoint", signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
