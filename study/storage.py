"""Open the Optuna storage of a run, the journal file (kill-safe) or an RDB URL (PostgreSQL),
and the study in it (`open_study`, `check_same_config`).

Journal file (`study.journal` in the run directory, the default). Optuna appends each write
under a lock; two things go wrong when a writer dies:

- its symlink lock is only force-released after 30 s, so every other worker stalls;
- a last line cut short (SIGKILL mid-write, full disk) is silently skipped by readers, and
  the next append glues onto it: the journal is then corrupt in the middle.

So our journals use `TailRepairingLock`: an `fcntl.flock` (the kernel releases it when the
holder dies) that, once held, cuts off a partial last line left by a dead writer after
copying the file aside. `open_journal` also validates every line and refuses, without
touching it, a journal that is corrupt before its last line.

RDB URL (`postgresql://...`, `mysql://...`, `sqlite:///...`): the scheme and its driver are
checked first; connecting is retried with exponential backoff; every storage call is retried
the same way on a lost connection, and for at least 30 s so that a server restart mid-sweep
is waited out (`RetryingStorage`, `open_rdb`). Passwords never leave this process:
`mask_url` / `redact` replace them with `***` in anything printed or written.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, get_storage
from optuna.storages.journal import JournalFileBackend, JournalStorage

from study import queue, records
from study.config import ConfigError
from study.records import RecordError

log = logging.getLogger(__name__)

# URL dialect -> SQLAlchemy drivers we accept, preferred first: (driver, module, pip package).
SCHEMES = {
    "postgresql": (("psycopg", "psycopg", "study[postgres]"),
                   ("psycopg2", "psycopg2", "psycopg2-binary")),
    "mysql": (("mysqldb", "MySQLdb", "mysqlclient"), ("pymysql", "pymysql", "pymysql")),
    "sqlite": (("pysqlite", "sqlite3", "(part of Python)"),),
}
# user:password@ -> user:***@. A password may hold any character but a newline ("/", "+",
# "=", spaces, quotes: drivers accept them); it runs to the last "@" of the line, so a line
# with several URLs is masked from the first password to the last host (never too little).
_PASSWORD = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^:/@\s]*):[^\n]*@")
# Passwords of the URLs this process was given (`register_url`): masked wherever they occur,
# also outside a URL (a YAML line folded at a space, a driver's message).
_SECRETS: set[str] = set()


class StorageError(RuntimeError):
    """The storage cannot be reached or used; the message says which and why (password masked)."""


# ---------------------------------------------------------------------------- passwords
def mask_url(text: str) -> str:
    """`text` with the password of every URL in it, and every registered password
    (`register_url`), replaced by `***`."""
    text = _PASSWORD.sub(lambda m: m.group(0) if m.group(0).endswith(":PASSWORD@")
                         else f"{m.group('head')}:***@", text)  # keep our own hints' placeholder
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


def url_password(url: str) -> str | None:
    """The password of `url` as its driver reads it (`scheme://user:PASSWORD@host`), or None."""
    match = re.match(r"^[A-Za-z][\w+.-]*://[^:/@\s]*:([^@]*)@", url, re.DOTALL)
    return match.group(1) if match and match.group(1) else None


def register_url(url: str | None) -> None:
    """Remember the password of `url` so that `mask_url` masks it wherever it appears.

    Passwords shorter than 4 characters are not registered (they would mask ordinary
    words); within a URL they are masked all the same.
    """
    password = url_password(url) if url else None
    if password and len(password) >= 4:
        _SECRETS.add(password)
        _SECRETS.add(password.replace('"', '\\"'))  # as JSON writes it


def redact(value: Any) -> Any:
    """`value` (nested dicts, lists, strings) with every URL password masked."""
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


# --------------------------------------------------------------------------------- URLs
def url_scheme(url: str) -> str:
    """The dialect of an RDB URL (`postgresql+psycopg://` -> `postgresql`), checked."""
    return _parse(url)[0]


def rdb_url(url: str) -> str:
    """`url` with an installed driver named (`postgresql://` -> `postgresql+psycopg://`).

    SQLAlchemy's default driver differs between releases (psycopg2 in 2.0, psycopg in 2.1):
    naming the one that is installed makes a plain `postgresql://` work with either.
    """
    dialect, driver, rest = _parse(url)
    return f"{dialect}+{driver}://{rest}"


def _parse(url: str) -> tuple[str, str, str]:
    match = re.match(r"^([A-Za-z][\w.-]*)(?:\+([\w.-]+))?://(.*)$", url, re.DOTALL)
    dialect = match.group(1).lower() if match else ""
    if dialect not in SCHEMES:
        shown = f"{dialect!r}" if dialect else "none"
        raise ConfigError(
            f"storage.url: unknown URL scheme {shown} in {mask_url(url)!r} (expected one of "
            f"{', '.join(s + '://' for s in SCHEMES)}; leave storage.url null for the journal "
            f"file in the run directory)"
        )
    _check_port(match.group(3), url)
    named = match.group(2)
    candidates = [c for c in SCHEMES[dialect] if named in (None, c[0])] or [(named, named, named)]
    for driver, module, _ in candidates:
        if importlib.util.find_spec(module) is not None:
            return dialect, driver, match.group(3)
    raise ConfigError(
        f"storage.url: no {dialect} driver is installed (pip install {candidates[0][2]})"
    )


def _check_port(rest: str, url: str) -> None:
    """Refuse a URL whose port is not a number (the driver's error would print the URL)."""
    # As SQLAlchemy reads it: user, ":" password (up to the first "@"), "@", host, port.
    after_user = re.sub(r"^[^:/]*(?::[^@]*)?@", "", rest, count=1, flags=re.DOTALL)
    authority = re.split(r"[/?]", after_user, maxsplit=1)[0]
    if authority.startswith("["):  # [ipv6]:port
        authority = authority.partition("]")[2]
    port = authority.partition(":")[2] if ":" in authority else ""
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"storage.url: the port {port!r} of {mask_url(url)!r} is not a "
                          f"number from 1 to 65535")


def check_workers(url: str | None, workers: int) -> None:
    """Refuse storages that cannot serve `workers` processes (SQLite: not exactly-once)."""
    if workers < 1:
        raise ConfigError(f"workers: must be >= 1, got {workers}")
    if workers > 1 and url is not None and url_scheme(url) == "sqlite":
        raise ConfigError(
            f"workers: SQLite cannot serve {workers} workers (two workers can take the same "
            f"trial); use storage=journal on one machine or storage=postgres"
        )


# ------------------------------------------------------------------------------ journal
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


# ---------------------------------------------------------------------------------- RDB
_TRANSIENT: tuple[type[BaseException], ...] = (optuna.exceptions.StorageInternalError,)
try:  # SQLAlchemy comes with Optuna; its errors are what a lost connection raises
    from sqlalchemy.exc import DBAPIError, OperationalError

    _TRANSIENT = (*_TRANSIENT, OperationalError, DBAPIError)
except ImportError:  # pragma: no cover
    pass


def with_retries(call: Callable[[], Any], attempts: int, what: str, url: str,
                 first_delay: float = 0.5, window_s: float = 0.0,
                 max_delay: float = 5.0) -> Any:
    """`call()`, retried on a transient storage error with delays doubling from
    `first_delay` (at most `max_delay` apart) until `attempts` attempts have failed AND
    `window_s` seconds have passed since the first failure; then StorageError."""
    delay, attempt, first_failure = first_delay, 0, None
    while True:
        attempt += 1
        try:
            return call()
        except _TRANSIENT as err:
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if attempt >= attempts and now - first_failure >= window_s:
                cause = err.__cause__ or err  # Optuna wraps the driver's error: show that
                reason = str(getattr(cause, "orig", None) or cause).strip().splitlines()[0]
                raise StorageError(
                    f"storage: cannot {what} {mask_url(url)} after {attempt} attempts: "
                    f"{mask_url(reason)}"
                ) from None
            log.warning("storage %s: %s failed (%s); retrying in %.1f s", mask_url(url),
                        what.removesuffix(" to"), type(err).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)


class RetryingStorage(BaseStorage):
    """A storage whose every call is retried with backoff when the connection drops.

    Note:
        A retried write may have been applied before the connection dropped. The sweep
        tolerates that: a trial created twice is dropped as a duplicate when taken, and a
        trial taken by a worker that never recorded itself goes stale and is re-queued.
    """

    def __init__(self, inner: BaseStorage, url: str, attempts: int,
                 window_s: float = 0.0) -> None:
        self._inner, self._url, self._attempts, self._window_s = inner, url, attempts, window_s

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)


def _retrying_method(name: str) -> Callable[..., Any]:
    def method(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(getattr(self._inner, name), *args, **kwargs)
        return with_retries(call, self._attempts, name.replace("_", " "), self._url,
                            window_s=self._window_s)

    method.__name__ = name
    return method


for _name in sorted(set(BaseStorage.__abstractmethods__) | {
        "get_n_trials", "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id",
        "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs",
        "check_trial_is_updatable", "get_best_trial", "remove_session"}):
    setattr(RetryingStorage, _name, _retrying_method(_name))
RetryingStorage.__abstractmethods__ = frozenset()


def open_rdb(url: str, attempts: int = 4, outage_s: float = 30.0) -> BaseStorage:
    """An RDB storage at `url`, connected (with retries) and retrying every call.

    Connecting gives up after `attempts` attempts (4: delays 0.5, 1, 2 s), so a wrong URL
    is reported within seconds. Once connected, every call is retried for at least
    `outage_s` seconds as well (delays at most 5 s apart): a server restart or failover in
    the middle of a sweep costs a pause, not the sweep (tests/study/test_workers.py). The
    default stays below `storage.grace_s` minus `storage.heartbeat_s` (60 - 10 s): an
    outage longer than that expires the workers' leases, and the trials they hold are re-run.
    """
    full = rdb_url(url)
    kwargs = {"pool_pre_ping": True}  # a connection dropped while idle is replaced, not used

    def connect() -> BaseStorage:
        return get_storage(RDBStorage(full, engine_kwargs=kwargs))

    try:
        inner = with_retries(connect, attempts, "connect to", url)
    except optuna.exceptions.StorageInternalError as err:  # pragma: no cover
        raise StorageError(f"storage: {mask_url(str(err))}") from None
    return RetryingStorage(inner, url, attempts, outage_s)


# -------------------------------------------------------------------------------- study
def open_study(run_dir: Path, url: str | None, study_name: str,
               direction: str, retries: int = 4) -> optuna.Study:
    """Create or load the study: the journal `study.journal` in `run_dir`, or the RDB `url`.

    The journal is validated and a partial last line repaired (logged); a study written in
    another storage format (`records.STORAGE_VERSION`) is refused (RecordError).
    """
    if url is None:
        backend, note = open_journal(Path(run_dir) / records.JOURNAL)
        if note:
            log.warning("%s", note)
    else:
        backend = open_rdb(url, retries)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Every trial is enqueued with fixed params: the sampler never picks a value.
    sampler = optuna.samplers.RandomSampler(seed=0)

    def load_or_create() -> optuna.Study:
        try:  # loading first: create_study appends a record even when the study exists
            return optuna.load_study(study_name=study_name, storage=backend, sampler=sampler)
        except KeyError:
            return optuna.create_study(storage=backend, study_name=study_name,
                                       direction=direction, load_if_exists=True,
                                       sampler=sampler)

    study = with_retries(load_or_create, retries, "open the study in", url or str(run_dir))
    empty = not study.get_trials(deepcopy=False)
    # A study with trials and no version attribute was written before it existed (1).
    version = study.user_attrs.get(records.STORAGE_VERSION_ATTR,
                                   records.STORAGE_VERSION if empty else 1)
    if version != records.STORAGE_VERSION:
        where = mask_url(url) if url else str(run_dir)
        raise RecordError(
            f"{where}: the study {study_name!r} was written in storage format {version!r}; "
            f"this version of study reads format {records.STORAGE_VERSION}. Resume it with "
            f"the version that wrote it, or start a new run directory."
        )
    if records.STORAGE_VERSION_ATTR not in study.user_attrs and empty:
        study.set_user_attr(records.STORAGE_VERSION_ATTR, records.STORAGE_VERSION)
    return study


def check_same_config(study: optuna.Study, config: dict[str, Any]) -> None:
    """Record `config` on a new study; refuse to mix trials of a different config into it."""
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", config)
        return
    differing = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
    if differing:
        shown = ", ".join(f"{k} (was {stored.get(k)!r}, now {config.get(k)!r})"
                          for k in differing[:5])
        raise ConfigError(
            f"the study {study.study_name!r} was started with a different config; "
            f"differing keys: {shown}. Use a new run directory (or study name) instead."
        )
