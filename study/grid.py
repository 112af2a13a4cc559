"""Expand a sweep declaration into its grid points: every axis combination x every seed.

Axes come in two kinds. A *group axis* (`task`, `model`, `optimizer`, `failure`,
`mitigation`) lists config-group options (for `failure` / `mitigation` a value may combine
several options, written `outliers+unscaled` or as a list `[outliers, unscaled]`; `none` is
the option without any entry): each combination of group options is composed by Hydra (with
the user's own overrides), so the options' YAML files are used exactly as `python -m study
task=blobs` would use them. A *scalar axis* (`optimizer.lr`, `train.batch_size`,
`model.depth`, ...) sets one key of the composed, resolved config to each listed value
(interpolations that refer to that key are not re-evaluated); every point is instantiated,
so an out-of-range value fails before any training.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from study.compositions import Compose, Ready, combination, compose_plain, compositions
from study.config import GROUPS, TRANSFORM_GROUPS, NotApplicableError, build_trial, plain_config
from study.schema import ConfigError, StudyConfig
from study.trial import TrialSpec

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass(frozen=True)
class GridPoint:
    """One trial of a sweep: its axis values (`params`, seed included) and its spec."""

    params: dict[str, Any]
    trial: TrialSpec


@dataclass(frozen=True)
class SweepPlan:
    """A sweep's declared axes and seeds, and the points they expand to (axis order)."""

    name: str | None
    axes: dict[str, list[Any]]
    seeds: list[int]
    points: list[GridPoint]
    # Distributions the storage records for some params instead of the categorical one of
    # their axis values (an edge search's learning rates: one log-float range).
    distributions: dict[str, Any] = dataclasses.field(default_factory=dict)


def expand_grid(cfg: DictConfig, compose: Compose, overrides: Sequence[str],
                 typed: StudyConfig, base_labels: dict[str, str],
                 ready: Ready | None = None) -> SweepPlan:
    """Every combination of the sweep's axes x its seeds, group axes outermost; the group
    options' configurations in `ready` were composed ahead (`compositions.Ahead`)."""
    axes = _check_axes(typed.sweep.axes)
    check_sweep_claims(typed.sweep.claims, axes)
    _check_overrides(overrides, axes, typed.sweep)
    group_axes = [a for a in axes if a in GROUPS]
    scalar_axes = [a for a in axes if a not in GROUPS]
    seeds = list(typed.sweep.seeds)

    points: list[GridPoint] = []
    skipped = 0  # axis combinations whose failure/mitigation does not apply to the task
    spec_axes = [a for a in group_axes if a not in TRANSFORM_GROUPS]
    composed = compose_plain(compose, overrides, compositions(axes), ready)
    base = plain_config(cfg)  # validated above
    for group_values in itertools.product(*(axes[a] for a in group_axes)):
        picked = dict(zip(group_axes, group_values, strict=True))
        spec_picked = tuple((g, picked[g]) for g in spec_axes)
        plain = {**(composed[spec_picked] if spec_picked else base),
                 **{g: composed[((g, v),)].get(g) for g, v in picked.items()
                    if g in TRANSFORM_GROUPS}}
        labels = {**base_labels, **{g: str(v) for g, v in picked.items()}}
        for scalar_values in itertools.product(*(axes[a] for a in scalar_axes)):
            scalars = dict(zip(scalar_axes, scalar_values, strict=True))
            try:
                template = build_trial(_with_values(plain, scalars), seeds[0], labels)
            except NotApplicableError:
                if not typed.sweep.skip_inapplicable:
                    raise
                skipped += 1
                continue
            for seed in seeds:
                trial = template if seed == seeds[0] else reseeded(template, seed)
                points.append(GridPoint({**picked, **scalars, "seed": seed}, trial))
    if skipped:
        log.info("%s: skipped %d axis combinations whose failure mode or mitigation does not "
                 "apply to the task (sweep.skip_inapplicable)", typed.sweep.name, skipped)
    if not points:
        raise ConfigError("sweep.axes: every point was skipped as inapplicable (empty grid)")
    check_sweep_claims(typed.sweep.claims, axes, planned_values(typed.sweep.claims, points))
    return SweepPlan(typed.sweep.name, axes, seeds, points,
                     numeric_distributions({a: axes[a] for a in scalar_axes}))


def numeric_distributions(axes: dict[str, list[Any]]) -> dict[str, Any]:
    """The distribution the storage records for each numeric axis: IntDistribution for
    integers, FloatDistribution for other numbers, on a log scale when every value is
    positive (>= 1 for integers) and they span at least a factor of 10; so Optuna's
    tools (optuna-dashboard, importance evaluators) read the learning rate as a log-scaled
    number. Axes with a non-numeric value (`full`, a string, a bool, a list) stay
    categorical (absent here)."""
    from optuna.distributions import FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name, values in axes.items():
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and math.isfinite(v) for v in values):
            continue
        low, high = min(values), max(values)
        integer = all(isinstance(v, int) for v in values)
        log = (low >= 1 if integer else low > 0) and high >= 10 * low
        out[name] = (IntDistribution(low, high, log=log) if integer
                     else FloatDistribution(float(low), float(high), log=log))
    return out


def _check_axes(raw: dict[str, Any]) -> dict[str, list[Any]]:
    if not raw:
        raise ConfigError("sweep.axes: the sweep declares no axes (empty grid)")
    axes: dict[str, list[Any]] = {}
    for name, values in raw.items():
        if name == "seed":
            raise ConfigError("sweep.axes.seed: seeds are declared by sweep.seeds, not an axis")
        if not isinstance(values, list):
            raise ConfigError(f"sweep.axes.{name}: expected a list of values, got {values!r}")
        if name in TRANSFORM_GROUPS:  # [outliers, unscaled] and "outliers+unscaled" alike
            values = [combination(v) for v in values]
        if not values:
            raise ConfigError(f"sweep.axes.{name}: no values (empty grid)")
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"sweep.axes.{name}: duplicate values in {values}")
        if "." not in name and name not in GROUPS:
            raise ConfigError(
                f"sweep.axes.{name}: not a config group ({', '.join(GROUPS)}) nor a dotted "
                f"key such as optimizer.lr"
            )
        axes[name] = values
    return axes


def _check_overrides(overrides: Sequence[str], axes: dict[str, list[Any]], sweep: Any) -> None:
    """Refuse a command-line value for a key the sweep sets itself (an axis, or `seed`):
    the sweep would silently replace it."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in axes:
            raise ConfigError(
                f"{key}: {key}={value} on the command line, but {key} is an axis of sweep "
                f"{sweep.name!r} ({axes[key]}), which would replace it; remove it, or edit "
                f"the sweep's axes"
            )
        if key == "seed":
            raise ConfigError(
                f"seed: seed={value} on the command line, but sweep {sweep.name!r} trains "
                f"the seeds {list(sweep.seeds)}; set sweep.seeds=[...] instead"
            )


def check_sweep_claims(claims: list[Any], axes: dict[str, list[Any]],
                       values: dict[str, list[Any]] | None = None,
                       searched: Sequence[str] = ()) -> None:
    """`study.claims.check_claims` of a sweep's claims, as ConfigError; `values`: the
    values the planned trials take in the columns the claims select on (`planned_values`),
    where the plan knows them; `searched`: a search's numeric keys."""
    from study.claims import ClaimError, check_claims
    from study.metrics import STATUSES, SUMMARY_METRICS

    try:
        check_claims(claims, list(axes), [*SUMMARY_METRICS, *STATUSES, "objective"],
                     values=values, searched=searched)
    except ClaimError as err:
        raise ConfigError(str(err)) from None


def planned_values(claims: list[Any], points: Sequence[GridPoint]) -> dict[str, list[Any]]:
    """The values `points` take in each column of trials.parquet (their params and
    configs) that a claim selects on: its `where` keys and its arms' axes."""
    from study.claims import selected_columns

    columns = selected_columns(claims)
    if not columns:
        return {}
    taken: dict[str, dict[str, Any]] = {c: {} for c in columns}
    for point in points:
        # a point's config record only where a column is not one of its axes
        row = point.params if columns <= point.params.keys() else {
            **point.trial.flat(), **point.params}
        for column in columns:
            if column in row:
                taken[column].setdefault(repr(row[column]), row[column])
    return {c: list(v.values()) for c, v in taken.items() if v}


def group_label(cfg: DictConfig, group: str, choice: Any) -> str:
    """The label of `group` in `cfg`: Hydra's choice, or for an option list (Hydra records
    none) the entry names joined with "+" ("none" without entries)."""
    if choice is not None and group not in TRANSFORM_GROUPS:
        return str(choice)
    if group in TRANSFORM_GROUPS:
        if isinstance(choice, str) and choice:
            return choice
        node = cfg.get(group)
        return "+".join(str(k) for k in node) if node else "none"
    return ""


def _with_values(plain: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`plain` with each dotted key of `values` set (the key must exist), `plain` itself
    unchanged. Only the dicts on the way to a set key are copied; the rest is shared with
    `plain`, which `build_trial` only reads (a deep copy of the whole config per point
    would be most of the expansion's time: lr_batch has 312 points)."""
    out = dict(plain)
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node: Any = out
        for part in parents:
            child = node.get(part) if isinstance(node, dict) else None
            if isinstance(child, dict):
                child = node[part] = dict(child)
            node = child
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"sweep.axes.{key}: no such key in the composed config")
        node[leaf] = value
    return out


def reseeded(trial: TrialSpec, seed: int) -> TrialSpec:
    return dataclasses.replace(trial, seed=seed)
