"""Claims: testable statements a sweep declares about its own results, and their verdicts.

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

Evaluation (`evaluate_claims`):

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
  are left out (n says how many remain).
- `unit`: the effect's unit in words (e.g. "log10 ratio of val_loss_final (arm /
  baseline)", "change in share diverged per decade of optimizer.lr").
- 95% interval: percentile bootstrap (2,000 resamples of pairs / groups, seeded).
- p-value: two-sided permutation test (2,000 sign flips of the paired differences / shuffles
  of the metric within each group), (1 + #{|null| >= |observed|}) / (1 + 2,000). For an
  equivalence claim (`expect: same`, with `margin` m in the effect's unit): two one-sided
  tests (TOST) on the bootstrap distribution, p = max(P(effect <= -m), P(effect >= m)).
- False-discovery control across the sweep's claims: Benjamini-Hochberg adjusted p-values
  (`q_value`).
- Verdict: `supported` when q <= alpha (0.05) and the interval excludes 0 on the expected
  side; `contradicted` when q <= alpha and it excludes 0 on the other side; otherwise
  `inconclusive` (including claims with no pairs or no variation). An equivalence claim
  is `supported` when q <= alpha (the effect lies within +-m), `contradicted` when the 95%
  interval lies wholly outside [-m, m], else `inconclusive`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ALPHA = 0.05
RESAMPLES = 2000
SAME = "same"
DIRECTIONS = {"compare": ("lower", "higher", SAME), "trend": ("increasing", "decreasing", SAME)}
_KEYS = {"statement", "metric", "where", "compare", "trend", "expect", "log", "pair_by",
         "margin"}
CLAIM_COLUMNS = ["statement", "metric", "effect", "ci_low", "ci_high", "verdict", "n_trials",
                 "comparison", "expect", "p_value", "q_value", "n_units", "unit", "margin"]


class ClaimError(ValueError):
    """A claim is malformed or names something the sweep does not have."""


# --------------------------------------------------------------------------- validation
def check_claims(claims: Sequence[Mapping[str, Any]], axes: Sequence[str],
                 metrics: Sequence[str]) -> None:
    """Raise ClaimError naming the first bad claim key (before any training)."""
    for i, claim in enumerate(claims):
        where = f"sweep.claims[{i}]"
        if not isinstance(claim, Mapping):
            raise ClaimError(f"{where}: expected a mapping, got {claim!r}")
        unknown = sorted(set(claim) - _KEYS)
        if unknown:
            raise ClaimError(f"{where}.{unknown[0]}: unknown claim key "
                             f"(known: {', '.join(sorted(_KEYS))})")
        for key in ("statement", "metric", "expect"):
            if key not in claim:
                raise ClaimError(f"{where}.{key}: missing")
        if claim["metric"] not in metrics:
            raise ClaimError(f"{where}.metric: unknown metric {claim['metric']!r}")
        kind = _kind(claim, where)
        if claim["expect"] not in DIRECTIONS[kind]:
            raise ClaimError(f"{where}.expect: must be one of {list(DIRECTIONS[kind])} for a "
                             f"{kind} claim, got {claim['expect']!r}")
        if kind == "compare":
            compared = _compared_axes(claim["compare"], f"{where}.compare")
        else:
            compared = [claim["trend"]]
        for axis in compared:
            if axis not in axes:
                raise ClaimError(f"{where}: {axis!r} is not an axis of the sweep ({list(axes)})")
        margin = claim.get("margin")
        if claim["expect"] == SAME:
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) \
                    or not 0 < margin < float("inf"):
                raise ClaimError(f"{where}.margin: an equivalence claim (expect: same) needs a "
                                 f"margin > 0 in the effect's unit, got {margin!r}")
        elif margin is not None:
            raise ClaimError(f"{where}.margin: only an equivalence claim (expect: same) has "
                             f"a margin")


def _compared_axes(spec: Any, where: str) -> list[str]:
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


def _arms(spec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arm, baseline) as axis -> value mappings (one axis, or several)."""
    if isinstance(spec["arm"], Mapping):
        return dict(spec["arm"]), dict(spec["baseline"])
    return {spec["axis"]: spec["arm"]}, {spec["axis"]: spec["baseline"]}


def _kind(claim: Mapping[str, Any], where: str = "claim") -> str:
    if ("compare" in claim) == ("trend" in claim):
        raise ClaimError(f"{where}: give exactly one of compare or trend")
    return "compare" if "compare" in claim else "trend"


# --------------------------------------------------------------------------- evaluation
def evaluate_claims(trials: pd.DataFrame, claims: Sequence[Mapping[str, Any]],
                    axes: Mapping[str, Sequence[Any]] | Sequence[str] | None = None,
                    seed: int = 0) -> pd.DataFrame:
    """One row per claim (`CLAIM_COLUMNS`): statement, metric, effect, ci_low, ci_high,
    verdict, n_trials, then comparison, expect, p_value, q_value, n_units (pairs or
    groups), unit (the effect's, in words) and margin (equivalence claims; else NaN).

    `axes`: the sweep's axes (names, or names -> values in sweep order); pairs and groups
    match on every axis but the claim's own, and on `seed`. Deterministic for a given `seed`.
    """
    axis_values = dict(axes) if isinstance(axes, Mapping) else {a: None for a in (axes or [])}
    rows = []
    for i, claim in enumerate(claims):
        rng = np.random.default_rng([seed, i])
        rows.append(_evaluate(trials, dict(claim), axis_values, rng))
    frame = pd.DataFrame(rows, columns=CLAIM_COLUMNS)
    frame["q_value"] = benjamini_hochberg(frame["p_value"].to_numpy(dtype=float))
    frame["verdict"] = [_verdict(r.q_value, r.ci_low, r.ci_high, r.expect, r.margin)
                        for r in frame.itertuples()]
    return frame


def _evaluate(trials: pd.DataFrame, claim: dict[str, Any], axes: dict[str, Any],
              rng: np.random.Generator) -> dict[str, Any]:
    kind = _kind(claim)
    frame = _filter(trials, claim.get("where") or {})
    log = bool(claim.get("log", False))
    rate = claim["metric"] not in frame.columns
    capped = not rate and _initial_of(claim["metric"]) in frame.columns
    values = _metric(frame, claim["metric"], log)
    compared = _compared_axes(claim["compare"], "compare") if kind == "compare" \
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
        arm, baseline = _arms(claim["compare"])
        if len(arm) == 1:
            row["comparison"] = f"{axis}: {arm[axis]} vs {baseline[axis]}, paired by seed"
        else:
            def label(side: dict[str, Any]) -> str:
                return ", ".join(f"{k}={v}" for k, v in side.items())
            row["comparison"] = f"{label(arm)} vs {label(baseline)}, paired by seed"
        stats = _paired(frame, arm, baseline, keys, rng, margin)
    else:
        row["comparison"] = f"trend over {axis}, within seed"
        stats = _trend(frame, axis, axes.get(axis), keys, rng, margin)
    row["unit"] = effect_unit(claim["metric"], kind, axis, log, rate,
                              log_axis=kind == "trend" and _is_log_axis(frame[axis]),
                              capped=capped)
    return {**row, **stats}


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
    if pd.api.types.is_numeric_dtype(series) and isinstance(value, (int, float)) \
            and not isinstance(value, bool):
        return np.isclose(series.to_numpy(dtype=float), float(value), rtol=1e-9, atol=0)
    return (series.astype(str) == str(value)).to_numpy()


def _metric(frame: pd.DataFrame, metric: str, log: bool) -> np.ndarray:
    if metric in frame.columns:
        values = frame[metric].to_numpy(dtype=float)
        initial = _initial_of(metric)
        if initial in frame.columns:
            start = frame[initial].to_numpy(dtype=float)
            values = np.minimum(np.where(np.isfinite(values), values, start), start)
    elif "status" in frame.columns:  # a status name: 1 where the trial has it, else 0
        values = (frame["status"] == metric).to_numpy(dtype=float)
    else:
        raise ClaimError(f"metric: no column {metric!r} in the trials")
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
    effect = float(d.mean())
    boot = d[rng.integers(0, len(d), (RESAMPLES, len(d)))].mean(axis=1)
    signs = rng.choice([-1.0, 1.0], (RESAMPLES, len(d)))
    null = (signs * d).mean(axis=1)
    p = _tost_p(boot, margin) if np.isfinite(margin) else _p(null, effect)
    return {"effect": effect, **_interval(boot), "p_value": p,
            "n_trials": 2 * len(d), "n_units": len(d)}


def _trend(frame: pd.DataFrame, axis: str, order: Sequence[Any] | None, keys: list[str],
           rng: np.random.Generator, margin: float = np.nan) -> dict[str, Any]:
    frame = frame[np.isfinite(frame["_value"].to_numpy(dtype=float))]
    x = _positions(frame[axis], order)
    frame = frame.assign(_x=x)
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
    pick = rng.integers(0, len(groups), (RESAMPLES, len(groups)))
    boot = sxy[pick].sum(axis=1) / sxx[pick].sum(axis=1)
    null_sxy = np.zeros(RESAMPLES)
    for cx, y in centred:
        perms = rng.random((RESAMPLES, len(y))).argsort(axis=1)
        null_sxy += (cx[None, :] * y[perms]).sum(axis=1)
    null = null_sxy / sxx.sum()
    n = int(sum(len(g) for g in groups))
    p = _tost_p(boot, margin) if np.isfinite(margin) else _p(null, effect)
    return {"effect": effect, **_interval(boot), "p_value": p, "n_trials": n,
            "n_units": len(groups)}


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


def _interval(boot: np.ndarray) -> dict[str, float]:
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    return {"ci_low": float(low), "ci_high": float(high)}


def _p(null: np.ndarray, observed: float) -> float:
    extreme = np.sum(np.abs(null) >= abs(observed) - 1e-12 * max(1.0, abs(observed)))
    return float((1 + extreme) / (1 + len(null)))


def _tost_p(boot: np.ndarray, margin: float) -> float:
    """Two one-sided tests of |effect| < margin on the bootstrap distribution."""
    below = np.sum(~(boot > -margin))  # NaN counts against equivalence
    above = np.sum(~(boot < margin))
    return float((1 + max(below, above)) / (1 + len(boot)))


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (step-up, monotone, capped at 1)."""
    p = np.asarray(p, dtype=float)
    if p.size == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty_like(p)
    out[order] = adjusted
    return out


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


# ------------------------------------------------------------------------------ run dir
def write_sweep_claims(run_dir: Path, claims_config: Sequence[Mapping[str, Any]] | None
                       ) -> Path | None:
    """Evaluate the sweep's claims on `run_dir`/trials.parquet and write claims.parquet.

    Returns the path, or None when the sweep declares no claims.
    """
    from study import records

    claims = _plain(claims_config)
    if not claims:
        return None
    trials, meta = records.read_trials(Path(run_dir))
    frame = evaluate_claims(trials, claims, meta.get("axes") or {})
    return records.write_claims(Path(run_dir), frame)


def _plain(claims: Any) -> list[dict[str, Any]]:
    if claims is None:
        return []
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(claims, (DictConfig, ListConfig)):
            claims = OmegaConf.to_container(claims, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with study
        pass
    return [dict(c) for c in claims]
