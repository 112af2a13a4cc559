"""Open the Optuna storage of a run, the journal file (`study.journal`, the default) or an
RDB URL (PostgreSQL), and the study in it (`open_study`, `check_same_config`).

RDB URL (`postgresql://...`, `mysql://...`, `sqlite:///...`): the scheme and its driver are
checked first; connecting is retried with exponential backoff; every storage call is retried
the same way on a lost connection, and for at least 30 s so that a server restart mid-sweep
is waited out (`RetryingStorage`, `open_rdb`). Passwords never leave this process:
`mask_url` / `redact` replace them with `***` in anything printed or written.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, get_storage

from study import records
from study.journal import open_journal
from study.records import RecordError
from study.schema import ConfigError

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
    if dialect == "sqlite" and re.sub(r"\?.*$", "", match.group(3), flags=re.DOTALL) in (
            "", "/", "/:memory:"):
        raise ConfigError(
            f"storage.url: {mask_url(url)!r} is an in-memory SQLite database: nothing it "
            f"holds outlives the process, so a run could not be resumed; give a file "
            f"(sqlite:///PATH) or leave storage.url null for the journal file")
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


# ---------------------------------------------------------------------------------- RDB
@functools.cache
def _transient() -> tuple[type[BaseException], ...]:
    """The errors a lost connection raises: Optuna's, and SQLAlchemy's (it comes with
    Optuna), imported at the first call: SQLAlchemy takes about 0.2 s to import, which a
    run on the journal file never needs."""
    try:
        from sqlalchemy.exc import DBAPIError, OperationalError
    except ImportError:  # pragma: no cover
        return (optuna.exceptions.StorageInternalError,)
    return (optuna.exceptions.StorageInternalError, OperationalError, DBAPIError)


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
        except _transient() as err:
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
               direction: str, retries: int = 4, results: Sequence[str] = ()) -> optuna.Study:
    """Create or load the study: the journal `study.journal` in `run_dir`, or the RDB `url`.

    The journal is validated and a partial last line repaired (logged); a study written in
    another storage format (`records.STORAGE_VERSION`) is refused (RecordError).
    `results`: the run's files `run_dir` holds (`records.held_results`); with any, the study
    must exist (RecordError, before a journal is created): a new one would number its trials
    from 0 again and write its curves over theirs.
    """
    where = mask_url(url) if url else str(Path(run_dir) / records.JOURNAL)

    def lost() -> RecordError:
        return RecordError(
            f"{run_dir} holds a run's results ({', '.join(results)}), but its storage "
            f"{where} holds no study {study_name!r} (its journal was deleted or moved, or "
            f"the database lost it): a run would number its trials from 0 again and write "
            f"over them. Restore the storage, or use a new run directory")

    if results and url is None and not (Path(run_dir) / records.JOURNAL).is_file():
        raise lost()
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
            if results:
                raise lost() from None
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


# The key prefix of a table file's digest in a study's config (`run.data_digests`).
DATA_DIGEST = "data digest of"


def check_same_config(study: optuna.Study, config: dict[str, Any]) -> None:
    """Record `config` on a new study; refuse to mix trials of a different config into it.
    A study recorded before its data digests were (no `DATA_DIGEST` key) is not refused for
    lacking them."""
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", config)
        return
    digests = any(k.startswith(DATA_DIGEST) for k in stored)
    differing = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k)
                       and (digests or not k.startswith(DATA_DIGEST)))
    if differing:
        shown = ", ".join(f"{k} (was {stored.get(k)!r}, now {config.get(k)!r})"
                          for k in differing[:5])
        raise ConfigError(
            f"the study {study.study_name!r} was started with a different config; "
            f"differing keys: {shown}. Use a new run directory (or study name) instead."
        )
