"""The CPU threads of training and of the plan's probe: the cores other processes leave free,
measured from the real /proc/stat beside a real busy process (a spinning interpreter)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch

from medseg.training.precision import (
    cpu_sample,
    cpu_threads,
    free_cores,
    other_cores,
    usable_cpus,
)

linux = pytest.mark.skipif(cpu_sample() is None, reason="no /proc/stat (not Linux)")


@pytest.fixture
def busy_process() -> Iterator[None]:
    """Another process keeping one core busy, pinned to none, as another user's job."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])
    time.sleep(0.5)  # started and on a core
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


@pytest.fixture
def threads_restored() -> Iterator[None]:
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@linux
def test_a_busy_process_is_seen_as_about_one_core(busy_process: None):
    before = cpu_sample()
    time.sleep(0.5)
    assert 0.7 < other_cores(before, cpu_sample()) < usable_cpus() + 0.1


@linux
def test_this_process_own_work_is_not_counted():
    before = cpu_sample()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # this process keeps a core busy itself
        pass
    assert other_cores(before, cpu_sample()) < 0.5  # allowing for a background job or two


def test_unknown_load_counts_as_none():
    assert other_cores(None, None) == 0.0


@linux
@pytest.mark.skipif(usable_cpus() < 2, reason="needs two CPUs")
def test_training_threads_leave_the_busy_core_out(
    busy_process: None, threads_restored: None, caplog: pytest.LogCaptureFixture
):
    torch.set_num_threads(usable_cpus())
    assert free_cores() == usable_cpus() - 1
    assert cpu_threads() == usable_cpus() - 1 == torch.get_num_threads()
    assert "1 of" in caplog.text and "busy with other processes" in caplog.text


@linux
@pytest.mark.skipif(usable_cpus() < 2, reason="needs two CPUs")
def test_deterministic_training_keeps_its_threads_and_warns(
    busy_process: None, threads_restored: None, caplog: pytest.LogCaptureFixture
):
    torch.set_num_threads(usable_cpus())
    assert cpu_threads(deterministic=True) == usable_cpus() == torch.get_num_threads()
    assert "train.deterministic keeps" in caplog.text


def test_threads_fixed_by_hand_are_kept(monkeypatch: pytest.MonkeyPatch, threads_restored: None):
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(sample_s=0.0) == 1 == torch.get_num_threads()
