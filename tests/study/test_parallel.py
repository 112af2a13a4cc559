"""Jobs done side by side in forked processes (`study.parallel`): the same results, and
the same report bytes, as one after another."""

from __future__ import annotations

import gc
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from analysis import report
from analysis.load import load_run
from study import parallel
from tests.analysis.conftest import CLAIMS, write_diag_run

BUILT = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
forks = pytest.mark.skipif(parallel.workers_available() < 2,
                           reason="needs Linux and two cores")


def _pid(tag: str) -> tuple[str, int]:
    return tag, os.getpid()


def _fail(message: str) -> None:
    raise ValueError(message)


def _die_in_a_worker(parent: int) -> str:
    if os.getpid() != parent:
        os._exit(9)  # a worker killed mid-job
    return "built here"


def _nested() -> dict:
    return parallel.run_jobs({"inner": (_pid, ("x",))}, workers=2)


@forks
def test_jobs_run_in_other_processes_and_come_back_in_order() -> None:
    jobs = {name: (_pid, (name,)) for name in ("a", "b", "c", "d")}
    built = parallel.run_jobs(jobs, workers=2)
    assert list(built) == ["a", "b", "c", "d"]
    assert [tag for tag, _ in built.values()] == ["a", "b", "c", "d"]
    assert os.getpid() not in {pid for _, pid in built.values()}


def _frozen(tag: str) -> tuple[str, int]:
    return tag, gc.get_freeze_count()


@forks
def test_a_worker_freezes_what_it_inherits_out_of_its_collections() -> None:
    """Every object a worker inherits is frozen (`gc.freeze`): its collections visit only
    what its job makes."""
    held = gc.get_freeze_count()
    built = parallel.run_jobs({name: (_frozen, (name,)) for name in ("a", "b")}, workers=2)
    assert all(count > held and count > 1000 for _, count in built.values())
    assert gc.get_freeze_count() == held  # the caller's collector is left as it was


def test_one_worker_runs_them_here() -> None:
    built = parallel.run_jobs({"a": (_pid, ("a",))}, workers=1)
    assert built == {"a": ("a", os.getpid())}


@forks
def test_an_exception_of_a_job_is_raised_here() -> None:
    with pytest.raises(ValueError, match="boom"):
        parallel.run_jobs({"ok": (_pid, ("ok",)), "bad": (_fail, ("boom",))}, workers=2)
    assert parallel.run_jobs({"after": (_pid, ("after",))}, workers=1)["after"][0] == "after"


@forks
def test_a_worker_that_dies_makes_the_jobs_run_here(caplog) -> None:
    built = parallel.run_jobs({"a": (_die_in_a_worker, (os.getpid(),)),
                               "b": (_pid, ("b",))}, workers=2)
    assert built == {"a": "built here", "b": ("b", os.getpid())}
    assert "died" in caplog.text


@forks
def test_a_job_that_runs_jobs_runs_them_in_its_own_process() -> None:
    built = parallel.run_jobs({"outer": (_nested, ()), "other": (_pid, ("o",))}, workers=2)
    tag, pid = built["outer"]["inner"]
    assert tag == "x" and pid != os.getpid()


@pytest.mark.slow
@forks
def test_the_report_is_the_same_bytes_built_side_by_side(tmp_path: Path, monkeypatch) -> None:
    run = load_run(write_diag_run(tmp_path / "run"))
    monkeypatch.setattr(report, "run_jobs", lambda jobs: parallel.run_jobs(jobs, workers=1))
    alone = report.render_html(run, claims=CLAIMS, built=BUILT)
    monkeypatch.setattr(report, "run_jobs", lambda jobs: parallel.run_jobs(jobs, workers=2))
    side_by_side = report.render_html(run, claims=CLAIMS, built=BUILT)
    assert side_by_side == alone
    assert alone.count("data:image/png;base64,") >= 5  # the figures are in it


def _echo(conn) -> int:
    conn.send(("pid", os.getpid(), conn.recv()))
    conn.recv()  # waits until killed
    return 0


@forks
def test_a_forked_server_answers_ignores_ctrl_c_and_is_reaped() -> None:
    import signal

    pid, conn = parallel.fork_serving(_echo)
    conn.send("hello")
    assert conn.recv() == ("pid", pid, "hello")
    os.kill(pid, signal.SIGINT)  # Ctrl-C reaches the process group: the parent's to handle
    assert conn.poll(0.5) is False  # still serving
    assert os.waitpid(pid, os.WNOHANG) == (0, 0)
    parallel.end_forked(pid, conn)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert conn.closed


def test_no_fork_where_forking_is_not_used(monkeypatch) -> None:
    monkeypatch.setattr(parallel, "workers_available", lambda: 1)
    assert parallel.fork_serving(_echo) is None


def _write_later(path: str, text: str, delay_s: float) -> str:
    import time

    time.sleep(delay_s)
    Path(path).write_text(text)
    return f"{text} from {os.getpid()}"


@forks
def test_aside_runs_in_another_process_while_the_block_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with parallel.aside(_write_later, str(out), "done", 0.5) as value:
        assert not out.exists()  # the block runs at once, the work goes on beside it
        got = value()
        assert out.read_text() == "done"
        assert got.startswith("done from ") and got != f"done from {os.getpid()}"
        assert value() == got  # asked again: the same value


@forks
def test_aside_raises_the_exception_of_its_work_where_the_value_is_asked() -> None:
    with parallel.aside(_fail, "bad claim") as value, pytest.raises(ValueError,
                                                                   match="bad claim"):
        value()


@forks
def test_the_end_of_an_aside_block_waits_for_its_work(tmp_path: Path) -> None:
    """A block ended without asking (an exception in it) cuts no write short."""
    out = tmp_path / "out"
    with pytest.raises(KeyError), parallel.aside(_write_later, str(out), "whole", 0.5):
        raise KeyError("the report failed")
    assert out.read_text() == "whole"


@forks
def test_the_work_of_an_aside_process_that_died_is_done_here(caplog) -> None:
    with parallel.aside(_die_in_a_worker, os.getpid()) as value:
        assert value() == "built here"
    assert "died" in caplog.text


def test_aside_without_forking_runs_the_work_before_the_block(tmp_path: Path,
                                                              monkeypatch) -> None:
    monkeypatch.setattr(parallel, "workers_available", lambda: 1)
    out = tmp_path / "out"
    with parallel.aside(_write_later, str(out), "here", 0.0) as value:
        assert out.read_text() == "here"
        assert value() == f"here from {os.getpid()}"
