"""`python -m study [+sweep=NAME] [overrides]`: compose, validate, dispatch. Nothing else.

Without a sweep it trains the one composed configuration; with `+sweep=NAME` it expands
conf/sweep/NAME.yaml. Either way the run directory gets the same files (docs/design.md).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from study import records
from study.config import ConfigError, plain_config, register, validate
from study.engine import make_engine
from study.environment import describe_environment, now_iso
from study.grid import expand
from study.metrics import SUMMARY_METRICS
from study.sweep import (
    check_same_config,
    describe,
    open_study,
    resolve_device,
    run_sweep,
    write_trials_table,
)

log = logging.getLogger("study")
register()

# Keys that say how to run, not what to run: they may change when a sweep is resumed.
_RUN_ONLY = ("engine", "device", "progress", "report", "resume", "storage")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    fresh = not any((run_dir / name).exists() for name in
                    (records.JOURNAL, records.TRIALS, records.CURVES_DIR))
    try:
        run(cfg, run_dir, list(hc.overrides.task), dict(hc.runtime.choices))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        if fresh:
            _remove_if_only_logs(run_dir)
        sys.exit(2)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str], choices: dict[str, str]) -> None:
    """Validate everything, then train, record and report. Raises ConfigError early."""
    typed = validate(cfg)
    plan = expand(cfg, lambda extra: hydra.compose("config", overrides=list(extra)),
                  overrides, choices)
    _check_objective(typed.objective.metric, plan)
    device = resolve_device(typed.device)
    engine = make_engine(typed.engine)
    config = plain_config(cfg)

    study = open_study(run_dir, typed.storage.url,
                       typed.storage.study_name or (plan.name or "single"),
                       typed.objective.direction)
    check_same_config(study, {k: v for k, v in _flatten(config).items()
                              if k.split(".")[0] not in _RUN_ONLY})
    _save_hydra_files(cfg, run_dir, overrides)
    previous = records.read_env(run_dir)
    env = describe_environment(overrides, run_dir, device, engine.name)
    # A resumed run keeps the command and start of the invocation that created it.
    for key in ("command", "resume_command", "started"):
        env[key] = previous.get(key, env.get(key))
    env["started"] = env["started"] or now_iso()
    invocations = previous.get("invocations", [])
    records.write_env(run_dir, {**env, "invocations": invocations})
    log.info("%s: %s on %s with the %s engine", plan.name or "single configuration",
             describe(plan.points), device, engine.name)

    bar = _Bar(typed.progress, len(plan.points), plan.name or "trial")
    started = time.perf_counter()
    try:
        outcome = run_sweep(plan, study, engine, device, run_dir, typed.objective.metric,
                            on_progress=bar, direction=typed.objective.direction)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted. Finish with: {env['resume_command']}", file=sys.stderr)
        sys.exit(130)
    bar.close()
    write_trials_table(study, plan, run_dir, {"metric": typed.objective.metric,
                                              "direction": typed.objective.direction})
    wall = round(time.perf_counter() - started, 3)
    invocations.append({"argv": env["argv"], "finished": now_iso(), "wall_time_s": wall,
                        "trials_trained": outcome.trained})
    env.update(finished=now_iso(), trials_total=outcome.total, invocations=invocations,
               wall_time_s=round(sum(i["wall_time_s"] for i in invocations), 3))
    records.write_env(run_dir, env)
    print(f"{outcome.trained} trials trained, {outcome.already_done} already done, "
          f"in {outcome.wall_time_s:.1f} s")
    if typed.report:
        from analysis import build_report

        print(f"report: {build_report(run_dir)}")
    else:
        print(f"run directory: {run_dir}")


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
        records.atomic_write_bytes(hydra_dir / name, OmegaConf.to_yaml(node).encode())


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
