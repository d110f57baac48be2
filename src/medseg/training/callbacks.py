"""Hooks into the fit loop, and the one every run has on its main process: the per-epoch curves.

A `Callback` overrides any of its methods; `medseg.training.loop.Trainer` calls them in this order:
``on_run_start``, then per epoch ``on_epoch_start``, ``on_step_end`` after every optimizer step,
``on_epoch_end`` with the epoch's logged values (after validation, before the checkpoint), and
``on_run_end`` (also when the run stops on an error or a signal). Hooks must not wait for the
device (no ``.item()`` in ``on_step_end``) if the run is to keep a GPU busy.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from medseg.io.atomic import write_json
from medseg.training.monitor import GPU_CURVES

log = logging.getLogger(__name__)


class TrainerView(Protocol):
    """What a hook is given of `medseg.training.loop.Trainer` (its other attributes are there as
    well); a protocol, so that the loop imports its hooks and not the other way round."""

    epoch: int  # epochs done
    clock: dict[str, float]  # the current epoch's wall-clock record (start, end, images, ...)
    cfg: Any  # the train params
    history: list[tuple[dict[str, float], dict[str, float]]]  # per epoch: record, best so far

    def best(self) -> dict[str, float]:
        """The best validation values so far, as logged beside each epoch."""
        ...


# Curves only: they measure the machine, not the model, and would show as a change in every
# `dvc metrics diff` (the metrics file keeps what the same params and data always reproduce).
MACHINE_CURVES = (
    "throughput_images_per_s", "gpu_peak_memory_gib", "gpu_peak_reserved_gib", *GPU_CURVES,
)  # fmt: skip
CURVES = Path("plots") / "metrics"  # dvclive's folder of curves, within the logs folder


class Callback:
    """A no-op hook for every point of the loop; subclass and override what you need."""

    def on_run_start(self, trainer: TrainerView) -> None:
        """Before the first epoch (after a resume: ``trainer.history`` holds the epochs done)."""

    def on_epoch_start(self, trainer: TrainerView) -> None:
        """Before the first step of an epoch (or of its rest, after a resume)."""

    def on_step_end(self, trainer: TrainerView, loss: torch.Tensor) -> None:
        """After an optimizer step; ``loss`` is the step's loss, a scalar on the device."""

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, float]) -> None:
        """After an epoch's validation; ``record`` holds the values logged for it."""

    def on_run_end(self, trainer: TrainerView) -> None:
        """After the last epoch, or when the run stops early."""


class LiveLog(Callback):
    """Per-epoch curves and the metrics file into ``logs_dir``: through dvclive when it is
    installed; else written here in dvclive's layout (``metrics.json`` nested at ``/``, one
    ``plots/metrics/<key>.tsv`` per curve), so that bench/gpu.sh reads either the same way.

    The epochs of a resumed run are logged again first, so the curves are whole.
    """

    def __init__(self, logs_dir: str | Path) -> None:
        self.logs_dir = Path(logs_dir)
        self.live: Any = None
        self.summary: dict[str, Any] = {}
        self.step = 0

    def on_run_start(self, trainer: TrainerView) -> None:
        try:
            from dvclive import Live
        except ImportError:  # a bare GPU machine: the same files, written here
            shutil.rmtree(self.logs_dir / CURVES, ignore_errors=True)
        else:
            self.live = Live(dir=str(self.logs_dir), save_dvc_exp=False, dvcyaml=None, report=None)
        for record, best in trainer.history:
            self._log(record, best)

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, float]) -> None:
        self._log(record, trainer.best())

    def on_run_end(self, trainer: TrainerView) -> None:
        if self.live is not None:
            self.live.end()
        elif self.summary:
            write_json(self.logs_dir / "metrics.json", self.summary)

    def _log(self, record: dict[str, float], best: dict[str, float]) -> None:
        if self.live is None:
            self.summary = _nested(
                {k: v for k, v in record.items() if k not in MACHINE_CURVES}
                | best
                | {"step": self.step}
            )
            for key, value in record.items():
                path = self.logs_dir / CURVES / f"{key}.tsv"
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as f:
                    if self.step == 0 or f.tell() == 0:
                        f.write(f"step\t{key.rsplit('/', 1)[-1]}\n")
                    f.write(f"{self.step}\t{value}\n")
            self.step += 1
            return
        for key, value in record.items():
            self.live.log_metric(key, value)
        for key in MACHINE_CURVES:
            self.live.summary.pop(key, None)
        self.live.summary.update(best)
        self.live.next_step()


def _nested(flat: dict[str, float]) -> dict[str, Any]:
    """``{"val/dice": x}`` -> ``{"val": {"dice": x}}``, as dvclive writes its summary."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


class StepTimeCheck(Callback):
    """After the first epoch, the seconds a step took here against the seconds the plan bought
    its steps with (`medseg.planning.probe`): a factor of `FACTOR` either way is a warning, as
    the budget then over- or under-runs by as much (a plan made on another machine, or while
    the machine was busy).

    Args:
        planned: the plan's seconds a step (``plans.json`` ``budget.step_seconds``).
    """

    FACTOR = 2.0

    def __init__(self, planned: float) -> None:
        self.planned = planned
        self.measured: float | None = None

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, float]) -> None:
        clock = trainer.clock
        steps = clock.get("images", 0) / trainer.cfg.batch_size
        if self.measured is not None or not steps or "end" not in clock:
            return
        self.measured = (clock["end"] - clock["start"]) / steps
        ratio = self.measured / self.planned
        text = (
            f"{self.measured:.3g} s a training step in the first epoch; the plan bought its "
            f"steps at {self.planned:.3g} s ({ratio:.2f}x)"
        )
        if ratio >= self.FACTOR or ratio <= 1.0 / self.FACTOR:
            log.warning(
                "%s: train.budget will %s by about that much. Was the plan measured on another "
                "machine or while this one was busy? Plan again here: dvc repro -f -s plan",
                text, "overrun" if ratio > 1 else "be underused",
            )  # fmt: skip
        else:
            log.info("%s", text)
