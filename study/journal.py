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
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

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
    return JournalStorage(JournalFileBackend(str(path), lock_obj=lock)), note
