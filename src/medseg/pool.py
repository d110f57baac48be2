"""Independent jobs in worker processes, with a progress bar, stopped at once on the first
failure or a stop signal: the process pool of the convert stage, for any stage whose cases are
independent."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from medseg.errors import MedsegError
from medseg.progress import progress

J = TypeVar("J")
R = TypeVar("R")


def worker_count(workers: int | None, n_jobs: int) -> int:
    """Processes to use: ``workers`` (0 or ``None``: every core this process may run on), at
    most one per job."""
    if not workers:
        try:
            workers = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            workers = os.cpu_count() or 1
    return max(1, min(workers, n_jobs))


def run_jobs(
    fn: Callable[[J], R],
    jobs: Sequence[J],
    workers: int | None,
    *,
    check: Callable[[R], R] = lambda r: r,
    desc: str = "",
    died: str = "a worker process died (out of memory?)",
) -> list[R]:
    """``[check(fn(job)) for job in jobs]``, in ``worker_count(workers, len(jobs))`` processes
    when that is more than one, in the order of ``jobs``.

    ``check`` sees each result as it arrives, in the parent: an exception it raises stops the
    run, and the workers are killed rather than left to finish their jobs. ``fn`` and the jobs
    must be picklable (a module-level function, plain data).

    Raises:
        MedsegError: ``died``, when a worker process dies (killed for memory, a crash).
    """
    n_workers = worker_count(workers, len(jobs))
    results: list[R | None] = [None] * len(jobs)
    if n_workers == 1:
        with progress(total=len(jobs), desc=desc) as bar:
            for i, job in enumerate(jobs):
                results[i] = check(fn(job))
                bar.update()
        return results  # type: ignore[return-value]  # every slot is filled
    pool = ProcessPoolExecutor(
        n_workers, mp_context=_start_method(), initializer=_worker_init, initargs=(os.getpid(),)
    )
    with pool:
        try:
            pending = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            with progress(total=len(jobs), desc=desc) as bar:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        results[pending.pop(future)] = check(future.result())
                        bar.update()
        except BrokenProcessPool as err:
            raise MedsegError(died) from err
        except BaseException:
            _stop_workers(pool)
            raise
    return results  # type: ignore[return-value]


def _worker_init(parent: int) -> None:
    """In a worker: die with the parent, even when it is SIGKILLed (Linux), and leave Ctrl-C to
    the parent, which stops the workers and removes the unfinished output."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's (forked) handler
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Kill the workers now (a failure or a stop signal): waiting for the jobs they are on
    would keep a stopped run alive, writing into an output that is about to be removed."""
    processes = getattr(pool, "_processes", None) or {}  # no public way before Python 3.14
    for process in list(processes.values()):
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _start_method() -> multiprocessing.context.BaseContext:
    """``fork`` on Linux while this process runs no other thread (the stage scripts run none):
    workers start in milliseconds without importing everything again, which is most of the
    speed-up on small data sets. Otherwise ``spawn``: clean workers, whatever the parent runs."""
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")
