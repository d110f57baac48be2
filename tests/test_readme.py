"""The README's commands say what the project actually runs."""

from __future__ import annotations

import importlib.util
import re
import sys

from conftest import REPO


def _bench(name: str):
    """bench/<name>.py as a module, loaded once (bench/harness.py, which it imports, first)."""
    for module_name in ("harness", name):
        if module_name not in sys.modules:
            path = REPO / "bench" / f"{module_name}.py"
            spec = importlib.util.spec_from_file_location(module_name, path)
            assert spec is not None and spec.loader is not None
            sys.modules[module_name] = module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_drive_recipe_in_the_readme_is_the_one_the_benchmark_runs():
    recipe = _bench("drive_recipe").RECIPE
    line = f"dvc exp run -S data.root=<path to DRIVE> -S data.layout=drive {recipe}"
    assert line in (REPO / "README.md").read_text()


def test_stage_times_are_measured_between_dvc_stage_lines():
    times = _bench("drive_recipe").stage_times(
        [(1.0, "Running stage 'train':"), (2.0, "epoch 1"), (9.5, "Running stage 'evaluate':")],
        end=12.0,
    )
    assert times == {"train": 8.5, "evaluate": 2.5}


def test_ci_runs_the_readme_test_command_verbatim():
    """The README's two commands (set up + repro, set up + tests); .ci/run runs the second."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    setup = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && '
    commands = re.findall(r"^python3 -m venv .*$", readme, flags=re.MULTILINE)
    assert commands == [setup + "dvc repro", setup + "pytest"]
    assert commands[1] in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
