"""Several workers on one study: every point exactly once, results equal a one-worker run."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from study import records, workers

ROOT = Path(__file__).resolve().parents[2]
TINY = ("+sweep=smoke", "train.epochs=1", "model.width=8", "report=false", "progress=false")


@pytest.mark.slow
def test_three_journal_workers_train_every_point_once(tmp_path: Path, tiny_baseline,
                                                      run_checks, study_cli) -> None:
    tally, same_results = run_checks
    run_dir = tmp_path / "run"
    done = study_cli(*TINY, "workers=3", f"hydra.run.dir={run_dir}", expect=0)
    assert "16 trials trained, 0 already done" in done.stdout
    assert tally(run_dir) == {"complete": 16, "points": 16, "lost": 0, "duplicated": 0,
                              "running": 0, "failed": 0}
    same_results(run_dir, tiny_baseline)


@pytest.mark.slow  # 4 worker processes importing torch on 2 cores: ~30 s
def test_four_postgres_workers_train_every_point_once(tmp_path: Path, postgres, tiny_baseline,
                                                      run_checks, study_cli) -> None:
    tally, same_results = run_checks
    url = postgres.database()
    run_dir = tmp_path / "run"
    done = study_cli(*TINY, "storage=postgres", "workers=4", f"hydra.run.dir={run_dir}",
                     env={"STUDY_STORAGE_URL": url}, expect=0)
    assert "16 trials trained, 0 already done" in done.stdout
    counts = tally(run_dir, url)
    assert counts == {"complete": 16, "points": 16, "lost": 0, "duplicated": 0, "running": 0,
                      "failed": 0}
    same_results(run_dir, tiny_baseline)
    assert not (run_dir / records.JOURNAL).exists()
    # The password reaches no file of the run directory and no output.
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert postgres.password.encode() not in path.read_bytes(), path
    assert postgres.password not in done.stdout + done.stderr
    assert "***" in records.read_env(run_dir)["storage"]


def _complete_trials(url: str) -> int:
    """COMPLETE trials in the database at `url` (0 before the study has made its tables)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'"
                                ).fetchone()[0]
    except psycopg.errors.UndefinedTable:
        return 0


@pytest.mark.slow  # the CLI's start (~6 s), training (~4 s) and a 5 s outage: ~20 s
def test_a_postgres_restart_mid_sweep_is_survived(tmp_path: Path, postgres, run_checks) -> None:
    """The server goes down while the sweep trains and comes back 5 s after the sweep's
    first storage call failed: the calls are retried until it is back, and the sweep
    finishes every point exactly once. (Results differ from `tiny_baseline`: more epochs,
    so none are compared.)"""
    tally, _ = run_checks
    url = postgres.database()
    run_dir = tmp_path / "run"
    # 200 epochs: ~4 s of training in 4 populations, so the sweep is mid-way when the server
    # goes down. The background heartbeat (every 50 s, not 10) keeps out of the outage: the
    # failed calls waited for are the sweep's own, which end it if they give up.
    overrides = (*TINY[:1], "train.epochs=200", *TINY[2:], "storage.heartbeat_s=50")
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        cli = subprocess.Popen([sys.executable, "-m", "study", *overrides, "storage=postgres",
                                f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=stdout,
                               stderr=stderr, text=True, env={**os.environ,
                                                              "STUDY_STORAGE_URL": url})

    def met_outage() -> bool:
        return "retrying in" in out.read_text() + err.read_text() or cli.poll() is not None

    try:
        deadline = time.monotonic() + 300  # generous: other jobs may share the CPUs
        while (done := _complete_trials(url)) == 0:
            assert cli.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "no trial finished within 300 s"
            time.sleep(0.1)
        assert done < 16, "the sweep finished before the outage: give it more work"
        # Down until the sweep's calls fail, then 5 s more: longer than the 3.5 s that
        # 4 attempts (delays 0.5, 1, 2 s) would wait.
        postgres.restart(pause_s=5, after=met_outage)
        code = cli.wait(timeout=600)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    logs = out.read_text() + err.read_text()
    assert code == 0, logs
    assert "retrying in" in logs  # the sweep met the outage, and waited it out
    assert tally(run_dir, url) == {"complete": 16, "points": 16, "lost": 0, "duplicated": 0,
                                   "running": 0, "failed": 0}
    trials = records.read_trials(run_dir)[0]  # written from the database after the outage
    assert len(trials) == 16 and trials["key"].is_unique


def _numba_pool_size(queue) -> None:
    import numba

    queue.put(numba.config.NUMBA_NUM_THREADS)


def test_a_worker_starts_its_thread_pools_at_its_share_of_the_cores() -> None:
    """numba sizes its pool when it loads, whatever set_num_threads says later: a worker's
    environment sets it before the process starts (the spawned process reads it), and pins
    a GPU each when there are several."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with workers._environment(workers.worker_environment(1, 0, [])):
        process = context.Process(target=_numba_pool_size, args=(queue,))
        process.start()
    try:
        assert queue.get(timeout=120) == 1
    finally:
        process.join(timeout=60)
    assert workers.worker_environment(3, 5, ["0", "1"]) == {
        "NUMBA_NUM_THREADS": "3", "OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": "1"}


def _report_sigint(queue) -> None:
    import signal

    queue.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def test_a_worker_is_spawned_deaf_to_ctrl_c_and_the_parent_keeps_its_handler() -> None:
    """A terminal's Ctrl-C reaches the whole process group: a worker spawned with SIGINT
    ignored cannot die of it in its imports (the parent stops it with SIGTERM), and the
    parent's own handler is back once the worker is spawned."""
    import signal

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    mine = signal.getsignal(signal.SIGINT)
    with workers._sigint_ignored():
        process = context.Process(target=_report_sigint, args=(queue,))
        process.start()
    assert signal.getsignal(signal.SIGINT) is mine
    try:
        assert queue.get(timeout=120) is True
    finally:
        process.join(timeout=60)


@pytest.mark.parametrize("sent", [b"", b"partial"])
def test_a_worker_whose_job_does_not_arrive_does_nothing(sent: bytes) -> None:
    """Its parent stopped (or died) before or while sending the job: no traceback."""
    receive, send = multiprocessing.Pipe(duplex=False)
    if sent:
        send.send_bytes(b"x" * 100)  # a message, then the end while reading the next
        receive.recv_bytes()
        os.write(send.fileno(), (1000).to_bytes(4, "big") + sent)  # a header, half a body
    send.close()
    assert workers._worker_entry(receive, 0) is None


def test_ctrl_c_while_the_workers_start_stops_cleanly(tmp_path: Path) -> None:
    """Ctrl-C to the whole process group just after a worker is spawned (a terminal's
    Ctrl-C while `workers=2` start): the parent stops after its population and says how
    to finish, the workers survive their imports and stop, no traceback, and nothing is
    left running (a worker that died before reading its job hung the parent forever)."""
    run_dir = tmp_path / "run"
    script = f"""
import os, runpy, signal, sys
sys.argv = ["study", *{[*TINY, "workers=2", f"hydra.run.dir={run_dir}"]!r}]
from study import workers
spawning = workers._sigint_ignored
sent = []
class ThenCtrlC:  # once, after the first worker is spawned
    def __init__(self):
        self.inner = spawning()
    def __enter__(self):
        return self.inner.__enter__()
    def __exit__(self, *exc):
        self.inner.__exit__(*exc)
        if not sent:
            sent.append(os.killpg(0, signal.SIGINT))
workers._sigint_ignored = ThenCtrlC
runpy.run_module("study", run_name="__main__", alter_sys=True)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, start_new_session=True)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("stopped after ")
    assert "nothing is lost. Finish with: python -m study +sweep=smoke" in lines[-1]
    assert lines[-1].endswith(f"workers=2 hydra.run.dir={run_dir}")
    left = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True)
    assert left.stdout.strip() == ""
    # The stopped invocation is recorded (it was not: its trials and time went missing).
    env = json.loads((run_dir / records.ENV).read_text())
    stopped = int(lines[-1].split()[2])
    assert [(i["stopped"], i["trials_trained"]) for i in env["invocations"]] == [
        (True, stopped)]
    assert "finished" not in env


@pytest.mark.slow  # a worker process's imports
def test_a_worker_in_bad_state_exits_3_without_a_traceback(tmp_path: Path) -> None:
    """A worker that cannot write its storage (a full disk, here a run directory that is a
    file) printed multiprocessing's traceback before the parent's one line."""
    from study.lease import Lease
    from study.plan import plan_from_overrides

    plan = plan_from_overrides(list(TINY))
    blocked = tmp_path / "not_a_directory"
    blocked.write_text("")
    job = workers.WorkerJob(plan, blocked, None, "smoke", "minimize", "val_loss_final",
                            "batched", "cpu", Lease(5.0, 30.0), 1, 1, os.getpid())
    script = ("import pickle, sys; from study import workers; "
              "workers.worker_main(pickle.loads(sys.stdin.buffer.read()), 0)")
    done = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(job), cwd=ROOT,
                          capture_output=True, timeout=300)
    err = done.stderr.decode()
    assert done.returncode == 3, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("[worker 0] ERROR study.workers: NotADirectoryError")
