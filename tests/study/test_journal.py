"""Batched journal writes (`BatchingJournalBackend`, `queue.batched`): one append per batch,
read back at once by the writer, invisible to other writers until it ends, and the same
study as unbatched writes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from study import queue
from study.journal import BatchingJournalBackend, open_journal

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(path: Path) -> optuna.Study:
    storage, _ = open_journal(path)
    return optuna.create_study(storage=storage, study_name="s", load_if_exists=True)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def _record(study: optuna.Study, n: int) -> None:
    """n trials queued, taken and told, as a sweep writes them."""
    for i in range(n):
        study.enqueue_trial({"x": float(i)}, user_attrs={"key": str(i)})
    for _ in range(n):
        trial = study.ask()
        trial.set_user_attr("status", "converged")
        study.tell(trial, float(trial.params.get("x", 0.0)) if trial.params else 0.0)


def _view(study: optuna.Study) -> list[tuple]:
    return [(t.number, t.state, t.params, t.user_attrs, t.values)
            for t in study.get_trials(deepcopy=False)]


def test_the_study_is_the_one_unbatched_writes_make(tmp_path: Path) -> None:
    plain, batched = _study(tmp_path / "plain.journal"), _study(tmp_path / "batched.journal")
    _record(plain, 5)
    with queue.batched(batched):
        _record(batched, 5)
    assert _view(batched) == _view(plain)
    assert _lines(tmp_path / "batched.journal") == _lines(tmp_path / "plain.journal")
    # and a reader that opens the file afterwards sees the same study
    assert _view(_study(tmp_path / "batched.journal")) == _view(plain)


def test_a_batch_is_one_append_with_one_fsync(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "study.journal"
    study = _study(path)
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    before = _lines(path)
    with queue.batched(study):
        _record(study, 4)
        assert _lines(path) == before  # nothing reached the file yet
        assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 4
    assert len(synced) == 1
    assert _lines(path) > before


def test_nested_batches_write_once_at_the_outermost_end(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    study = _study(path)
    before = _lines(path)
    with queue.batched(study):
        with queue.batched(study):
            _record(study, 2)
        assert _lines(path) == before
    assert _lines(path) > before


def test_records_of_a_batch_that_raised_are_written(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    study = _study(path)
    with pytest.raises(RuntimeError), queue.batched(study):
        _record(study, 3)
        raise RuntimeError("boom")
    assert len(_study(path).get_trials()) == 3


def test_another_writer_waits_for_the_batch_and_both_agree(tmp_path: Path) -> None:
    """A second storage on the same file (another worker) cannot append inside a batch:
    its write lands after the batch's records, and both storages replay the same study."""
    path = tmp_path / "study.journal"
    mine, other = _study(path), _study(path)
    wrote = threading.Event()

    def write_other() -> None:
        other.enqueue_trial({"x": 99.0}, user_attrs={"key": "other"})
        wrote.set()

    with queue.batched(mine):
        _record(mine, 2)
        thread = threading.Thread(target=write_other)
        thread.start()
        time.sleep(0.3)
        assert not wrote.is_set()  # blocked on the file lock the batch holds
        _record(mine, 1)
    thread.join(timeout=30)
    assert wrote.is_set()
    assert _view(mine) == _view(other)
    assert [t.user_attrs["key"] for t in mine.get_trials()] == ["0", "1", "0", "other"]


def test_an_rdb_storage_is_left_unbatched(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    with queue.batched(study):
        _record(study, 2)
    assert len(study.get_trials()) == 2


def test_open_journal_uses_the_batching_backend(tmp_path: Path) -> None:
    storage, _ = open_journal(tmp_path / "study.journal")
    assert isinstance(storage._backend, BatchingJournalBackend)


def test_a_batched_record_reads_back_as_the_json_round_trip_gives_it() -> None:
    import enum
    import json

    import numpy as np

    from study.journal import _line, _read_back

    class Level(enum.IntEnum):
        HIGH = 3

    class Name(str):
        pass

    class Color(str, enum.Enum):
        RED = "red"

    odd = {"tuple": (1, 2.5, [True, None, float("nan"), float("inf"), -0.0]),
           "numpy float": np.float64(0.1), "int enum": Level.HIGH, "str": Name("x"),
           "str enum": Color.RED,
           "nested": {"pairs": (("g", 1),)}, "int key": {1: "one", "x": 2.0},
           "float key": {1.5: None}, "empty": ([], {}, ())}
    for record in (odd, *({k: v} for k, v in odd.items())):
        back, want = _read_back(record), json.loads(_line(record))
        assert repr(back) == repr(want)  # types (list, float, int), NaN and key order
        assert _line(back) == _line(want)
    fresh = {"list": [1, [2]]}
    back = _read_back(fresh)
    back["list"][1].append(3)
    assert fresh == {"list": [1, [2]]}  # a copy: the caller's objects are not shared
    with pytest.raises(TypeError):
        _read_back({"x": np.int64(3)})  # what JSON cannot write fails as it did


def test_a_sweep_study_reads_back_batched_as_unbatched(tmp_path: Path) -> None:
    # Records with tuples and non-str keys in their attributes, written batched and not.
    def record(study: optuna.Study) -> None:
        study.enqueue_trial({"x": 1.0}, user_attrs={"key": "a", "betas": (0.9, 0.999)})
        trial = study.ask()
        trial.set_user_attr("metrics", {"loss": float("nan"), "steps": (1, 2)})
        trial.set_user_attr("by_step", {3: 0.5})
        study.tell(trial, 0.5)

    plain = _study(tmp_path / "plain.journal")
    record(plain)
    batched = _study(tmp_path / "batched.journal")
    with queue.batched(batched):
        record(batched)
        inside = repr(_view(batched))
    assert inside == repr(_view(plain))
    assert repr(_view(_study(tmp_path / "batched.journal"))) == repr(_view(plain))
