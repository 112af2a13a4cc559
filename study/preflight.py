"""What `study.run.execute` checks before it writes anything to a run directory: that
`resume=` names a run, that the directory holds no other study, and that every task and
data transform of the plan can draw its data; and what the sweep checks of the data each
trial trains on (`DataNotes`: NaN or inf in it)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from study import records, storage
from study.config import TRANSFORM_GROUPS
from study.failures import trial_dataset
from study.grid import SweepPlan
from study.journal import journal_study_names
from study.schema import ConfigError
from study.seeds import seed_streams
from study.tasks.base import InvalidData, check_dataset
from study.trial import TrialSpec

log = logging.getLogger("study")


def check_resume(resume: str | None, run_dir: Path) -> None:
    """Refuse (ConfigError) `resume=DIR` when DIR is not a study run directory (it has
    neither env.json nor a journal: a typo would otherwise start a fresh sweep there), or
    when `hydra.run.dir` names another directory."""
    if resume is not None and os.path.abspath(resume) != os.path.abspath(run_dir):
        raise ConfigError(f"resume: {resume} is not the run directory {run_dir} that "
                          f"hydra.run.dir names; give one of the two")
    if resume is not None and not any((run_dir / name).is_file()
                                      for name in (records.ENV, records.JOURNAL)):
        raise ConfigError(f"resume: {resume} is not a study run directory (it holds no "
                          f"{records.ENV} nor {records.JOURNAL}); to start a new run there, "
                          f"pass hydra.run.dir={resume} instead")


def check_run_dir(run_dir: Path, study_name: str, url: str | None) -> None:
    """Refuse a run directory that belongs to another run: another version of study wrote
    its trials.parquet (RecordError), or it holds another study or another storage's
    (ConfigError: their trial numbers, and so their curve files, would collide). An
    unreadable trials.parquet is not refused: it is derived, and rebuilt at the end.

    Refuse too a directory that is no run (neither a journal nor an env.json of a run) but
    holds a file of a name a run writes (env.json, report.html, trials.parquet,
    claims.parquet, edges.parquet, curves/): the run would write over the user's, and a run
    whose journal was deleted would number its trials from 0 again over the curve files it
    left. Other files (a user's notes, Hydra's multirun.yaml and logs) are left alone."""
    if not _is_run(run_dir):
        taken = [name for name in RUN_FILES if (run_dir / name).exists()]
        if taken:
            raise ConfigError(f"hydra.run.dir: {run_dir} is not a study run and holds "
                              f"{', '.join(taken)}, which a run would write over: choose a "
                              f"new or empty directory")
    try:
        records.read_trials(run_dir)
    except records.UnreadableRecordError as err:
        log.warning("%s; it is rebuilt from the storage at the end of this run", err)
    except records.MissingRecordError:
        pass
    env = records.read_env(run_dir)
    journal = run_dir / records.JOURNAL
    owner = env.get("study_name")
    if owner is None and journal.is_file():
        names = journal_study_names(journal)
        owner = names[0] if names and study_name not in names else None
    if owner is not None and owner != study_name:
        raise ConfigError(
            f"{run_dir} holds the study {owner!r}; this command's study is {study_name!r} "
            f"(another sweep, or another storage.study_name). A run directory holds one "
            f"study: use a new run directory, or resume with: "
            f"{env.get('resume_command', 'the command that created it')}")
    where = storage.mask_url(url) if url else records.JOURNAL
    stored = env.get("storage") or (records.JOURNAL if journal.is_file() else None)
    if stored is not None and stored != where:
        raise ConfigError(
            f"{run_dir} holds a study stored in {stored}; this command's storage is {where}. "
            f"A run directory holds one study: use a new run directory, or the same storage")


# What a run writes into its directory, other than its journal and `.hydra/`.
RUN_FILES = (records.ENV, records.REPORT, records.TRIALS, records.CLAIMS, records.EDGES,
             records.CURVES_DIR)


def _is_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run: its journal, or an env.json that a run wrote (a file
    of that name of the user's own is not one)."""
    return (run_dir / records.JOURNAL).is_file() or records.resume_command(run_dir) is not None


def check_data(plan: SweepPlan) -> None:
    """Draw one seed's data for every task and data transform (failure mode or
    mitigation) of `plan` before anything is written, and check each draw and each
    transform's output (`study.tasks.base.check_dataset`: tensors of the task's shapes and
    dtypes, class labels in 0..output_dim-1, a finite floor >= 0). A task or transform that
    raises, or returns data its task cannot train on, is a ConfigError naming it, not a
    traceback in the middle of training nor a run on invalid data."""
    from study.failures import apply_data_transforms

    seen: set[str] = set()
    for point in plan.points:
        spec = point.trial
        transforms = spec.data_transforms
        key = repr((spec.task, transforms))
        if key in seen:
            continue
        seen.add(key)
        seed = seed_streams(spec.seed).data
        where = spec.labels.get("task") or type(spec.task).__name__
        try:
            data = spec.task.generate(seed)
        except Exception as err:
            raise ConfigError(f"task {where}: drawing its data (seed {seed}) raised "
                              f"{type(err).__name__}: {err}") from None
        try:
            check_dataset(data, spec.task)
        except InvalidData as err:
            raise ConfigError(f"task {where}: generate(seed {seed}) returned invalid data: "
                              f"{err}") from None
        for transform in transforms:
            try:
                data = apply_data_transforms(data, [transform], seed, spec.task)
            except Exception as err:
                name = getattr(transform, "target", None) or type(transform).__name__
                groups = "+".join(spec.labels.get(g) or "none" for g in TRANSFORM_GROUPS)
                did = (f"returned invalid data: {err}" if isinstance(err, InvalidData)
                       else f"raised {type(err).__name__}: {err}")
                raise ConfigError(f"{groups}: {name} {did} (applied to the data of task "
                                  f"{where}, seed {seed})") from None


def check_memory(plan: SweepPlan, device: torch.device) -> None:
    """Refuse (ConfigError) a plan with a trial that alone needs more memory than the
    machine has (`planner.estimate_trial_bytes` against `planner.machine_bytes`): a slip
    such as `train.epochs=1000000000` would otherwise be killed for memory mid-run, after
    the run directory was written. Populations are sized by the planner; this is the one
    trial that no population can hold."""
    from study.engine.planner import (
        HELD_BYTES_PER_STEP,
        estimate_trial_bytes,
        machine_bytes,
        parameter_count,
        trial_steps,
    )

    limit = machine_bytes(device)
    if limit is None or not plan.points:
        return
    need, spec = max(((estimate_trial_bytes(p.trial), p.trial) for p in plan.points),
                     key=lambda pair: pair[0])
    if need <= limit:
        return
    steps = trial_steps(spec)
    # named by what takes most of it: the records of its steps, or its model
    key = "train.epochs" if 2 * HELD_BYTES_PER_STEP * steps > need else "model.width"
    raise ConfigError(f"{key}: a trial of this plan needs about {_gib(need)} of "
                      f"memory ({steps:,} steps of records, {parameter_count(spec):,} "
                      f"parameters), more than the {_gib(limit)} this machine has; train "
                      f"fewer steps (train.epochs, train.batch_size, task.n_train) or a "
                      f"smaller model")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def nonfinite_note(spec: TrialSpec) -> tuple[str, bool] | None:
    """None when the data `spec` trains on (`study.failures.trial_dataset` of its data seed)
    is finite; else a note naming the task, the data seed and how many NaN or inf each split holds,
    and whether a data transform (a failure mode) is there to have put them in."""
    seed = seed_streams(spec.seed).data
    data = trial_dataset(spec, seed)
    bad = {name: int((~torch.isfinite(t.double())).sum()) for name, t in
           (("x_train", data.x_train), ("y_train", data.y_train),
            ("x_val", data.x_val), ("y_val", data.y_val))}
    bad = {name: n for name, n in bad.items() if n}
    if not bad:
        return None
    intended = bool(spec.data_transforms)
    note = (f"task {spec.labels.get('task') or type(spec.task).__name__} with data seed "
            f"{seed} has non-finite values ("
            + ", ".join(f"{n} in {name}" for name, n in bad.items()) + ")"
            + (" from its failure mode" if intended else ", not from any failure mode"))
    return note, intended


class DataNotes:
    """`nonfinite_note` once per (task, data transforms, data seed): the data is drawn for
    the first trial of each, and later trials of the same draw get None."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, int]] = set()

    def first(self, spec: TrialSpec) -> tuple[str, bool] | None:
        key = (repr((spec.task, spec.data_transforms)), seed_streams(spec.seed).data)
        if key in self._seen:
            return None
        self._seen.add(key)
        return nonfinite_note(spec)
