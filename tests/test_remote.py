"""Remote storage for real: `dvc push` / `dvc pull` through an S3 server and a local folder.

The S3 server is moto's standalone server (an S3-protocol server in a separate process, as
dvc-s3's own tests use it), started on 127.0.0.1 at a free port by a fixture and stopped after.
Credentials reach DVC only through ``.dvc/config.local`` or the environment, never ``.dvc/config``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import dvc_env, dvc_status, ran, run, write_params

boto3 = pytest.importorskip("boto3")
pytest.importorskip("dvc_s3", reason="S3 remotes need the s3 extra: pip install -e '.[s3]'")
pytest.importorskip("moto.server", reason="the S3 test server needs moto[server] (dev extra)")

BUCKET = "medseg-test"
KEY_ID, SECRET = "testing-key-id", "testing-secret"
OUTPUTS = ("data", "models", "results")  # every stage output lives under these


class MotoServer:
    """moto's S3 server in a child process on 127.0.0.1; `stop` ends it (its data goes too)."""

    def __init__(self, log: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start; see {log}") from None
                time.sleep(0.2)
        self.client = boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )
        self.client.create_bucket(Bucket=BUCKET)

    def keys(self, prefix: str = "") -> set[str]:
        """Every object key in the test bucket under ``prefix``."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return {obj["Key"] for page in pages for obj in page.get("Contents", [])}

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path / "moto.log")
    yield server
    server.stop()


def no_aws_env(**extra: str) -> dict[str, str]:
    """`dvc_env` without the AWS variables of the machine running the tests. (Keys in
    ``~/.aws`` would rank below the ones each test gives, so no real account is ever used.)"""
    env = {k: v for k, v in dvc_env().items() if not k.startswith("AWS_")}
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
    )
    env.update(extra)
    return env


# credentials as a user on a CI runner or a cloud instance passes them
ENV_WITH_KEYS = no_aws_env(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)


def add_s3_remote(project: Path, s3: MotoServer, prefix: str = "store") -> None:
    """Make ``s3://BUCKET/prefix`` at the moto server the default remote and commit it; put the
    keys in ``.dvc/config.local``, as docs/remotes.md says, and check git ignores that file."""
    run(project, "dvc", "remote", "add", "-d", "-f", "s3", f"s3://{BUCKET}/{prefix}")
    run(project, "dvc", "remote", "modify", "s3", "endpointurl", s3.url)
    run(project, "dvc", "remote", "modify", "--local", "s3", "access_key_id", KEY_ID)
    run(project, "dvc", "remote", "modify", "--local", "s3", "secret_access_key", SECRET)
    assert SECRET not in (project / ".dvc" / "config").read_text()
    assert SECRET in (project / ".dvc" / "config.local").read_text()
    run(project, "git", "check-ignore", "-q", ".dvc/config.local")  # fails if not ignored
    run(project, "git", "commit", "-qam", "S3 remote")
    assert "config.local" not in run(project, "git", "ls-files").stdout


def hashes(root: Path, tops: tuple[str, ...] = OUTPUTS) -> dict[str, str]:
    """sha256 of every file under ``root/top`` for each top, by relative path."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for top in tops
        if (root / top).exists()
        for path in sorted((root / top).rglob("*"))
        if path.is_file()
    }


def cache_keys(project: Path) -> set[str]:
    """The files of the project's local DVC cache, as the keys a remote stores them under
    (the run cache, ``runs/``, is pushed only on request)."""
    cache = project / ".dvc" / "cache"
    keys = {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()}
    return {key for key in keys if not key.startswith("runs/")}


def assert_same_as(clone: Path, source: Path, env: dict[str, str]) -> None:
    """``clone`` holds every output of ``source``, bit for bit, and DVC sees nothing to do."""
    assert hashes(clone) == hashes(source)
    assert dvc_status(clone, env=env) == {}
    cloud = json.loads(run(clone, "dvc", "status", "--cloud", "--json", env=env).stdout)
    assert cloud == {}
    assert ran(run(clone, "dvc", "repro", env=env)) == []


def test_s3_round_trip_push_clone_pull(reproduced: Path, s3: MotoServer, tmp_path: Path):
    add_s3_remote(reproduced, s3)
    env = no_aws_env()  # the source's keys come from .dvc/config.local only
    push = run(reproduced, "dvc", "push", env=env)
    assert "pushed" in push.stdout

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(reproduced), str(clone))
    assert not (clone / "models").exists()
    run(clone, "dvc", "pull", env=ENV_WITH_KEYS)  # a fresh clone: keys from the environment
    assert_same_as(clone, reproduced, ENV_WITH_KEYS)
    # the remote holds exactly what a clone needs
    assert {key.removeprefix("store/") for key in s3.keys("store/")} == cache_keys(clone)


def test_the_default_run_leaves_nothing_for_dvc_to_report(reproduced: Path):
    """After the default `dvc repro` in a clone (every dvc.yaml DVC collects there), review
    sees only real results: nothing to do, every metrics file loads, no empty rows."""
    assert dvc_status(reproduced) == {}
    shown = run(reproduced, "dvc", "metrics", "show", "--json")
    assert "failed to load" not in shown.stdout + shown.stderr
    files = json.loads(shown.stdout)[""]["data"]
    assert set(files) == {"results/train/metrics.json", "results/evaluate/metrics.json"}
    assert all("error" not in f and f["data"] for f in files.values())
    diff = run(reproduced, "dvc", "metrics", "diff", "HEAD", "--all")
    assert "failed to load" not in diff.stdout + diff.stderr


def test_local_folder_round_trip_with_the_default_remote(reproduced: Path, tmp_path: Path):
    # the repository's own .dvc/config: a folder next to the project, nothing to set up
    remote = tmp_path / "medseg-dvc-remote"
    assert not remote.exists()
    run(reproduced, "dvc", "push")
    clone = tmp_path / "clone"  # a sibling of the project: the same relative remote path
    run(tmp_path, "git", "clone", "-q", str(reproduced), str(clone))
    run(clone, "dvc", "pull")
    assert_same_as(clone, reproduced, dvc_env())
    stored = {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}
    assert stored == cache_keys(clone)


def snapshot(root: Path) -> dict[str, str]:
    """Every file of a repository (workspace, git, DVC cache) but DVC's own scratch folder."""
    return {
        path: digest
        for path, digest in hashes(root, tuple(p.name for p in root.iterdir())).items()
        if not path.startswith(".dvc/tmp/")
    }


def test_server_gone_before_pull_is_a_clear_error_and_changes_nothing(
    reproduced: Path, s3: MotoServer, tmp_path: Path
):
    add_s3_remote(reproduced, s3)
    run(reproduced, "dvc", "push", env=no_aws_env())
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(reproduced), str(clone))
    run(clone, "dvc", "pull", "data/processed", env=ENV_WITH_KEYS)  # a partly pulled clone
    before = snapshot(clone)
    assert "data/processed/train.json" in before

    s3.stop()
    # botocore retries each request 5 times by default (about 1.5 minutes here); 2 are enough
    proc = run(clone, "dvc", "pull", env=dict(ENV_WITH_KEYS, AWS_MAX_ATTEMPTS="2"), check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert f'Could not connect to the endpoint URL: "http://127.0.0.1:{s3.port}/' in output
    assert "failed to pull data from the cloud" in output
    assert "Traceback" not in output
    assert snapshot(clone) == before


def test_interrupted_push_completes_when_repeated(reproduced: Path, s3: MotoServer, tmp_path: Path):
    add_s3_remote(reproduced, s3)
    # one upload at a time, killed as soon as the first object has landed
    push = subprocess.Popen(
        [sys.executable, "-m", "dvc", "push", "-j", "1"],
        cwd=reproduced,
        env=no_aws_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not s3.keys("store/") and push.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert push.poll() is None, "the push finished before it could be interrupted"
    os.killpg(push.pid, signal.SIGKILL)
    push.wait()
    partial = {key.removeprefix("store/") for key in s3.keys("store/")}

    status = json.loads(run(reproduced, "dvc", "status", "-c", "--json", env=no_aws_env()).stdout)
    assert status, "dvc status -c sees nothing missing after a killed push"
    run(reproduced, "dvc", "push", env=no_aws_env())

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(reproduced), str(clone))
    run(clone, "dvc", "pull", env=ENV_WITH_KEYS)
    assert_same_as(clone, reproduced, ENV_WITH_KEYS)
    stored = {key.removeprefix("store/") for key in s3.keys("store/")}
    assert stored == cache_keys(clone)
    assert partial and partial < stored  # the first push had really stopped midway


def test_versioned_data_set_pushed_and_pulled_gives_the_same_manifest(
    project: Path, s3: MotoServer, tmp_path: Path
):
    # a data set from elsewhere, in the DRIVE layout, brought under DVC inside the repository
    run(project, "python", "stages/synthesize.py", "--params", "params.yaml", "--out", "data/drive")
    run(project, "dvc", "add", "data/drive")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["root"] = "data/drive"
    write_params(project / "params.yaml", params)
    assert ran(run(project, "dvc", "repro", "convert")) == ["convert"]
    run(project, "git", "add", "data/drive.dvc", "data/.gitignore", "params.yaml", "dvc.lock")
    run(project, "git", "commit", "-qm", "DRIVE-layout data set under DVC")
    assert "data/drive/" not in run(project, "git", "ls-files").stdout
    add_s3_remote(project, s3, prefix="data")
    run(project, "dvc", "push", env=no_aws_env())

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(project), str(clone))
    run(clone, "dvc", "pull", "data/drive.dvc", env=ENV_WITH_KEYS)
    assert hashes(clone, ("data/drive",)) == hashes(project, ("data/drive",))
    # the clone converts the pulled data itself (its cache holds no converted output)
    assert ran(run(clone, "dvc", "repro", "convert", env=ENV_WITH_KEYS)) == ["convert"]
    manifest = "data/converted/manifest.csv"
    assert (clone / manifest).read_bytes() == (project / manifest).read_bytes()
    assert hashes(clone, ("data/converted",)) == hashes(project, ("data/converted",))
    status = run(clone, "dvc", "status", "convert", "--json", env=ENV_WITH_KEYS)
    assert json.loads(status.stdout) == {}


def test_the_model_artifact_fetched_by_dvc_artifacts_get_predicts(reproduced: Path, tmp_path: Path):
    """The registry path: `dvc artifacts get` of the declared model into a fresh folder (data
    from the default local remote), then `medseg predict` with what it fetched."""
    from PIL import Image

    missing = run(reproduced, "dvc", "artifacts", "get", str(reproduced), "segmentation-model",
                  check=False)  # fmt: skip
    assert missing.returncode != 0  # no version registered yet
    # a version, as `gto register` writes it: an annotated tag <name>@v<semver>
    run(reproduced, "git", "tag", "-a", "segmentation-model@v0.1.0", "-m", "first model")
    run(reproduced, "dvc", "push")
    shutil.rmtree(reproduced / ".dvc" / "cache")  # the remote is the only copy left
    fetched = tmp_path / "elsewhere" / "model"
    fetched.parent.mkdir()
    run(fetched.parent, "dvc", "artifacts", "get", str(reproduced), "segmentation-model",
        "-o", str(fetched))  # fmt: skip
    assert sorted(p.name for p in fetched.iterdir()) == sorted(
        p.name for p in (reproduced / "models").iterdir()
    )
    image = sorted((reproduced / "data" / "converted" / "images").iterdir())[0]
    out = tmp_path / "predicted"
    run(tmp_path, "medseg", "predict", "--model", str(fetched), "--out", str(out), str(image))
    mask = np.asarray(Image.open(out / f"{image.stem}.png"))
    assert mask.shape == np.asarray(Image.open(image)).shape[:2]
