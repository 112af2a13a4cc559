"""Across-trial aggregates: status counts and the stability-map cells (DataFrame in, out)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.axes import (
    MapLayout,
    SweepAxes,
    format_key,
    joined,
    ordered_labels,
    value_key,
)

# Known statuses from best to worst, then `pruned` (stopped by a search, not judged);
# unknown ones follow, alphabetically.
STATUS_ORDER = ("converged", "slow", "unstable", "recovered", "no_progress", "diverged",
                "pruned")
FINAL = "val_loss_final"
INITIAL = "val_loss_initial"
# Cell markers (drawn as symbols over the heatmap) and what they mean.
MARKERS = {
    "diverged": "majority of seeds diverged",
    "no_progress": "majority of seeds made no progress (none diverged)",
    "unstable": "majority of seeds unstable or recovered (none diverged)",
    "some_diverged": "some seeds (not a majority) diverged",
}
ERRATIC = ("unstable", "recovered")
# Robust color limits: beyond the quartiles -/+ FENCE x IQR (in log10 units on a log
# scale) the colors saturate, so a few exploded cells cannot flatten the rest.
FENCE = 3.0


def order_statuses(statuses: Iterable[str]) -> list[str]:
    """Distinct statuses, known ones in STATUS_ORDER, unknown ones after them sorted."""
    present = set(statuses)
    known = [s for s in STATUS_ORDER if s in present]
    return known + sorted(present - set(known))


def status_counts(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials per status: columns `status`, `n`, `fraction`, ordered as order_statuses."""
    counts = trials["status"].value_counts()
    order = order_statuses(counts.index)
    total = int(counts.sum())
    return pd.DataFrame({
        "status": order,
        "n": [int(counts[s]) for s in order],
        "fraction": [counts[s] / total for s in order],
    })


def cell_marker(n: int, n_diverged: int, n_no_progress: int, n_erratic: int = 0) -> str:
    """Majority diverged, else any diverged, else majority no progress, else majority
    unstable or recovered, else "". A divergence shows before a majority of another status:
    only the symbols say a seed diverged (its capped loss colours it as one that did not
    learn), where the colour already shows a cell that learned nothing."""
    if 2 * n_diverged > n:
        return "diverged"
    if n_diverged:
        return "some_diverged"
    if 2 * n_no_progress > n:
        return "no_progress"
    if 2 * n_erratic > n:
        return "unstable"
    return ""


def is_status_share(metric: str) -> bool:
    """A map metric that names a status colors by the share of seeds that ended so."""
    return metric in STATUS_ORDER


def task_reference(trials: pd.DataFrame) -> pd.Series:
    """Per-trial normalizer: median `val_loss_initial` over all trials of the same task."""
    initial = pd.to_numeric(trials[INITIAL], errors="coerce")
    if "task" not in trials.columns:
        return pd.Series(initial.median(), index=trials.index)
    return initial.groupby(trials["task"].astype(str)).transform("median")


def capped_loss(trials: pd.DataFrame, metric: str = FINAL,
                initial: str = INITIAL) -> pd.Series:
    """Per trial: min(final, initial); a non-finite final counts as the initial loss.

    The cap of the report's figures and per-cell tables, said in their captions: a trial
    that blew up or stopped counts as no better than its initialization. trials.parquet
    itself keeps the measured value."""
    final = pd.to_numeric(trials[metric], errors="coerce")
    start = pd.to_numeric(trials[initial], errors="coerce")
    final = final.where(np.isfinite(final), start)
    return np.minimum(final, start)


def cell_summary(trials: pd.DataFrame, axes: SweepAxes, metric: str = FINAL) -> pd.DataFrame:
    """One row per configuration (combination of varying-axis values), over its seeds.

    Columns: one per axis (display labels, e.g. "0.001", "full"), `n` trials, `n_<status>`
    for every status present in `trials` (order_statuses order), `median_final` (median of
    `metric`, falling back to `objective` when the column is absent; the final validation
    loss is capped at each trial's initial loss first; for a status name (is_status_share):
    the share of the configuration's trials with that status), `n_defined` (trials with a
    finite value), `reference` (median
    `val_loss_initial` over all trials of the configuration's task; NaN without that
    column), `ratio` = median_final / reference, and `marker` (a MARKERS key or "").
    Rows follow axis order. A run with no varying axis gives a single row.
    """
    share = is_status_share(metric)
    if metric not in trials.columns and not share:
        metric = "objective"
    names = axes.names
    work = pd.DataFrame({name: label_series(trials[name]) for name in names},
                        index=trials.index)
    work["status"] = trials["status"].astype(str)
    work["value"] = ((trials["status"].astype(str) == metric).astype(float) if share
                     else pd.to_numeric(trials[metric], errors="coerce"))
    if metric == FINAL and INITIAL in trials.columns:
        work["value"] = capped_loss(trials)
    work["reference"] = task_reference(trials) if INITIAL in trials.columns else np.nan
    keys = names or [pd.Series(0, index=trials.index)]
    grouped = work.groupby(keys, sort=False, dropna=False)
    work["defined"] = np.isfinite(work["value"]).astype(int)
    cells = grouped.agg(n=("status", "size"),
                        median_final=("value", "mean" if share else "median"),
                        n_defined=("defined", "sum"), reference=("reference", "first"))
    counts = grouped["status"].value_counts().unstack(fill_value=0)
    statuses = order_statuses(work["status"])
    for status in statuses:
        cells[f"n_{status}"] = counts[status].astype(int)
    cells = cells.reset_index(drop=not names)
    cells["ratio"] = cells["median_final"] / cells["reference"]
    erratic = sum(_column(cells, f"n_{s}") for s in ERRATIC)
    cells["marker"] = [
        cell_marker(n, d, p, e) for n, d, p, e in zip(
            cells["n"], _column(cells, "n_diverged"), _column(cells, "n_no_progress"),
            erratic, strict=True)
    ]
    ranks = {name: cells[name].map(_rank([format_key(k) for k in axes.values[name]]))
             for name in names}
    order = pd.DataFrame(ranks, index=cells.index).sort_values(names).index if names \
        else cells.index
    columns = [*names, "n", *(f"n_{s}" for s in statuses), "n_defined", "median_final",
               "reference", "ratio", "marker"]
    return cells.loc[order, columns].reset_index(drop=True)


@dataclass(frozen=True)
class StabilityMap:
    """Stability-map cells plus what the renderer needs to lay them out.

    `cells` is cell_summary's frame plus `row`/`col` panel labels ("" without facet),
    `x`/`y` display labels, `x_pos`/`y_pos` positions in `x_labels`/`y_labels` and
    `color_value` (`ratio` when normalized, else `median_final`). `log_color`: every finite
    color value is positive, so the color scale is logarithmic (else linear).
    `color_limits`: the color scale's ends (robust_limits); cells beyond saturate, and
    `n_above` / `n_below` count them. `share`: colored by the share of a status (0 to 1).
    """

    cells: pd.DataFrame
    layout: MapLayout
    x_labels: tuple[str, ...]
    y_labels: tuple[str, ...]
    row_labels: tuple[str, ...]
    col_labels: tuple[str, ...]
    metric: str
    normalized: bool
    log_color: bool = True
    color_limits: tuple[float, float] = (0.1, 10.0)
    n_below: int = 0
    n_above: int = 0
    share: bool = False


def stability_map(summary: pd.DataFrame, axes: SweepAxes, layout: MapLayout,
                  metric: str = FINAL) -> StabilityMap:
    """Lay cell_summary's rows out as heatmap cells: x, y and panel facets from `layout`.

    For the final validation loss, color is normalized per task (median final / the task's
    median initial validation loss, since tasks have different loss scales) when the
    reference is known; any other metric (`summary` from cell_summary(..., metric)) is
    shown raw.
    """
    normalized = metric == FINAL and bool(summary["reference"].notna().any())
    cells = summary.copy()
    cells["row"] = cells[layout.row] if layout.row else ""
    cells["col"] = joined(cells, layout.cols)
    cells["x"], cells["y"] = cells[layout.x], cells[layout.y]
    x_labels = [format_key(k) for k in axes.values[layout.x]]
    y_labels = [format_key(k) for k in axes.values[layout.y]]
    cells["x_pos"] = cells["x"].map(_rank(x_labels))
    cells["y_pos"] = cells["y"].map(_rank(y_labels))
    cells["color_value"] = cells["ratio"] if normalized else cells["median_final"]
    share = is_status_share(metric)
    finite = cells["color_value"][np.isfinite(cells["color_value"])]
    log_color = bool((finite > 0).all()) and not share
    limits = (0.0, 1.0) if share else robust_limits(finite, log_color)
    rows, cols = ordered_labels(axes, layout.row, layout.cols)
    return StabilityMap(
        cells=cells, layout=layout, x_labels=tuple(x_labels), y_labels=tuple(y_labels),
        row_labels=tuple(r for r in rows if r in set(cells["row"])),
        col_labels=tuple(c for c in cols if c in set(cells["col"])),
        metric=metric, normalized=normalized, log_color=log_color, color_limits=limits,
        n_below=int((finite < limits[0]).sum()), n_above=int((finite > limits[1]).sum()),
        share=share,
    )


def robust_limits(values: pd.Series, log: bool) -> tuple[float, float]:
    """Color-scale ends: the finite min and max, pulled in to the quartiles -/+ FENCE x IQR
    (of log10 values on a log scale) when values lie beyond; when the quartiles coincide,
    the 5th and 95th percentiles (else the whole range); a flat range is widened (a factor
    2 each side on a log scale, +1 on a linear one)."""
    finite = values[np.isfinite(values) & ((values > 0) if log else True)]
    if finite.empty:
        return (0.1, 10.0) if log else (0.0, 1.0)
    x = np.log10(finite.to_numpy(float)) if log else finite.to_numpy(float)
    q1, q3 = np.quantile(x, [0.25, 0.75])
    low = max(float(x.min()), q1 - FENCE * (q3 - q1))
    high = min(float(x.max()), q3 + FENCE * (q3 - q1))
    if high <= low:
        # Half the cells or more share one value (a count that is mostly 0): fences say
        # nothing, so the 5th to 95th percentiles, else the whole range.
        low, high = (float(v) for v in np.quantile(x, [0.05, 0.95]))
        if high <= low:
            low, high = float(x.min()), float(x.max())
    if log:
        low, high = 10.0**low, 10.0**high
        return (low / 2, high * 2) if high / low < 1.01 else (low, high)
    return (low, high + 1.0) if high <= low else (low, high)


def label_series(values: pd.Series) -> pd.Series:
    """Display label of every value (`format_key(value_key(v))`), as str."""
    return values.map(lambda v: format_key(value_key(v))).astype(str)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame.columns else pd.Series(0, index=frame.index)


def _rank(labels: list[str]) -> dict[str, int]:
    return {lab: i for i, lab in enumerate(labels)}
