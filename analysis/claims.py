"""Score a sweep's claims on its trials: effect, 95% interval, p, q and verdict per claim.

`evaluate_claims(trials, claims, axes)` is a pure function of the trials table and the
claim specs (the language: `study.claims`). `score_run(run_dir)` applies it to a run
directory's files and writes claims.parquet; the run calls it when its trials are written,
and `python -m analysis RUN_DIR` calls it again, so a report's verdicts are rebuilt from the
files alone.

Where the specs come from (`score_claims`): the run's saved config (`.hydra/config.yaml`,
`sweep.claims`), then, with `python -m analysis RUN_DIR --claims FILE`, the claims of FILE
(a sweep YAML such as conf/sweep/NAME.yaml, a mapping with `claims:`, or a list of claims):
a claim of FILE replaces the saved claim with the same statement, and the others are added.
So a claim added to a sweep's YAML after the run is scored with
`python -m analysis RUN_DIR --claims conf/sweep/NAME.yaml`.

Scoring:

- **compare**, paired by seed: each trial of the `arm` is matched with the `baseline` trial
  that has the same seed and the same value of every other sweep axis. With arms given as
  mappings (axis -> value, the same axes in both), the arm and the baseline differ on all
  of those axes, and pairs match on the remaining ones. Effect = mean of the
  paired differences (arm - baseline), in the metric's units (log10 ratio with `log:
  true`); for a status (0/1 per trial), a change in the share of trials with it.
- **trend**: trials are grouped by seed and every other axis; effect = the pooled
  within-group least-squares slope of the metric on the axis value (per decade for a log
  axis): sum over groups of Sxy / sum of Sxx.
- A loss of one split (`{split}_loss_final`, `_end`, `_best`) is compared **capped at the
  trial's initial loss of that split** (a non-finite loss counts as the initial one): a
  trial that blew up counts as no better than its initialization, so it stays in the
  comparison without making the effect infinite. The columns keep the measured values; the
  claim's unit says "capped at initial". Pairs or trials with any other non-finite value
  are left out (n says how many remain); so are the trials a search's pruner stopped
  (status `pruned`: their runs were cut), but in a claim about the share pruned.
- `unit`: the effect's unit in words (e.g. "log10 ratio of val_loss_final (arm /
  baseline)", "change in share diverged per decade of optimizer.lr").
- 95% interval: percentile bootstrap (`analysis.stats.bootstrap`: 2,000 resamples of the
  pairs / of the groups' (Sxy, Sxx)).
- p-value, two-sided: for a compare claim, a permutation test flipping the signs of the
  paired differences (`analysis.stats.sign_flip_p`: 9,999 random sign patterns, or exact
  over all 2^n of them up to n = 13 pairs); for a trend, 9,999 shuffles of the metric
  within each group
  (scipy's permutation test has no strata, so these are drawn here and scored with the same
  convention, `analysis.stats.permutation_p`). For an equivalence claim (`expect: same`,
  with `margin` m in the effect's unit): two one-sided tests (TOST) on the bootstrap
  distribution, p = max(P(effect <= -m), P(effect >= m)).
- Every draw of a claim comes from `analysis.stats.generator(statement)`: a claim's
  interval and p-value do not depend on the other claims or their order.
- False-discovery control across the claims scored together: Benjamini-Hochberg adjusted
  p-values (`q_value`); adding a claim can change the others' q (the family grows).
- Verdict: `supported` when q <= alpha (0.05) and the interval excludes 0 on the expected
  side; `contradicted` when q <= alpha and it excludes 0 on the other side; otherwise
  `inconclusive` (including claims with no pairs or no variation). An equivalence claim
  is `supported` when q <= alpha (the effect lies within +-m), `contradicted` when the 95%
  interval lies wholly outside [-m, m], else `inconclusive`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from analysis.aggregate import STATUS_ORDER
from analysis.stats import (
    N_PERMUTATIONS,
    bootstrap,
    generator,
    permutation_p,
    q_values,
    sign_flip_p,
)
from study import records
from study.claims import (
    SAME,
    ClaimError,
    arms,
    check_claims,
    compared_axes,
    kind_of,
    plain_claims,
    selected_columns,
    selects,
)

ALPHA = 0.05
# claims.parquet: records.CLAIM_COLUMNS (the columns every claims table has), then these.
DETAIL_COLUMNS = ("comparison", "expect", "p_value", "q_value", "n_units", "unit", "margin")
COLUMNS = (*records.CLAIM_COLUMNS, *DETAIL_COLUMNS)
HYDRA_CONFIG = Path(".hydra") / "config.yaml"


# ------------------------------------------------------------------------------ run dir
def score_run(run_dir: Path, claims: Sequence[Mapping[str, Any]] | None = None,
              claims_file: Path | None = None) -> pd.DataFrame | None:
    """Score claims on `run_dir`/trials.parquet (`score_claims`) and write claims.parquet;
    return the table, or None, writing nothing, when there is no claim."""
    frame = score_claims(run_dir, claims, claims_file)
    if frame is not None:
        records.write_claims(Path(run_dir), frame)
    return frame


def score_claims(run_dir: Path, claims: Sequence[Mapping[str, Any]] | None = None,
                 claims_file: Path | None = None) -> pd.DataFrame | None:
    """The claims table of `run_dir` from its files, or None when there is no claim.

    `claims`: the specs to score (default: `saved_claims`); the claims of `claims_file`
    replace those with the same statement and add the others (`merge_claims`). Raises
    ClaimError naming a bad claim, RecordError for an unreadable run.
    """
    run_dir = Path(run_dir)
    specs = saved_claims(run_dir) if claims is None else plain_claims(claims)
    extra = read_claims_file(claims_file) if claims_file is not None else []
    specs = merge_claims(specs, extra)
    if not specs:
        return None
    trials, meta = records.read_trials(run_dir)
    axes = meta.get("axes") or {}
    # A claim's own axis may be any column the trials vary on: a search records only its
    # categorical keys as axes, yet a trend over its continuous lr is a claim it can make.
    names = [*axes, *(c for c in trials.columns if c not in axes)]
    metrics = [*trials.columns, *STATUS_ORDER]
    # The file's own claims first, so that an error names the file and its own position;
    # their values against the trials' (a run's own claims had theirs checked against its
    # plan where it knew them, a grid's, and must not fail once it has trained).
    searched = meta.get("searched") or ()
    check_claims(extra, names, metrics, source=f"{claims_file}: claims",
                 values=_taken_values(trials, extra), searched=searched)
    check_claims(specs, names, metrics, searched=searched)
    return evaluate_claims(trials, specs, axes)


def _taken_values(trials: pd.DataFrame, specs: Sequence[Mapping[str, Any]]
                  ) -> dict[str, list[Any]]:
    """The values the trials take in each column a claim selects on (`selected_columns`),
    for `check_claims`: a value no trial has selects nothing."""
    columns = selected_columns(specs)
    values = {}
    for column in sorted(c for c in columns if c in trials.columns):
        try:
            values[column] = trials[column].dropna().unique().tolist()
        except TypeError:  # unhashable cells (lists): not checked
            continue
    return values


def saved_claims(run_dir: Path) -> list[dict[str, Any]]:
    """The claims of the run's saved config (`sweep.claims` of .hydra/config.yaml)."""
    path = Path(run_dir) / HYDRA_CONFIG
    config = _load_yaml(path) if path.is_file() else None
    sweep = config.get("sweep") if isinstance(config, Mapping) else None
    return plain_claims(sweep.get("claims") if isinstance(sweep, Mapping) else None)


def read_claims_file(path: Path) -> list[dict[str, Any]]:
    """Claims from a YAML file: a sweep file (`sweep: {claims: [...]}`), a mapping with
    `claims:`, or a list of claims. Raises ClaimError when it holds none of these."""
    path = Path(path)
    if not path.is_file():
        raise ClaimError(f"claims file {path} does not exist")
    content = _load_yaml(path)
    if isinstance(content, Mapping) and isinstance(content.get("sweep"), Mapping):
        content = content["sweep"]
    if isinstance(content, Mapping):
        content = content.get("claims")
    if not isinstance(content, list):
        raise ClaimError(f"{path}: expected a list of claims, a `claims:` list or a sweep "
                         f"file with `sweep.claims`")
    return plain_claims(content)


def merge_claims(saved: Sequence[Mapping[str, Any]], extra: Sequence[Mapping[str, Any]]
                 ) -> list[dict[str, Any]]:
    """`saved` in order, each replaced by the claim of `extra` with its statement, then the
    claims of `extra` with a new statement."""
    by_statement = {c.get("statement"): dict(c) for c in extra if isinstance(c, Mapping)}
    merged = [by_statement.pop(c.get("statement"), dict(c)) for c in saved]
    return merged + [c for c in (dict(c) for c in extra if isinstance(c, Mapping))
                     if c.get("statement") in by_statement]


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ClaimError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err


# --------------------------------------------------------------------------- evaluation
def evaluate_claims(trials: pd.DataFrame, claims: Sequence[Mapping[str, Any]],
                    axes: Mapping[str, Sequence[Any]] | Sequence[str] | None = None
                    ) -> pd.DataFrame:
    """One row per claim (`COLUMNS`): statement, metric, effect, ci_low, ci_high,
    verdict, n_trials, then comparison, expect, p_value, q_value, n_units (pairs or
    groups), unit (the effect's, in words) and margin (equivalence claims; else NaN).

    `axes`: the sweep's axes (names, or names -> values in sweep order); pairs and groups
    match on every axis but the claim's own, and on `seed`. Deterministic: each claim
    draws from `generator(statement)`.
    """
    axis_values = dict(axes) if isinstance(axes, Mapping) else {a: None for a in (axes or [])}
    rows = [_evaluate(trials, dict(claim), axis_values, generator(claim["statement"]))
            for claim in claims]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["q_value"] = q_values(frame["p_value"].to_numpy(dtype=float))
    frame["verdict"] = [_verdict(r.q_value, r.ci_low, r.ci_high, r.expect, r.margin)
                        for r in frame.itertuples()]
    return frame


def _evaluate(trials: pd.DataFrame, claim: dict[str, Any], axes: dict[str, Any],
              rng: np.random.Generator) -> dict[str, Any]:
    kind = kind_of(claim)
    frame = _filter(trials, claim.get("where") or {})
    log = bool(claim.get("log", False))
    rate = claim["metric"] not in frame.columns
    capped = not rate and _initial_of(claim["metric"]) in frame.columns
    values = _metric(frame, claim["metric"], log)
    compared = compared_axes(claim["compare"], "compare") if kind == "compare" \
        else [claim["trend"]]
    axis = "+".join(compared)
    keys = [a for a in axes if a not in compared and a in frame.columns]
    keys += [k for k in claim.get("pair_by", []) if k not in keys]
    keys += ["seed"] if "seed" in frame.columns else []
    frame = frame.assign(_value=values)
    margin = float(claim["margin"]) if claim["expect"] == SAME else np.nan
    row = {"statement": claim["statement"], "metric": claim["metric"],
           "expect": claim["expect"], "margin": margin}
    if kind == "compare":
        arm, baseline = arms(claim["compare"])
        row["comparison"] = _comparison(arm, baseline, axis)
        stats = _paired(frame, arm, baseline, keys, rng, margin)
    else:
        row["comparison"] = f"trend over {axis}, within seed"
        stats = _trend(frame, axis, axes.get(axis), keys, rng, margin)
    row["unit"] = effect_unit(claim["metric"], kind, axis, log, rate,
                              log_axis=kind == "trend" and _is_log_axis(frame[axis]),
                              capped=capped)
    return {**row, **stats}


def _comparison(arm: dict[str, Any], baseline: dict[str, Any], axis: str) -> str:
    if len(arm) == 1:
        return f"{axis}: {arm[axis]} vs {baseline[axis]}, paired by seed"

    def label(side: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v}" for k, v in side.items())

    return f"{label(arm)} vs {label(baseline)}, paired by seed"


def effect_unit(metric: str, kind: str, axis: str, log: bool, rate: bool,
                log_axis: bool = False, capped: bool = False) -> str:
    """The unit of a claim's effect, in words, e.g. "log10 ratio of val_loss_final (arm /
    baseline)" or "change in share diverged per decade of optimizer.lr"; `capped` adds
    "; each loss capped at its initial"."""
    return _unit(metric, kind, axis, log, rate, log_axis) + (
        "; each loss capped at its initial" if capped else "")


def _unit(metric: str, kind: str, axis: str, log: bool, rate: bool, log_axis: bool) -> str:
    if rate:
        what = f"change in share {metric}"
    elif log:
        what = f"log10 ratio of {metric}" if kind == "compare" else f"change in log10 {metric}"
    else:
        what = f"{metric} difference" if kind == "compare" else f"change in {metric}"
    if kind == "compare":
        return what + (" (arm / baseline)" if log and not rate else " (arm - baseline)")
    return f"{what} {'per decade' if log_axis else 'per step'} of {axis}"


def _initial_of(metric: str) -> str | None:
    """`{split}_loss_initial` for a loss of one split that claims cap, else None."""
    split, _, rest = metric.partition("_loss_")
    return f"{split}_loss_initial" if split in ("train", "val") and rest in (
        "final", "end", "best") else None


def _is_log_axis(values: pd.Series) -> bool:
    numeric = pd.to_numeric(values, errors="coerce")
    return bool(len(numeric)) and bool(numeric.notna().all() and (numeric > 0).all())


def _filter(trials: pd.DataFrame, where: Mapping[str, Any]) -> pd.DataFrame:
    mask = np.ones(len(trials), dtype=bool)
    for column, wanted in where.items():
        if column not in trials.columns:
            raise ClaimError(f"where: no column {column!r} in the trials")
        options = wanted if isinstance(wanted, (list, tuple)) else [wanted]
        mask &= np.logical_or.reduce([_matches(trials[column], v) for v in options])
    return trials[mask]


def _matches(series: pd.Series, value: Any) -> np.ndarray:
    """Which rows of `series` `value` selects (`study.claims.selects`, once per distinct
    value of the column)."""
    codes, options = pd.factorize(series)  # a missing value's code is -1: the last hit
    hits = np.array([selects(o, value) for o in options] + [selects(math.nan, value)])
    return hits[codes]


def _metric(frame: pd.DataFrame, metric: str, log: bool) -> np.ndarray:
    if metric in frame.columns:
        values = frame[metric].to_numpy(dtype=float)
        initial = _initial_of(metric)
        if initial in frame.columns:
            start = frame[initial].to_numpy(dtype=float)
            values = np.minimum(np.where(np.isfinite(values), values, start), start)
    elif "status" in frame.columns:  # a status name: 1 where the trial has it, else 0
        values = (frame["status"].astype(str) == metric).to_numpy(dtype=float)
    else:
        raise ClaimError(f"metric: no column {metric!r} in the trials")
    if "status" in frame.columns and metric != "pruned":  # a cut run's outcome is unknown
        values = np.where(frame["status"].astype(str) == "pruned", np.nan, values)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(values > 0, np.log10(values), np.nan)
    return values


def _empty(n_trials: int = 0) -> dict[str, Any]:
    return {"effect": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p_value": 1.0,
            "n_trials": n_trials, "n_units": 0}


def _paired(frame: pd.DataFrame, arm: Mapping[str, Any], baseline: Mapping[str, Any],
            keys: list[str], rng: np.random.Generator, margin: float = np.nan
            ) -> dict[str, Any]:
    """Paired differences arm - baseline; each side is the trials whose axes take its
    values (axis -> value), matched on `keys`."""
    def side(values: Mapping[str, Any]) -> pd.Series:
        mask = np.logical_and.reduce([_matches(frame[a], v) for a, v in values.items()])
        part = frame[mask]
        return part.groupby([part[k].astype(str) for k in keys])["_value"].mean() \
            if keys else part["_value"]

    joined = pd.concat([side(arm).rename("arm"), side(baseline).rename("base")], axis=1,
                       join="inner").dropna()
    with np.errstate(invalid="ignore"):
        d = (joined["arm"] - joined["base"]).to_numpy()
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return _empty()
    boot = bootstrap((d,), _mean, rng)
    p = _tost_p(boot.distribution, margin) if np.isfinite(margin) else sign_flip_p(d, rng)
    return {"effect": float(d.mean()), "ci_low": float(boot.low), "ci_high": float(boot.high),
            "p_value": p, "n_trials": 2 * len(d), "n_units": len(d)}


def _trend(frame: pd.DataFrame, axis: str, order: Sequence[Any] | None, keys: list[str],
           rng: np.random.Generator, margin: float = np.nan) -> dict[str, Any]:
    frame = frame[np.isfinite(frame["_value"].to_numpy(dtype=float))]
    frame = frame.assign(_x=_positions(frame[axis], order))
    groups = [g for _, g in (frame.groupby([frame[k].astype(str) for k in keys])
                             if keys else [(None, frame)])]
    groups = [g for g in groups if g["_x"].nunique() > 1]
    if not groups:
        return _empty(len(frame))
    centred = [(g["_x"].to_numpy() - g["_x"].mean(), g["_value"].to_numpy(dtype=float))
               for g in groups]
    sxx = np.array([(cx ** 2).sum() for cx, _ in centred])
    sxy = np.array([(cx * (y - y.mean())).sum() for cx, y in centred])
    effect = float(sxy.sum() / sxx.sum())
    boot = bootstrap((sxy, sxx), _pooled_slope, rng)
    if np.isfinite(margin):
        p = _tost_p(boot.distribution, margin)
    else:  # the metric shuffled within each group: the slope under no trend
        null_sxy = np.zeros(N_PERMUTATIONS)
        for cx, y in centred:
            perms = rng.random((N_PERMUTATIONS, len(y))).argsort(axis=1)
            null_sxy += (cx[None, :] * y[perms]).sum(axis=1)
        p = permutation_p(null_sxy / sxx.sum(), effect)
    return {"effect": effect, "ci_low": float(boot.low), "ci_high": float(boot.high),
            "p_value": p, "n_trials": int(sum(len(g) for g in groups)),
            "n_units": len(groups)}


def _mean(d: np.ndarray, axis: int = -1) -> np.ndarray:
    return d.mean(axis=axis)


def _pooled_slope(sxy: np.ndarray, sxx: np.ndarray, axis: int = -1) -> np.ndarray:
    return sxy.sum(axis=axis) / sxx.sum(axis=axis)


def _positions(values: pd.Series, order: Sequence[Any] | None) -> np.ndarray:
    """Axis values as numbers: log10 of all-positive numbers, else the position in `order`
    (the sweep's axis order; sorted values without one)."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all() and (numeric > 0).all():
        return np.log10(numeric.to_numpy(dtype=float))
    if numeric.notna().all():
        return numeric.to_numpy(dtype=float)
    labels = [str(v) for v in (order if order is not None else sorted(values.astype(str).unique()))]
    return values.astype(str).map({v: i for i, v in enumerate(labels)}).to_numpy(dtype=float)


def _tost_p(boot: np.ndarray, margin: float) -> float:
    """Two one-sided tests of |effect| < margin on the bootstrap distribution."""
    below = np.sum(~(boot > -margin))  # NaN counts against equivalence
    above = np.sum(~(boot < margin))
    return float((1 + max(below, above)) / (1 + len(boot)))


def _verdict(q: float, low: float, high: float, expect: str, margin: float = np.nan) -> str:
    if expect == SAME:
        if q <= ALPHA:
            return "supported"
        outside = low > margin or high < -margin
        return "contradicted" if outside else "inconclusive"
    if not (q <= ALPHA) or not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    expects_up = expect in ("higher", "increasing")
    if low > 0:
        return "supported" if expects_up else "contradicted"
    if high < 0:
        return "contradicted" if expects_up else "supported"
    return "inconclusive"
