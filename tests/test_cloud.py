"""The SkyPilot task `cloud/train.sky.yaml`: parsed offline by SkyPilot itself, and its `run:`
commands run for real against a local git remote and the local S3 test server.

SkyPilot pins an older click than DVC needs, so it lives in its own interpreter: the one named
by ``MEDSEG_SKY_PYTHON``, else ``.venv-sky/bin/python`` in the repository (`.ci/run` makes it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, dvc_status, ran, run
from test_remote import BUCKET, ENV_WITH_KEYS, MotoServer, hashes, s3  # noqa: F401 (s3: a fixture)

TASK = REPO / "cloud" / "train.sky.yaml"

# Parse each task file as `sky launch` does, with the values --env/--secret would give; print
# per file what it resolved to, or the error. One process: importing sky takes seconds.
PARSE = """
import json, sys
import sky, yaml
for path in sys.argv[1:]:
    try:
        task = sky.Task.from_yaml_config(
            yaml.safe_load(open(path)),
            env_overrides=[("EXP_NAME", "t")],
            secrets_overrides=[("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s"),
                               ("GIT_TOKEN", "g")],
        )
    except Exception as error:
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
        continue
    print(json.dumps({
        "name": task.name,
        "accelerators": sorted(a for r in task.resources for a in (r.accelerators or {})),
        "disk_size": sorted({r.disk_size for r in task.resources}),
        "workdir": task.workdir,
        "file_mounts": task.file_mounts,
        "envs": task.envs,
        "secrets": sorted(task.secrets),
    }))
"""

# broken copies of the task file: (id, text replaced, replacement, words of the expected error)
BROKEN = [
    ("unknown-field", "disk_size: 100", "disk_sise: 100", "disk_sise"),
    ("bad-accelerator-count", "L4:1}", "L4:one}", "L4:one"),
]


def sky_python() -> str:
    """An interpreter that has SkyPilot, or skip the test saying how to get one."""
    python = os.environ.get("MEDSEG_SKY_PYTHON") or str(REPO / ".venv-sky" / "bin" / "python")
    if shutil.which(python) is None:
        pytest.skip(f"SkyPilot: no {python}; set MEDSEG_SKY_PYTHON or make .venv-sky (see .ci/run)")
    has_sky = "import importlib.util as u, sys; sys.exit(u.find_spec('sky') is None)"
    if subprocess.run([python, "-c", has_sky]).returncode != 0:
        pytest.skip(f"{python} has no SkyPilot (pip install skypilot)")
    return python


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """SkyPilot's view of the task file and of each `BROKEN` copy, by id ("task" for the file).

    The parser runs from the repository root (workdir and file mounts are relative to where
    `sky` is called) with HOME in a temporary folder, so no SkyPilot config or cached catalog
    of this machine is used, and with proxies to a closed port, so reaching a cloud fails."""
    tmp = tmp_path_factory.mktemp("sky")
    text = TASK.read_text()
    paths = {"task": TASK}
    for name, old, new, _ in BROKEN:
        assert old in text
        paths[name] = tmp / f"{name}.sky.yaml"
        paths[name].write_text(text.replace(old, new))
    dead = "http://127.0.0.1:9"
    env = dict(os.environ, HOME=str(tmp), HTTP_PROXY=dead, HTTPS_PROXY=dead, NO_PROXY="")
    env.update(http_proxy=dead, https_proxy=dead, no_proxy="")
    env["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
    proc = subprocess.run(
        [sky_python(), "-c", PARSE, *map(str, paths.values())],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return dict(zip(paths, results, strict=True))


def test_skypilot_parses_the_task_offline(parsed: dict[str, dict[str, Any]]):
    task = parsed["task"]
    assert "error" not in task, task
    assert task["name"] == "medseg-train"
    assert task["accelerators"] == ["A100", "A100-80GB", "H100", "L4"]  # any one of them
    assert task["disk_size"] == [100]
    assert task["workdir"] == "."
    assert task["file_mounts"] == {"~/sky_workdir/.git": ".git"}
    assert task["envs"] == {"EXP_NAME": "t", "EXP_SET": "", "GIT_REMOTE": "origin",
                            "DVC_REMOTE": ""}  # fmt: skip
    assert task["secrets"] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GIT_TOKEN"]


@pytest.mark.parametrize(
    ("name", "words"), [(b[0], b[3]) for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_skypilot_rejects_a_broken_task(parsed: dict[str, dict[str, Any]], name: str, words: str):
    assert words in parsed[name].get("error", "")


def task_env(**values: str) -> dict[str, str]:
    """The environment the task's `run:` sees: its `envs:` defaults, then ``values``."""
    task = yaml.safe_load(TASK.read_text())
    env = dict(ENV_WITH_KEYS)  # the S3 keys, as the task's secrets pass them
    env.update({k: v for k, v in task["envs"].items() if v is not None})
    env.update(values)
    return env


def exp_show(project: Path, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """`dvc exp show --json` as {experiment name: its data (params, metrics)}."""
    rows = json.loads(run(project, "dvc", "exp", "show", "--json", env=env).stdout)
    return {
        rev["name"]: rev["data"]
        for row in rows
        for exp in row.get("experiments") or []
        for rev in exp["revs"]
    }


@pytest.mark.parametrize(
    ("exp_set", "stages"),
    [
        pytest.param("", [], id="same-params"),  # every output comes from S3: fast
        pytest.param(
            "train.lr=2.0e-2 train.seed=3",
            ["train", "evaluate"],
            id="new-params",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_the_task_run_pushes_an_experiment_a_laptop_pulls_and_applies(
    reproduced: Path,
    s3: MotoServer,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
    exp_set: str,
    stages: list[str],
):
    # the laptop's repository: S3 as the DVC remote, a git remote `origin`, everything pushed
    origin = tmp_path / "origin.git"
    run(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    run(reproduced, "dvc", "remote", "add", "-d", "s3", f"s3://{BUCKET}/cloud")
    run(reproduced, "dvc", "remote", "modify", "s3", "endpointurl", s3.url)
    run(reproduced, "git", "commit", "-qam", "S3 remote")
    run(reproduced, "git", "remote", "add", "origin", str(origin))
    run(reproduced, "git", "push", "-q", "origin", "main")
    run(reproduced, "dvc", "push", env=ENV_WITH_KEYS)

    # the instance: the synced workdir with its .git, no DVC cache; the task's `run:` verbatim
    instance = tmp_path / "instance"
    run(tmp_path, "git", "clone", "-q", str(origin), str(instance))
    token = "token-for-an-https-remote"  # unused by a local origin, but the branch runs
    env = task_env(EXP_NAME="cloud-exp", EXP_SET=exp_set, GIT_TOKEN=token)
    script = yaml.safe_load(TASK.read_text())["run"]
    proc = subprocess.run(
        ["bash", "-c", script], cwd=instance, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ran(proc) == stages  # the other stages' outputs came from S3
    helper = run(instance, "git", "config", "credential.helper").stdout
    assert "$GIT_TOKEN" in helper and token not in (instance / ".git" / "config").read_text()

    # the laptop again, in a fresh clone (its outputs can come from S3 only): pull, compare, apply
    laptop = tmp_path / "laptop"
    run(tmp_path, "git", "clone", "-q", str(origin), str(laptop))
    run(laptop, "dvc", "exp", "pull", "origin", "cloud-exp", env=ENV_WITH_KEYS)
    shown = exp_show(laptop, ENV_WITH_KEYS)["cloud-exp"]
    train = yaml.safe_load((instance / "params.yaml").read_text())["train"]
    assert shown["params"]["params.yaml"]["data"]["train"] == train
    metrics = shown["metrics"]["results/evaluate/metrics.json"]["data"]
    assert metrics == json.loads((instance / "results" / "evaluate" / "metrics.json").read_text())
    run(laptop, "dvc", "exp", "apply", "cloud-exp", env=ENV_WITH_KEYS)
    assert hashes(laptop) == hashes(instance)
    assert (laptop / "params.yaml").read_bytes() == (instance / "params.yaml").read_bytes()
    assert dvc_status(laptop, env=ENV_WITH_KEYS) == {}
