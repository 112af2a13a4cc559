"""The sweep driver: grid points -> Optuna trials -> engine -> storage and Parquet.

Optuna is the source of truth. Every grid point x seed is enqueued once as a WAITING trial
carrying its canonical key (`TrialSpec.key`) and flat config as user attributes; workers
`ask` waiting trials, train them in populations, write their curves, then `tell` each one a
finite objective with its status and summary metrics as user attributes. Re-running against
the same storage resumes: points whose key already has a COMPLETE (or live RUNNING/WAITING)
trial are not enqueued again.

The harness owns this loop (no Hydra sweeper plugin): see docs/design.md for why.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from study import records
from study.config import ConfigError
from study.engine import Engine, population_key
from study.engine.planner import plan_populations
from study.grid import GridPoint, SweepPlan
from study.metrics import objective_value, summarize_many

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SweepOutcome:
    """What one invocation did: points in the plan, trials it trained, trials found done."""

    total: int
    trained: int
    already_done: int
    wall_time_s: float


def open_study(run_dir: Path, url: str | None, study_name: str,
               direction: str) -> optuna.Study:
    """Create or load the study (JournalStorage `study.journal` in `run_dir` by default)."""
    if url is None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage: Any = JournalStorage(JournalFileBackend(str(Path(run_dir) / records.JOURNAL)))
    else:
        storage = url
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        storage=storage, study_name=study_name, direction=direction, load_if_exists=True,
        # Every trial is enqueued with fixed params: the sampler never picks a value.
        sampler=optuna.samplers.RandomSampler(seed=0),
    )


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


def _distributions(plan: SweepPlan) -> dict[str, CategoricalDistribution]:
    dists = {axis: CategoricalDistribution(values) for axis, values in plan.axes.items()}
    dists["seed"] = CategoricalDistribution(plan.seeds)
    return dists


def _fail_orphans(study: optuna.Study) -> int:
    """Fail RUNNING trials claimed by a process of this host that no longer exists."""
    host = socket.gethostname()
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker") or {}
        if owner.get("host") == host and not _pid_alive(int(owner.get("pid", -1))):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            failed += 1
    return failed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    for point in missing:
        study.enqueue_trial(point.params, user_attrs={"key": point.trial.key(),
                                                      "config": point.trial.flat()})
    return len(missing), done


def _claims(study: optuna.Study, plan: SweepPlan) -> Iterator[tuple[optuna.Trial, GridPoint]]:
    """Ask waiting trials one by one until none is left; yield each with its grid point."""
    by_key = {p.trial.key(): p for p in plan.points}
    dists = _distributions(plan)
    worker = {"host": socket.gethostname(), "pid": os.getpid()}
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = study.ask(dists)
        key = trial.user_attrs.get("key")
        if key not in by_key:
            # Sampled, not enqueued (the queue emptied under us) or from another config.
            study.tell(trial, state=TrialState.FAIL)
            if key is None:
                return
            raise ConfigError(f"trial {trial.number} of study {study.study_name!r} has key "
                              f"{key} which is not a point of this sweep")
        trial.set_user_attr("worker", worker)
        yield trial, by_key[key]


def _batches(claims: Iterator[tuple[optuna.Trial, GridPoint]], chunk_of: dict[str, int]
             ) -> Iterator[list[tuple[optuna.Trial, GridPoint]]]:
    """Group consecutive claims of one planned chunk (one population that fits memory)."""
    batch: list[tuple[optuna.Trial, GridPoint]] = []
    for claim in claims:
        if batch and chunk_of[claim[1].trial.key()] != chunk_of[batch[0][1].trial.key()]:
            yield batch
            batch = []
        batch.append(claim)
    if batch:
        yield batch


def curves_frame(number: int, trace) -> pd.DataFrame:
    """A trace in the long curves format of `study.records`."""
    parts = []

    def add(split: str, metric: str, steps, values) -> None:
        if values is not None and len(values):
            parts.append(pd.DataFrame({"trial": number, "step": steps, "split": split,
                                       "metric": metric, "value": values}))

    steps = range(len(trace.step_loss))
    add("batch", "loss", steps, trace.step_loss)
    add("batch", "grad_norm", steps, trace.grad_norm)
    for split in ("train", "val"):
        add(split, "loss", trace.eval_step, getattr(trace, f"{split}_loss"))
        add(split, "accuracy", trace.eval_step, getattr(trace, f"{split}_acc"))
    if trace.diag_step is not None:
        for metric in ("sharpness", "noise_scale"):
            values = getattr(trace, metric)
            if values is not None and not np.isnan(values).all():
                add("diag", metric, trace.diag_step, values)
    return pd.concat(parts, ignore_index=True)


def run_sweep(plan: SweepPlan, study: optuna.Study, engine: Engine, device: torch.device,
              run_dir: Path, objective: str, on_progress: Callable[[int, int], None]
              | None = None, budget_bytes: int | None = None,
              direction: str = "minimize") -> SweepOutcome:
    """Train every point of `plan` not yet done in `study`; see the module docstring.

    `on_progress(done, total)` is called after each population (done counts finished trials
    of the plan, including those found done). `budget_bytes` bounds a population's memory
    (default: the planner's, from the device).
    """
    started = time.perf_counter()
    orphans = _fail_orphans(study)
    if orphans:
        log.warning("failed %d trials left RUNNING by a dead process; re-queued", orphans)
    chunk_of = plan_chunks(plan, device, engine, budget_bytes)
    _, done = enqueue_missing(study, plan, chunk_of)
    total = len(plan.points)
    if on_progress:
        on_progress(done, total)
    trained = 0
    for batch in _batches(_claims(study, plan), chunk_of):
        traces = engine.run([point.trial for _, point in batch], device)
        numbers = [trial.number for trial, _ in batch]
        frames = [curves_frame(n, tr) for n, tr in zip(numbers, traces, strict=True)]
        # Curves first, then tell: a COMPLETE trial always has its curves on disk.
        records.write_curves(run_dir, f"trials-{min(numbers):06d}-{max(numbers):06d}",
                             pd.concat(frames, ignore_index=True))
        summaries = summarize_many(traces, [point.trial.optimizer.lr for _, point in batch])
        for (trial, _), summary in zip(batch, summaries, strict=True):
            trial.set_user_attr("status", summary["status"])
            trial.set_user_attr("metrics", {k: v for k, v in summary.items() if k != "status"})
            study.tell(trial, objective_value(summary, objective, direction))
        trained += len(batch)
        if on_progress:
            on_progress(done + trained, total)
    return SweepOutcome(total, trained, done, time.perf_counter() - started)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per COMPLETE trial: number, key, status, objective, flat config, metrics."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "key" not in t.user_attrs:
            continue
        rows.append({"trial": t.number, "key": t.user_attrs["key"],
                     "status": t.user_attrs.get("status"), "objective": t.value,
                     **t.user_attrs.get("config", {}), **t.user_attrs.get("metrics", {})})
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
    pops = len({population_key(p.trial) for p in points})
    return f"{len(points)} trials in {pops} populations"
