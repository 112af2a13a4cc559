"""The report's first screen: what the sweep found, in sentences and one small table.

- the suspects (varying axes) ranked by how much of each outcome's variance they explain
  (importance.axis_importance: divergence, instability, final loss; 95% intervals over
  seeds);
- the claims' verdicts, one line each;
- the stable learning-rate range per optimizer.

`findings_context` returns a plain dict for the template (the report adds `claim_lines`);
the numbers come from the tested compute functions (importance.py, sensitivity.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis import tables
from analysis.aggregate import status_counts
from analysis.axes import LR, SweepAxes
from analysis.importance import (
    INTERACTIONS,
    OUTCOMES,
    PAIR,
    SEED_NOISE,
    axis_importance,
    ranked_axes,
)
from analysis.sensitivity import lr_curves, stable_lr_range

# A two-way interaction gets its own row in the suspects table when it explains at least
# this share of some outcome; the others are summed into "other interactions".
PAIR_SHOWN = 0.05
OTHER = "other interactions"
OUTCOME_TITLES = {"diverged": "divergence", "erratic": "instability", "log_loss": "final loss"}


def findings_context(lab: pd.DataFrame, axes: SweepAxes) -> dict[str, Any]:
    """Headline sentences, the suspects table (HTML) and stable lr lines; the claim lines
    (`claim_lines`) are the report's to add, from the claims it has once the sections are
    built."""
    names = [*axes.names, *axes.searched]
    counts = status_counts(lab)
    headline = [_status_sentence(counts, len(lab))]
    importance = (axis_importance(lab, axes.names, searched=axes.searched) if names
                  else pd.DataFrame())
    suspects_html, n_seeds = "", 0
    if names and not importance.empty:
        order = ranked_axes(importance, names)
        headline.insert(0, _lead_sentence(importance, order[0]))
        headline += [s for s in (_outcome_sentence(importance, o) for o in OUTCOMES) if s]
        suspects_html = _suspects_table(importance, order)
        n_seeds = int(importance["n_seeds"].iloc[0])
    return {"headline": headline, "suspects": suspects_html, "n_seeds": n_seeds,
            "searched": list(axes.searched), "stable_lr": stable_lr_lines(lab, axes)}


def _lead_sentence(importance: pd.DataFrame, top: str) -> str:
    """"Main suspect: X", with the outcomes it explains most of among the axes."""
    mains = importance[~importance["source"].str.contains(PAIR, regex=False)
                       & ~importance["source"].isin([INTERACTIONS, SEED_NOISE])]
    led = [o for o in OUTCOMES
           if not mains[mains["outcome"] == o].empty
           and mains[mains["outcome"] == o]["share"].notna().any()
           and mains.loc[mains[mains["outcome"] == o]["share"].idxmax(), "source"] == top]
    shares = mains[mains["source"] == top].set_index("outcome")["share"]
    parts = [f"{OUTCOME_TITLES[o]} ({_pct(shares[o])})" for o in led]
    if not parts:
        return f"Main suspect: {top} (the largest mean share of the outcomes' variance)."
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"Main suspect: {top}, the largest share of the variance in {listed}."


def _status_sentence(counts: pd.DataFrame, n: int) -> str:
    parts = [f"{r.n} {r.status.replace('_', ' ')} ({100 * r.fraction:.0f}%)"
             for r in counts.itertuples()]
    return f"{n} trials: " + ", ".join(parts) + "."


def _outcome_sentence(importance: pd.DataFrame, outcome: str) -> str:
    part = importance[importance["outcome"] == outcome]
    title = OUTCOME_TITLES[outcome].capitalize()
    if part.empty:
        return ""
    if part["share"].isna().all():
        return f"{title}: the same in every trial (nothing to explain)."
    is_pair = part["source"].str.contains(PAIR, regex=False)
    mains = part[~part["source"].isin([INTERACTIONS, SEED_NOISE]) & ~is_pair].sort_values(
        "share", ascending=False)
    top = mains.iloc[0]
    text = f"{title}: {top['source']} explains most ({_share(top)} of its variance)"
    if len(mains) > 1 and mains.iloc[1]["share"] >= 0.05:
        text += f", then {mains.iloc[1]['source']} ({_share(mains.iloc[1])})"
    pairs = part[is_pair].sort_values("share", ascending=False)
    if len(pairs) and pairs.iloc[0]["share"] >= 0.1:
        text += f"; jointly, {pairs.iloc[0]['source']} ({_share(pairs.iloc[0])})"
    inter = part.loc[is_pair | (part["source"] == INTERACTIONS), "share"].sum()
    noise = part[part["source"] == SEED_NOISE].iloc[0]
    return (text + f"; all combinations of axes {_pct(inter)}, seeds "
            f"{_pct(noise['share'])}.")


def _pct(value: float, sign: str = "%") -> str:
    """A share in whole percent; rounding noise around 0 reads 0, never -0."""
    if not np.isfinite(value):
        return "–"
    return f"{round(100 * value) + 0:.0f}{sign}"


def _share(row: Any) -> str:
    if not np.isfinite(row["ci_low"]):
        return _pct(row["share"])
    return f"{_pct(row['share'])} [{_pct(row['ci_low'], '')}, {_pct(row['ci_high'], '')}]"


def _suspects_table(importance: pd.DataFrame, order: list[str]) -> str:
    """Rows: axes in rank order, two-way interactions that matter, the other interactions
    summed, and seed noise; columns: outcomes."""
    present = [o for o in OUTCOMES if o in set(importance["outcome"])]
    is_pair = importance["source"].str.contains(PAIR, regex=False)
    pair_share = importance[is_pair].groupby("source")["share"]
    shown = [p for p in pair_share.mean().sort_values(ascending=False).index
             if pair_share.max()[p] >= PAIR_SHOWN]
    hidden = importance["source"].isin([INTERACTIONS]) | (is_pair & ~importance[
        "source"].isin(shown))
    other = importance[hidden].groupby("outcome", as_index=False).agg(
        share=("share", lambda v: v.sum(min_count=1)))
    other = other.assign(source=OTHER, ci_low=np.nan, ci_high=np.nan)
    importance = pd.concat([importance[~hidden], other], ignore_index=True)
    indexed = importance.set_index(["outcome", "source"])
    sources = [*order, *shown, OTHER, SEED_NOISE]
    rows = []
    for rank, source in enumerate(sources):
        row = {"rank": str(rank + 1) if source in order else "",
               "suspect (axis)": source}
        for outcome in present:
            row[OUTCOMES[outcome]] = (_share(indexed.loc[(outcome, source)])
                                      if (outcome, source) in indexed.index else "–")
        rows.append(row)
    frame = pd.DataFrame(rows)
    shade = {OUTCOMES[o]: pd.Series([indexed["share"].get((o, s), np.nan)
                                     for s in sources])
             for o in present}
    return tables.styled(frame, "suspects", shade=shade, cmap="Reds",
                         right=[OUTCOMES[o] for o in present], fixed_range=(0.0, 1.0))


def claim_lines(claims: pd.DataFrame | None) -> list[dict[str, str]]:
    """One line per claim: verdict and statement, effect [95% CI] unit, q."""
    if claims is None or claims.empty:
        return []
    out = []
    for row in claims.itertuples():
        unit = getattr(row, "unit", "") or ""
        unit = "" if not isinstance(unit, str) else f" {unit}"
        q = getattr(row, "q_value", np.nan)
        detail = f"effect {tables.fmt_interval(row.effect, row.ci_low, row.ci_high)}{unit}"
        if isinstance(q, float) and np.isfinite(q):
            detail += f", q = {tables.fmt(q)}"
        out.append({"verdict": str(row.verdict), "statement": str(row.statement),
                    "detail": detail})
    return out


def stable_lr_lines(lab: pd.DataFrame, axes: SweepAxes) -> list[str]:
    """Per optimizer: the learning rates stable in every group (task x batch size x ...)
    and where the per-group upper edges lie; when no lr is stable in every group, the lrs
    stable in the most groups."""
    if LR not in axes.values:
        return []
    group = [a for a in axes.names if a != LR]
    curves = lr_curves(lab, group)
    ranges = stable_lr_range(curves, group)
    by = "optimizer" if "optimizer" in group else None
    lines = []
    for name, part in (ranges.groupby(by, sort=False) if by else [("all trials", ranges)]):
        others = [g for g in group if g != by]
        n = len(part)
        # A group without any stable lr empties the intersection (max/min skip NaN).
        low = part["lr_min_progress"].max(skipna=False)
        high = part["lr_max_stable"].min(skipna=False)
        prefix = f"{name}: " if by else ""
        where = f" in all {n} groups ({' x '.join(others)})" if others and n > 1 else ""
        if np.isfinite(low) and np.isfinite(high) and low <= high:
            upper = f"≥ {high:.3g}" if part["upper_open"].all() else f"{high:.3g}"
            text = f"{prefix}stable{where} from lr {low:.3g} to {upper}"
            mine = curves[curves[by] == name] if by else curves
            text += _no_progress_inside(mine, low, high, n)
        else:
            text = f"{prefix}no learning rate is stable{where}"
            counts = _groups_stable_at(curves[curves[by] == name] if by else curves,
                                       part, others)
            if len(counts) and counts.max() > 0:
                best = counts.sort_values(ascending=False, kind="stable").head(3)
                text += "; stable in the most groups: " + ", ".join(
                    f"lr {lr:.3g} ({k} of {n})" for lr, k in best.items() if k > 0)
        edges = part["lr_max_stable"][np.isfinite(part["lr_max_stable"])]
        if others and n > 1 and len(edges) and edges.min() < edges.max():
            worst = part.loc[edges.idxmin(), others].astype(str)
            # a group where no seed diverged has its edge beyond the grid: at least its top
            top = "≥ " if part.loc[edges.idxmax(), "upper_open"] else ""
            text += (f"; the largest stable lr per group ranges from {edges.min():.3g} ("
                     + ", ".join(f"{k}={v}" for k, v in worst.items())
                     + f") to {top}{edges.max():.3g}")
        lines.append(text + ".")
    return lines


def _no_progress_inside(curves: pd.DataFrame, low: float, high: float, n: int) -> str:
    """Where, inside a range no seed diverged in, some seed made no progress (a range's
    upper end is where divergence starts, not where progress stops): "" when nowhere."""
    lr = curves["lr"].to_numpy(dtype=float)
    stalled = curves[(lr >= low) & (lr <= high) & (curves["n_no_progress"] > 0)]
    counts = stalled.groupby("lr", sort=True).size()
    if counts.empty:
        return ""
    return "; inside it some seeds made no progress at " + ", ".join(
        f"lr {v:.3g}" + (f" ({k} of {n} groups)" if n > 1 else "") for v, k in counts.items())


def _groups_stable_at(curves: pd.DataFrame, ranges: pd.DataFrame,
                      others: list[str]) -> pd.Series:
    """Per grid lr: in how many groups it lies inside the group's stable range."""
    merged = curves.merge(ranges, on=[*others, *(["optimizer"] if "optimizer" in ranges
                                                 and "optimizer" in curves else [])],
                          how="inner") if others else curves.assign(
        lr_min_progress=ranges["lr_min_progress"].iloc[0],
        lr_max_stable=ranges["lr_max_stable"].iloc[0])
    inside = ((merged["lr"] >= merged["lr_min_progress"])
              & (merged["lr"] <= merged["lr_max_stable"])
              & (merged["n_diverged"] == 0) & (merged["n_no_progress"] == 0))
    return inside.groupby(merged["lr"]).sum().astype(int)
