"""The config's schema (`StudyConfig`, registered with Hydra as `study_schema`), its
resolvers and `ConfigError`: what Hydra needs to compose a command line.

It imports neither torch nor any spec, so that Hydra composes (and refuses an unknown key,
option or type) before the entry point imports the rest; `study.config` validates the
composed config and builds the specs.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

SPEC_GROUPS = ("task", "model", "optimizer")  # one option each, built through its _target_
TRANSFORM_GROUPS = ("failure", "mitigation")  # any number of named entries (study.failures)
GROUPS = SPEC_GROUPS + TRANSFORM_GROUPS


class ConfigError(ValueError):
    """A composed config is invalid; the message names the key and what is wrong."""


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """`cfg` without the `hydra` node, interpolations resolved, as plain containers."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)


# ------------------------------------------------------------------------------- schemas
# Every default lives here or in the spec a schema mirrors (conf/config.yaml sets none of
# them; tests/study/test_schema.py checks both: this module imports no spec, so that Hydra
# composes, and refuses a mistyped command line, before torch is imported).
@dataclass
class TrainConfig:
    """`train:`, as `study.trial.TrainSpec` (its defaults)."""

    batch_size: Any = 32  # examples per step, or "full": checked by TrainSpec
    epochs: int = 20  # budget in epochs: every batch size sees the same examples
    eval_every: int | None = None  # steps between evaluations (None: epochs)
    dtype: str = "float32"


@dataclass
class DiagnosticsConfig:
    """`diagnostics:` (opt-in, measured on the side), as `study.trial.DiagnosticsSpec`."""

    sharpness: bool = False  # top Hessian eigenvalue (Lanczos)
    noise_scale: bool = False  # gradient noise scale B_simple
    every: int | None = None  # steps between measurements (None: each eval)
    iterations: int = 20  # Lanczos iterations for sharpness
    max_examples: int = 256  # examples for per-example gradients


@dataclass
class ObjectiveConfig:
    """The value told to Optuna (a diverged trial's is capped at its initial loss)."""

    metric: str = "val_loss_final"
    direction: str = "minimize"


@dataclass
class StorageConfig:
    kind: str = "journal"  # journal | rdb (conf/storage/: journal, postgres, rdb)
    url: str | None = None  # None: JournalStorage file study.journal in the run directory
    study_name: str | None = None  # None: the sweep's name ("single" without a sweep)
    heartbeat_s: float = 10.0  # a worker refreshes its lease this often (study.lease)
    grace_s: float = 60.0  # a taken trial silent this long is stale: failed, re-queued
    retries: int = 4  # connection attempts (delays doubling from 0.5 s); calls mid-run: >= 30 s
    # True: every evaluation's validation loss as an Optuna intermediate value and the key
    # metrics (records.KEY_METRICS) as user attributes of their own, for optuna-dashboard;
    # each is one more storage write per trial.
    dashboard: bool = False


@dataclass
class SweepConfig:
    name: str = "sweep"
    seeds: list[int] = field(default_factory=lambda: [0])
    axes: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    claims: list[Any] = field(default_factory=list)  # scored by analysis.claims
    skip_inapplicable: bool = False  # drop points whose failure/mitigation misfits the task
    # A sampler sweep (study.search): `sampler` other than grid, a `space` instead of axes,
    # a budget of `trials` proposals asked `population` at a time.
    sampler: str = "grid"
    space: dict[str, Any] = field(default_factory=dict)
    trials: int | None = None
    population: int | None = None
    # {type: successive_halving | hyperband | median | percentile, ...}; {}: no pruning.
    pruner: dict[str, Any] = field(default_factory=dict)
    # An edge search (study.edge): {low, high, precision, candidates} of the learning rate.
    edge: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyConfig:
    task: Any = None
    model: Any = None
    optimizer: Any = None
    failure: Any = None  # {entry name: {_target_: ..., **arguments}}; see study.failures
    mitigation: Any = None
    storage: StorageConfig = field(default_factory=StorageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    sweep: SweepConfig | None = None  # set by +sweep=NAME (conf/sweep/)
    seed: int = 0  # trial seed: data, init and batch-order streams derive from it
    engine: str = "batched"  # batched (population engine) | reference (one by one)
    device: str = "auto"  # auto = cuda when available, else cpu
    progress: bool = True  # progress bar on the terminal
    report: bool = True  # write report.html at the end
    resume: str | None = None  # a run directory to finish (same as hydra.run.dir=DIR)
    workers: int = 1  # local worker processes on one study (study.workers)


def register() -> None:
    """Register the schema (`study_schema`) and the resolvers; idempotent."""
    ConfigStore.instance().store(name="study_schema", node=StudyConfig)
    for name, fn in _RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# ----------------------------------------------------------------------------- resolvers
def _round_sig(x: float, digits: int = 6) -> float:
    """Round to `digits` significant digits (10**0.25 prints as 1.77828, not 1.7782794...)."""
    return float(f"{x:.{digits}g}")


def logspace(start: float, stop: float, num: int) -> list[float]:
    """`num` values from `start` to `stop` (both included), evenly spaced in log10."""
    if not (start > 0 and stop > 0) or num < 1:
        raise ValueError(f"logspace needs start, stop > 0 and num >= 1, got {start}, {stop}, {num}")
    if num == 1:
        return [float(start)]
    a, b = math.log10(start), math.log10(stop)
    return [_round_sig(10 ** (a + (b - a) * i / (num - 1))) for i in range(num)]


def linspace(start: float, stop: float, num: int) -> list[float]:
    """`num` evenly spaced values from `start` to `stop` (both included)."""
    if num < 1:
        raise ValueError(f"linspace needs num >= 1, got {num}")
    if num == 1:
        return [float(start)]
    return [_round_sig(start + (stop - start) * i / (num - 1)) for i in range(num)]


def int_range(start: int, stop: int | None = None, step: int = 1) -> list[int]:
    """Python's `range` as a list (stop excluded): `${range:3}` is [0, 1, 2]."""
    return list(range(start) if stop is None else range(start, stop, step))


_NEW_RUN_DIRS: dict[str, str] = {}
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def sweep_name_problem(name: Any) -> str | None:
    """Why `name` cannot be a sweep's name, or None. The name is a folder of outputs/ and
    the study's name in the storage: a path such as ../x would put a run elsewhere."""
    if isinstance(name, str) and _PLAIN_NAME.fullmatch(name):
        return None
    return (f"sweep.name: expected a plain name (letters, digits, '.', '_', '-'; not "
            f"starting with '.' or '-'), got {name!r}")


def new_run_dir(resume: str | None, sweep_name: str) -> str:
    """`resume` when given, else a new directory `outputs/<sweep_name>/<stamp>` that this
    process creates (takes): the stamp is the time to the second, with `_2`, `_3`, ...
    appended when another invocation took it first, so two runs started in the same
    second never share a directory. The same value for every call in one process."""
    if resume is not None:
        return str(resume)
    problem = sweep_name_problem(sweep_name)
    if problem:
        raise ValueError(problem)
    if sweep_name not in _NEW_RUN_DIRS:
        parent = Path("outputs") / sweep_name
        parent.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        for attempt in itertools.count(1):
            candidate = parent / (stamp if attempt == 1 else f"{stamp}_{attempt}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            _NEW_RUN_DIRS[sweep_name] = str(candidate)
            break
    return _NEW_RUN_DIRS[sweep_name]


_RESOLVERS = {"logspace": logspace, "linspace": linspace, "range": int_range,
              "new_run_dir": new_run_dir}
