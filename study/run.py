"""One invocation of `python -m study` once its config is valid: storage, run directory,
env.json, training (in this process or with worker processes), records and report.

`study.__main__` composes and validates the config, expands it and calls `execute`; it
maps ConfigError to exit code 2 and RecordError / StorageError to 3. `execute` checks
everything it can (device, storage settings, the run directory, the stored config) before
it writes `.hydra/` or env.json (docs/design.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from study import queue, records, storage
from study.analyst import Analyst, score_and_report
from study.config import plain_config, resolve_device
from study.edge import EdgePlan, describe_edge, edges_frame, run_edge
from study.engine import make_engine
from study.environment import config_sources, describe_environment, now_iso, resume_command
from study.grid import SweepPlan
from study.lease import Lease
from study.metrics import SUMMARY_METRICS
from study.preflight import check_data, check_memory, check_resume, check_run_dir
from study.schema import ConfigError, StudyConfig
from study.search import SearchPlan, describe_search, done_runs, run_search
from study.storage import check_same_config, open_study
from study.sweep import (
    SweepOutcome,
    describe,
    plan_chunks,
    run_sweep,
    write_trials_table,
)
from study.workers import StopRequest, WorkerJob, run_workers, threads_per_worker

if TYPE_CHECKING:
    import optuna
    import torch

    from study.engine.base import Engine

log = logging.getLogger("study")

# Keys that say how to run, not what to run: they may change when a sweep is resumed.
RUN_ONLY = ("engine", "device", "progress", "report", "resume", "storage", "workers")


def runs_planned(plan: SweepPlan | SearchPlan) -> int:
    """Training runs the invocation aims at: the grid's points, or a search's budget."""
    return plan.total if isinstance(plan, (SearchPlan, EdgePlan)) else len(plan.points)


def check_objective(metric: str, plan: SweepPlan) -> None:
    """Raise ConfigError unless `metric` is a summary metric defined for every point of
    `plan` (accuracies need a classification task)."""
    if metric not in SUMMARY_METRICS:
        raise ConfigError(f"objective.metric: unknown metric {metric!r} "
                          f"(one of {', '.join(SUMMARY_METRICS)})")
    if "acc" in metric and any(p.trial.task.loss != "cross_entropy" for p in plan.points):
        raise ConfigError(f"objective.metric: {metric} is undefined for regression tasks")


class InterruptedBeforeTraining(KeyboardInterrupt):
    """Ctrl-C once the study may be stored (its journal written) and before training: the
    message says how to start it (a run of another config there would be refused)."""


def execute(cfg: DictConfig, typed: StudyConfig, plan: SweepPlan, run_dir: Path,
            overrides: list[str], hydra_cfg: Any, analyst: Analyst | None = None) -> int:
    """Train the missing points of `plan` into `run_dir`, record them and report; return
    the exit status.

    `cfg` is the composed config, `typed` its `validate(cfg)`, `plan` its expansion,
    `overrides` the command line's and `hydra_cfg` Hydra's own config (for .hydra/);
    `analyst`, where given, scores the claims and builds the report (else this process).
    Raises ConfigError, RecordError or StorageError before `.hydra/` and env.json are
    written when the device, storage settings, run directory or stored config refuse the
    run. Returns 0 when it finished (points still held by other workers are reported on
    stderr with the resume command) and 130 when Ctrl-C or SIGTERM stopped it (nothing is
    lost; the resume command is printed).
    """
    device = resolve_device(typed.device)
    engine = make_engine(typed.engine)
    config = plain_config(cfg)

    url = storage_url(typed)
    leases = Lease(typed.storage.heartbeat_s, typed.storage.grace_s)
    study_name = typed.storage.study_name or (plan.name or "single")
    check_resume(typed.resume, run_dir)
    check_run_dir(run_dir, study_name, url)
    check_memory(plan, device)  # first: it draws no data, and a trial too large to train
    check_data(plan)  # may have data too large to draw (task.n_train)
    sources = config_sources(hydra_cfg)
    try:  # from here on the study may be stored, before env.json says how to go on
        study = open_study(run_dir, url, study_name, typed.objective.direction,
                           typed.storage.retries, results=records.held_results(run_dir))
        with records.run_lock(run_dir):  # read and record the config as one step: of two
            # commands started into a new directory at once, the second sees the first's
            check_same_config(study, {**resumable_config(config), **data_digests(plan)})
        save_hydra_files(cfg, run_dir, overrides, hydra_cfg)
        env, invocations, mine = start_env(run_dir, overrides, device, engine.name, url,
                                           typed.workers, study_name, sources)
    except KeyboardInterrupt:
        raise InterruptedBeforeTraining(
            f"interrupted before training started; nothing was trained. Start it with: "
            f"{resume_command(overrides, run_dir, sources)}") from None
    if isinstance(plan, SearchPlan):
        size, note = describe_search(plan), ""
    elif isinstance(plan, EdgePlan):
        size, note = describe_edge(plan), ""
    else:
        size, note = describe(plan.points, device, engine)
    log.info("%s: %s on %s with the %s engine%s%s", plan.name or "single configuration", size,
             device, engine.name, f", {typed.workers} workers" if typed.workers > 1 else "",
             note)

    bar = ProgressBar(typed.progress, runs_planned(plan), plan.name or "trial")
    outside = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    stop = StopRequest().install()
    if analyst is not None:  # the start-up is done: a starved analyst is renewed now
        analyst.keep_up()
    started = time.perf_counter()
    try:
        with bar.logs_above():
            outcome = train(typed, plan, study, study_name, url, leases, engine, device,
                            run_dir, stop, bar)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted. Finish with: {env['resume_command']}", file=sys.stderr)
        return 130
    finally:  # outside training, the command's own handlers (Ctrl-C ends it at once)
        for signum, handler in outside.items():
            signal.signal(signum, handler)
    bar.close()
    if outcome.stopped:
        with records.run_lock(run_dir):  # this invocation's trials and time are recorded
            finish_env(run_dir, env, invocations, mine, outcome,
                       round(time.perf_counter() - started, 3), stopped=True)
        print(f"stopped after {outcome.trained} trials; nothing is lost. "
              f"Finish with: {env['resume_command']}", file=sys.stderr)
        return 130
    # Invocations sharing the run directory (SLURM array jobs) finish in turn: each reads
    # the study after the one before it wrote, so the last files written hold every trial.
    with records.run_lock(run_dir):
        write_results(study, plan, run_dir, typed)
        finish_env(run_dir, env, invocations, mine, outcome,
                   round(time.perf_counter() - started, 3))
        print_outcome(outcome, study, plan, env["resume_command"])
        analyse(run_dir, typed, analyst)
    return 0


def storage_url(typed: StudyConfig) -> str | None:
    """The RDB URL to use (None: the journal file), checked before anything is written.

    Raises ConfigError for an unknown storage kind, an RDB without a URL, a URL of an
    unknown scheme or more workers than the storage can serve.
    """
    kind, url = typed.storage.kind, typed.storage.url
    if kind not in ("journal", "rdb"):
        raise ConfigError(f"storage.kind: must be journal or rdb, got {kind!r}")
    if kind == "rdb" and not url:
        raise ConfigError("storage.url: this storage needs a database URL: export "
                          "STUDY_STORAGE_URL=postgresql://USER:PASSWORD@HOST:PORT/DB "
                          "(or pass storage.url=...)")
    if url:
        storage.url_scheme(url)
    storage.check_workers(url, typed.workers)
    return url or None


def resumable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The plain config as dotted keys, without the keys that say how to run (`RUN_ONLY`):
    what a resumed run must share with the run that created the study."""
    return {k: v for k, v in _flatten(config).items() if k.split(".")[0] not in RUN_ONLY}


def data_digests(plan: SweepPlan) -> dict[str, str]:
    """{"data digest of PATH": digest} of every table file the plan's trials read
    (`study.tasks.table`): a resumed run must read the data its study was started on. A
    changed file gives its points new trial keys, and the grid would train again beside
    the trials of the old data, into one trials.parquet."""
    return {f"{storage.DATA_DIGEST} {point.trial.task.path}": point.trial.task.digest
            for point in plan.points if getattr(point.trial.task, "digest", None)}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_hydra_files(cfg: DictConfig, run_dir: Path, overrides: list[str],
                     hydra_cfg: Any) -> None:
    """Write .hydra/config.yaml, overrides.yaml and hydra.yaml (what Hydra's output_subdir
    would hold) atomically, database passwords masked. Call it only once the config is
    valid, so a refused resume leaves the run's record untouched."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    job = OmegaConf.to_container(cfg, resolve=False)
    job.pop("hydra", None)
    hydra_node = {"hydra": OmegaConf.to_container(hydra_cfg, resolve=False)}
    for name, node in (("config.yaml", job), ("overrides.yaml", overrides),
                       ("hydra.yaml", hydra_node)):
        # Masked before YAML folds a long value over lines, and after (anything missed).
        text = storage.mask_url(OmegaConf.to_yaml(OmegaConf.create(storage.redact(node))))
        records.atomic_write_bytes(hydra_dir / name, text.encode())


def start_env(run_dir: Path, overrides: list[str], device: torch.device, engine_name: str,
              url: str | None, workers: int, study_name: str, sources: Sequence[str] = ()
              ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Write env.json for the start of this invocation; return (env, invocations, this
    invocation's record: argv, engine, device) for `finish_env`. `sources`: where its
    command line told Hydra configs are (`environment.config_sources`), kept in the
    commands.

    A resumed run keeps the command, resume command, start time, engine and device of the
    invocation that created it (each invocation's own are in its record), and its list of
    earlier invocations; the storage URL is masked. Invocations
    that share the run directory at once (workers on several machines) read and write
    env.json in turn (`records.run_lock`), so none is lost.
    """
    env = storage.redact(describe_environment(overrides, run_dir, device, engine_name,
                                              sources))
    with records.run_lock(run_dir):
        previous = records.read_env(run_dir)
        mine = {"argv": env["argv"], "engine": env["engine"], "device": env["device"]}
        for key in ("command", "resume_command", "started", "engine", "device"):
            env[key] = previous.get(key, env.get(key))
        env["started"] = env["started"] or now_iso()
        env["storage"] = storage.mask_url(url) if url else records.JOURNAL
        env["study_name"] = study_name
        env["workers"] = workers
        invocations = previous.get("invocations", [])
        records.write_env(run_dir, {**env, "invocations": invocations})
    return env, invocations, mine


def train(typed: StudyConfig, plan: SweepPlan, study: optuna.Study, study_name: str,
          url: str | None, leases: Lease, engine: Engine, device: torch.device, run_dir: Path,
          stop: StopRequest, bar: ProgressBar) -> SweepOutcome:
    """Train the missing points of `plan`: in this process when `typed.workers` is 1, else
    with that many worker processes. Once `stop` is requested it stops after the current
    population (`outcome.stopped`); a second Ctrl-C raises KeyboardInterrupt."""
    if isinstance(plan, (SearchPlan, EdgePlan)):
        driver = run_search if isinstance(plan, SearchPlan) else run_edge
        return driver(plan, study, engine, device, run_dir, typed.objective.metric,
                      on_progress=bar, direction=typed.objective.direction,
                      leases=leases, stop=lambda: stop.requested,
                      dashboard=typed.storage.dashboard)
    if typed.workers == 1:
        return run_sweep(plan, study, engine, device, run_dir, typed.objective.metric,
                         on_progress=bar, direction=typed.objective.direction,
                         leases=leases, stop=lambda: stop.requested,
                         dashboard=typed.storage.dashboard)
    job = WorkerJob(plan, run_dir, url, study_name, typed.objective.direction,
                    typed.objective.metric, typed.engine, typed.device, leases,
                    typed.storage.retries, threads_per_worker(typed.workers), os.getpid(),
                    typed.storage.dashboard)
    return run_with_workers(job, typed.workers, study, stop, bar, engine, device)


def run_with_workers(job: WorkerJob, workers: int, study: optuna.Study, stop: StopRequest,
                     bar: ProgressBar, engine: Engine, device: torch.device) -> SweepOutcome:
    """Enqueue, run `workers` processes, then finish what a dead worker left (in-process)."""
    started = time.perf_counter()
    total = len(job.plan.points)
    done_before, reclaimed = queue.prepare(study, job.plan,
                                           plan_chunks(job.plan, device, engine), job.leases)
    bar(done_before, total)
    codes, trained = run_workers(job, workers, stop,
                                 poll=lambda: bar(queue.done_points(study, job.plan), total))
    crashed = [i for i, c in enumerate(codes) if c not in (0, 130)]
    if crashed:
        log.warning("workers %s exited with codes %s; their trials are re-run",
                    crashed, [codes[i] for i in crashed])
    last = SweepOutcome(total, 0, 0, 0.0, stopped=True)
    if not stop.requested:
        last = run_sweep(job.plan, study, engine, device, job.run_dir, job.objective,
                         on_progress=bar, direction=job.direction, leases=job.leases,
                         stop=lambda: stop.requested, dashboard=job.dashboard)
    return SweepOutcome(total, trained + last.trained, done_before,
                        time.perf_counter() - started, reclaimed + last.reclaimed, last.stopped)


def write_results(study: optuna.Study, plan: SweepPlan, run_dir: Path,
                  typed: StudyConfig) -> None:
    """Write trials.parquet from the study and, for an edge search, edges.parquet."""
    write_trials_table(study, plan, run_dir, {"metric": typed.objective.metric,
                                              "direction": typed.objective.direction})
    if isinstance(plan, EdgePlan):
        records.write_edges(run_dir, edges_frame(plan, study))


def finish_env(run_dir: Path, env: dict[str, Any], invocations: list[dict[str, Any]],
               mine: dict[str, Any], outcome: SweepOutcome, wall_s: float,
               stopped: bool = False) -> None:
    """Append this invocation (`mine`, finish time, `wall_s`, trials trained) to the
    invocations env.json holds now (others may have finished meanwhile; `invocations` is
    what it held at the start) and write the final env.json: finish time, trials in the
    plan, the invocations and their summed wall time; `stopped` (Ctrl-C, SIGTERM): the
    invocation is recorded as such and the run's finish time left as it was. The caller
    holds `records.run_lock(run_dir)`."""
    mine = {**mine, "finished": now_iso(), "wall_time_s": wall_s,
            "trials_trained": outcome.trained, **({"stopped": True} if stopped else {})}
    now = records.read_env(run_dir)
    invocations = [*now.get("invocations", invocations), mine]
    env.update(trials_total=outcome.total, invocations=invocations,
               wall_time_s=round(sum(i["wall_time_s"] for i in invocations), 3))
    # a stopped invocation finishes no run: the run's finish time stays what it was
    finished = now.get("finished") if stopped else now_iso()
    if finished is not None:
        env["finished"] = finished
    records.write_env(run_dir, env)


def print_outcome(outcome: SweepOutcome, study: optuna.Study, plan: SweepPlan,
                  resume_command: str) -> None:
    """Print what this invocation trained; on stderr, how many points of `plan` have no
    COMPLETE trial yet (held by other workers or lost) and the command that finishes them."""
    print(f"{outcome.trained} trials trained, {outcome.already_done} already done, "
          f"in {outcome.wall_time_s:.1f} s")
    missing = outcome.total - (done_runs(study) if isinstance(plan, (SearchPlan, EdgePlan))
                               else queue.done_points(study, plan))
    if missing:
        print(f"{missing} trials are still held by other workers or were lost; finish with: "
              f"{resume_command}", file=sys.stderr)


def analyse(run_dir: Path, typed: StudyConfig, analyst: Analyst | None) -> None:
    """For a sweep, score its claims into claims.parquet (the scoring `python -m analysis`
    reruns); build report.html where `typed.report`; print the report's path, else the run
    directory. By `analyst` where given, else here; the files are the same."""
    claims = typed.sweep.claims if typed.sweep is not None else None
    if analyst is None:
        path = score_and_report(run_dir, claims, typed.report)
    else:
        path = analyst.finish(run_dir, claims, typed.report)
    print(f"report: {path}" if path is not None else f"run directory: {run_dir}")


class ProgressBar:
    """tqdm progress over trials on stderr, fed by run_sweep's on_progress(done, total)."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="trial", disable=not enabled,
                         dynamic_ncols=True, file=sys.stderr)

    def logs_above(self) -> contextlib.AbstractContextManager[object]:
        """A context in which the console's log lines print above the bar (tqdm.write), not
        into it; a no-op when the bar is off."""
        if self._bar.disable:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()

    def __call__(self, done: int, total: int) -> None:
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
