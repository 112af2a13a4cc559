"""Independent pieces of work done side by side, one forked process per core.

Three users: the report (`analysis.report`) draws its sections, each a pure function of
the loaded run that returns text (PNG data URIs, tables), while the analyst
(`study.analyst`) scores the claims beside them (`aside`); the grid (`study.grid`, and
`study.search` for its space's corners) composes the configurations of its group options,
each a Hydra composition that returns a plain dict; and the trial-major kernel's first
compilation (`study.engine.trial_major`) compiles its largest callees into numba's disk
cache. All of it is Python that holds the GIL (matplotlib's drawing, OmegaConf's merging,
numba's typing), so threads would not overlap them; processes do. A forked child inherits
the parent's state (the loaded run, Hydra's initialised config search path, the imported
kernel): nothing is pickled on the way in, and only the job's result comes back. The
results are the same as doing the jobs one after another (tested): each job reads only
its arguments, and the only thing one writes is numba's cache, which numba reads back.

Forked, not spawned: a spawned child would import matplotlib, pandas and scipy (or Hydra)
again and receive its inputs pickled, which costs about as much as it saves. Fork is used
on Linux only (elsewhere the platform's default is spawn, and on macOS forking a process
that has loaded system frameworks is unsafe); there, and with one core, the jobs run in
order. A child runs no OpenMP region and no numba-compiled code (the kernel's jobs only
compile), so forking after torch has loaded is safe.

A worker freezes what it inherits (`gc.freeze`, as `study.heap.settle` does after the
imports): its collections visit only the objects its jobs make, not the parent's heap
(numba's compilation makes many; the kernel's first compilation took about 7% less).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Hashable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection, Pipe
from typing import Any, TypeVar

log = logging.getLogger(__name__)

Job = tuple[Callable[..., Any], tuple[Any, ...]]
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

# The jobs of the `run_jobs` call in progress: forked workers inherit them.
_JOBS: list[Job] = []


def workers_available() -> int:
    """Cores this process may run on (1 where forking is not used)."""
    if not sys.platform.startswith("linux"):
        return 1
    return len(os.sched_getaffinity(0))


def run_jobs(jobs: Mapping[K, Job], workers: int | None = None) -> dict[K, Any]:
    """{name: fn(*args)} for every `(fn, args)` in `jobs`, built by up to `workers` forked
    processes (default: `workers_available()`), in the order given (put the longest
    first: a free worker takes the next job). An exception of a job is raised here; a
    worker that died (killed, out of memory) makes them run here, one after another."""
    workers = min(workers_available() if workers is None else workers, len(jobs))
    if workers <= 1 or _JOBS:  # one core, or called from inside a job
        return _in_order(jobs)
    _JOBS[:] = jobs.values()
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=gc.freeze) as pool:
            return dict(zip(jobs, pool.map(_run, range(len(_JOBS))), strict=True))
    except BrokenProcessPool as err:
        log.warning("a worker process died (%s); doing its jobs in this process", err)
    finally:
        _JOBS.clear()
    return _in_order(jobs)


def _in_order(jobs: Mapping[K, Job]) -> dict[K, Any]:
    return {name: fn(*args) for name, (fn, args) in jobs.items()}


def _run(index: int) -> Any:
    fn, args = _JOBS[index]
    return fn(*args)


@contextlib.contextmanager
def aside(fn: Callable[..., T], *args: Any) -> Iterator[Callable[[], T]]:
    """`fn(*args)` started in a forked process while the block runs; the block gets a
    function that waits for its value (an exception of `fn` is raised there, as by a call).

    Where forking is not used (`fork_serving`), `fn` runs here before the block, and a
    process that died (killed, out of memory) has `fn` run here when the value is asked
    for. The block's end waits for the process to finish (nothing it writes is cut short),
    then reaps it.
    """
    forked = fork_serving(lambda conn: _serve_value(conn, fn, args))
    if forked is None:
        value = fn(*args)
        yield lambda: value
        return
    pid, conn = forked
    answer: list[tuple[str, Any]] = []

    def value() -> T:
        if not answer:
            try:
                answer.append(conn.recv())
            except (EOFError, OSError):  # the process died without answering
                log.warning("the forked process of %s died; doing its work here",
                            getattr(fn, "__name__", fn))
                answer.append(("value", fn(*args)))
        kind, got = answer[0]
        if kind == "error":
            raise got
        return got

    try:
        yield value
    finally:
        with contextlib.suppress(Exception):
            if not answer:
                conn.recv()  # its work done before it is ended
        end_forked(pid, conn)


def _serve_value(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> int:
    """In a process of `aside`: send ("value", fn(*args)) or ("error", the exception)."""
    try:
        answer: tuple[str, Any] = ("value", fn(*args))
    except Exception as err:  # noqa: BLE001  (raised by the caller of `aside`'s value)
        answer = ("error", err)
    try:
        conn.send(answer)
    except Exception as err:  # noqa: BLE001  (a value or an exception that does not pickle)
        conn.send(("error", RuntimeError(f"{type(err).__name__}: {err}")))
    return 0


def fork_serving(serve: Callable[[Connection], int]) -> tuple[int, Connection] | None:
    """Fork a process that runs `serve(conn)` and exits with its status, `conn` one end of
    a pipe; return its pid and the other end. None where forking is not used (not Linux,
    one core) or fails. The child ignores Ctrl-C (the parent's to handle), dies of
    SIGTERM, and leaves with `os._exit`, so it runs none of the parent's exit handlers."""
    if workers_available() < 2:
        return None
    mine, theirs = Pipe()
    try:
        pid = os.fork()
    except OSError as err:
        log.debug("no forked process (%s)", err)
        mine.close()
        theirs.close()
        return None
    if pid == 0:
        status = 1
        try:
            mine.close()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            # SIGTERM ends it, whatever handler the parent had installed when it forked.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            status = serve(theirs)
        finally:
            os._exit(status)
    theirs.close()
    return pid, mine


def end_forked(pid: int, conn: Connection) -> None:
    """Kill a process of `fork_serving`, close this end of its pipe and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    conn.close()
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
