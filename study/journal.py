"""The journal file of a run (`study.journal`): a lock that survives a killed writer, tail
repair and validation.

Optuna appends each write under a lock; two things go wrong when a writer dies:

- its symlink lock is only force-released after 30 s, so every other worker stalls;
- a last line cut short (SIGKILL mid-write, full disk) is silently skipped by readers, and
  the next append glues onto it: the journal is then corrupt in the middle.

So our journals use `TailRepairingLock`: an `fcntl.flock` (the kernel releases it when the
holder dies) that, once held, cuts off a partial last line left by a dead writer after
copying the file aside. `open_journal` also validates every line and refuses, without
touching it, a journal that is corrupt before its last line.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from optuna.storages.journal import JournalFileBackend, JournalStorage

from study import queue
from study.records import RecordError

log = logging.getLogger(__name__)


class TailRepairingLock(queue.JournalLock):
    """`flock` on `<journal>.flock`; once held, a dead writer's partial last line is removed.

    Note:
        Every writer of the journal must use this lock (all `study` processes do). Optuna's
        own default lock (a symlink) does not exclude it: do not point a plain Optuna
        program that writes at a journal a sweep is using.
    """

    def __init__(self, journal: Path) -> None:
        self._journal = Path(journal)
        self._path = self._journal.with_name(self._journal.name + ".flock")
        self._threads = threading.Lock()  # one flock per process: threads queue here
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.hold()
        # Holding the lock, nobody is writing: a partial last line is a dead writer's.
        repaired = repair_tail(self._journal)
        if repaired:
            log.warning("%s", repaired)
        return True

    def hold(self) -> None:
        """Take the lock without looking at the journal."""
        self._threads.acquire()
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._threads.release()


def repair_tail(path: Path) -> str | None:
    """Cut a partial last line off the journal at `path` (after a backup); what was done.

    Call it only while holding the journal's lock. Returns None when the file is empty or
    ends with a newline.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return None
        cut = _after_last_newline(fh, size)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        backup = path.with_name(f"{path.name}.{stamp}.bak")
        try:
            shutil.copyfile(path, backup)
        except OSError:
            backup.unlink(missing_ok=True)  # no empty or partial backup (a full disk)
            raise
        fh.truncate(cut)
        fh.flush()
        os.fsync(fh.fileno())
    return (f"repaired {path}: removed a partial last line of {size - cut} bytes (a writer "
            f"was killed mid-write or the disk was full); the file before the repair is "
            f"{backup}")


def _after_last_newline(fh, size: int, block: int = 1 << 16) -> int:
    end = size
    while end > 0:
        start = max(0, end - block)
        fh.seek(start)
        chunk = fh.read(end - start)
        at = chunk.rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def validate_journal(path: Path) -> list[str]:
    """The names of the studies in the journal at `path`; RecordError naming the first line
    that is not a valid Optuna journal record (not JSON, or a record Optuna cannot apply:
    an unknown op code, a missing field)."""
    with open(path, "rb") as fh:
        return validate_lines(path, fh)


def validate_lines(path: Path, lines: Iterable[bytes]) -> list[str]:
    """`validate_journal` of these `lines` of the journal at `path`."""
    replay = queue.replay_journal()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            record, reason = None, f"{type(err).__name__}: {err}"
        else:
            reason = "not an Optuna journal record"
        if isinstance(record, dict) and "op_code" in record:
            try:
                replay.apply_logs([record])
                continue
            except Exception as err:  # what Optuna would raise on opening it
                reason = (f"a record Optuna cannot apply: op_code {record['op_code']!r}, "
                          f"{type(err).__name__} {err}".rstrip())
        raise RecordError(
            f"{path} is corrupt at line {number} ({reason}), so it cannot be repaired "
            f"safely; nothing was changed. Restore it from a backup, or start a new run "
            f"directory."
        )
    return [study.study_name for study in replay.get_all_studies()]


def journal_study_names(path: Path) -> list[str]:
    """The names of the studies in the journal at `path`, read under its lock (validated:
    RecordError when corrupt; a partial last line is left for `open_journal` to repair)."""
    lock = TailRepairingLock(Path(path))
    lock.hold()
    try:
        with open(path, "rb") as fh:
            complete = fh.read().rpartition(b"\n")[0]
        return validate_lines(path, complete.splitlines())
    finally:
        lock.release()


def open_journal(path: Path) -> tuple[JournalStorage, str | None]:
    """The journal storage at `path`, validated and tail-repaired; (storage, repair note)."""
    path = Path(path)
    lock = TailRepairingLock(path)
    note = None
    if path.is_file():
        lock.hold()
        try:
            note = repair_tail(path)
            validate_journal(path)
        finally:
            lock.release()
    return JournalStorage(BatchingJournalBackend(path, lock)), note


class BatchingJournalBackend(JournalFileBackend):
    """Optuna's journal file backend whose writes between `begin_batch` and `end_batch` reach
    the file as one append: one lock, one write, one fsync, instead of one each per write.

    A sweep writes about six records per trial (queue, take, owner, status, metrics, tell);
    each append locks the file, writes, fsyncs and unlocks, and that was a large share of a
    small sweep's time. In a batch the file lock is held from `begin_batch` to `end_batch`,
    so no other writer can append in between: records written in the batch are read back
    (`read_logs`) right after the file's, at the numbers they will have in the file, and
    the storage's replay (and with it every state check, such as taking a trial) sees
    exactly what it would have seen unbatched. `end_batch` writes them, also after an
    error (the replay has applied them already).

    Durability is per batch: a process killed inside one leaves none of its records, as if
    it had been killed before (a taken trial stays WAITING, a trained one RUNNING, and is
    reclaimed and trained again).

    Batches nest (the outermost one writes). The caller must keep other threads from
    appending while a batch begins or ends (`study.queue.batched` holds the storage's
    thread lock there).
    """

    def __init__(self, path: Path, lock: TailRepairingLock) -> None:
        super().__init__(str(path), lock_obj=lock)
        self._batch_lock = lock
        self._depth = 0
        self._pending: list[dict[str, Any]] = []
        self._in_file = 0  # records in the file while a batch holds the lock

    def begin_batch(self) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        self._batch_lock.acquire()
        try:
            known = max(self._log_number_offset)
            self._in_file = known + sum(1 for _ in super().read_logs(known))
        except BaseException:
            self._depth = 0
            self._batch_lock.release()
            raise

    def end_batch(self) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        pending, self._pending = self._pending, []
        try:
            if pending:
                _append(self._file_path, pending)
        finally:
            self._batch_lock.release()

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if self._depth == 0:
            super().append_logs(logs)
            return
        # As read back from the file: JSON turns tuples into lists.
        self._pending.extend(_read_back(log) for log in logs)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        if self._depth == 0:
            yield from super().read_logs(log_number_from)
            return
        if log_number_from < self._in_file:
            yield from super().read_logs(log_number_from)
        yield from self._pending[max(0, log_number_from - self._in_file):]


def _read_back(record: dict[str, Any]) -> dict[str, Any]:
    """`record` as `json.loads(_line(record))` returns it: a fresh copy with lists for
    tuples and plain str, int and float for their subclasses. Copied directly where every
    value is one JSON writes as such (a third of the round trip's time on a trial's metrics
    record); anything else takes the round trip, which raises for what JSON cannot write."""
    try:
        return _json_copy(record)
    except _NotPlain:
        return json.loads(_line(record))


class _NotPlain(Exception):
    """A value that `_json_copy` leaves to the JSON round trip."""


def _json_copy(value: Any) -> Any:
    # The base types' own conversions, as JSON writes a subclass (a str enum's value, not
    # its __str__).
    if isinstance(value, str):
        return str.__str__(value)
    if value is None or value is True or value is False:
        return value
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int.__int__(value)
    if isinstance(value, dict):
        if not all(type(k) is str for k in value):
            raise _NotPlain  # JSON turns other keys into strings
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_copy(v) for v in value]
    raise _NotPlain


def _line(record: dict[str, Any]) -> str:
    """One journal line, as Optuna's backend writes it."""
    return json.dumps(record, separators=(",", ":"))


def _append(path: str, records: list[dict[str, Any]]) -> None:
    """Append `records` to the journal at `path` with one write and one fsync (the caller
    holds the lock)."""
    text = "".join(_line(r) + "\n" for r in records)
    with open(path, "ab") as fh:
        fh.write(text.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())
