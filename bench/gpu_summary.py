"""The table of bench/gpu.sh, from whatever its stages left in the work folder.

Standard library only (PyYAML if present), and every row on its own: a missing file, a train
stage killed by its time limit, a missing nvidia-smi or ``[N/A]`` samples give "-" in that
row (with the reason), never a crash, so the table always prints.

Reads, in ``WORK``: ``times.tsv`` (``name start end rc`` per stage, ``time.time()`` seconds,
written by gpu.sh), ``train.log`` (the train stage's output, with its "epoch clock" lines),
``smi.csv`` (nvidia-smi samples: timestamp, utilization.gpu, power.draw, clocks.sm,
memory.used), ``train/metrics.json``, ``evaluate/metrics.json``, ``params.yaml`` and, per
baseline, ``baseline-NAME.log``.

The figures: the GPU busy share, power and SM clock are means of the samples taken inside
training epochs 2..N (plan drawing and steps; start-up, compile, validation and checkpoints
left out), beside the busy share over the whole train stage; images/s is the median over epochs
2..N (an epoch's time includes drawing its plan) and, end to end, all patches over the train
stage's wall time; time to first step runs from the stage's start to the end of the first
optimizer step (interpreter, CUDA start-up, cuDNN tuning, compile). A baseline's row gives its
images/s and its own time to first step beside the run's: for the ``compile`` baseline, the
difference is what ``torch.compile`` costs at the start.

    python bench/gpu_summary.py WORK [--out summary.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

from harness import table

CPU_RECIPE_MPX_S = 0.65  # the 2-core CPU recipe in bf16: 70 patches of 96^2 a second
KILLED = {124: "stopped by its time limit", 137: "killed by its time limit"}


def parse_float(text: str) -> float | None:
    """A number from nvidia-smi's CSV, or None for ``[N/A]``, ``[Not Supported]``, blanks."""
    try:
        return float(text.strip().split()[0])
    except (ValueError, IndexError):
        return None


def read_smi(path: Path) -> list[tuple[float, list[float | None]]]:
    """nvidia-smi ``--format=csv,noheader,nounits`` lines: (unix time, [values]); lines that do
    not parse (a header, a half-written last line, an error message) are skipped."""
    samples = []
    if not path.is_file():
        return samples
    for line in path.read_text(errors="replace").splitlines():
        stamp, *fields = line.split(",")
        try:
            t = datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
        except ValueError:
            continue
        samples.append((t, [parse_float(f) for f in fields]))
    return samples


def read_clocks(path: Path) -> list[dict]:
    """The trainer's "epoch clock {json}" lines (one per epoch) from a log."""
    clocks = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            _, found, rest = line.partition("epoch clock ")
            if found:
                try:
                    clocks.append(json.loads(rest))
                except json.JSONDecodeError:
                    continue
    return clocks


def read_times(path: Path) -> dict[str, tuple[float, float | None, int | None]]:
    """``times.tsv``: per stage its start, end and exit code (end and code None while it ran)."""
    times: dict[str, tuple[float, float | None, int | None]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            try:
                end = float(parts[2]) if len(parts) > 2 and parts[2] else None
                rc = int(parts[3]) if len(parts) > 3 and parts[3] else None
                times[parts[0]] = (float(parts[1]), end, rc)
            except (ValueError, IndexError):
                continue
    return times


def mean_inside(
    samples: list[tuple[float, list[float | None]]], windows: Iterable[tuple[float, float]],
    column: int,
) -> float | None:  # fmt: skip
    """Mean of one column over the samples inside any window; None when there are none."""
    spans = list(windows)
    values = [
        v[column]
        for t, v in samples
        if len(v) > column and v[column] is not None and any(a <= t <= b for a, b in spans)
    ]
    return sum(values) / len(values) if values else None  # type: ignore[arg-type]


def rate(clock: dict) -> float:
    return clock["images"] / (clock["end"] - clock["start"])


def median_rate(clocks: list[dict]) -> float | None:
    """Median images/s over epochs 2..N (epoch 1 alone when it is the only one)."""
    later = clocks[1:] or clocks
    return statistics.median(rate(c) for c in later) if later else None


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def summarise(work: Path) -> list[tuple[str, str]]:
    """The table's rows: (measure, value)."""
    rows: list[tuple[str, str]] = []

    def row(name: str, compute: Callable[[], str]) -> None:
        try:
            rows.append((name, compute()))
        except Exception as err:  # one broken row must not cost the others
            rows.append((name, f"- ({type(err).__name__}: {err})"))

    times = read_times(work / "times.tsv")
    clocks = read_clocks(work / "train.log")
    smi = read_smi(work / "smi.csv")
    params: dict = {}
    try:
        import yaml

        params = yaml.safe_load((work / "params.yaml").read_text()) or {}
    except Exception:  # no PyYAML, or no params: the rows that need them say "-"
        params = {}
    train_p = params.get("train", {})
    epochs_2n = [(c["start"], c["end"]) for c in (clocks[1:] or clocks)]

    def stage(name: str) -> str:
        if name not in times:
            return "not run"
        start, end, rc = times[name]
        if end is None:
            return "did not finish (the command was cut off)"
        state = "ok" if rc == 0 else KILLED.get(rc or 0, f"failed (exit {rc})")
        return f"{end - start:.1f} s, {state}"

    def first_step() -> str:
        start = times["train"][0]
        return fmt(clocks[0]["first_step_end"] - start)

    def end_to_end() -> str:
        start, end, _ = times["train"]
        last = end if end is not None else clocks[-1]["end"]
        return fmt(sum(c["images"] for c in clocks) / (last - start))

    def mpx() -> str:
        r = median_rate(clocks)
        px = train_p["patch_size"] ** 2
        if r is None:
            return "-"
        m = r * px / 1e6
        return f"{m:.2f} ({m / CPU_RECIPE_MPX_S:.0f}x the 2-core CPU recipe's {CPU_RECIPE_MPX_S})"

    def per_epoch(key: str, spec: str = ".3f") -> str:
        values = [c[key] for c in clocks if key in c]
        return fmt(statistics.median(values), spec) if values else "-"

    def busy(windows: list[tuple[float, float]], column: int, spec: str = ".1f") -> str:
        if not smi:
            return "- (no nvidia-smi samples)"
        value = mean_inside(smi, windows, column)
        return fmt(value, spec) if value is not None else "- (no numeric samples inside)"

    def whole_train() -> list[tuple[float, float]]:
        start, end, _ = times["train"]
        return [(start, end if end is not None else float("inf"))]

    def peak(key: str) -> str:
        values = [c[key] for c in clocks if key in c]
        return fmt(max(values), ".2f") if values else "-"

    train_m = load_json(work / "train" / "metrics.json")
    eval_m = load_json(work / "evaluate" / "metrics.json")

    row("smoke run (1 short epoch, evaluate 2 images)", lambda: stage("smoke"))
    row("train stage wall time", lambda: stage("train"))
    row("epochs done / planned", lambda: f"{len(clocks)} / {train_p.get('epochs', '?')}")
    row("time to first step (s): start-up + compile", first_step)
    row("images/s, median of epochs 2..N", lambda: fmt(median_rate(clocks)))
    row("images/s end to end (all patches / train stage)", end_to_end)
    row("patch Mpx/s, median epoch", mpx)
    row("plan drawing per epoch (s, median)", lambda: per_epoch("plan_s"))
    row("checkpoint, training blocked (s, median)", lambda: per_epoch("checkpoint_s"))
    row("GPU busy inside epochs 2..N (%)", lambda: busy(epochs_2n, 0))
    row("GPU busy over the whole train stage (%)", lambda: busy(whole_train(), 0))
    row("GPU power inside epochs 2..N (W)", lambda: busy(epochs_2n, 1, ".0f"))
    row("SM clock inside epochs 2..N (MHz)", lambda: busy(epochs_2n, 2, ".0f"))
    row(
        "peak GPU memory allocated / reserved (GiB)",
        lambda: f"{peak('peak_allocated_gib')} / {peak('peak_reserved_gib')}",
    )
    row(
        "best val Dice (epoch)", lambda: f"{train_m['best_val_dice']:.4f} ({train_m['best_epoch']})"
    )
    row("evaluate stage wall time", lambda: stage("evaluate"))
    row("threshold (evaluate)", lambda: str(eval_m["threshold"]))
    row("test F1 = Dice (FOV)", lambda: f"{eval_m['test']['fov']['dice']:.4f}")
    row("test AUC (FOV)", lambda: f"{eval_m['test']['fov']['auc_roc']:.4f}")
    main_rate = median_rate(clocks)
    for log in sorted(work.glob("baseline-*.log")):
        name = log.stem.removeprefix("baseline-")

        def baseline(log: Path = log, name: str = name) -> str:
            state = stage("baseline-" + name)
            base = read_clocks(log)
            r = median_rate(base)
            if r is None:
                return f"- ({state})"
            ratio = f"; the run is {main_rate / r:.2f}x this" if main_rate else ""
            first = (
                f"first step after {base[0]['first_step_end'] - times['baseline-' + name][0]:.1f} s"
            )
            if clocks:
                first += f" (the run's {clocks[0]['first_step_end'] - times['train'][0]:.1f} s)"
            return f"{r:.1f} images/s, {first} ({state}{ratio})"

        row(f"baseline {name}", baseline)
    rows.append(("note", "evaluate runs the network under bf16 autocast on CUDA (fp32 on a CPU)"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("work", type=Path)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    text = table(("measure", "value"), summarise(args.work))
    print(f"\n{text}")
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
