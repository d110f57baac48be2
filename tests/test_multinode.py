"""Two "nodes" on this machine: torchrun with a static rendezvous on 127.0.0.1 and gloo.

Each node is its own ``torchrun --nnodes=2 --node_rank=R --nproc_per_node=1`` process tree, as
on two machines sharing a checkpoint folder. One node is killed mid-run (SIGKILL of its whole
process tree: a lost machine, no chance to save); the other fails on its next collective; both
are started again and resume from the checkpoint in the shared folder.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import REPO, tiny_params, write_params
from safetensors.numpy import load_file

from medseg.training.checkpoint import CHECKPOINT, FINISHED

# 3 epochs of 2 steps: the kill lands after the first epoch's checkpoint, inside the second
TRAIN = {"epochs": 3, "patches_per_epoch": 8, "batch_size": 4, "val_every": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {
        **os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"),
        "OMP_NUM_THREADS": "1",
    }  # fmt: skip


def _stage_args(params: Path, data: Path, out: Path) -> list[str]:
    return [
        str(REPO / "stages" / "train.py"), "--params", str(params), "--data", str(data),
        "--models", str(out / "models"), "--logs", str(out / "logs"),
        "--checkpoints", str(out / "checkpoints"),
    ]  # fmt: skip


def _start_nodes(params: Path, data: Path, out: Path) -> list[subprocess.Popen[str]]:
    """Both nodes of one run, each a torchrun agent with one worker, in its own process group."""
    port = _free_port()
    nodes = []
    for rank in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
            "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
            "--max_restarts=0", "--", *_stage_args(params, data, out),
        ]  # fmt: skip
        pipe, merged = subprocess.PIPE, subprocess.STDOUT
        nodes.append(subprocess.Popen(cmd, env=_env(), stdout=pipe, stderr=merged, text=True))
    return nodes


def _kill_node(node: subprocess.Popen[str]) -> None:
    """SIGKILL a node's agent and its workers (torchrun starts each worker in a session of its
    own: killing the agent's process group alone would leave the worker training)."""
    tree = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    for proc in tree:
        proc.kill()
    psutil.wait_procs(tree, timeout=30)


def _finish(node: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    try:
        output, _ = node.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # waiting on a dead peer: end it as a cluster would
        _kill_node(node)
        output, _ = node.communicate()
    return node.returncode, output


def _losses(out: Path) -> np.ndarray:
    rows = (out / "logs" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    return np.array([float(r.split("\t")[1]) for r in rows[1:]])


def _weights(out: Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "models" / "last.safetensors"))


def _run_nodes(params: Path, data: Path, out: Path) -> list[str]:
    results = [_finish(node, 600) for node in _start_nodes(params, data, out)]
    for code, output in results:
        assert code == 0, output[-3000:]
    return [output for _, output in results]


@pytest.mark.slow
def test_two_nodes_killed_mid_run_resume_to_the_same_weights(processed: Path, tmp_path: Path):
    params = write_params(tmp_path / "p.yaml", tiny_params(train=TRAIN))
    one, whole, cut = tmp_path / "one", tmp_path / "whole", tmp_path / "cut"
    subprocess.run(
        [sys.executable, *_stage_args(params, processed, one)], env=_env(), check=True,
        timeout=600, capture_output=True,
    )  # fmt: skip
    _run_nodes(params, processed, whole)

    # 1. both nodes start; node 1 is lost once the first epoch's checkpoint is on the shared disk
    nodes = _start_nodes(params, processed, cut)
    ckpt = cut / "checkpoints" / CHECKPOINT
    deadline = time.monotonic() + 300
    while not ckpt.exists() and nodes[1].poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ckpt.exists(), _finish(nodes[0], 5)[1][-3000:]
    _kill_node(nodes[1])
    _finish(nodes[1], 30)
    code, output = _finish(nodes[0], 120)
    assert code != 0, "node 0 went on alone: " + output[-2000:]
    assert not (cut / "models").exists()  # nothing half-written
    assert ckpt.exists()

    # 2. both nodes again: they resume from the shared checkpoint and finish
    outputs = _run_nodes(params, processed, cut)
    assert "resuming from" in outputs[0]
    assert [p.name for p in (cut / "checkpoints").iterdir()] == [FINISHED]

    # 3. the weights and curve of the uninterrupted two-node run, exactly
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(_losses(cut), _losses(whole))

    # 4. the curve of one process over the same global batch: equal but for the order of the
    # sums (the first epoch agrees to about 1e-5; AdamW's normalised steps let that grow a little)
    want, got = _losses(one), _losses(whole)
    assert len(got) == len(want) == TRAIN["epochs"]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
    np.testing.assert_allclose(got, want, rtol=5e-3)
