"""Per-case values summarised over cases: mean, median and a tail percentile, NaN excluded.

Boundary and lesion metrics are reported per case in ``per_image.csv`` and summarised here for
``metrics.json``. A value is NaN where the case has no defined value (e.g. the segmentation
quality of a case with no matched lesion); such cases are left out of the statistics and
counted in ``n_excluded``.

The tail statistic is taken on the metric's worse side, so that it shows the bad cases: the
95th percentile (``p95``) of a distance (lower is better), the 5th (``p05``) of a score (higher
is better). Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def tail_key(higher_is_better: bool) -> str:
    """``p05`` for a score (higher is better), ``p95`` for a distance."""
    return "p05" if higher_is_better else "p95"


def summarize(values: Iterable[float], *, higher_is_better: bool) -> dict[str, float | int | None]:
    """Mean, median and tail percentile of per-case values, NaN left out and counted.

    Args:
        values: one float per case; NaN for a case without a defined value.
        higher_is_better: True for scores (tail ``p05``), False for distances (tail ``p95``).

    Returns:
        ``{"mean", "median", "p05" or "p95", "n", "n_excluded"}``: ``n`` counts the cases
        included; the statistics are None (JSON ``null``) when no case is.
    """
    array = np.asarray(list(values), dtype=np.float64)
    kept = array[~np.isnan(array)]
    tail = tail_key(higher_is_better)
    out: dict[str, float | int | None] = {"mean": None, "median": None, tail: None}
    if kept.size:
        out["mean"] = float(kept.mean())
        out["median"] = float(np.median(kept))
        out[tail] = float(np.percentile(kept, 5 if higher_is_better else 95))
    out["n"] = int(kept.size)
    out["n_excluded"] = int(array.size - kept.size)
    return out


def mean_over_classes(per_class: dict[str, dict]) -> dict:
    """One block from several classes' blocks of the same shape: the unweighted mean of each
    statistic over the classes (classes where it is None left out), counts summed.

    The headline block of a multi-class model, as ``metrics.json`` holds it for the pixel
    metrics (``test.fov`` is the mean over the foreground classes of ``test.classes.<name>.fov``).

    Args:
        per_class: class name -> nested dict of floats, None and counts (ints under ``n``
            and keys starting ``n_``), every class with the same keys.
    """
    return _mean_blocks(list(per_class.values()))


def _mean_blocks(blocks: list[dict]) -> dict:
    if not blocks:
        return {}
    out: dict = {}
    for key, first in blocks[0].items():
        items = [block[key] for block in blocks]
        if isinstance(first, dict):
            out[key] = _mean_blocks(items)
        elif key == "n" or key.startswith("n_"):
            out[key] = int(sum(items))
        else:
            kept = [float(v) for v in items if v is not None]
            out[key] = float(np.mean(kept)) if kept else None
    return out
