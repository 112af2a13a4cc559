"""Leases on taken trials: their timing, who holds a trial, and whether its holder is alive.

Optuna's own heartbeats exist only for RDB storages inside `optimize()`, and a SIGKILLed
worker leaves its trials RUNNING forever. So each worker of a sweep:

- records itself on every trial it takes (user attribute `worker` = host, pid, id);
- refreshes ONE heartbeat for all the trials it holds (study system attribute
  `heartbeat:<id>`, seconds since the epoch) when it takes trials, between populations, and
  every `heartbeat_s` seconds from a background thread during a long population.

A RUNNING trial is *stale* when its holder is a dead process on this host (known at once),
when the holder's heartbeat is older than `grace_s` seconds (any host; clocks must agree to
well within it), or when no holder was recorded `grace_s` seconds after it was taken (the
taker died between the two writes). `study.queue.reclaim` fails stale trials and re-queues
their points. The FAIL transition is the token: the storage lets exactly one worker move a
RUNNING trial to FAIL, and only that worker re-queues, so a point is queued once per loss.

`duplicates` is the second guard, for points queued twice (two machines enqueueing at once,
a retried write): among trials of one point, only the lowest-numbered live one may train, and
none once a COMPLETE one exists. Together: a point is COMPLETE at most once, and every loss
is re-queued until one is.

This module decides; `study.queue` reads and writes the storage.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from study.schema import ConfigError, StorageConfig

log = logging.getLogger(__name__)

HEARTBEAT = "heartbeat:"
LIVE = (TrialState.RUNNING, TrialState.WAITING)


@dataclass(frozen=True)
class Lease:
    """Heartbeat period and the silence after which a taken trial is stale (seconds);
    the defaults are `storage.heartbeat_s` and `storage.grace_s`."""

    heartbeat_s: float = StorageConfig.heartbeat_s
    grace_s: float = StorageConfig.grace_s

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s < self.grace_s:
            raise ConfigError(f"storage.heartbeat_s: must be > 0 and < storage.grace_s "
                              f"({self.grace_s}), got {self.heartbeat_s}")


@dataclass(frozen=True)
class Worker:
    """One worker process: where it runs, and an id unique across restarts and hosts."""

    host: str
    pid: int
    id: str

    @classmethod
    def here(cls) -> Worker:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:12])

    def record(self) -> dict[str, str | int]:
        return {"host": self.host, "pid": self.pid, "id": self.id}

    @property
    def heartbeat_key(self) -> str:
        """The study system attribute that holds this worker's last heartbeat."""
        return HEARTBEAT + self.id


class Heartbeat:
    """A worker's heartbeat: `beat()` now, and every `interval` s on a daemon thread.

    `write(key, seconds since the epoch)` stores one heartbeat (`study.queue.heartbeat`).
    """

    def __init__(self, write: Callable[[str, float], None], worker: Worker,
                 interval: float) -> None:
        self._write, self._worker, self._interval = write, worker, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def beat(self) -> None:
        self._write(self._worker.heartbeat_key, time.time())

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except Exception as err:  # a lost connection must not kill the worker
                log.warning("heartbeat of worker %s failed: %s", self._worker.id, err)

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(trial: FrozenTrial, me: Worker, heartbeats: dict[str, float], now: float,
             grace: float) -> bool:
    """Whether a RUNNING `trial` has lost its worker (see the module docstring);
    `heartbeats` are the study's system attributes."""
    owner = trial.user_attrs.get("worker") or {}
    if owner.get("id") == me.id:
        return False
    if owner.get("host") == me.host and not pid_alive(int(owner.get("pid", -1))):
        return True
    last = heartbeats.get(HEARTBEAT + str(owner.get("id")))
    if last is None:  # no holder recorded (or one without heartbeat): age of the take
        last = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return now - float(last) > grace


def duplicates(taken: Iterable[int], trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers among `taken` that must not train: their point is done or held by a lower one."""
    by_number = {}
    complete: set[str] = set()
    lowest: dict[str, int] = {}
    for t in trials:
        key = t.user_attrs.get("key")
        by_number[t.number] = key
        if t.state == TrialState.COMPLETE:
            complete.add(key)
        elif t.state in LIVE:
            lowest[key] = min(lowest.get(key, t.number), t.number)
    return {n for n in taken
            if by_number.get(n) in complete or lowest.get(by_number.get(n), n) < n}
