from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medseg.errors import MedsegError
from medseg.training.distributed import World, allsum, sync_batchnorm, world_from_env
from medseg.training.losses import bce_dice_loss


def test_world_from_env(monkeypatch: pytest.MonkeyPatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert world_from_env() == World(0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_from_env() == World(3, 4, 1)


def test_shares_split_the_global_batch():
    shares = [World(r, 4).share(16) for r in range(4)]
    assert [(s.start, s.stop) for s in shares] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    with pytest.raises(MedsegError, match=r"train.batch_size .* divide by the number of processes"):
        World(0, 3).share(16)


def test_single_process_is_unchanged():
    t = torch.arange(3.0)
    assert allsum(t) is t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: dict) -> None:
    """Half of a batch per process: batch norm and loss as one process over the whole batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = sync_batchnorm(
            torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                torch.nn.Conv2d(4, 1, 1)),
            torch.device("cpu"),
        )  # fmt: skip
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(4, 1, 8, 8, generator=g), (torch.rand(4, 1, 8, 8, generator=g) > 0.7)
        part = slice(2 * rank, 2 * rank + 2)
        loss = bce_dice_loss(ddp(x[part]), y[part].float(), torch.ones(2, 1, 8, 8), allsum=allsum)
        loss.backward()
        out[rank] = (
            loss.item(),
            [p.grad.clone() for p in net.parameters()],
            net[1].running_mean.clone(),
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_over_the_whole_batch():
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 1, 1)
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 1, 8, 8, generator=g), (torch.rand(4, 1, 8, 8, generator=g) > 0.7)
    loss = bce_dice_loss(net(x), y.float(), torch.ones(4, 1, 8, 8))
    loss.backward()
    for rank in (0, 1):
        dist_loss, grads, running_mean = out[rank]
        assert dist_loss == pytest.approx(loss.item(), rel=1e-5)
        for got, want in zip(grads, [p.grad for p in net.parameters()], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(running_mean, net[1].running_mean)
