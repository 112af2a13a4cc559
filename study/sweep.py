"""The sweep driver: grid points -> Optuna queue -> engine -> storage and Parquet.

Optuna is the source of truth. Every grid point x seed is enqueued once (`study.queue`);
workers take waiting trials (the storage hands each to exactly one worker), train them in
populations, write their curves, then `tell` each one a finite objective with its status and
summary metrics as user attributes. Where the engine can train in the background
(`study.engine.start`), the next population trains while the last one's curves are written
and its trials told: the caller's work between populations no longer leaves cores idle.
Re-running against the same storage resumes: points whose key already has a COMPLETE (or
live RUNNING/WAITING) trial are not enqueued again.

Several workers (processes or machines) may run `run_sweep` on one study at once; leases
(`study.lease`) re-queue the trials of a worker that died, and drop a point queued twice.
The harness owns this loop (no Hydra sweeper plugin): see docs/design.md for why, and
docs/scaling.md for the guarantees.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from study import lease, queue, records
from study.engine import BatchedEngine, Engine, Pending, batch_key, start, trial_major
from study.engine.base import OnEval
from study.engine.planner import plan_populations
from study.grid import GridPoint, SweepPlan
from study.metrics import objective_value, summarize_many
from study.metrics.curvature import stability_threshold
from study.preflight import DataNotes
from study.queue import Taken
from study.trial import TrialSpec

log = logging.getLogger(__name__)

DEFAULT_LEASE = lease.Lease()


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


def plan_chunks(plan: SweepPlan, device: torch.device, engine: Engine,
                budget_bytes: int | None = None) -> dict[str, int]:
    """Chunk index of every point's key: the planner's populations, in its order.

    Engines that train trial by trial say how many trials they take at once
    (`population_limit`); the batched engine takes whatever fits the memory budget.
    """
    chunks = plan_populations([p.trial for p in plan.points], device, budget_bytes,
                              max_trials=engine.population_limit)
    return {plan.points[i].trial.key(): c for c, chunk in enumerate(chunks) for i in chunk}


def run_sweep(plan: SweepPlan, study: optuna.Study, engine: Engine, device: torch.device,
              run_dir: Path, objective: str, on_progress: Callable[[int, int], None]
              | None = None, budget_bytes: int | None = None,
              direction: str = "minimize", leases: lease.Lease = DEFAULT_LEASE,
              stop: Callable[[], bool] = lambda: False, enqueue: bool = True,
              dashboard: bool = False) -> SweepOutcome:
    """Train every point of `plan` not yet done in `study` (one worker); see the module doc.

    `on_progress(done, total)` is called after each population (done counts finished points
    of the plan, including those found done). `budget_bytes` bounds a population's memory
    (default: the planner's, from the device). `stop()` is polled between populations (and
    between takes): once true, taken untrained trials are re-queued and the call returns.
    `enqueue=False` only takes what is queued (a worker started by a parent that enqueued).
    `dashboard`: see `train_population`.
    """
    started = time.perf_counter()
    me = lease.Worker.here()
    chunk_of = plan_chunks(plan, device, engine, budget_bytes)
    total, trained, reclaimed = len(plan.points), 0, 0
    with lease.Heartbeat(queue.heartbeat(study), me, leases.heartbeat_s) as heart:
        done, reclaimed = queue.prepare(study, plan, chunk_of, leases, me, enqueue)
        if on_progress:
            on_progress(done, total)
        taken, pending = queue.take_waiting(study, plan, me, stop, chunk_of), None
        notes = DataNotes()
        # Populations under way, oldest first: at most two, the one being told while the
        # next trains. Cancelled (their trials left RUNNING, as by a crash) if this raises.
        training: list[tuple[list[Taken], Pending]] = []

        def finish_oldest() -> int:
            group, traces = training[0][0], training[0][1].result()
            training.pop(0)
            told = finish_population(study, run_dir, group, traces, objective, direction,
                                     dashboard=dashboard)
            if on_progress:
                on_progress(queue.done_points(study, plan), total)
            return told

        try:
            while True:
                with queue.batched(study):  # the takes of a population: one append
                    group, pending = queue.next_population(taken, pending, chunk_of)
                if not group:
                    break
                heart.beat()
                group = queue.drop_duplicates(study, group)
                reclaimed += queue.reclaim(study, plan, me, leases.grace_s)
                if group:
                    _note_bad_data(group, notes)
                    training.append((group, start_population(engine, device, group)))
                while len(training) > 1:
                    trained += finish_oldest()
                heart.beat()
                if stop():
                    break
            while training:
                trained += finish_oldest()
        finally:
            for _, running in training:
                running.cancel()
        stopped = stop()
        if pending:
            queue.release(study, plan, [pending], "released")
    return SweepOutcome(total, trained, done, time.perf_counter() - started, reclaimed, stopped)


def train_population(study: optuna.Study, engine: Engine, device: torch.device,
                     run_dir: Path, taken: list[Taken], objective: str, direction: str,
                     prune: bool = False, dashboard: bool = False) -> int:
    """Train the `taken` trials as one population, write their curves, tell each trial;
    how many were told.

    `prune`: every trial reports its validation loss at each evaluation (Optuna's
    intermediate values) and the study's pruner decides, once all rows of the evaluation
    have reported, which stop there; those are told PRUNED, with `pruned_step`.

    Each trial's user attributes: `status`, and `metrics` (every summary metric,
    `records.encode_metrics`). `dashboard`: also every evaluation's finite validation loss
    as an intermediate value (already there when pruning) and the `records.KEY_METRICS` as
    attributes of their own, which optuna-dashboard draws and lists."""
    pruned: dict[int, int] = {}
    hook = _pruning_hook(study, [trial for trial, _ in taken], pruned) if prune else None
    traces = start_population(engine, device, taken, hook).result()
    return finish_population(study, run_dir, taken, traces, objective, direction, pruned,
                             dashboard, prune)


def start_population(engine: Engine, device: torch.device, taken: list[Taken],
                     on_eval: OnEval | None = None) -> Pending:
    """The `taken` trials' training as one population, under way in the background where
    the engine can (`study.engine.start`)."""
    return start(engine, [point.trial for _, point in taken], device, on_eval)


def finish_population(study: optuna.Study, run_dir: Path, taken: list[Taken],
                      traces: Sequence[Any], objective: str, direction: str,
                      pruned: dict[int, int] | None = None, dashboard: bool = False,
                      prune: bool = False) -> int:
    """Write the curves of the `taken` trials' `traces`, then tell each trial (see
    `train_population`; `pruned`: row -> step of the rows a pruner stopped); how many
    were told."""
    pruned = pruned or {}
    numbers = [trial.number for trial, _ in taken]
    # Curves first (atomically), then tell: a COMPLETE trial always has its curves on disk.
    records.write_curves(run_dir, f"trials-{min(numbers):06d}-{max(numbers):06d}",
                         records.curves_table(numbers, traces))
    summaries = summarize_many(traces, [stability_threshold(point.trial.optimizer)
                                        for _, point in taken],
                               pruned=[i in pruned for i in range(len(taken))])
    told = 0
    with queue.batched(study):  # one append for the population's results
        for i, ((trial, _), summary) in enumerate(zip(taken, summaries, strict=True)):
            told += _tell(study, trial, summary, traces[i], objective, direction,
                          pruned.get(i), dashboard, prune)
    return told


def _tell(study: optuna.Study, trial: optuna.Trial, summary: dict[str, Any], trace: Any,
          objective: str, direction: str, pruned_step: int | None, dashboard: bool,
          prune: bool) -> int:
    """Record one trained trial: its status and metrics, then COMPLETE with its objective
    value or PRUNED (`pruned_step`); 0 when another worker reclaimed it meanwhile, else 1."""
    try:
        trial.set_user_attr("status", summary["status"])
        trial.set_user_attr("metrics", records.encode_metrics(summary))
        if dashboard:
            _dashboard_attrs(trial, summary, trace, reported=prune)
        if pruned_step is not None:
            trial.set_user_attr("pruned_step", pruned_step)
            queue.tell(study, trial, state=TrialState.PRUNED)
        else:
            queue.tell(study, trial, objective_value(summary, objective, direction))
    except UpdateFinishedTrialError:
        # Another worker judged this one stale (a long stall) and re-queued its point.
        log.warning("trial %d was reclaimed by another worker; its result is dropped",
                    trial.number)
        return 0
    return 1


def _dashboard_attrs(trial: optuna.Trial, summary: dict[str, Any], trace: Any,
                     reported: bool) -> None:
    """Key metrics as attributes and (unless pruning `reported` them) the validation
    losses of every evaluation as intermediate values."""
    for name in records.KEY_METRICS:
        if name in summary:
            trial.set_user_attr(name, records.encode_value(summary[name]))
    if reported:
        return
    for step, value in zip(trace.eval_step, trace.val_loss, strict=True):
        if math.isfinite(value):
            trial.report(float(value), int(step))


def _pruning_hook(study: optuna.Study, trials: Sequence[optuna.Trial], pruned: dict[int, int]):
    """`Engine.run`'s on_eval: report each row's validation loss, then ask the pruner;
    records the pruned rows (index -> step) in `pruned`."""
    def hook(step: int, values: dict[int, float]) -> set[int]:
        with queue.batched(study):  # an evaluation's reports: one append
            for i, value in values.items():
                if np.isfinite(value):
                    trials[i].report(float(value), step)
        stop = {i for i in values if step > 0 and trials[i].should_prune()}
        pruned.update({i: step for i in stop})
        return stop

    return hook


def _note_bad_data(taken: list[Taken], notes: DataNotes) -> None:
    """Log and record on the trial (user attribute `data_warning`) the first trial of each
    (task, data transforms, data seed) whose training data holds NaN or inf; it trains on
    them as drawn. A failure mode may put them there on purpose (logged at INFO); with no
    data transform they are unintended (a WARNING)."""
    for trial, point in taken:
        found = notes.first(point.trial)
        if found is None:
            continue
        note, intended = found
        log.log(logging.INFO if intended else logging.WARNING,
                "trial %d: %s; it trains on them as drawn", trial.number, note)
        trial.set_user_attr("data_warning", note)


def write_trials_table(study: optuna.Study, plan: SweepPlan, run_dir: Path,
                       objective: dict[str, str]) -> Path:
    """trials.parquet from the storage, with the sweep's axes (and a search's numeric
    keys, `searched`) in its metadata."""
    frame = records.trials_frame(queue.finished(study))
    meta = {"sweep": plan.name, "axes": plan.axes, "seeds": plan.seeds, "objective": objective,
            "study_name": study.study_name}
    if getattr(plan, "searched", None):
        meta["searched"] = plan.searched
    return records.write_trials(run_dir, frame, meta)


def describe(points: Sequence[GridPoint], device: torch.device | str,
             engine: Engine | None = None) -> tuple[str, str]:
    """For the log, a plan on `device`: its size ("N trials in M populations") and, where
    `engine` takes the CPU's trial-major kernel but some of its populations cannot, how
    many trials train layer-major and why (`trial_major.unfit`), as "; N of them train
    layer-major, without the CPU kernel (n1 for ..., n2 for ...)"; else ""."""
    groups = _groups(points, device)
    size = f"{len(points)} trials in {len(groups)} populations"
    if not (isinstance(engine, BatchedEngine) and engine.trial_major
            and torch.device(device).type == "cpu"):
        return size, ""
    why: Counter[str] = Counter()
    for trials in groups.values():
        if (reason := trial_major.unfit(trials, device)) is not None:
            why[reason] += len(trials)
    if not why:
        return size, ""
    reasons = ", ".join(f"{n} for {reason}" for reason, n in why.most_common())
    return size, (f"; {sum(why.values())} of them train layer-major, without the CPU kernel "
                  f"({reasons})")


def _groups(points: Sequence[GridPoint], device: torch.device | str
            ) -> dict[str, list[TrialSpec]]:
    """The plan's trials by `batch_key`, as the planner groups them."""
    groups: dict[str, list[TrialSpec]] = defaultdict(list)
    for point in points:
        groups[batch_key(point.trial, device)].append(point.trial)
    return groups
