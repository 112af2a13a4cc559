"""The Optuna study as a sweep's queue: fill it, take trials from it, give them back.

Every grid point x seed is enqueued once as a WAITING trial that already holds its params,
its canonical key (`TrialSpec.key`) and flat config (user attributes `key`, `config`). A
worker *takes* waiting trials (the storage moves each WAITING -> RUNNING for exactly one
worker), trains them and tells them; a trial taken and not trained is *released* (failed,
its point queued again); a stale one (`study.lease`) is *reclaimed* the same way.

This is the only module that touches Optuna's private state; each access says why. The
storage attribute names and values are those of `study.records` (STORAGE_VERSION).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages.journal import _file as _journal_file
from optuna.storages.journal import _storage as _journal_storage
from optuna.study import _tell as _optuna_tell
from optuna.trial import FrozenTrial, TrialState

from study import lease
from study.schema import ConfigError

if TYPE_CHECKING:
    from study.grid import GridPoint, SweepPlan

log = logging.getLogger(__name__)

Taken = tuple[optuna.Trial, "GridPoint"]
# Trials whose result is recorded: told a value, or stopped by a pruner (sampler sweeps).
DONE = (TrialState.COMPLETE, TrialState.PRUNED)

# The interface of a journal file lock (`acquire`, `release`) that `JournalFileBackend`
# calls is declared only in a private module; `study.storage`'s lock implements it.
JournalLock = _journal_file.BaseJournalFileLock


@runtime_checkable
class BatchingBackend(Protocol):
    """A journal backend that can group writes (`study.journal.BatchingJournalBackend`)."""

    def begin_batch(self) -> None: ...

    def end_batch(self) -> None: ...


# ------------------------------------------------------------------- Optuna private state
@contextlib.contextmanager
def batched(study: optuna.Study) -> Iterator[None]:
    """Group the storage writes made inside into one append, where the storage is a
    journal file (`BatchingJournalBackend`); elsewhere (an RDB) a no-op.

    The journal storage's thread lock is held while the batch begins and ends, so that no
    other thread (a heartbeat) is inside a write then: one that had checked for a batch
    just before it began would wait for the file lock the batch holds, while holding the
    storage's thread lock the batch's next write needs. Optuna exposes neither the
    backend nor that lock publicly.
    """
    storage = study._storage
    if not (isinstance(storage, _journal_storage.JournalStorage)
            and isinstance(storage._backend, BatchingBackend)):
        yield
        return
    backend = storage._backend
    with storage._thread_lock:
        backend.begin_batch()
    try:
        yield
    finally:
        with storage._thread_lock:
            backend.end_batch()


def tell(study: optuna.Study, trial: optuna.Trial, values: float | None = None,
         state: TrialState | None = None) -> None:
    """`study.tell(trial, values, state)`, less the deep copy of the told trial that
    `Study.tell` returns: a sweep never reads it, and copying a trial with its config and
    metrics was more than half of telling it (about 0.5 s of lr_batch's 936 tells).
    `Study.tell` is a thin wrapper around this private function (positional arguments: the
    third is named `values` or `value_or_values` by the Optuna version)."""
    _optuna_tell._tell_with_warning(study, trial, values, state)


def _backend(study: optuna.Study) -> tuple[optuna.storages.BaseStorage, int]:
    """The storage and id of `study`, as `Study.ask` reaches them: `Study` has no public
    call for a single trial's state transition nor for study system attributes."""
    return study._storage, study._study_id


def _trial_id(trial: FrozenTrial | optuna.Trial) -> int:
    """The storage id of `trial`: the storage's calls take it, and neither trial class
    exposes it publicly."""
    return trial._trial_id


def try_take(study: optuna.Study, waiting: FrozenTrial) -> optuna.Trial | None:
    """Move a WAITING trial to RUNNING for this worker; None if another worker took it.

    The storage's atomic state change is what `Study.ask` does to pop a queued trial, but
    `ask` reads every waiting trial to pop one (0.7 s a trial on PostgreSQL with a sweep
    queued); this takes a trial of a queue already read.
    """
    storage, _ = _backend(study)
    try:
        if not storage.set_trial_state_values(_trial_id(waiting), state=TrialState.RUNNING):
            return None
    except UpdateFinishedTrialError:
        return None
    return optuna.Trial(study, _trial_id(waiting))


def fail(study: optuna.Study, trial: FrozenTrial | optuna.Trial, reason: str) -> bool:
    """Move a RUNNING trial to FAIL with `status=reason`; False if someone finished it first.

    Through the storage, whose state change is the atomic check (the token of
    `study.lease`): `Study.tell` would read the trial first and refuse a finished one
    itself, one more storage read per trial for the same answer, and a reclaimed trial is
    a `FrozenTrial` of another worker, which has no public id to write its status by.
    """
    storage, _ = _backend(study)
    try:
        storage.set_trial_user_attr(_trial_id(trial), "status", reason)
        storage.set_trial_state_values(_trial_id(trial), TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    return True


def heartbeats(study: optuna.Study) -> dict[str, Any]:
    """The study's system attributes (the workers' heartbeats among them): `Study` has no
    public call that reads or writes them."""
    storage, study_id = _backend(study)
    return storage.get_study_system_attrs(study_id)


def heartbeat(study: optuna.Study) -> Callable[[str, float], None]:
    """`write(key, seconds)` of one worker heartbeat, for `lease.Heartbeat` (see
    `heartbeats` for why through the storage)."""
    storage, study_id = _backend(study)

    def write(key: str, seconds: float) -> None:
        storage.set_study_system_attr(study_id, key, seconds)

    return write


def replay_journal() -> Any:
    """An empty replay of journal records (`apply_logs(records)`, `get_all_studies()`):
    what Optuna runs when it opens a journal, without a storage or a lock on the file."""
    # Replaying records is how Optuna opens a journal; replaying them line by line without
    # opening a storage on the file has no public entry point.
    return _journal_storage.JournalStorageReplayResult("validate-")


# --------------------------------------------------------------------------------- fill
def distributions(plan: SweepPlan) -> dict[str, BaseDistribution]:
    """The distribution of every param of `plan`'s points (axes, then `seed`)."""
    dists: dict[str, BaseDistribution] = {
        axis: plan.distributions.get(axis) or CategoricalDistribution(values)
        for axis, values in plan.axes.items()}
    dists["seed"] = CategoricalDistribution(plan.seeds)
    return dists


def enqueue(study: optuna.Study, point: GridPoint, dists: dict[str, BaseDistribution]
            ) -> None:
    """Queue `point` as a WAITING trial that already holds its params.

    What `Study.enqueue_trial` writes (the params as `fixed_params`), plus the params
    themselves: taking it then writes nothing more (`ask` would write them one by one,
    five storage calls a trial).
    """
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=point.params,
        distributions={name: dists[name] for name in point.params},
        system_attrs={"fixed_params": point.params},
        user_attrs={"key": point.trial.key(), "config": point.trial.flat()}))


def enqueue_missing(study: optuna.Study, plan: SweepPlan, chunk_of: dict[str, int]
                    ) -> tuple[int, int]:
    """Enqueue the points with no COMPLETE/RUNNING/WAITING trial; (enqueued, already done).

    Points are enqueued chunk by chunk (`chunk_of`: the planner's population of each key)
    so that consecutive takes yield trials that train together.
    """
    live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    trials = study.get_trials(deepcopy=False, states=live)
    present = {t.user_attrs.get("key") for t in trials}
    done = sum(1 for t in trials if t.state == TrialState.COMPLETE)
    missing = [p for p in plan.points if p.trial.key() not in present]
    missing.sort(key=lambda p: chunk_of[p.trial.key()])
    dists = distributions(plan)
    with batched(study):
        for point in missing:
            enqueue(study, point, dists)
    return len(missing), done


def requeue(study: optuna.Study, plan: SweepPlan, trial: FrozenTrial | optuna.Trial) -> None:
    """Queue the point of a failed `trial` again (a trial of no point of `plan`: nothing)."""
    key = trial.user_attrs.get("key")
    for point in plan.points:
        if point.trial.key() == key:
            enqueue(study, point, distributions(plan))
            return


# --------------------------------------------------------------------------------- take
def take_waiting(study: optuna.Study, plan: SweepPlan, me: lease.Worker,
                 stop: Callable[[], bool], chunk_of: dict[str, int]) -> Iterator[Taken]:
    """Take waiting trials chunk by chunk (`chunk_of`), in queue order within a chunk,
    until none is left or `stop()`; yield each with its point.

    One read of the queue per pass (see `try_take`); each waiting trial of the snapshot is
    taken or found taken by another worker, and the queue is read again when the snapshot
    is used up (trials queued since, such as released ones, are seen then).

    Chunk by chunk, not in plain queue order: workers that start together enqueue the
    same points at once, and their queues interleave (chunk 1 of one worker between
    chunk 0 of the other), which made populations of one or two trials.
    """
    by_key = {p.trial.key(): p for p in plan.points}
    dists = distributions(plan)
    while not stop():
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting:
            return
        last = len(plan.points)  # a trial of no point of this plan: last, then refused
        waiting = sorted(waiting, key=lambda t: (chunk_of.get(t.user_attrs.get("key"), last),
                                                 t.number))
        for queued in waiting:
            if stop():
                return
            trial = try_take(study, queued)
            if trial is None:
                continue
            key = queued.user_attrs.get("key")
            if key not in by_key:  # queued by hand, or by another config of the study
                trial.set_user_attr("status", "unused")
                tell(study, trial, state=TrialState.FAIL)
                if key is None:
                    continue
                raise ConfigError(f"trial {trial.number} of study {study.study_name!r} has key "
                                  f"{key} which is not a point of this sweep")
            for name, dist in dists.items():  # queued without its params (storage format 1)
                if name not in queued.params:
                    trial.suggest_categorical(name, dist.choices)
            trial.set_user_attr("worker", me.record())
            yield trial, by_key[key]


def next_population(taken: Iterator[Taken], pending: Taken | None, chunk_of: dict[str, int]
                    ) -> tuple[list[Taken], Taken | None]:
    """Consecutive taken trials of one planned chunk (they train as one population), and
    the first taken trial of the next chunk (if any).

    The planner's chunks are populations that fit memory; with several workers a chunk may
    be shared between them (each trains the part it took).
    """
    group = [pending] if pending else []
    for item in taken:
        if group and chunk_of[item[1].trial.key()] != chunk_of[group[0][1].trial.key()]:
            return group, item
        group.append(item)
    return group, None


def release(study: optuna.Study, plan: SweepPlan, taken: Sequence[Taken], reason: str
            ) -> None:
    """Give taken, untrained trials back: fail them and queue their points again."""
    for trial, point in taken:
        if fail(study, trial, reason):
            enqueue(study, point, distributions(plan))


def reclaim_stale(study: optuna.Study, trials: Iterable[FrozenTrial], me: lease.Worker,
                  grace_s: float, requeue_one: Callable[[FrozenTrial], None]) -> int:
    """Fail the stale RUNNING `trials` (`lease.is_stale`) and `requeue_one` each one this
    worker failed; how many."""
    beats = heartbeats(study)
    now = time.time()
    reclaimed = 0
    for trial in trials:
        if (trial.state == TrialState.RUNNING
                and lease.is_stale(trial, me, beats, now, grace_s)
                and fail(study, trial, "stale")):
            requeue_one(trial)
            reclaimed += 1
    return reclaimed


def reclaim(study: optuna.Study, plan: SweepPlan, me: lease.Worker, grace_s: float) -> int:
    """Re-queue the points of trials left RUNNING by dead or silent workers; how many."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    count = reclaim_stale(study, running, me, grace_s, lambda t: requeue(study, plan, t))
    if count:
        log.warning("re-queued %d trials left RUNNING by dead or silent workers", count)
    return count


def drop_duplicates(study: optuna.Study, group: list[Taken]) -> list[Taken]:
    """`group` without the trials whose point is done or held by another worker (failed
    with status `duplicate`)."""
    snapshot = study.get_trials(deepcopy=False)
    dropped = lease.duplicates([t.number for t, _ in group], snapshot)
    for trial, _ in group:
        if trial.number in dropped:
            fail(study, trial, "duplicate")
    if dropped:
        log.info("dropped %d trials whose point is done or held by another worker", len(dropped))
    return [item for item in group if item[0].number not in dropped]


# ------------------------------------------------------------------------------- count
def done_points(study: optuna.Study, plan: SweepPlan) -> int:
    """How many points of `plan` have a COMPLETE trial in `study`."""
    keys = {p.trial.key() for p in plan.points}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return len(keys & {t.user_attrs.get("key") for t in complete})


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """The trials whose result is recorded (COMPLETE or PRUNED), in trial order."""
    return study.get_trials(deepcopy=False, states=DONE)


def prepare(study: optuna.Study, plan: SweepPlan, chunk_of: dict[str, int],
            leases: lease.Lease, me: lease.Worker | None = None, enqueue_points: bool = True
            ) -> tuple[int, int]:
    """Re-queue stale trials, enqueue missing points; (points done, trials reclaimed)."""
    reclaimed = reclaim(study, plan, me or lease.Worker.here(), leases.grace_s)
    if enqueue_points:
        enqueue_missing(study, plan, chunk_of)
    return done_points(study, plan), reclaimed
