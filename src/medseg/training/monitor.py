"""The GPU's load while it trains: busy share, power and SM clock, sampled by a thread.

On CUDA a thread reads NVML (through ``torch.cuda.utilization``, ``power_draw`` and
``clock_rate``, which need the ``nvidia-ml-py`` package) every `INTERVAL_S` seconds, each
sample stamped with ``time.time()``. The trainer averages the samples that fall inside each
training epoch (plan and steps; validation and checkpoint left out) into its curves, so
``dvc plots`` shows them per epoch. On a CPU, or where NVML cannot be read, there is no
monitor and no such curves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

INTERVAL_S = 0.2
# the curves a monitor adds, each the mean of the samples inside the epoch
GPU_CURVES = ("gpu_busy_percent", "gpu_power_w", "gpu_sm_clock_mhz")


class GpuMonitor:
    """Samples ``read()`` every ``interval_s`` seconds in a thread until `stop`.

    Args:
        read: returns one sample, ``{curve: value}`` (keys of `GPU_CURVES`); a sample that
            raises is skipped.
        interval_s: seconds between samples.
    """

    def __init__(self, read: Callable[[], dict[str, float]], interval_s: float = INTERVAL_S):
        self.read = read
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, device: torch.device) -> GpuMonitor | None:
        """A monitor of ``device`` when it is a CUDA GPU whose NVML answers, else None."""
        if device.type != "cuda":
            return None

        def read() -> dict[str, float]:
            return {
                "gpu_busy_percent": float(torch.cuda.utilization(device)),
                "gpu_power_w": torch.cuda.power_draw(device) / 1000.0,  # milliwatts
                "gpu_sm_clock_mhz": float(torch.cuda.clock_rate(device)),
            }

        try:
            read()
        except Exception as err:  # no nvidia-ml-py, or no NVML for this GPU: no curves, no harm
            log.info("no GPU load curves: NVML cannot be read (%s)", err)
            return None
        return cls(read)

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                values = self.read()
            except Exception:  # one failed reading (a driver hiccup) must not end the run
                continue
            with self._lock:
                self.samples.append((time.time(), values))

    def means(self, start: float, end: float) -> dict[str, float]:
        """Each curve's mean over the samples taken in [start, end] (``time.time()``); the
        samples up to ``end`` are dropped (memory stays flat). Empty when none fell inside."""
        with self._lock:
            inside = [values for t, values in self.samples if start <= t <= end]
            self.samples = [(t, values) for t, values in self.samples if t > end]
        keys = sorted({key for values in inside for key in values})
        return {
            key: sum(v[key] for v in inside if key in v) / sum(key in v for v in inside)
            for key in keys
        }

    def stop(self) -> None:
        """End the sampling thread."""
        self._done.set()
        self._thread.join()
