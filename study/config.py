"""Config schemas, resolvers and validation: the Hydra edge of `study`.

Only this module and the entry points see `DictConfig`. Composition catches wrong types and
unknown options (Hydra itself, against the `StudyConfig` schema registered below);
`validate` catches what Hydra lets through (keys appended with `+`, out-of-range values);
`build_trial` turns a composed config into a frozen `TrialSpec`, instantiating the
config-group options through their `_target_` after checking their keys.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from study.engine import ENGINES
from study.trial import DiagnosticsSpec, TrainSpec, TrialSpec

SPEC_GROUPS = ("task", "model", "optimizer")  # one option each, built through its _target_
TRANSFORM_GROUPS = ("failure", "mitigation")  # any number of named entries (study.failures)
GROUPS = SPEC_GROUPS + TRANSFORM_GROUPS
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A composed config is invalid; the message names the key and what is wrong."""


class NotApplicableError(ConfigError):
    """A failure mode or mitigation does not apply to the task (e.g. outliers on blobs)."""


# ------------------------------------------------------------------------------- schemas
# Every default lives here or in the spec a schema mirrors (conf/config.yaml sets none of
# them; tests/study/test_config.py checks both).
@dataclass
class TrainConfig:
    """`train:`, as `study.trial.TrainSpec` (its defaults)."""

    batch_size: Any = TrainSpec.batch_size  # examples per step, or "full": checked by TrainSpec
    epochs: int = TrainSpec.epochs  # budget in epochs: every batch size sees the same examples
    eval_every: int | None = TrainSpec.eval_every  # steps between evaluations (None: epochs)
    dtype: str = TrainSpec.dtype


@dataclass
class DiagnosticsConfig:
    """`diagnostics:` (opt-in, measured on the side), as `study.trial.DiagnosticsSpec`."""

    sharpness: bool = DiagnosticsSpec.sharpness  # top Hessian eigenvalue (Lanczos)
    noise_scale: bool = DiagnosticsSpec.noise_scale  # gradient noise scale B_simple
    every: int | None = DiagnosticsSpec.every  # steps between measurements (None: each eval)
    iterations: int = DiagnosticsSpec.iterations  # Lanczos iterations for sharpness
    max_examples: int = DiagnosticsSpec.max_examples  # examples for per-example gradients


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


def new_run_dir(resume: str | None, sweep_name: str) -> str:
    """`resume` when given, else a new directory `outputs/<sweep_name>/<stamp>` that this
    process creates (takes): the stamp is the time to the second, with `_2`, `_3`, ...
    appended when another invocation took it first, so two runs started in the same
    second never share a directory. The same value for every call in one process."""
    if resume is not None:
        return str(resume)
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


# ---------------------------------------------------------------------------- validation
def validate(cfg: DictConfig) -> StudyConfig:
    """Check the composed config against the schema and ranges; return it typed.

    Hydra accepts `+train.epochz=3` even with a schema, so the composed config is merged
    back into `StudyConfig` here, which rejects unknown keys.
    """
    try:
        plain = plain_config(cfg)
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StudyConfig), plain))
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None
    if typed.engine not in ENGINES:
        raise ConfigError(f"engine: must be one of {sorted(ENGINES)}, got {typed.engine!r}")
    if typed.device not in DEVICES:
        raise ConfigError(f"device: must be one of {list(DEVICES)}, got {typed.device!r}")
    if typed.objective.direction not in ("minimize", "maximize"):
        raise ConfigError(
            f"objective.direction: must be minimize or maximize, got {typed.objective.direction!r}"
        )
    if typed.seed < 0:
        raise ConfigError(f"seed: must be >= 0, got {typed.seed}")
    if typed.storage.retries < 1:
        raise ConfigError(f"storage.retries: must be >= 1, got {typed.storage.retries}")
    if typed.sweep is not None:
        if not typed.sweep.seeds:
            raise ConfigError(f"sweep.seeds: sweep {typed.sweep.name!r} has no seeds (empty grid)")
        if any(s < 0 for s in typed.sweep.seeds):
            raise ConfigError(f"sweep.seeds: seeds must be >= 0, got {typed.sweep.seeds}")
        if len(set(typed.sweep.seeds)) != len(typed.sweep.seeds):
            raise ConfigError(f"sweep.seeds: duplicate seeds in {typed.sweep.seeds}")
    return typed


def resolve_device(name: str) -> torch.device:
    """The torch device of `device`: `auto` is CUDA when available, else CPU; `cuda`
    without CUDA is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """`cfg` without the `hydra` node, interpolations resolved, as plain containers."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    first = str(err).splitlines()[0]
    return f"{key}: {first}" if key else first


def build_trial(plain: dict[str, Any], seed: int, labels: dict[str, str]) -> TrialSpec:
    """Instantiate the groups of a validated config (see `plain_config`) into a `TrialSpec`."""
    specs = {group: instantiate_group(plain, group) for group in SPEC_GROUPS}
    transforms = {group: instantiate_entries(plain, group) for group in TRANSFORM_GROUPS}
    check_values("train", plain["train"], _hints(TrainSpec))
    check_values("diagnostics", plain.get("diagnostics", {}), _hints(DiagnosticsSpec))
    try:
        train_spec = TrainSpec(**plain["train"])
        diagnostics = DiagnosticsSpec(**plain.get("diagnostics", {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    trial = TrialSpec(specs["task"], specs["model"], specs["optimizer"], train_spec, seed,
                      labels, diagnostics)
    if not any(transforms.values()):
        return trial
    from study.failures import apply_transforms
    from study.failures.base import NotApplicable

    try:
        return apply_transforms(trial, transforms["failure"], transforms["mitigation"])
    except NotApplicable as err:
        raise NotApplicableError(f"{'+'.join(labels.get(g) or g for g in TRANSFORM_GROUPS)}: "
                                 f"{err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{'+'.join(labels.get(g) or g for g in TRANSFORM_GROUPS)}: {err}"
                          ) from None


def instantiate_entries(plain: dict[str, Any], group: str) -> list[tuple[str, Any]]:
    """(entry name, transform) for each entry of a failure/mitigation node, in order.

    An entry whose `_target_` is a function (not a class) becomes a
    `study.failures.FunctionTransform` calling it with the entry's other keys.
    """
    node = plain.get(group) or {}
    if not isinstance(node, dict):
        raise ConfigError(f"{group}: expected named entries with a _target_, got {node!r}")
    out = []
    for name, entry in node.items():
        if entry is None:  # an entry switched off with `~failure.name` or `name: null`
            continue
        if not isinstance(entry, dict) or "_target_" not in entry:
            raise ConfigError(f"{group}.{name}: expected a config with a _target_, got {entry!r}")
        target_path = entry["_target_"]
        try:
            target = get_class(target_path) if _is_class(target_path) else None
        except Exception as err:
            raise ConfigError(f"{group}.{name}._target_: cannot import {target_path!r} ({err})"
                              ) from None
        if target is None:
            from study.failures.base import FunctionTransform, freeze

            params = tuple(sorted((k, freeze(v)) for k, v in entry.items() if k != "_target_"))
            out.append((name, FunctionTransform(target_path, params)))
        else:
            out.append((name, instantiate_group({f"{group}.{name}": entry}, f"{group}.{name}")))
    return out


def _is_class(path: str) -> bool:
    """Whether `path` names a class (else a function); raises if it names nothing."""
    from hydra.utils import get_object

    try:
        return inspect.isclass(get_object(path))
    except Exception as err:
        raise ConfigError(f"_target_: cannot import {path!r} ({err})") from None


def instantiate_group(plain: dict[str, Any], group: str) -> Any:
    """Build `plain[group]` through its `_target_`, naming unknown keys and bad values."""
    node = plain.get(group)
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(f"{group}: expected a config with a _target_, got {node!r}")
    values = dict(node)
    target_path = values.pop("_target_")
    try:
        target = get_class(target_path)
    except Exception as err:  # hydra raises ImportError / ValueError variants
        raise ConfigError(f"{group}._target_: cannot import {target_path!r} ({err})") from None
    known = _init_fields(target)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{group}.{unknown[0]}: unknown key for {target.__name__} "
            f"(known keys: {', '.join(sorted(known))})"
        )
    check_values(group, values, _hints(target))
    try:
        return target(**values)
    except ValueError as err:  # the specs' own range checks name the key already
        raise ConfigError(str(err)) from None
    except TypeError as err:
        raise ConfigError(f"{group}: {err}") from None


def _init_fields(target: type) -> set[str]:
    if dataclasses.is_dataclass(target):
        return {f.name for f in dataclasses.fields(target) if f.init}
    params = inspect.signature(target).parameters
    return {name for name in params if name != "self"}


def check_values(group: str, values: dict[str, Any], hints: dict[str, Any]) -> None:
    """Raise ConfigError naming `group.key` for a value that is not a finite number where
    the field is annotated `float` or `int` (a string, a bool, NaN, an infinity), or a
    non-finite float anywhere."""
    for key, value in values.items():
        hint = hints.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint in (float, int) and not number:
            raise ConfigError(f"{group}.{key}: expected a number, got {value!r}")
        if hint is int and isinstance(value, float):
            raise ConfigError(f"{group}.{key}: expected an integer, got {value!r}")
        if number and not math.isfinite(value):
            raise ConfigError(f"{group}.{key}: must be a finite number, got {value!r}")


@functools.cache  # resolving annotations is slow, and a sweep asks once per point and group
def _hints(target: Any) -> dict[str, Any]:
    """The resolved type annotations of `target`'s fields or arguments ({} if unresolvable;
    shared: read it, never change it)."""
    try:
        return typing.get_type_hints(target if dataclasses.is_dataclass(target)
                                     else target.__init__)
    except Exception:  # a target with annotations that do not resolve: nothing to check
        return {}
