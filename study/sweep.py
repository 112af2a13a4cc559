"""The sweep driver: grid points -> Optuna trials -> engine -> storage and Parquet.

Optuna is the source of truth. Every grid point x seed is enqueued once as a WAITING trial
carrying its canonical key (`TrialSpec.key`) and flat config as user attributes; workers
`ask` waiting trials (the storage hands each to exactly one worker), train them in
populations, write their curves, then `tell` each one a finite objective with its status and
summary metrics as user attributes. Re-running against the same storage resumes: points
whose key already has a COMPLETE (or live RUNNING/WAITING) trial are not enqueued again.

Several workers (processes or machines) may run `run_sweep` on one study at once; leases
(`study.lease`) re-queue the trials of a worker that died, and drop a point queued twice.
The harness owns this loop (no Hydra sweeper plugin): see docs/design.md for why, and
docs/scaling.md for the guarantees.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from study import lease, records, storage
from study.config import ConfigError
from study.engine import Engine, population_key
from study.engine.planner import plan_populations
from study.failures import trial_dataset
from study.grid import GridPoint, SweepPlan
from study.metrics import objective_value, summarize_many
from study.metrics.curvature import stability_threshold
from study.seeds import seed_streams

log = logging.getLogger(__name__)

Claim = tuple[optuna.Trial, GridPoint]
# Trials whose result is recorded: told a value, or stopped by a pruner (sampler sweeps).
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class SweepOutcome:
    """What one invocation did: points in the plan, trials it trained, trials found done.

    `reclaimed`: stale trials of dead workers it failed and re-queued; `stopped`: it stopped
    early on request (Ctrl-C), leaving a resumable state.
    """

    total: int
    trained: int
    already_done: int
    wall_time_s: float
    reclaimed: int = 0
    stopped: bool = False


@dataclass(frozen=True)
class Lease:
    """Heartbeat period and the silence after which a claimed trial is stale (seconds)."""

    heartbeat_s: float = 10.0
    grace_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s < self.grace_s:
            raise ConfigError(f"storage.heartbeat_s: must be > 0 and < storage.grace_s "
                              f"({self.grace_s}), got {self.heartbeat_s}")


def open_study(run_dir: Path, url: str | None, study_name: str,
               direction: str, retries: int = 4) -> optuna.Study:
    """Create or load the study: the journal `study.journal` in `run_dir`, or the RDB `url`.

    The journal is validated and a partial last line repaired (logged); a study written by
    an incompatible version of `study` is refused (RecordError).
    """
    if url is None:
        backend, note = storage.open_journal(Path(run_dir) / records.JOURNAL)
        if note:
            log.warning("%s", note)
    else:
        backend = storage.open_rdb(url, retries)
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

    study = storage.with_retries(load_or_create, retries, "open the study in",
                                 url or str(run_dir))
    empty = not study.get_trials(deepcopy=False)
    # A study with trials and no version attribute was written before it existed (1).
    version = study.user_attrs.get(records.STORAGE_VERSION_ATTR,
                                   records.STORAGE_VERSION if empty else 1)
    if version != records.STORAGE_VERSION:
        where = storage.mask_url(url) if url else str(run_dir)
        raise records.RecordError(
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


def _distributions(plan: SweepPlan) -> dict[str, BaseDistribution]:
    dists: dict[str, BaseDistribution] = {
        axis: plan.distributions.get(axis) or CategoricalDistribution(values)
        for axis, values in plan.axes.items()}
    dists["seed"] = CategoricalDistribution(plan.seeds)
    return dists


def plan_chunks(plan: SweepPlan, device: torch.device, engine: Engine,
                budget_bytes: int | None = None) -> dict[str, int]:
    """Chunk index of every point's key: the planner's populations, in its order.

    Engines that train trial by trial say how many trials they take at once
    (`population_limit`); the batched engine takes whatever fits the memory budget.
    """
    chunks = plan_populations([p.trial for p in plan.points], device, budget_bytes,
                              max_trials=getattr(engine, "population_limit", None))
    return {plan.points[i].trial.key(): c for c, chunk in enumerate(chunks) for i in chunk}


def enqueue_missing(study: optuna.Study, plan: SweepPlan, chunk_of: dict[str, int]
                    ) -> tuple[int, int]:
    """Enqueue the points with no COMPLETE/RUNNING/WAITING trial; (enqueued, already done).

    Points are enqueued chunk by chunk (`chunk_of`, from `plan_chunks`) so that consecutive
    `ask`s yield trials that train together.
    """
    live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    trials = study.get_trials(deepcopy=False, states=live)
    present = {t.user_attrs.get("key") for t in trials}
    done = sum(1 for t in trials if t.state == TrialState.COMPLETE)
    missing = [p for p in plan.points if p.trial.key() not in present]
    missing.sort(key=lambda p: chunk_of[p.trial.key()])
    dists = _distributions(plan)
    for point in missing:
        _enqueue(study, point, dists)
    return len(missing), done


def _requeue(study: optuna.Study, plan: SweepPlan, trial: FrozenTrial | optuna.Trial) -> None:
    """Queue the point of a failed `trial` again (a trial of no point of `plan`: nothing)."""
    key = trial.user_attrs.get("key")
    for point in plan.points:
        if point.trial.key() == key:
            _enqueue(study, point, _distributions(plan))
            return


def _enqueue(study: optuna.Study, point: GridPoint,
             dists: dict[str, CategoricalDistribution]) -> None:
    """Queue `point` as a WAITING trial that already holds its params.

    What `Study.enqueue_trial` writes (the params as `fixed_params`), plus the params
    themselves: a claim then records nothing more (`ask` would write them one by one, five
    storage calls a trial).
    """
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=point.params,
        distributions={name: dists[name] for name in point.params},
        system_attrs={"fixed_params": point.params},
        user_attrs={"key": point.trial.key(), "config": point.trial.flat()}))


def _claims(study: optuna.Study, plan: SweepPlan, me: lease.Worker,
            stop: Callable[[], bool], chunk_of: dict[str, int]) -> Iterator[Claim]:
    """Claim waiting trials chunk by chunk (`chunk_of`), in queue order within a chunk,
    until none is left or `stop()`; yield each with its point.

    What `Study.ask` does for a queued trial, with one scan of the queue per pass instead
    of one per claim: `ask` reads every waiting trial to pop one, so with a sweep queued
    (936 trials for lr_batch) a claim cost 0.7 s on PostgreSQL. Each waiting trial of the
    snapshot is popped with the storage's atomic WAITING -> RUNNING (False: another worker
    took it first; a queued trial already holds its params, see `_enqueue`), and the queue
    is read again when the snapshot is used up (trials queued since, such as released
    ones, are seen then).

    Chunk by chunk, not in plain queue order: workers that start together enqueue the
    same points at once, and their queues interleave (chunk 1 of one worker between
    chunk 0 of the other), which made populations of one or two trials.
    """
    by_key = {p.trial.key(): p for p in plan.points}
    dists = _distributions(plan)
    storage, study_id = study._storage, study._study_id  # as Study.ask reaches them
    while not stop():
        waiting = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
        if not waiting:
            return
        last = len(plan.points)  # a trial of no point of this plan: last, then refused
        waiting = sorted(waiting, key=lambda t: (chunk_of.get(t.user_attrs.get("key"), last),
                                                 t.number))
        for queued in waiting:
            if stop():
                return
            try:
                if not storage.set_trial_state_values(queued._trial_id, state=TrialState.RUNNING):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            trial = optuna.Trial(study, queued._trial_id)
            key = queued.user_attrs.get("key")
            if key not in by_key:  # queued by hand, or by another config of the study
                trial.set_user_attr("status", "unused")
                study.tell(trial, state=TrialState.FAIL)
                if key is None:
                    continue
                raise ConfigError(f"trial {trial.number} of study {study.study_name!r} has key "
                                  f"{key} which is not a point of this sweep")
            for name, dist in dists.items():  # queued without its params (older versions)
                if name not in queued.params:
                    trial.suggest_categorical(name, dist.choices)
            trial.set_user_attr("worker", me.record())
            yield trial, by_key[key]


def _next_batch(claims: Iterator[Claim], pending: Claim | None, chunk_of: dict[str, int]
                ) -> tuple[list[Claim], Claim | None]:
    """Consecutive claims of one planned chunk, and the first claim of the next one (if any).

    The planner's chunks are populations that fit memory; with several workers a chunk may
    be shared between them (each trains the part it claimed).
    """
    batch = [pending] if pending else []
    for claim in claims:
        if batch and chunk_of[claim[1].trial.key()] != chunk_of[batch[0][1].trial.key()]:
            return batch, claim
        batch.append(claim)
    return batch, None


def _release(study: optuna.Study, plan: SweepPlan, claims: Sequence[Claim], reason: str
             ) -> None:
    """Give claimed, untrained trials back: fail them and queue their points again."""
    for trial, point in claims:
        if lease.fail(study, trial, reason):
            _enqueue(study, point, _distributions(plan))


def curves_frame(numbers: Sequence[int], traces: Sequence) -> pd.DataFrame:
    """Traces (of trials `numbers`) in the long curves format of `study.records`, trial by
    trial; built from whole arrays at once (a frame per curve costs ~1 ms, 6 per trial)."""
    trial, step, split, metric, value = [], [], [], [], []

    def add(number: int, split_name: str, metric_name: str, steps, values) -> None:
        if values is not None and len(values):
            trial.append(np.full(len(values), number, dtype=np.int64))
            step.append(np.asarray(steps, dtype=np.int64))
            split.append((split_name, len(values)))
            metric.append((metric_name, len(values)))
            value.append(np.asarray(values, dtype=np.float64))

    for number, trace in zip(numbers, traces, strict=True):
        steps = np.arange(len(trace.step_loss))
        add(number, "batch", "loss", steps, trace.step_loss)
        add(number, "batch", "grad_norm", steps, trace.grad_norm)
        for name in ("train", "val"):
            add(number, name, "loss", trace.eval_step, getattr(trace, f"{name}_loss"))
            add(number, name, "accuracy", trace.eval_step, getattr(trace, f"{name}_acc"))
        if trace.diag_step is not None:
            for name in ("sharpness", "noise_scale", "precond_sharpness"):
                values = getattr(trace, name)
                if values is not None and not np.isnan(values).all():
                    add(number, "diag", name, trace.diag_step, values)

    def labels(runs: list[tuple[str, int]]) -> np.ndarray:
        return np.repeat(np.array([r[0] for r in runs], dtype=object), [r[1] for r in runs])

    return pd.DataFrame({"trial": np.concatenate(trial), "step": np.concatenate(step),
                         "split": labels(split), "metric": labels(metric),
                         "value": np.concatenate(value)})


def run_sweep(plan: SweepPlan, study: optuna.Study, engine: Engine, device: torch.device,
              run_dir: Path, objective: str, on_progress: Callable[[int, int], None]
              | None = None, budget_bytes: int | None = None,
              direction: str = "minimize", leases: Lease = Lease(),
              stop: Callable[[], bool] = lambda: False, enqueue: bool = True,
              dashboard: bool = False) -> SweepOutcome:
    """Train every point of `plan` not yet done in `study` (one worker); see the module doc.

    `on_progress(done, total)` is called after each population (done counts finished points
    of the plan, including those found done). `budget_bytes` bounds a population's memory
    (default: the planner's, from the device). `stop()` is polled between populations (and
    between claims): once true, claimed untrained trials are re-queued and the call returns.
    `enqueue=False` only claims what is queued (a worker started by a parent that enqueued).
    `dashboard`: see `train_batch`.
    """
    started = time.perf_counter()
    me = lease.Worker.here()
    chunk_of = plan_chunks(plan, device, engine, budget_bytes)
    total, trained, reclaimed = len(plan.points), 0, 0
    with lease.Heartbeat(study, me, leases.heartbeat_s) as heart:
        done, reclaimed = prepare(study, plan, chunk_of, leases, me, enqueue)
        if on_progress:
            on_progress(done, total)
        claims, pending = _claims(study, plan, me, stop, chunk_of), None
        checked: set[tuple[str, int]] = set()
        while True:
            batch, pending = _next_batch(claims, pending, chunk_of)
            if not batch:
                break
            heart.beat()
            batch = _drop_duplicates(study, batch)
            reclaimed += _reclaim(study, plan, me, leases)
            if batch:
                _report_bad_data(batch, checked)
                trained += train_batch(study, engine, device, run_dir, batch, objective,
                                       direction, dashboard=dashboard)
            heart.beat()
            if on_progress:
                on_progress(done_points(study, plan), total)
            if stop():
                break
        stopped = stop()
        if pending:
            _release(study, plan, [pending], "released")
    return SweepOutcome(total, trained, done, time.perf_counter() - started, reclaimed, stopped)


def prepare(study: optuna.Study, plan: SweepPlan, chunk_of: dict[str, int], leases: Lease,
            me: lease.Worker | None = None, enqueue: bool = True) -> tuple[int, int]:
    """Re-queue stale trials, enqueue missing points; (points done, trials reclaimed)."""
    reclaimed = _reclaim(study, plan, me or lease.Worker.here(), leases)
    if enqueue:
        enqueue_missing(study, plan, chunk_of)
    return done_points(study, plan), reclaimed


def _reclaim(study: optuna.Study, plan: SweepPlan, me: lease.Worker, leases: Lease) -> int:
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    count = lease.reclaim_stale(study, running, me, leases.grace_s,
                                lambda t: _requeue(study, plan, t))
    if count:
        log.warning("re-queued %d trials left RUNNING by dead or silent workers", count)
    return count


def _drop_duplicates(study: optuna.Study, batch: list[Claim]) -> list[Claim]:
    snapshot = study.get_trials(deepcopy=False)
    dropped = lease.duplicates([t.number for t, _ in batch], snapshot)
    for trial, _ in batch:
        if trial.number in dropped:
            lease.fail(study, trial, "duplicate")
    if dropped:
        log.info("dropped %d trials whose point is done or held by another worker", len(dropped))
    return [c for c in batch if c[0].number not in dropped]


def done_points(study: optuna.Study, plan: SweepPlan) -> int:
    """How many points of `plan` have a COMPLETE trial in `study`."""
    keys = {p.trial.key() for p in plan.points}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return len(keys & {t.user_attrs.get("key") for t in complete})


def train_batch(study: optuna.Study, engine: Engine, device: torch.device, run_dir: Path,
                batch: list[Claim], objective: str, direction: str, prune: bool = False,
                dashboard: bool = False) -> int:
    """Train one population, write its curves, tell each trial; how many were told.

    `prune`: every trial reports its validation loss at each evaluation (Optuna's
    intermediate values) and the study's pruner decides, once all rows of the evaluation
    have reported, which stop there; those are told PRUNED, with `pruned_step`.

    Each trial's user attributes: `status`, and `metrics` (every summary metric, a
    non-finite value as the string "nan", "inf" or "-inf" so that the storage holds plain
    JSON; `trials_frame` reads them back as floats). `dashboard`: also every evaluation's
    finite validation loss as an intermediate value (already there when pruning) and the
    `KEY_METRICS` as attributes of their own (non-finite ones as strings), which
    optuna-dashboard draws and lists."""
    pruned: dict[int, int] = {}
    hook = _pruning_hook([trial for trial, _ in batch], pruned) if prune else None
    traces = engine.run([point.trial for _, point in batch], device, on_eval=hook)
    numbers = [trial.number for trial, _ in batch]
    # Curves first (atomically), then tell: a COMPLETE trial always has its curves on disk.
    records.write_curves(run_dir, f"trials-{min(numbers):06d}-{max(numbers):06d}",
                         curves_frame(numbers, traces))
    summaries = summarize_many(traces, [stability_threshold(point.trial.optimizer)
                                        for _, point in batch])
    told = 0
    for i, ((trial, _), summary) in enumerate(zip(batch, summaries, strict=True)):
        try:
            trial.set_user_attr("status", summary["status"])
            trial.set_user_attr("metrics", {k: _plain(v) for k, v in summary.items()
                                            if k != "status"})
            if dashboard:
                _dashboard_attrs(trial, summary, traces[i], reported=prune)
            if i in pruned:
                trial.set_user_attr("pruned_step", pruned[i])
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, objective_value(summary, objective, direction))
        except UpdateFinishedTrialError:
            # Another worker judged this one stale (a long stall) and re-queued its point.
            log.warning("trial %d was reclaimed by another worker; its result is dropped",
                        trial.number)
            continue
        told += 1
    return told


# Summary metrics also stored as attributes of their own with `dashboard` (a dashboard
# lists attributes, not the members of one).
KEY_METRICS = ("val_loss_end", "val_loss_final", "train_loss_final", "divergence_step",
               "spike_count", "eval_rise_count", "sharpness_ratio_max")


def _plain(value: Any) -> Any:
    """`value` as plain JSON: a non-finite float as its name ("nan", "inf", "-inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _unplain(value: Any) -> Any:
    """The inverse of `_plain`."""
    return float(value) if value in ("nan", "inf", "-inf") else value


def _dashboard_attrs(trial: optuna.Trial, summary: dict[str, Any], trace: Any,
                     reported: bool) -> None:
    """Key metrics as attributes and (unless pruning `reported` them) the validation
    losses of every evaluation as intermediate values."""
    for name in KEY_METRICS:
        if name in summary:
            trial.set_user_attr(name, _plain(summary[name]))
    if reported:
        return
    for step, value in zip(trace.eval_step, trace.val_loss, strict=True):
        if math.isfinite(value):
            trial.report(float(value), int(step))


def _pruning_hook(trials: Sequence[optuna.Trial], pruned: dict[int, int]):
    """`Engine.run`'s on_eval: report each row's validation loss, then ask the pruner;
    records the pruned rows (index -> step) in `pruned`."""
    def hook(step: int, values: dict[int, float]) -> set[int]:
        for i, value in values.items():
            if np.isfinite(value):
                trials[i].report(float(value), step)
        stop = {i for i in values if step > 0 and trials[i].should_prune()}
        pruned.update({i: step for i in stop})
        return stop

    return hook


def _report_bad_data(batch: list[Claim], checked: set[tuple[str, int]]) -> None:
    """Report each (task, data seed) whose training data holds NaN or inf; the trial trains.

    A failure mode may put non-finite values in on purpose (logged at INFO); in a trial with
    no data transform they are unintended (a WARNING). Either way the note is recorded on
    the trial (user attribute `data_warning`).
    """
    for trial, point in batch:
        spec, seed = point.trial, seed_streams(point.trial.seed).data
        key = (repr((spec.task, getattr(spec, "data_transforms", ()))), seed)
        if key in checked:
            continue
        checked.add(key)
        data = trial_dataset(spec, seed)
        bad = {name: int((~torch.isfinite(t.double())).sum()) for name, t in
               (("x_train", data.x_train), ("y_train", data.y_train),
                ("x_val", data.x_val), ("y_val", data.y_val))}
        bad = {name: n for name, n in bad.items() if n}
        if not bad:
            continue
        intended = bool(getattr(spec, "data_transforms", ()))
        note = (f"task {spec.labels.get('task') or type(spec.task).__name__} with data seed "
                f"{seed} has non-finite values ("
                + ", ".join(f"{n} in {name}" for name, n in bad.items()) + ")"
                + (" from its failure mode" if intended else ", not from any failure mode"))
        log.log(logging.INFO if intended else logging.WARNING,
                "trial %d: %s; it trains on them as drawn", trial.number, note)
        trial.set_user_attr("data_warning", note)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per COMPLETE (or PRUNED) trial: number, key, status, objective, flat config,
    its params (a sampler sweep's `optimizer.betas.0` is a param, not a config key), metrics,
    and for a pruned trial `pruned_step` (its objective is then its last reported loss)."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=DONE):
        if "key" not in t.user_attrs:
            continue
        extra = ({"pruned_step": t.user_attrs.get("pruned_step")}
                 if t.state == TrialState.PRUNED else {})
        rows.append({"trial": t.number, "key": t.user_attrs["key"], **extra,
                     "status": t.user_attrs.get("status"), "objective": t.value,
                     **t.params, **t.user_attrs.get("config", {}),
                     **{k: _unplain(v) for k, v in t.user_attrs.get("metrics", {}).items()}})
    return pd.DataFrame(rows)


def write_trials_table(study: optuna.Study, plan: SweepPlan, run_dir: Path,
                       objective: dict[str, str]) -> Path:
    """trials.parquet from the storage, with the sweep's axes in its metadata."""
    frame = trials_frame(study)
    meta = {"sweep": plan.name, "axes": plan.axes, "seeds": plan.seeds, "objective": objective,
            "study_name": study.study_name}
    return records.write_trials(run_dir, frame, meta)


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU; `cuda` without CUDA is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def describe(points: Sequence[GridPoint]) -> str:
    """A one-line size of a plan, for the log."""
    # repr, as the planner keys them: a task may hold lists (one value per feature).
    pops = len({repr(population_key(p.trial)) for p in points})
    return f"{len(points)} trials in {pops} populations"
