from __future__ import annotations

import time

import pytest
import torch

from medseg.training.monitor import GPU_CURVES, GpuMonitor


def test_no_monitor_without_a_cuda_gpu():
    assert GpuMonitor.start(torch.device("cpu")) is None


def test_means_count_only_the_samples_inside_the_window():
    readings = iter([{"gpu_busy_percent": 10.0}, RuntimeError("NVML hiccup")] * 1000)

    def read() -> dict[str, float]:
        value = next(readings)
        if isinstance(value, Exception):
            raise value
        return value

    monitor = GpuMonitor(read, interval_s=0.01)
    time.sleep(0.3)
    monitor.stop()
    stamps = [t for t, _ in monitor.samples]
    assert len(stamps) >= 3  # the failed readings were skipped, the thread went on
    assert monitor.means(stamps[0], stamps[1]) == {"gpu_busy_percent": 10.0}
    assert [t for t, _ in monitor.samples] == stamps[2:]  # those up to the window's end dropped
    assert monitor.means(stamps[-1] + 1, stamps[-1] + 2) == {}


def test_means_average_each_curve_over_its_samples():
    monitor = GpuMonitor(lambda: {}, interval_s=10.0)
    monitor.stop()
    monitor.samples = [
        (1.0, {"gpu_busy_percent": 50.0, "gpu_power_w": 300.0}),
        (2.0, {"gpu_busy_percent": 100.0}),
        (3.0, {"gpu_busy_percent": 0.0, "gpu_power_w": 500.0}),
    ]
    assert monitor.means(0.5, 2.5) == {"gpu_busy_percent": 75.0, "gpu_power_w": 300.0}
    assert set(GPU_CURVES) >= {"gpu_busy_percent", "gpu_power_w"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_monitor_reads_a_cuda_gpu():
    monitor = GpuMonitor.start(torch.device("cuda"))
    if monitor is None:
        pytest.skip("NVML cannot be read here (no nvidia-ml-py)")
    start = time.time()
    time.sleep(0.5)
    monitor.stop()
    means = monitor.means(start, time.time())
    assert set(means) == set(GPU_CURVES) and 0 <= means["gpu_busy_percent"] <= 100
