"""The analysis in a process forked ahead (`study.analyst`): the same files as done here,
done here when it fails or dies, and no process left behind."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from study import parallel
from study.analyst import Analyst, score_and_report
from study.records import RecordError
from tests.analysis.conftest import write_sweep_run
from tests.study.conftest import TINY, run_study

pytestmark = pytest.mark.skipif(parallel.workers_available() < 2,
                                reason="forks only on Linux with two cores")

CLAIMS = [{"statement": "divergence rises with the learning rate", "metric": "diverged",
           "trend": "optimizer.lr", "expect": "increasing"},
          {"statement": "adam ends lower than sgd", "metric": "val_loss_final",
           "compare": {"axis": "optimizer", "arm": "adam", "baseline": "sgd"},
           "expect": "lower"}]


def _html(run_dir: Path) -> str:
    # The footer says when the report was built, and the page names its run directory:
    # the rest must be the same bytes.
    text = (run_dir / "report.html").read_text().replace(str(run_dir), "RUN_DIR")
    return re.sub(r'<p class="built">.*?</p>', "", text)


@pytest.fixture()
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    first = write_sweep_run(tmp_path / "first")
    second = tmp_path / "second"
    shutil.copytree(first, second)
    return first, second


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow  # two reports, about 10 s
def test_the_analyst_writes_what_this_process_writes(two_runs, caplog) -> None:
    there, here = two_runs
    analyst = Analyst.start()
    assert analyst is not None
    pid = analyst.pid
    with caplog.at_level(logging.DEBUG, logger="study.analyst"):
        assert analyst.finish(there, CLAIMS, report=True, wait_s=120) == there / "report.html"
    assert "analysing here" not in caplog.text  # the analyst did it
    assert pid != os.getpid() and _gone(pid)  # answered, then reaped
    assert score_and_report(here, CLAIMS, report=True) == here / "report.html"
    assert (there / "claims.parquet").read_bytes() == (here / "claims.parquet").read_bytes()
    assert _html(there) == _html(here)


@pytest.mark.slow  # two reports, about 10 s
def test_claims_scored_beside_the_report_give_what_scoring_first_gives(two_runs) -> None:
    """`score_and_report` scores the claims in a process of its own while the report is
    built: the same claims.parquet and report as scoring first, claims.parquet listed among
    the run's files included (it is written after the report has read the directory)."""
    from analysis.claims import score_run
    from analysis.report import build_report

    beside, first = two_runs
    (beside / "claims.parquet").unlink(missing_ok=True)
    (first / "claims.parquet").unlink(missing_ok=True)
    score_run(first, CLAIMS)
    build_report(first)
    assert score_and_report(beside, CLAIMS, report=True) == beside / "report.html"
    assert (beside / "claims.parquet").read_bytes() == (first / "claims.parquet").read_bytes()
    assert _html(beside) == _html(first)
    assert "claims.parquet</code>" in _html(beside)


def test_without_a_report_only_the_claims_are_written(two_runs) -> None:
    there, _ = two_runs
    analyst = Analyst.start()
    assert analyst.finish(there, CLAIMS, report=False) is None
    assert (there / "claims.parquet").exists() and not (there / "report.html").exists()


def test_the_work_of_an_analyst_that_died_is_done_here(two_runs) -> None:
    there, here = two_runs
    analyst = Analyst.start()
    os.kill(analyst.pid, signal.SIGKILL)  # killed, out of memory
    assert analyst.finish(there, CLAIMS, report=False) is None
    score_and_report(here, CLAIMS, report=False)
    assert (there / "claims.parquet").read_bytes() == (here / "claims.parquet").read_bytes()


def test_a_starved_analyst_is_ended_at_once_and_the_work_done_here(two_runs,
                                                                  caplog) -> None:
    """Its imports run at the lowest priority, which other processes can starve for
    minutes: `finish` stops waiting as soon as the analyst gets (almost) no CPU, however
    long it would have waited, ends it and works here."""
    there, here = two_runs
    analyst = Analyst.start()
    pid = analyst.pid
    os.kill(pid, signal.SIGSTOP)  # as starved: no CPU, it never says it is ready
    started = time.perf_counter()
    with caplog.at_level(logging.DEBUG, logger="study.analyst"):
        assert analyst.finish(there, CLAIMS, report=False, wait_s=600) is None
    assert "starved" in caplog.text and "analysing here" in caplog.text
    assert time.perf_counter() - started < 60 and _gone(pid)
    score_and_report(here, CLAIMS, report=False)
    assert (there / "claims.parquet").read_bytes() == (here / "claims.parquet").read_bytes()


def test_an_analyst_not_ready_in_time_is_ended_and_the_work_done_here(two_runs, caplog,
                                                                    monkeypatch) -> None:
    """An analyst that gets the CPU but is not ready within `wait_s` is ended too."""
    from study import analyst as analyst_module

    monkeypatch.setattr(analyst_module, "STARVED_SHARE", 0.0)  # never judged starved
    there, _ = two_runs
    analyst = Analyst.start()
    pid = analyst.pid
    os.kill(pid, signal.SIGSTOP)
    with caplog.at_level(logging.DEBUG, logger="study.analyst"):
        assert analyst.finish(there, CLAIMS, report=False, wait_s=0.5) is None
    assert "not ready" in caplog.text and "analysing here" in caplog.text and _gone(pid)
    assert (there / "claims.parquet").exists()


def _nices(pid: int, seconds: float, stop=lambda seen: False) -> set[int]:
    """The nice values seen among the threads of `pid` (/proc/PID/task/TID/stat, field
    19), sampled for `seconds` or until `stop(seen)`."""
    seen: set[int] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop(seen):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError):
                seen.add(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
    return seen


@pytest.fixture()
def busy_imports(monkeypatch):
    """An analyst's imports that take a second of their thread's CPU, whatever this process
    has imported already (a forked analyst inherits those, and would be ready at once)."""
    from study import analyst as analyst_module

    real = analyst_module._import_quietly

    def busy(low_priority: bool = True) -> None:
        real(low_priority)
        end = time.thread_time() + 1.0
        while time.thread_time() < end:
            pass

    monkeypatch.setattr(analyst_module, "_import_quietly", busy)
    monkeypatch.setattr(analyst_module, "RENEW_AFTER_S", 0.3)
    return analyst_module


def test_a_starved_analyst_is_renewed_at_the_runs_priority_and_does_the_work(
        two_runs, caplog, busy_imports) -> None:
    """Beside other CPU-bound processes the analyst's imports get no CPU from the start:
    at the end of the start-up `keep_up` ends it and forks one at the run's priority, which
    does the work (nothing is analysed here) and leaves no process behind."""
    there, here = two_runs
    analyst = Analyst.start()
    first = analyst.pid
    assert 19 in _nices(first, 30, lambda seen: 19 in seen)  # imports at the lowest
    os.kill(first, signal.SIGSTOP)  # as starved
    # Long enough that what it used before it stopped is under STARVED_SHARE of the time.
    time.sleep(0.5 + 5 * busy_imports._cpu_seconds(first))
    with caplog.at_level(logging.DEBUG, logger="study.analyst"):
        analyst.keep_up()
        renewed = analyst.pid
        assert renewed not in (None, first) and _gone(first)
        assert _nices(renewed, 0.5) == {os.getpriority(os.PRIO_PROCESS, 0)}
        analyst.keep_up()  # renewed once: kept
        assert analyst.pid == renewed
        assert analyst.finish(there, CLAIMS, report=False) is None
    assert "renewed" in caplog.text and "analysing here" not in caplog.text
    assert _gone(renewed)
    score_and_report(here, CLAIMS, report=False)
    assert (there / "claims.parquet").read_bytes() == (here / "claims.parquet").read_bytes()


def test_an_analyst_starved_until_now_but_not_now_is_kept(busy_imports) -> None:
    """Starved by the run's own start-up (compositions on every core), it gets the CPU once
    the start-up is done: `keep_up` keeps it rather than throw its imports away."""
    analyst = Analyst.start()
    pid = analyst.pid
    os.kill(pid, signal.SIGSTOP)  # starved since it was forked
    time.sleep(0.5)
    os.kill(pid, signal.SIGCONT)  # importing again, on a free core
    analyst.keep_up()
    assert analyst.pid == pid
    analyst.close()
    assert _gone(pid)


def test_an_analyst_that_gets_the_cpu_or_is_ready_is_kept(monkeypatch) -> None:
    """Not starved, or too soon to tell, or ready: `keep_up` keeps the analyst."""
    from study import analyst as analyst_module

    analyst = Analyst.start()
    pid = analyst.pid
    analyst.keep_up()  # importing for less than RENEW_AFTER_S
    assert analyst.pid == pid
    monkeypatch.setattr(analyst_module, "RENEW_AFTER_S", 0.0)
    monkeypatch.setattr(analyst_module, "STARVED_SHARE", 0.0)  # never judged starved
    analyst.keep_up()
    assert analyst.pid == pid
    monkeypatch.setattr(analyst_module, "STARVED_SHARE", 1e9)  # always, unless ready
    deadline = time.monotonic() + 120
    while not analyst._conn.poll(0.1):
        assert time.monotonic() < deadline
    analyst.keep_up()
    assert analyst.pid == pid
    analyst.close()
    assert _gone(pid)


def test_an_error_of_the_analyst_is_raised_here(tmp_path: Path) -> None:
    run_dir = write_sweep_run(tmp_path / "run")
    (run_dir / "trials.parquet").write_bytes(b"not parquet")
    analyst = Analyst.start()
    pid = analyst.pid
    with pytest.raises(RecordError):
        analyst.finish(run_dir, CLAIMS, report=True, wait_s=120)
    assert _gone(pid)
    assert not (run_dir / "claims.parquet").exists()
    assert not (run_dir / "report.html").exists()


def test_close_ends_an_analyst_that_had_no_work() -> None:
    analyst = Analyst.start()
    pid = analyst.pid
    analyst.close()
    analyst.close()  # twice: nothing more
    assert _gone(pid)


def _processes_naming(text: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in ps.stdout.splitlines() if text in line]


def test_a_refused_command_leaves_no_analyst_behind(tmp_path: Path) -> None:
    # The analyst is forked as soon as Hydra has composed the config, before validation
    # refuses it: the refusal must end it (it shares the command line, run directory
    # included).
    run_dir = tmp_path / "refused-run"
    done = run_study("optimizer.lr=-1", f"hydra.run.dir={run_dir}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: optimizer.lr is out of range: -1"
    assert _processes_naming(str(run_dir)) == []
    assert not run_dir.exists()


@pytest.mark.slow  # a run and its report through the command line
def test_a_run_writes_its_report_through_the_analyst_and_leaves_no_process(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "smoke-run"
    done = run_study(*TINY[:-2], "progress=false", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"report: {run_dir / 'report.html'}"
    assert (run_dir / "claims.parquet").exists() and (run_dir / "report.html").exists()
    assert _processes_naming(str(run_dir)) == []
