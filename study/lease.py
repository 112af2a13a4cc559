"""Leases on claimed trials: who holds a trial, whether it is alive, and taking a trial back.

Optuna's own heartbeats exist only for RDB storages inside `optimize()` (FACTS), and a
SIGKILLed worker leaves its trials RUNNING forever. So each worker of a sweep:

- records itself on every trial it claims (user attribute `worker` = host, pid, id);
- refreshes ONE heartbeat for all its claims (study system attribute `heartbeat:<id>`,
  seconds since the epoch) when it claims, between populations, and every `interval`
  seconds from a background thread during a long population.

A RUNNING trial is *stale* when its owner is a dead process on this host (known at once),
when the owner's heartbeat is older than `grace` seconds (any host; clocks must agree to
well within `grace`), or when no owner was recorded `grace` seconds after it was claimed
(the claimer died between the two writes). `reclaim_stale` fails stale trials and re-queues
their points. The FAIL transition is the token: the storage lets exactly one worker move a
RUNNING trial to FAIL, and only that worker re-queues, so a point is queued once per loss.

`duplicates` is the second guard, for points queued twice (two machines enqueueing at once,
a retried write): among trials of one point, only the lowest-numbered live one may train, and
none once a COMPLETE one exists. Together: a point is COMPLETE at most once, and every loss
is re-queued until one is.
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

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

HEARTBEAT = "heartbeat:"
LIVE = (TrialState.RUNNING, TrialState.WAITING)


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


class Heartbeat:
    """A worker's heartbeat: `beat()` now, and every `interval` s on a daemon thread."""

    def __init__(self, study: optuna.Study, worker: Worker, interval: float) -> None:
        self._study, self._worker, self._interval = study, worker, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def beat(self) -> None:
        self._study._storage.set_study_system_attr(
            self._study._study_id, HEARTBEAT + self._worker.id, time.time())

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
    """Whether a RUNNING `trial` has lost its worker (see the module docstring)."""
    owner = trial.user_attrs.get("worker") or {}
    if owner.get("id") == me.id:
        return False
    if owner.get("host") == me.host and not pid_alive(int(owner.get("pid", -1))):
        return True
    last = heartbeats.get(HEARTBEAT + str(owner.get("id")))
    if last is None:  # no owner recorded (or a record without heartbeat): age of the claim
        last = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return now - float(last) > grace


def fail(study: optuna.Study, trial: FrozenTrial | optuna.Trial, reason: str) -> bool:
    """Move a RUNNING trial to FAIL with `status=reason`; False if someone finished it first."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "status", reason)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    return True


def reclaim_stale(study: optuna.Study, trials: Iterable[FrozenTrial], me: Worker,
                  grace: float, requeue: Callable[[FrozenTrial], None]) -> int:
    """Fail the stale RUNNING `trials` and `requeue` each one this worker failed; how many."""
    heartbeats = study._storage.get_study_system_attrs(study._study_id)
    now = time.time()
    reclaimed = 0
    for trial in trials:
        if (trial.state == TrialState.RUNNING and is_stale(trial, me, heartbeats, now, grace)
                and fail(study, trial, "stale")):
            requeue(trial)
            reclaimed += 1
    return reclaimed


def duplicates(claimed: Iterable[int], trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers among `claimed` that must not train: their point is done or held by a lower one."""
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
    return {n for n in claimed
            if by_number.get(n) in complete or lowest.get(by_number.get(n), n) < n}
