"""Experiments on tiny params: `dvc exp run -S`, a queued sweep run by `dvc queue start -j N`,
and `dvc exp show` with the metrics as columns."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import pytest
import yaml
from conftest import ran, run

DICE = "test.fov.dice"


def exp_table(project: Path) -> list[dict[str, str]]:
    """The rows of `dvc exp show --csv`, columns by their header."""
    proc = run(project, "dvc", "exp", "show", "--csv", "--all-commits")
    return list(csv.DictReader(io.StringIO(proc.stdout)))


def test_exp_run_with_a_changed_param_reruns_train_and_evaluate(reproduced: Path):
    proc = run(reproduced, "dvc", "exp", "run", "-n", "lr-high", "-S", "train.lr=2.0e-2")
    assert ran(proc) == ["train", "evaluate"]
    # the workspace holds the experiment's params and results; git history is untouched
    assert yaml.safe_load((reproduced / "params.yaml").read_text())["train"]["lr"] == 0.02
    assert run(reproduced, "git", "log", "--oneline").stdout.count("\n") == 2

    rows = {row["Experiment"]: row for row in exp_table(reproduced)}
    assert "lr-high" in rows
    assert rows["lr-high"]["train.lr"] == "0.02"
    assert 0.0 <= float(rows["lr-high"][DICE]) <= 1.0
    assert 0.0 <= float(rows["lr-high"]["val.dice"]) <= 1.0


@pytest.mark.slow  # two trainings in two workers: over a minute on two cores
def test_queued_sweep_runs_in_parallel_workers(reproduced: Path):
    run(reproduced, "dvc", "exp", "run", "--queue", "-S", "train.lr=5.0e-3,2.0e-2")
    queued = run(reproduced, "dvc", "queue", "status").stdout
    assert queued.count("Queued") == 2, queued
    run(reproduced, "dvc", "queue", "start", "-j", "2")

    deadline = time.monotonic() + 600
    while True:
        status = run(reproduced, "dvc", "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, f"the sweep did not finish:\n{status}"
        time.sleep(2)
    assert status.count("Success") == 2, status
    run(reproduced, "dvc", "queue", "stop", "--kill")

    rows = [row for row in exp_table(reproduced) if row["typ"].startswith("branch_")]
    by_lr = {row["train.lr"]: row for row in rows}
    assert set(by_lr) == {"0.005", "0.02"}, rows
    for row in by_lr.values():
        assert 0.0 <= float(row[DICE]) <= 1.0
    # the workspace is left as it was: queued experiments run in their own temporary copies
    assert yaml.safe_load((reproduced / "params.yaml").read_text())["train"]["lr"] == 2.0e-3
    assert run(reproduced, "git", "status", "--porcelain").stdout == ""
