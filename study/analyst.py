"""The run's analysis (claims.parquet and report.html) in a process forked before training.

What the end of a run needs first is its libraries: scipy.stats for the claims,
matplotlib, seaborn and the report's modules, about 2 CPU-seconds of imports on one core.
A process forked at start-up imports them while this one imports torch and the engine
(single-threaded too, so on two or more cores they overlap), at the lowest priority, so
that they take only the CPU time the run leaves; then it waits. When the run has
written trials.parquet and env.json, `Analyst.finish` hands it the run directory and the
claims; it scores them (`analysis.claims.score_run`, in a process forked beside the
report's) while it builds the report (`analysis.report.build_report`, which forks its own
workers) and answers with the report's path. The files are the same, byte for byte, as
when this process writes them: the same functions read the same files.

Its imports run at the lowest priority, and a process cannot take that back: on a machine
busy with other processes they get almost no CPU (a smoke sweep beside two CPU-bound
processes waited 95 s for them). So the analyst says when its imports are done, and
`finish` waits for that only `READY_WAIT_S`, and only while the analyst gets the CPU to
finish them (`STARVED_SHARE` of a core, read from /proc every `STARVED_CHECK_S`); an
analyst not ready by then, or starved, is ended and the work is done in this process, at
the run's priority, as without an analyst.

Beside other CPU-bound processes the imports are starved from the start, and doing them
after training put about 2 CPU-seconds more on the run's last stage: it took four times
as long beside two such processes, the other stages twice. So at the end of its start-up
the run asks `keep_up`: an analyst still importing that got less than `STARVED_SHARE` of a
core since it was forked, and still gets less once the start-up is done, is ended and a
new one forked at the run's own priority, whose imports then take their share of the CPU
beside training; `finish` waits for it as long as it gets the CPU (`RENEWED_WAIT_S` at
most). On an idle machine the first analyst gets the CPU once the start-up is done (most
of a core during it, unless a grid's compositions take every core) and is kept.

Nothing is lost when the analyst fails: an exception there, or its death (killed, out of
memory), makes `finish` do the work in this process, where an error is raised as it would
have been without an analyst (a bad record: RecordError, exit 3). `close` kills the analyst
(after its answer, or when the run was refused, stopped or interrupted while waiting), so
no command leaves a process behind. Forked, so Linux only, and only with a second core
(`study.parallel`): elsewhere `start` returns None and the caller does the work itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from study import heap
from study.parallel import aside, end_forked, fork_serving

log = logging.getLogger(__name__)

# How long `finish` waits for an analyst still importing: on an idle machine its imports
# (about 2 CPU-seconds, started with the run) are done long before the results; an analyst
# still importing then is starved by other processes, and this process does the work.
READY_WAIT_S = 2.0
# An analyst still importing that got less than this share of a core over the last
# STARVED_CHECK_S seconds is starved (other processes hold the cores): waiting longer
# would not make it ready. Its imports use a whole core when it gets one.
STARVED_SHARE = 0.25
STARVED_CHECK_S = 0.2
# `keep_up` judges an analyst only once it has been importing this long, and one starved
# so far only if it is still starved over this much longer.
RENEW_AFTER_S = 1.0
RECHECK_S = 0.1
# How long `finish` waits for an analyst renewed at the run's priority: as long as it gets
# the CPU, since doing its work here would take as long and start from nothing; the limit
# only guards against one that hangs.
RENEWED_WAIT_S = 30.0

Claims = Sequence[Mapping[str, Any]] | None


def score_and_report(run_dir: Path, claims: Claims, report: bool) -> Path | None:
    """Score `claims` (a sweep's, None for a single configuration) into
    run_dir/claims.parquet (`analysis.claims.score_run`: nothing written without a claim)
    and, where `report`, build run_dir/report.html; return its path (None without one)."""
    from analysis.claims import score_run
    from analysis.report import build_report

    if claims is None or not report:
        if claims is not None:
            score_run(run_dir, claims)
        return build_report(run_dir) if report else None
    # Scored in a process of its own while the report's set-up and sections run (their
    # first 0.4-0.6 s are on one core otherwise); only the claims' lines wait for it.
    with aside(score_run, run_dir, claims) as scored:
        return build_report(run_dir, scoring=scored)


class Analyst:
    """A forked process holding the analysis libraries, waiting for one run directory."""

    def __init__(self, pid: int, conn: Connection) -> None:
        self._pid: int | None = pid
        self._conn = conn
        self._low = True  # its imports run at the lowest priority (until `keep_up` renews it)
        self._forked = time.monotonic()

    @property
    def pid(self) -> int | None:
        """The analyst's process id (None once closed)."""
        return self._pid

    @classmethod
    def start(cls) -> Analyst | None:
        """Fork the analyst (it starts importing at once); None where forking is not
        used (not Linux, one core) or fails."""
        forked = fork_serving(_serve)
        if forked is None:
            log.debug("no analyst process; the run analyses its results itself")
            return None
        return cls(*forked)

    def keep_up(self) -> None:
        """At the end of the run's start-up: an analyst still importing that got less than
        `STARVED_SHARE` of a core since it was forked, and still gets less over the next
        `RECHECK_S` (other processes hold the cores, not the run's own start-up: a grid's
        compositions side by side take every core for a while), is ended, and a new one
        forked at the run's priority takes its place; see the module doc. Nothing changes
        where forking fails or the analyst is ready, renewed already, or has been importing
        for less than `RENEW_AFTER_S`."""
        elapsed = time.monotonic() - self._forked
        if self._pid is None or not self._low or elapsed < RENEW_AFTER_S:
            return
        if self._conn.poll():  # ready (or dead: `finish` sees which)
            return
        cpu = _cpu_seconds(self._pid)
        if cpu is None or cpu >= STARVED_SHARE * elapsed:
            return
        used = self._cpu_over(RECHECK_S)
        if used is None or used >= STARVED_SHARE * RECHECK_S:
            return
        forked = fork_serving(functools.partial(_serve, low_priority=False))
        if forked is None:
            return
        log.debug("the analyst process got %.2f CPU-seconds in %.1f s of its imports; "
                  "renewed at the run's priority", cpu, elapsed)
        end_forked(self._pid, self._conn)
        (self._pid, self._conn), self._low = forked, False
        self._forked = time.monotonic()

    def finish(self, run_dir: Path, claims: Claims, report: bool,
               wait_s: float | None = None) -> Path | None:
        """`score_and_report(run_dir, claims, report)`, done by the analyst once its imports
        are done (waiting at most `wait_s` seconds for them, default `READY_WAIT_S`, or
        `RENEWED_WAIT_S` for an analyst `keep_up` renewed, and only while it is not
        starved), or here when it is not ready by then, starved, failed or died (an error
        is raised from here, as without an analyst)."""
        if wait_s is None:
            wait_s = READY_WAIT_S if self._low else RENEWED_WAIT_S
        try:
            unready = self._wait_ready(wait_s)
            if unready is not None:
                outcome, value = unready
            else:
                self._conn.recv()  # ("ready", None)
                self._conn.send((Path(run_dir), claims, report))
                outcome, value = self._conn.recv()
        except (EOFError, OSError) as err:
            outcome, value = "died", repr(err)
        finally:
            self.close()
        if outcome == "done":
            return value
        log.debug("the analyst process %s (%s); analysing here", outcome, value)
        return score_and_report(run_dir, claims, report)

    def _wait_ready(self, wait_s: float) -> tuple[str, str] | None:
        """Wait for the analyst's "ready" (None once it has come), at most `wait_s`
        seconds and while it gets `STARVED_SHARE` of a core; else why not."""
        end = time.monotonic() + wait_s
        while True:
            left = end - time.monotonic()
            used = self._cpu_over(max(0.0, min(left, STARVED_CHECK_S)))
            if used is None:
                return None
            if left <= STARVED_CHECK_S:
                return "not ready", f"imports not done after {wait_s:g} s"
            if used < STARVED_SHARE * STARVED_CHECK_S:
                return "starved", (f"{used:.2f} CPU-seconds in the last "
                                   f"{STARVED_CHECK_S:g} s of its imports")

    def _cpu_over(self, seconds: float) -> float | None:
        """Wait up to `seconds` for the analyst's answer: None once it has come (ready, or
        its end of the pipe closed), else the CPU-seconds it used meanwhile (infinite where
        /proc cannot tell, so that it is never judged starved)."""
        before = _cpu_seconds(self._pid)
        if self._conn.poll(seconds):
            return None
        after = _cpu_seconds(self._pid)
        return math.inf if before is None or after is None else after - before

    def close(self) -> None:
        """End the analyst and reap it: it holds nothing that needs an orderly end (it
        answers only once its files are written). Safe to call twice."""
        if self._pid is None:
            return
        end_forked(self._pid, self._conn)
        self._pid = None


def _cpu_seconds(pid: int | None) -> float | None:
    """The CPU time (user + system, all threads) process `pid` has used, from
    /proc/PID/stat; None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _serve(conn: Connection, low_priority: bool = True) -> int:
    """The analyst's life: import in the background (at the lowest priority where
    `low_priority`) and say so when done, wait for one piece of work, do it, answer."""
    def imports() -> None:
        _import_quietly(low_priority)
        heap.settle()
        with contextlib.suppress(OSError):  # the run may have given up on this process
            conn.send(("ready", None))

    importer = threading.Thread(target=imports, name="analyst-imports")
    importer.start()
    try:
        run_dir, claims, report = conn.recv()
    except EOFError:  # the run ended without results, or did them itself
        return 0
    finally:
        importer.join()
    try:
        conn.send(("done", score_and_report(run_dir, claims, report)))
    except Exception as err:  # noqa: BLE001  (redone by the run, which raises it)
        conn.send(("failed", f"{type(err).__name__}: {err}"))
    return 0


def _import_quietly(low_priority: bool = True) -> None:
    """Import what the work needs, where `low_priority` at the lowest priority (the nice
    value is per thread on Linux): the run's own start-up and training come first, and
    these imports take the CPU time they leave (a single-threaded start-up, the Python
    between populations). The work itself runs on the analyst's main thread, at the run's
    priority."""
    if low_priority:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, 19)
    with contextlib.suppress(Exception):  # an error shows again where the work imports
        import analysis.claims  # noqa: F401  (scipy.stats, pandas)
        import analysis.report  # noqa: F401  (matplotlib, jinja2, the sections)
