"""SIGKILL at random moments, resume each time: nothing lost, nothing run twice.

A sweep (journal storage, one or two workers) is killed with SIGKILL, process group and
all, at random moments (while Python starts, while it enqueues, trains, writes curves or
appends to the journal), at least 10 times, and resumed each time. At the end every point
has exactly one COMPLETE trial and trials.parquet equals an uninterrupted run's on every
metric. Ctrl-C stops after the current population with nothing left RUNNING.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Slower than the other tests' tiny sweep so that kills land during training too.
SWEEP = ("+sweep=smoke", "train.epochs=3", "model.width=8", "report=false", "progress=false",
         "storage.heartbeat_s=1", "storage.grace_s=3")


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "study", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, study_cli) -> tuple[Path, float]:
    """An uninterrupted run of the sweep: its directory and how many seconds it took."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    started = time.perf_counter()
    study_cli(*SWEEP, f"hydra.run.dir={run_dir}", expect=0)
    return run_dir, time.perf_counter() - started


@pytest.fixture(scope="module")
def baseline(uninterrupted) -> Path:
    return uninterrupted[0]


def journal_bytes(run_dir: Path) -> int:
    path = run_dir / "study.journal"
    return path.stat().st_size if path.exists() else 0


def kill_moment(process: subprocess.Popen, run_dir: Path, rng: random.Random, kill: int,
                seconds: float, full_journal: int) -> bool:
    """Wait for kill `kill`'s moment; False if the run ended first. Even kills come at a
    random time within an uninterrupted run's lifetime on this machine (most of it is
    start-up); odd ones once the journal has grown by a random share of what an
    uninterrupted run appends after what is there (enqueueing, takes, tells), then a
    random few milliseconds more: on a fast machine as on a slow one, kills land in
    start-up, enqueueing, training, curves and journal appends."""
    if kill % 2 == 0:
        time.sleep(rng.uniform(0.05, 1.0) * seconds)
        return process.poll() is None
    start = journal_bytes(run_dir)
    target = start + 1 + rng.random() * max(full_journal - start, 1)
    while journal_bytes(run_dir) < target:
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.05))
    return process.poll() is None


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path, uninterrupted,
                                                               run_checks, study_cli) -> None:
    tally, same_results = run_checks
    baseline, seconds = uninterrupted
    full_journal = journal_bytes(baseline)
    rng = random.Random(7)
    run_dir = tmp_path / "run"
    kills, finished_early = 0, 0
    while kills < 10:
        workers = 1 + kills % 2
        process = start(*SWEEP, f"workers={workers}", f"hydra.run.dir={run_dir}")
        if not kill_moment(process, run_dir, rng, kills, seconds, full_journal):
            # It finished before its moment (a resumed run has less left): start over
            # elsewhere.
            _, err = process.communicate()
            finished_early += 1
            assert process.returncode == 0, err
            assert finished_early < 10
            run_dir = tmp_path / f"run{finished_early}"
            continue
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        kills += 1
    time.sleep(3.5)  # past grace_s: a trial taken by a holder never recorded is stale now
    study_cli(*SWEEP, f"hydra.run.dir={run_dir}", expect=0)
    counts = tally(run_dir)
    repairs = len(list(run_dir.glob("study.journal.*.bak")))
    print(f"kills={kills} finished before their kill={finished_early} "
          f"journal tail repairs={repairs} {counts}")
    assert counts["lost"] == 0 and counts["duplicated"] == 0 and counts["running"] == 0
    assert counts["complete"] == counts["points"] == 16
    same_results(run_dir, baseline)


@pytest.mark.slow
def test_ctrl_c_stops_after_the_population_and_the_resume_finishes(tmp_path: Path, baseline,
                                                                 run_checks, study_cli) -> None:
    tally, same_results = run_checks
    run_dir = tmp_path / "run"
    process = start(*SWEEP, "workers=2", f"hydra.run.dir={run_dir}")
    journal = run_dir / "study.journal"
    deadline = time.time() + 120
    while time.time() < deadline and b'"status"' not in (
            journal.read_bytes() if journal.exists() else b""):
        time.sleep(0.2)  # until a first trial is told
    process.send_signal(signal.SIGINT)  # the parent only, as `kill -INT` would
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "stopping after the current population" in err
    assert "Finish with: python -m study" in err
    counts = tally(run_dir)
    assert counts["running"] == 0 and counts["duplicated"] == 0
    study_cli(*SWEEP, f"hydra.run.dir={run_dir}", expect=0)
    counts = tally(run_dir)
    assert counts["lost"] == 0 and counts["duplicated"] == 0 and counts["complete"] == 16
    same_results(run_dir, baseline)
