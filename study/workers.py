"""`workers=N`: N local worker processes on one study, and stopping cleanly on a signal.

The parent (`python -m study`) composes, validates, expands and enqueues; then it starts N
processes (spawned, so no CUDA or thread state is inherited) that each open the same study
and run `study.sweep.run_sweep(enqueue=False)`: they take waiting trials through the
storage until none is left. Each worker gets `cores // N` torch threads and, when several
GPUs are visible, one of them (`CUDA_VISIBLE_DEVICES`, round robin). When they are done the
parent runs one last pass itself (re-running the trials of a worker that died) and writes
trials.parquet and the report.

Ctrl-C (SIGINT) or SIGTERM: the parent asks every worker to stop after its current
population (SIGTERM to each); taken untrained trials go back to the queue. A second
Ctrl-C kills them at once (their trials are re-run on resume). A worker whose parent
died stops after its current population too.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from study import heap
from study.grid import SweepPlan
from study.lease import Lease

log = logging.getLogger(__name__)


class StopRequest:
    """Set by SIGINT/SIGTERM: stop after the current population; a second SIGINT stops now."""

    def __init__(self) -> None:
        self.count = 0

    @property
    def requested(self) -> bool:
        return self.count > 0

    def install(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
                announce: bool = True) -> StopRequest:
        def handle(signum: int, frame: object) -> None:
            self.count += 1
            if self.count > 1 and signum == signal.SIGINT:
                raise KeyboardInterrupt
            if self.count == 1 and announce:
                print("\nstopping after the current population (Ctrl-C again to stop now)",
                      file=sys.stderr, flush=True)

        for signum in signals:
            signal.signal(signum, handle)
        return self


@dataclass(frozen=True)
class WorkerJob:
    """What a worker process needs (picklable): the plan and how to reach the study."""

    plan: SweepPlan
    run_dir: Path
    url: str | None
    study_name: str
    direction: str
    objective: str
    engine: str
    device: str
    leases: Lease
    retries: int
    threads: int
    parent: int
    dashboard: bool = False  # storage.dashboard


def _worker_entry(jobs: Connection, index: int) -> None:
    """Entry point of a spawned worker: its job arrives over `jobs` (see `run_workers`),
    which then carries back how many trials it trained; no job (the parent was stopped or
    died first) is nothing to do."""
    try:
        job = jobs.recv()
    except (EOFError, OSError):  # all or part of it: the parent was stopped meanwhile
        jobs.close()
        return
    worker_main(job, index, jobs)


def worker_main(job: WorkerJob, index: int, report: Connection | None = None) -> None:
    """Entry point of worker process `index`: take and train until the queue is empty;
    send the number of trials it trained over `report`, where given."""
    heap.hold()  # until the imports are done (study.heap)
    from study.config import resolve_device
    from study.engine import make_engine
    from study.records import RecordError
    from study.storage import StorageError, mask_url, open_study
    from study.sweep import run_sweep

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it sends SIGTERM
    stop = StopRequest().install((signal.SIGTERM,), announce=False)
    logging.basicConfig(level=logging.WARNING,
                        format=f"[worker {index}] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(job.threads)
    try:
        study = open_study(job.run_dir, job.url, job.study_name, job.direction, job.retries)
        heap.settle()
        outcome = run_sweep(job.plan, study, make_engine(job.engine),
                            resolve_device(job.device), job.run_dir, job.objective,
                            direction=job.direction, leases=job.leases, enqueue=False,
                            dashboard=job.dashboard,
                            stop=lambda: stop.requested or os.getppid() != job.parent)
    except (OSError, RecordError, StorageError) as err:
        # Bad state (a full disk, an unreachable database): one line, as the parent's; what
        # it held is reclaimed and re-run (`study.lease`).
        log.error("%s", mask_url(f"{type(err).__name__}: {err}"))
        sys.exit(3)
    if report is not None:
        with contextlib.suppress(OSError):  # a parent gone meanwhile reads nothing
            report.send(outcome.trained)
    sys.exit(130 if outcome.stopped else 0)


def visible_gpus(device: str) -> list[str]:
    """CUDA device ids the workers share out (empty on CPU)."""
    if device == "cpu" or not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def worker_environment(threads: int, index: int, gpus: Sequence[str]) -> dict[str, str]:
    """Environment of worker `index`: its GPU (when there are any) and its thread pools'
    sizes, set before the process starts.

    numba's pool (the fused update) is launched with NUMBA_NUM_THREADS threads whatever
    `set_num_threads` says later, and its idle threads spun beside the other workers: 2 busy
    threads per worker on 2 cores, and lr_batch took 70-89 s with `workers=2` against 23.6 s
    with the pools sized (16.5 s with one worker).
    """
    env = {"NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    return env


def threads_per_worker(workers: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // workers)


@contextlib.contextmanager
def _environment(extra: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_workers(job: WorkerJob, workers: int, stop: StopRequest,
                poll: Callable[[], None] = lambda: None, poll_s: float = 1.0
                ) -> tuple[list[int], int]:
    """Start `workers` processes on `job`, wait for all, return their exit codes and how
    many trials they trained (each sends its count as it ends: the storage's count of
    trials done would include other invocations' on the same study).

    `poll()` runs every `poll_s` seconds while they work (progress). A stop request is
    forwarded (SIGTERM: stop after the current population; a second Ctrl-C: SIGKILL).
    """
    context = multiprocessing.get_context("spawn")
    gpus = visible_gpus(job.device)
    processes, senders = [], []
    for index in range(workers):
        send, receive = context.Pipe()  # the job goes out, the worker's count comes back
        with _environment(worker_environment(job.threads, index, gpus)), _sigint_ignored():
            process = context.Process(target=_worker_entry, args=(receive, index),
                                      name=f"study-worker-{index}")
            process.start()
        receive.close()
        processes.append(process)
        senders.append(send)
    forwarded = 0
    try:
        # The job (the whole plan: 200 KB for lr_batch) goes over a pipe once every worker
        # runs, with this process's Ctrl-C handler in place: written into the spawn's own
        # pipe, it blocked `start` until the child had imported torch to read it, and
        # forever when the child died first (its end of that pipe stays open here).
        for send in senders:
            with contextlib.suppress(OSError):  # a worker already dead: its exit code tells
                send.send(job)
        while any(p.is_alive() for p in processes):
            _wait_any(processes, poll_s)
            if stop.count > forwarded:
                forwarded = stop.count
                for p in processes:
                    if p.is_alive():
                        (p.terminate if forwarded == 1 else p.kill)()
            poll()
    except KeyboardInterrupt:
        for p in processes:
            if p.is_alive():
                p.kill()
        raise
    finally:
        for p in processes:
            p.join()
        trained = 0
        for send in senders:
            with contextlib.suppress(EOFError, OSError):  # a worker that died sent nothing
                if send.poll():
                    trained += send.recv()
            send.close()
    return [p.exitcode for p in processes], trained


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a worker is spawned: an ignored signal stays ignored across
    exec (a handled one does not), so the worker cannot die of a Ctrl-C (sent to the whole
    process group) in its imports, before it can ignore SIGINT itself: one that did
    printed a traceback. A Ctrl-C within the spawn's few milliseconds is lost."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_any(processes: list, timeout: float) -> None:
    from multiprocessing.connection import wait

    wait([p.sentinel for p in processes if p.is_alive()], timeout)
