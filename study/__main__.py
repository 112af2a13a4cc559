"""`python -m study [+sweep=NAME] [overrides]`: compose, validate, dispatch. Nothing else.

Without a sweep it trains the one composed configuration; with `+sweep=NAME` it expands
conf/sweep/NAME.yaml. Either way the run directory gets the same files (docs/design.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from study import records, storage
from study.claims import write_sweep_claims
from study.config import ConfigError, plain_config, register, validate
from study.engine import make_engine
from study.environment import describe_environment, now_iso
from study.grid import expand
from study.metrics import SUMMARY_METRICS
from study.sweep import (
    Lease,
    SweepOutcome,
    check_same_config,
    describe,
    done_points,
    open_study,
    plan_chunks,
    prepare,
    resolve_device,
    run_sweep,
    write_trials_table,
)
from study.workers import StopRequest, WorkerJob, run_workers, threads_per_worker

log = logging.getLogger("study")
register()

# Keys that say how to run, not what to run: they may change when a sweep is resumed.
_RUN_ONLY = ("engine", "device", "progress", "report", "resume", "storage", "workers")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    fresh = not any((run_dir / name).exists() for name in
                    (records.JOURNAL, records.TRIALS, records.CURVES_DIR))
    try:
        run(cfg, run_dir, list(hc.overrides.task), dict(hc.runtime.choices))
    except ConfigError as err:
        print(f"error: {storage.mask_url(str(err))}", file=sys.stderr)
        if fresh:
            _remove_if_only_logs(run_dir)
        sys.exit(2)
    except (records.RecordError, storage.StorageError) as err:
        # Bad state (a corrupt journal, another version's run, an unreachable database):
        # nothing of the run directory was changed.
        print(f"error: {storage.mask_url(str(err))}", file=sys.stderr)
        if fresh:
            _remove_if_only_logs(run_dir)
        sys.exit(3)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str], choices: dict[str, str]) -> None:
    """Validate everything, then train, record and report. Raises ConfigError early."""
    typed = validate(cfg)
    plan = expand(cfg, lambda extra: hydra.compose("config", overrides=list(extra)),
                  overrides, choices)
    _check_objective(typed.objective.metric, plan)
    device = resolve_device(typed.device)
    engine = make_engine(typed.engine)
    config = plain_config(cfg)

    url = _storage_url(typed)
    leases = Lease(typed.storage.heartbeat_s, typed.storage.grace_s)
    _check_run_dir(run_dir)
    study_name = typed.storage.study_name or (plan.name or "single")
    study = open_study(run_dir, url, study_name, typed.objective.direction,
                       typed.storage.retries)
    check_same_config(study, {k: v for k, v in _flatten(config).items()
                              if k.split(".")[0] not in _RUN_ONLY})
    _save_hydra_files(cfg, run_dir, overrides)
    previous = records.read_env(run_dir)
    env = storage.redact(describe_environment(overrides, run_dir, device, engine.name))
    # A resumed run keeps the command and start of the invocation that created it.
    for key in ("command", "resume_command", "started"):
        env[key] = previous.get(key, env.get(key))
    env["started"] = env["started"] or now_iso()
    env["storage"] = storage.mask_url(url) if url else records.JOURNAL
    env["workers"] = typed.workers
    invocations = previous.get("invocations", [])
    records.write_env(run_dir, {**env, "invocations": invocations})
    log.info("%s: %s on %s with the %s engine%s", plan.name or "single configuration",
             describe(plan.points), device, engine.name,
             f", {typed.workers} workers" if typed.workers > 1 else "")

    bar = _Bar(typed.progress, len(plan.points), plan.name or "trial")
    stop = StopRequest().install()
    started = time.perf_counter()
    try:
        if typed.workers == 1:
            outcome = run_sweep(plan, study, engine, device, run_dir, typed.objective.metric,
                                on_progress=bar, direction=typed.objective.direction,
                                leases=leases, stop=lambda: stop.requested)
        else:
            job = WorkerJob(plan, run_dir, url, study_name, typed.objective.direction,
                            typed.objective.metric, typed.engine, typed.device, leases,
                            typed.storage.retries, threads_per_worker(typed.workers),
                            os.getpid())
            outcome = _run_with_workers(job, typed.workers, study, stop, bar, engine, device)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted. Finish with: {env['resume_command']}", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    bar.close()
    if outcome.stopped:
        print(f"stopped after {outcome.trained} trials; nothing is lost. "
              f"Finish with: {env['resume_command']}", file=sys.stderr)
        sys.exit(130)
    write_trials_table(study, plan, run_dir, {"metric": typed.objective.metric,
                                              "direction": typed.objective.direction})
    if typed.sweep is not None:
        write_sweep_claims(run_dir, typed.sweep.claims)
    wall = round(time.perf_counter() - started, 3)
    invocations.append({"argv": env["argv"], "finished": now_iso(), "wall_time_s": wall,
                        "trials_trained": outcome.trained})
    env.update(finished=now_iso(), trials_total=outcome.total, invocations=invocations,
               wall_time_s=round(sum(i["wall_time_s"] for i in invocations), 3))
    records.write_env(run_dir, env)
    print(f"{outcome.trained} trials trained, {outcome.already_done} already done, "
          f"in {outcome.wall_time_s:.1f} s")
    missing = outcome.total - done_points(study, plan)
    if missing:
        print(f"{missing} trials are still held by other workers or were lost; finish with: "
              f"{env['resume_command']}", file=sys.stderr)
    if typed.report:
        from analysis import build_report

        print(f"report: {build_report(run_dir)}")
    else:
        print(f"run directory: {run_dir}")


def _storage_url(typed) -> str | None:
    """The RDB URL to use (None: the journal file), checked before anything is written."""
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


def _check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory whose trials.parquet another version of study wrote."""
    if (run_dir / records.TRIALS).is_file():
        records.read_trials(run_dir)  # RecordError on another schema version


def _run_with_workers(job: WorkerJob, workers: int, study, stop: StopRequest, bar,
                      engine, device) -> SweepOutcome:
    """Enqueue, run `workers` processes, then finish what a dead worker left (in-process)."""
    started = time.perf_counter()
    total = len(job.plan.points)
    done_before, reclaimed = prepare(study, job.plan, plan_chunks(job.plan, device, engine),
                                     job.leases)
    bar(done_before, total)
    codes = run_workers(job, workers, stop,
                        poll=lambda: bar(done_points(study, job.plan), total))
    crashed = [i for i, c in enumerate(codes) if c not in (0, 130)]
    if crashed:
        log.warning("workers %s exited with codes %s; their trials are re-run",
                    crashed, [codes[i] for i in crashed])
    last = SweepOutcome(total, 0, 0, 0.0, stopped=True)
    if not stop.requested:
        last = run_sweep(job.plan, study, engine, device, job.run_dir, job.objective,
                         on_progress=bar, direction=job.direction, leases=job.leases,
                         stop=lambda: stop.requested)
    done = done_points(study, job.plan)
    return SweepOutcome(total, done - done_before, done_before,
                        time.perf_counter() - started, reclaimed + last.reclaimed, last.stopped)


def _check_objective(metric: str, plan) -> None:
    if metric not in SUMMARY_METRICS:
        raise ConfigError(f"objective.metric: unknown metric {metric!r} "
                          f"(one of {', '.join(SUMMARY_METRICS)})")
    if "acc" in metric and any(p.trial.task.loss != "cross_entropy" for p in plan.points):
        raise ConfigError(f"objective.metric: {metric} is undefined for regression tasks")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _save_hydra_files(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    """What Hydra's output_subdir would hold, written only once the config is valid."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    job = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    job.pop("hydra", None)
    for name, node in (("config.yaml", job), ("overrides.yaml", OmegaConf.create(overrides)),
                       ("hydra.yaml", OmegaConf.create({"hydra": HydraConfig.get()}))):
        text = storage.mask_url(OmegaConf.to_yaml(node))
        records.atomic_write_bytes(hydra_dir / name, text.encode())


def _remove_if_only_logs(run_dir: Path) -> None:
    """Remove a run directory this invocation created if it holds nothing but logs."""
    if run_dir.is_dir() and all(p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


class _Bar:
    """tqdm progress over trials, fed by run_sweep's on_progress(done, total)."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="trial", disable=not enabled,
                         dynamic_ncols=True, file=sys.stderr)

    def __call__(self, done: int, total: int) -> None:
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


if __name__ == "__main__":
    main()
