"""Claims: testable statements a sweep declares about its own results (the spec language).

A claim (one entry of `sweep.claims`) names a metric, a comparison and the expected direction:

    - statement: Standardizing inputs lowers the final validation loss of unscaled features
      metric: val_loss_final        # a trials.parquet column, or a status (diverged -> 0/1)
      where: {failure: unscaled}    # optional: only these trials (value or list of values)
      compare: {axis: mitigation, arm: standardize_inputs, baseline: none}
      expect: lower                 # lower | higher
      log: true                     # optional: compare log10 of the metric

    - statement: Divergence rises with the learning rate for SGD
      metric: diverged
      where: {optimizer: sgd}
      trend: optimizer.lr           # an axis; log10 of positive numbers, else the axis order
      expect: increasing            # increasing | decreasing

    - statement: Standardized inputs at full batch beat raw inputs at batch 10
      metric: val_loss_final
      log: true
      compare:                      # arms that differ on several axes: axis -> value each
        arm: {mitigation: standardize_inputs, train.batch_size: full}
        baseline: {mitigation: none, train.batch_size: 10}
      expect: lower

    - statement: Standardizing already unit-scale features changes nothing
      metric: val_loss_final
      log: true
      where: {failure: none}
      compare: {axis: mitigation, arm: standardize_inputs, baseline: none}
      expect: same                  # an equivalence claim: |effect| < margin
      margin: 0.05                  # in the effect's unit (here log10 ratio: +-12%)

Validation (`check_claims`) runs with the sweep, before any training, and again when
`python -m analysis` scores claims given after the run: keys, metric and axes, and where
the values are known (a grid's planned trials, a run's trials), that every value a claim
selects is one some trial has. Scoring (effect, interval,
p-value, verdict) is `analysis.claims`: a function of trials.parquet and these specs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

SAME = "same"
DIRECTIONS = {"compare": ("lower", "higher", SAME), "trend": ("increasing", "decreasing", SAME)}
KEYS = {"statement", "metric", "where", "compare", "trend", "expect", "log", "pair_by",
        "margin"}


class ClaimError(ValueError):
    """A claim is malformed or names something the sweep does not have."""


# --------------------------------------------------------------------------- validation
def check_claims(claims: Sequence[Mapping[str, Any]], axes: Sequence[str],
                 metrics: Sequence[str], source: str = "sweep.claims",
                 values: Mapping[str, Sequence[Any]] | None = None,
                 searched: Sequence[str] = ()) -> None:
    """Raise ClaimError naming the first bad claim key (before any training), as
    `source[i].key` (`source`: where the claims were written).

    `values`: the values each axis takes, where known (a grid's): an arm, a baseline or a
    `where` value of such an axis must be one of them, and an arm must differ from its
    baseline. A claim that selects no trial would otherwise read `inconclusive` with
    n_trials 0, as if its evidence had been weighed. `searched`: a search's numeric keys
    (every proposal draws its own values): its trials have no pairs, so a compare claim is
    refused (pairing by seed would set the means of proposals the sampler chose apart for
    each arm against each other, one pair per seed)."""
    for i, claim in enumerate(claims):
        where = f"{source}[{i}]"
        if not isinstance(claim, Mapping):
            raise ClaimError(f"{where}: expected a mapping, got {claim!r}")
        unknown = sorted(set(claim) - KEYS)
        if unknown:
            raise ClaimError(f"{where}.{unknown[0]}: unknown claim key "
                             f"(known: {', '.join(sorted(KEYS))})")
        for key in ("statement", "metric", "expect"):
            if key not in claim:
                raise ClaimError(f"{where}.{key}: missing")
        if claim["metric"] not in metrics:
            raise ClaimError(f"{where}.metric: unknown metric {claim['metric']!r}")
        kind = kind_of(claim, where)
        if claim["expect"] not in DIRECTIONS[kind]:
            raise ClaimError(f"{where}.expect: must be one of {list(DIRECTIONS[kind])} for a "
                             f"{kind} claim, got {claim['expect']!r}")
        if kind == "compare":
            compared = compared_axes(claim["compare"], f"{where}.compare")
            if searched:
                raise ClaimError(
                    f"{where}.compare: a search's trials have no pairs (each proposal draws "
                    f"its own {', '.join(searched)}), so a compare claim needs a grid "
                    f"(sweep.axes); a trend over a searched key is a claim a search can make")
        else:
            compared = [claim["trend"]]
        for axis in compared:
            if axis not in axes:
                raise ClaimError(f"{where}: {axis!r} is not an axis of the sweep ({list(axes)})")
        _check_values(claim, kind, dict(values or {}), where)
        margin = claim.get("margin")
        if claim["expect"] == SAME:
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) \
                    or not 0 < margin < float("inf"):
                raise ClaimError(f"{where}.margin: an equivalence claim (expect: same) needs a "
                                 f"margin > 0 in the effect's unit, got {margin!r}")
        elif margin is not None:
            raise ClaimError(f"{where}.margin: only an equivalence claim (expect: same) has "
                             f"a margin")


def _check_values(claim: Mapping[str, Any], kind: str, values: dict[str, Sequence[Any]],
                  where: str) -> None:
    """The values a claim selects exist on their axes, and its `where` keeps its arm and
    baseline, or two values of its trend's axis (`check_claims`)."""
    filters = claim.get("where") or {}
    if not isinstance(filters, Mapping):
        raise ClaimError(f"{where}.where: expected a mapping of column -> value(s), got "
                         f"{filters!r}")
    listed = {column: wanted if isinstance(wanted, (list, tuple)) else [wanted]
              for column, wanted in filters.items()}
    for column, wanted in listed.items():
        for value in wanted:
            if values.get(column) and not takes(values[column], value):
                raise ClaimError(f"{where}.where.{column}: no trial has {column}={value!r} "
                                 f"(its values: {list(values[column])}); the claim would "
                                 f"select nothing")
    if kind != "compare":
        axis = claim["trend"]
        if axis in listed and len({repr(v) for v in listed[axis]}) < 2:
            raise ClaimError(f"{where}.where.{axis}: a trend over {axis} needs at least two "
                             f"of its values, the claim keeps {listed[axis]!r}")
        return
    arm, baseline = arms(claim["compare"])
    for side, chosen in (("arm", arm), ("baseline", baseline)):
        for axis, value in chosen.items():
            if axis in listed and not takes(listed[axis], value):
                raise ClaimError(f"{where}.where.{axis}: keeps {listed[axis]!r}, without "
                                 f"the {side}'s {value!r}; the claim would compare nothing")
            if values.get(axis) and not takes(values[axis], value):
                raise ClaimError(f"{where}.compare.{side}: no trial has {axis}={value!r} "
                                 f"(its values: {list(values[axis])}); the claim would "
                                 f"compare nothing")
    if all(takes([baseline[axis]], value) for axis, value in arm.items()):
        raise ClaimError(f"{where}.compare: the arm and the baseline are the same trials "
                         f"({arm!r})")


def selected_columns(claims: Sequence[Any]) -> set[str]:
    """The trials columns `claims` select on: their `where` keys and their arms' axes
    (of well-formed parts; `check_claims` names the rest)."""
    columns: set[str] = set()
    for claim in claims:
        if not isinstance(claim, Mapping):
            continue
        where = claim.get("where")
        columns |= set(where) if isinstance(where, Mapping) else set()
        compare = claim.get("compare")
        if isinstance(compare, Mapping):
            for side in (compare.get("arm"), compare.get("baseline")):
                columns |= set(side) if isinstance(side, Mapping) else set()
            if isinstance(compare.get("axis"), str):
                columns.add(compare["axis"])
    return columns


def takes(options: Sequence[Any], value: Any) -> bool:
    """Whether `value` is one of `options` (`selects` one of them)."""
    return any(selects(option, value) for option in options)


def selects(option: Any, value: Any) -> bool:
    """Whether a claim's `value` selects a trial whose column holds `option`: numbers
    within 1e-9 relative (an axis written 1e-1 in YAML and 0.1 in a claim), else as text
    (8 selects "8"). The one matching rule of the plan's checks and of the scoring."""
    if _number(value) and _number(option) and math.isclose(option, value, rel_tol=1e-9):
        return True
    return str(option) == str(value)


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def compared_axes(spec: Any, where: str) -> list[str]:
    """The axes a compare claim's arms differ on: `[axis]`, or the keys of mapping arms."""
    if not isinstance(spec, Mapping):
        raise ClaimError(f"{where}: expected a mapping with arm and baseline, got {spec!r}")
    missing = {"arm", "baseline"} - set(spec)
    if missing:
        raise ClaimError(f"{where}.{sorted(missing)[0]}: missing")
    arm, baseline = spec["arm"], spec["baseline"]
    if isinstance(arm, Mapping) or isinstance(baseline, Mapping):
        if "axis" in spec:
            raise ClaimError(f"{where}.axis: arms given as axis -> value mappings name their "
                             f"axes themselves; remove axis")
        if not (isinstance(arm, Mapping) and isinstance(baseline, Mapping)) or not arm \
                or set(arm) != set(baseline):
            raise ClaimError(f"{where}: arm and baseline must both map the same axes to "
                             f"values, got {arm!r} and {baseline!r}")
        return list(arm)
    if "axis" not in spec:
        raise ClaimError(f"{where}.axis: missing")
    return [spec["axis"]]


def arms(spec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arm, baseline) as axis -> value mappings (one axis, or several)."""
    if isinstance(spec["arm"], Mapping):
        return dict(spec["arm"]), dict(spec["baseline"])
    return {spec["axis"]: spec["arm"]}, {spec["axis"]: spec["baseline"]}


def kind_of(claim: Mapping[str, Any], where: str = "claim") -> str:
    """"compare" or "trend"; ClaimError unless the claim gives exactly one of them."""
    if ("compare" in claim) == ("trend" in claim):
        raise ClaimError(f"{where}: give exactly one of compare or trend")
    return "compare" if "compare" in claim else "trend"


def plain_claims(claims: Any) -> list[dict[str, Any]]:
    """`claims` (None, a list of mappings, or an OmegaConf list) as plain dicts and lists."""
    if claims is None:
        return []
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(claims, (DictConfig, ListConfig)):
        claims = OmegaConf.to_container(claims, resolve=True)
    return [dict(c) if isinstance(c, Mapping) else c for c in claims]
