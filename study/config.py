"""Config validation and the specs built from it: the Hydra edge of `study`.

Only this module and the entry points see `DictConfig`. Composition catches wrong types and
unknown options (Hydra itself, against the `StudyConfig` schema that `study.schema`
registers); `validate` catches what Hydra lets through (keys appended with `+`,
out-of-range values); `build_trial` turns a composed config into a frozen `TrialSpec`,
instantiating the config-group options through their `_target_` after checking their keys.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
import typing
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from study.engine import ENGINES
from study.schema import (  # noqa: F401  (GROUPS and plain_config: imported from here too)
    GROUPS,
    SPEC_GROUPS,
    TRANSFORM_GROUPS,
    ConfigError,
    StudyConfig,
    plain_config,
    sweep_name_problem,
)
from study.trial import DiagnosticsSpec, TrainSpec, TrialSpec

DEVICES = ("auto", "cpu", "cuda")


class NotApplicableError(ConfigError):
    """A failure mode or mitigation does not apply to the task (e.g. outliers on blobs)."""


# ---------------------------------------------------------------------------- validation
def validate(cfg: DictConfig) -> StudyConfig:
    """Check the composed config against the schema and ranges; return it typed.

    Hydra accepts `+train.epochz=3` even with a schema, so the composed config is merged
    back into `StudyConfig` here, which rejects unknown keys.
    """
    try:
        plain = plain_config(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None
    return validate_plain(plain)


def validate_plain(plain: dict[str, Any]) -> StudyConfig:
    """`validate` of a config already made plain (`plain_config`): the same checks, the
    same errors."""
    try:
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
        # `+sweep.axes.model.depth=[1,4]` on a command line nests, as Hydra reads dots
        typed.sweep.axes = _flat_keys(typed.sweep.axes, "sweep.axes",
                                      lambda v: not isinstance(v, dict))
        typed.sweep.space = _flat_keys(typed.sweep.space, "sweep.space", lambda v: (
            not isinstance(v, dict) or bool({"low", "high"} & set(v))))
        problem = sweep_name_problem(typed.sweep.name)
        if problem:
            raise ConfigError(problem)
        if not typed.sweep.seeds:
            raise ConfigError(f"sweep.seeds: sweep {typed.sweep.name!r} has no seeds (empty grid)")
        if any(s < 0 for s in typed.sweep.seeds):
            raise ConfigError(f"sweep.seeds: seeds must be >= 0, got {typed.sweep.seeds}")
        if len(set(typed.sweep.seeds)) != len(typed.sweep.seeds):
            raise ConfigError(f"sweep.seeds: duplicate seeds in {typed.sweep.seeds}")
    return typed


def _flat_keys(node: Any, where: str, is_leaf: typing.Callable[[Any], bool]
               ) -> Any:
    """`node` ({key: leaf or nested mapping}) with nested keys joined by dots, in order
    ({"model": {"depth": [1, 4]}} -> {"model.depth": [1, 4]}); not a mapping: as it is
    (validation names it). A key given both ways is refused."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if is_leaf(value) or not value:
            if prefix in out:
                raise ConfigError(f"{where}.{prefix}: given twice (as {prefix} and nested)")
            out[prefix] = value
        else:
            for key, child in value.items():
                walk(f"{prefix}.{key}", child)

    for key, value in node.items():
        walk(str(key), value)
    return out


def resolve_device(name: str) -> torch.device:
    """The torch device of `device`: `auto` is CUDA when available, else CPU; `cuda`
    without CUDA is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    first = str(err).splitlines()[0]
    return f"{key}: {first}" if key else first


# The top-level keys of a config that `build_trial` reads: a trial's configuration. The
# others say how to run (engine, device, workers, storage, ...), what is told (objective),
# or are the sweep's own; the trial's seed is an argument (a sweep's `sweep.seeds`).
TRIAL_KEYS = (*GROUPS, "train", "diagnostics")


def build_trial(plain: dict[str, Any], seed: int, labels: dict[str, str]) -> TrialSpec:
    """Instantiate the groups of a validated config (see `plain_config`) into a `TrialSpec`;
    of `plain` it reads the `TRIAL_KEYS` only."""
    specs = {group: instantiate_group(plain, group) for group in SPEC_GROUPS}
    for group, spec in specs.items():
        check_kind(group, spec, plain[group]["_target_"])
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
        target = locate(target_path, f"{group}.{name}._target_")
        if not inspect.isclass(target):
            from study.failures.base import FunctionTransform, freeze

            params = tuple(sorted((k, freeze(v)) for k, v in entry.items() if k != "_target_"))
            out.append((name, FunctionTransform(target_path, params)))
        else:
            out.append((name, instantiate_group({f"{group}.{name}": entry}, f"{group}.{name}")))
    return out


def locate(path: Any, key: str) -> Any:
    """The object a `_target_` names: its first name imported as a module, then each next
    name an attribute, or else a submodule imported. Raises ConfigError naming `key` and
    the reason in one line (Hydra's own lookup logs several lines and nests its reasons)."""
    parts = path.split(".") if isinstance(path, str) else []
    if not parts or not all(part.isidentifier() for part in parts):
        raise ConfigError(f"{key}: expected a dotted path such as module.Class, got {path!r}")
    found = _import(parts[0], path, key)
    for depth in range(1, len(parts)):
        if not hasattr(found, parts[depth]) and inspect.ismodule(found):
            # a submodule not imported yet: importing it binds it on its parent
            _import(".".join(parts[:depth + 1]), path, key, missing_ok=True)
        if not hasattr(found, parts[depth]):
            raise ConfigError(f"{key}: cannot import {path!r} ({'.'.join(parts[:depth])!r} "
                              f"has no attribute {parts[depth]!r})")
        found = getattr(found, parts[depth])
    return found


def _import(module: str, path: str, key: str, missing_ok: bool = False) -> Any:
    """`module` imported; a module that does not exist is None where `missing_ok`, else
    ConfigError, as is one whose own code raised (a user's module with a bug)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            if missing_ok:
                return None
            raise ConfigError(f"{key}: cannot import {path!r} (no module named {module!r})"
                              ) from None
        raise ConfigError(f"{key}: cannot import {path!r} (importing {module!r} failed: "
                          f"{err})") from None
    except Exception as err:
        reason = (str(err).strip().splitlines() or ["no message"])[0]
        raise ConfigError(f"{key}: cannot import {path!r} (importing {module!r} raised "
                          f"{type(err).__name__}: {reason})") from None


def instantiate_group(plain: dict[str, Any], group: str) -> Any:
    """Build `plain[group]` through its `_target_`, naming unknown keys and bad values."""
    node = plain.get(group)
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(f"{group}: expected a config with a _target_, got {node!r}")
    values = dict(node)
    target_path = values.pop("_target_")
    target = locate(target_path, f"{group}._target_")
    if not inspect.isclass(target):
        raise ConfigError(f"{group}._target_: {target_path!r} is not a class "
                          f"({type(target).__name__})")
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
    except Exception as err:  # noqa: BLE001  (a user's class may raise anything)
        raise ConfigError(f"{group}: {target_path} raised {type(err).__name__}: {err}"
                          ) from None


# What the engines ask of each spec group's object: a base class, or a task's protocol.
TASK_MEMBERS = ("loss", "input_dim", "output_dim", "n_train", "n_val", "generate")


def check_kind(group: str, spec: Any, target_path: str) -> None:
    """Refuse a spec of the wrong kind (a task class as the optimizer): the engines would
    fail on it mid-run."""
    from study.models import ModelSpec
    from study.optimizers import OptimizerSpec

    bases = {"optimizer": OptimizerSpec, "model": ModelSpec}
    if group in bases and not isinstance(spec, bases[group]):
        base = bases[group]
        raise ConfigError(f"{group}._target_: {target_path} is no {group} spec (not a "
                          f"subclass of {base.__module__}.{base.__name__})")
    if group == "task":
        missing = [m for m in TASK_MEMBERS if not hasattr(spec, m)]
        if missing:
            raise ConfigError(f"task._target_: {target_path} is not a task (it lacks "
                              f"{', '.join(missing)}: see study.tasks.base.Task)")


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
