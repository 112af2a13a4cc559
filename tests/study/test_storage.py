"""Storage: journal repair and validation, URL checks, retries, masking, leases."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from study import lease, queue, records, storage
from study.engine import ReferenceEngine
from study.journal import TailRepairingLock, repair_tail
from study.lease import Lease
from study.plan import plan_from_overrides
from study.records import trials_frame
from study.schema import ConfigError
from study.storage import open_study
from study.sweep import run_sweep

# The tiny sweep of tests/study/conftest.py (TINY), as the run that wrote the fixture.
TINY = ("+sweep=smoke", "train.epochs=1", "model.width=8", "report=false", "progress=false")
FIXTURES = Path(__file__).resolve().parent / "fixtures"

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_plan():
    return plan_from_overrides(["+sweep=smoke", "train.epochs=1", "model.width=8"])


@pytest.fixture(scope="module")
def finished_journal(tmp_path_factory, tiny_plan) -> bytes:
    """The journal of a finished tiny sweep (bytes)."""
    run_dir = tmp_path_factory.mktemp("finished")
    study = open_study(run_dir, None, "tiny", "minimize")
    run_sweep(tiny_plan, study, ReferenceEngine(), CPU, run_dir, "val_loss_final")
    return (run_dir / records.JOURNAL).read_bytes()


# ---------------------------------------------------------------------------- journal
def test_a_partial_last_line_is_backed_up_cut_and_reported(tmp_path: Path, finished_journal,
                                                           caplog) -> None:
    journal = tmp_path / records.JOURNAL
    cut_short = finished_journal + b'{"op_code":6,"worker_id":"x","trial_id":3,"sta'
    journal.write_bytes(cut_short)
    with caplog.at_level("WARNING"):
        study = open_study(tmp_path, None, "tiny", "minimize")
    repaired = journal.read_bytes()
    assert repaired.startswith(finished_journal) and b'"sta' not in repaired[len(finished_journal):]
    backups = list(tmp_path.glob(f"{records.JOURNAL}.*.bak"))
    assert len(backups) == 1 and backups[0].read_bytes() == cut_short
    assert f"repaired {journal}: removed a partial last line of 46 bytes" in caplog.text
    assert len(trials_frame(queue.finished(study))) == 16  # every finished trial is still COMPLETE


def test_a_journal_corrupt_before_its_last_line_is_refused_and_left_alone(
        tmp_path: Path, finished_journal) -> None:
    lines = finished_journal.splitlines(keepends=True)
    lines[5] = lines[5][:20] + b"\n"
    journal = tmp_path / records.JOURNAL
    journal.write_bytes(b"".join(lines))
    before = journal.read_bytes()
    with pytest.raises(records.RecordError, match=r"is corrupt at line 6 \(JSONDecodeError"):
        open_study(tmp_path, None, "tiny", "minimize")
    assert journal.read_bytes() == before
    assert not list(tmp_path.glob("*.bak"))


def test_a_backup_the_disk_has_no_room_for_is_removed_not_left_empty(
        tmp_path: Path, finished_journal, monkeypatch) -> None:
    import errno

    journal = tmp_path / records.JOURNAL
    cut_short = finished_journal + b'{"op_code":6'
    journal.write_bytes(cut_short)

    def full_disk(source, target):
        Path(target).write_bytes(b"")  # what copyfile leaves when the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("study.journal.shutil.copyfile", full_disk)
    with pytest.raises(OSError, match="No space left"):
        repair_tail(journal)
    assert journal.read_bytes() == cut_short and not list(tmp_path.glob("*.bak"))


@pytest.mark.parametrize("line", [b'{"op_code": 8}\n', b'{"op_code": 42, "worker_id": "w"}\n',
                                  b'{"op_code": 0, "worker_id": "w"}\n'])
def test_a_journal_record_optuna_cannot_apply_is_refused(tmp_path: Path, finished_journal,
                                                         line: bytes) -> None:
    lines = finished_journal.splitlines(keepends=True)
    lines[5] = line
    journal = tmp_path / records.JOURNAL
    journal.write_bytes(b"".join(lines))
    with pytest.raises(records.RecordError, match=r"is corrupt at line 6 \(a record Optuna "
                                                   r"cannot apply"):
        open_study(tmp_path, None, "tiny", "minimize")
    assert journal.read_bytes() == b"".join(lines)


def test_a_study_is_loaded_before_it_is_created(tmp_path: Path, finished_journal) -> None:
    journal = tmp_path / records.JOURNAL
    journal.write_bytes(finished_journal)
    open_study(tmp_path, None, "tiny", "minimize")
    assert journal.read_bytes() == finished_journal  # no create-study record appended


def test_the_lock_of_a_killed_writer_is_free_at_once(tmp_path: Path) -> None:
    journal = tmp_path / records.JOURNAL
    journal.write_bytes(b"")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from study.journal import "
        "TailRepairingLock; TailRepairingLock(Path(sys.argv[1])).acquire(); "
        "print('held', flush=True); time.sleep(60)"), str(journal)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    started = time.perf_counter()
    lock = TailRepairingLock(journal)
    lock.acquire()
    lock.release()
    assert time.perf_counter() - started < 1.0  # Optuna's own lock: 30 s


def test_a_study_of_another_storage_format_is_refused(tmp_path: Path) -> None:
    study = open_study(tmp_path, None, "s", "minimize")
    study.set_user_attr(records.STORAGE_VERSION_ATTR, 99)
    with pytest.raises(records.RecordError, match="written in storage format 99; this version "
                                                  "of study reads format 2"):
        open_study(tmp_path, None, "s", "minimize")


# ------------------------------------------------------------------------------- URLs
def test_passwords_are_masked() -> None:
    text = "postgresql+psycopg://alice:p@ss:w0rd@db.example:5432/study and sqlite:///x.db"
    assert storage.mask_url(text) == ("postgresql+psycopg://alice:***@db.example:5432/study "
                                      "and sqlite:///x.db")
    assert storage.redact({"a": ["x://u:pw@h/d"], "n": 3}) == {"a": ["x://u:***@h/d"], "n": 3}


def test_a_registered_password_is_masked_outside_a_url_too() -> None:
    storage.register_url("postgresql://u:Spaced pass/w0rd@h/db")
    assert storage.mask_url("a driver's message: 'Spaced pass/w0rd' was refused") == (
        "a driver's message: '***' was refused")


def test_a_port_that_is_not_a_number_is_refused_with_the_password_masked() -> None:
    for url in ("postgresql://u:Ab+1/q2== z9@127.0.0.1:54x2/db", "postgresql://h:99999/db"):
        with pytest.raises(ConfigError, match="is not a number from 1 to 65535") as err:
            storage.url_scheme(url)
        assert "q2==" not in str(err.value)
    assert storage.url_scheme("postgresql://u:Ab+1/q2== z9@127.0.0.1:5432/db") == "postgresql"


def test_an_unknown_url_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"storage.url: unknown URL scheme 'redis' in "
                                          r"'redis://u:\*\*\*@h/0'"):
        storage.url_scheme("redis://u:secret@h/0")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite://?cache=shared"])
def test_an_in_memory_sqlite_database_is_refused(url: str) -> None:
    """Nothing it holds outlives the process: a stopped run said "nothing is lost" and its
    resume trained everything again (and the heartbeat's own connection found no tables)."""
    with pytest.raises(ConfigError, match="is an in-memory SQLite database"):
        storage.url_scheme(url)
    assert storage.url_scheme("sqlite:///runs.db") == "sqlite"


def test_sqlite_is_refused_for_several_workers() -> None:
    storage.check_workers("sqlite:///x.db", 1)
    with pytest.raises(ConfigError, match="workers: SQLite cannot serve 2 workers"):
        storage.check_workers("sqlite:///x.db", 2)


def test_a_plain_postgresql_url_names_an_installed_driver() -> None:
    pytest.importorskip("psycopg")
    assert storage.rdb_url("postgresql://u:p@h/d") == "postgresql+psycopg://u:p@h/d"


def test_an_unreachable_database_is_retried_then_reported() -> None:
    pytest.importorskip("psycopg")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(storage.StorageError) as err:
        storage.open_rdb(f"postgresql://study:hunter2@127.0.0.1:{port}/study", attempts=2)
    message = str(err.value)
    assert message.startswith(f"storage: cannot connect to postgresql://study:***@127.0.0.1:"
                              f"{port}/study after 2 attempts: ")
    assert "hunter2" not in message
    assert time.perf_counter() - started >= 0.5  # one backoff delay


# ----------------------------------------------------------------------------- leases
def _running(study: optuna.Study, owner: dict | None) -> optuna.trial.FrozenTrial:
    study.enqueue_trial({}, user_attrs={"key": "k"})
    trial = study.ask()
    if owner is not None:
        trial.set_user_attr("worker", owner)
    return study.get_trials(deepcopy=False)[trial.number]


def test_staleness_dead_pid_here_silent_heartbeat_anywhere_and_unowned_trials(
        tmp_path: Path) -> None:
    study = open_study(tmp_path, None, "s", "minimize")
    me = lease.Worker.here()
    dead = subprocess.Popen(["true"])
    dead.wait()
    now = time.time()
    alive_here = _running(study, {"host": me.host, "pid": os.getpid(), "id": "a"})
    dead_here = _running(study, {"host": me.host, "pid": dead.pid, "id": "b"})
    elsewhere = _running(study, {"host": "other-host", "pid": 1, "id": "c"})
    unowned = _running(study, None)
    beats = {"heartbeat:a": now, "heartbeat:c": now - 5}
    assert not lease.is_stale(alive_here, me, beats, now, grace=10)
    assert lease.is_stale(dead_here, me, beats, now, grace=10)
    assert not lease.is_stale(elsewhere, me, beats, now, grace=10)
    assert lease.is_stale(elsewhere, me, beats, now, grace=4)
    assert not lease.is_stale(unowned, me, beats, now, grace=10)
    assert lease.is_stale(unowned, me, beats, now + 11, grace=10)


def test_a_stale_trial_is_failed_and_requeued_by_exactly_one_worker(tmp_path: Path) -> None:
    study = open_study(tmp_path, None, "s", "minimize")
    stale = _running(study, {"host": "other-host", "pid": 1, "id": "gone"})
    queue.heartbeat(study)("heartbeat:gone", time.time() - 100)
    requeued = []
    first = queue.reclaim_stale(study, [stale], lease.Worker.here(), 1.0, requeued.append)
    # A second worker acting on the same (old) snapshot loses the FAIL transition.
    second = queue.reclaim_stale(study, [stale], lease.Worker.here(), 1.0, requeued.append)
    assert (first, second, len(requeued)) == (1, 0, 1)
    assert study.get_trials(deepcopy=False)[stale.number].state == TrialState.FAIL


def test_only_the_lowest_live_trial_of_a_point_may_train(tmp_path: Path) -> None:
    study = open_study(tmp_path, None, "s", "minimize")
    for key in ("a", "a", "b", "c"):
        study.enqueue_trial({}, user_attrs={"key": key})
    done = study.ask()  # trial 0, key a
    study.tell(done, 1.0)
    taken = [study.ask().number for _ in range(3)]  # 1 (a), 2 (b), 3 (c)
    study.enqueue_trial({}, user_attrs={"key": "b"})  # 4: b queued twice
    assert lease.duplicates([*taken, 4], study.get_trials(deepcopy=False)) == {1, 4}


def test_a_stopped_worker_gives_its_taken_trials_back(tmp_path: Path, tiny_plan) -> None:
    study = open_study(tmp_path, None, "tiny", "minimize")
    calls = []

    def stop_after_first_population() -> bool:
        calls.append(datetime.now())
        return len(trials_frame(queue.finished(study))) > 0

    outcome = run_sweep(tiny_plan, study, ReferenceEngine(), CPU, tmp_path, "val_loss_final",
                        leases=Lease(1, 5), stop=stop_after_first_population)
    assert outcome.stopped and 0 < outcome.trained < 16
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    again = run_sweep(tiny_plan, study, ReferenceEngine(), CPU, tmp_path, "val_loss_final")
    assert again.trained + outcome.trained == 16
    keys = trials_frame(queue.finished(study))["key"]
    assert sorted(keys) == sorted(p.trial.key() for p in tiny_plan.points)


@pytest.mark.slow
def test_a_run_directory_written_before_the_queue_module_resumes(
        tmp_path: Path, tiny_baseline: Path, run_checks, study_cli) -> None:
    """fixtures/interrupted_smoke: the tiny sweep as study 0.1.0 wrote it before the queue
    had a module of its own (storage format 2), stopped with trials 0-7 told and 8-12 taken
    by a worker long gone. It resumes: the taken trials are reclaimed (their holder's
    heartbeat is old), every point is told once, and the numbers equal an uninterrupted
    run's: those trained now to the bit, those told by 0.1.0 (its layer-major CPU engine,
    whose products round in another order than the trial-major kernel's) within the
    engine's float32 bound."""
    tally, _ = run_checks
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "interrupted_smoke", run_dir)
    done = study_cli(*TINY, f"hydra.run.dir={run_dir}", f"resume={run_dir}", expect=0)
    assert "8 trials trained, 8 already done" in done.stdout
    counts = tally(run_dir)
    assert counts["complete"] == counts["points"] == 16
    assert counts["lost"] == counts["duplicated"] == counts["running"] == 0
    got = records.read_trials(run_dir)[0].set_index("key").sort_index()
    want = records.read_trials(tiny_baseline)[0].set_index("key").sort_index()
    assert list(got.index) == list(want.index)
    assert sorted(got.columns) == sorted(want.columns)
    columns = [c for c in want.columns if c != "trial"]
    numbers = [c for c in columns if pd.api.types.is_float_dtype(want[c])]
    others = [c for c in columns if c not in numbers]
    assert got[others].equals(want[others])
    assert np.allclose(got[numbers].to_numpy(), want[numbers].to_numpy(), rtol=1e-4,
                       atol=1e-6, equal_nan=True)
    exact = (got[numbers].fillna(0) == want[numbers].fillna(0)).all(axis=1)
    assert exact.sum() >= 8  # at least the points trained after the resume


def test_a_database_that_lost_the_study_of_a_run_with_results_is_refused(tmp_path: Path
                                                                         ) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    storage.open_study(tmp_path, url, "other", "minimize")  # the database holds another
    with pytest.raises(records.RecordError, match="holds no study 'mine'"):
        storage.open_study(tmp_path, url, "mine", "minimize", results=["trials.parquet"])
    names = [s.study_name for s in optuna.get_all_study_summaries(url)]
    assert names == ["other"]  # nothing created
    assert storage.open_study(tmp_path, url, "mine", "minimize").study_name == "mine"


def test_a_study_recorded_without_data_digests_resumes_with_them(tmp_path: Path) -> None:
    study = storage.open_study(tmp_path, None, "s", "minimize")
    storage.check_same_config(study, {"task": "table"})
    digest = {f"{storage.DATA_DIGEST} /d.csv": "abc"}
    storage.check_same_config(study, {"task": "table", **digest})  # recorded before digests
    (tmp_path / "b").mkdir()
    fresh = storage.open_study(tmp_path / "b", None, "s", "minimize")
    storage.check_same_config(fresh, {"task": "table", **digest})
    with pytest.raises(ConfigError, match=r"data digest of /d\.csv \(was 'abc', now 'xyz'\)"):
        storage.check_same_config(fresh, {"task": "table", f"{storage.DATA_DIGEST} /d.csv": "xyz"})
