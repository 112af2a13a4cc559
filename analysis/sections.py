"""Report sections added on top of the map and curves: LR sensitivity, status galleries,
per-cell statistics, metric tables, diagnostics and claims. Each returns a plain dict for
the template (images as data URIs, tables as HTML), or a note saying why it is empty.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis import diagnostics, figures, gallery, tables
from analysis.aggregate import FINAL, INITIAL, capped_loss, label_series
from analysis.axes import LR, SEED, SweepAxes, format_key, joined
from analysis.curves import curve_facets, line_axis, select_curve_trials
from analysis.sensitivity import (
    diverged_points,
    lr_curves,
    lr_sensitivity,
    plot_lr_sensitivity,
    stable_lr_range,
)
from analysis.stats import N_RESAMPLES, divergence_rate, seed_spread
from study.records import read_curves

MAX_PANELS = 16  # lr-sensitivity panels: four rows of four at the page's width
VERDICT_COLORS = {"supported": "#d7ecd9", "contradicted": "#f6d5d1",
                  "inconclusive": "#ececec"}


def labeled(trials: pd.DataFrame, axes: SweepAxes) -> pd.DataFrame:
    """`trials` with every axis column replaced by its display label, rows sorted by axis
    order (then seed, then trial), so groupby(sort=False) yields groups in axis order."""
    out = trials.copy()
    ranks = {}
    for name, keys in axes.values.items():
        out[name] = label_series(trials[name])
        order = {format_key(k): i for i, k in enumerate(keys)}
        ranks[name] = out[name].map(order)
    sort = pd.DataFrame(ranks, index=out.index)
    for extra in (SEED, "trial"):
        if extra in out:
            sort[extra] = out[extra]
    return out.loc[sort.sort_values(list(sort.columns), kind="stable").index] if len(
        sort.columns) else out


# ------------------------------------------------------------------------ LR sensitivity
def lr_section(lab: pd.DataFrame, axes: SweepAxes) -> dict[str, Any]:
    """Final loss vs learning rate with seed bands, plus the sensitivity/stable-range table."""
    if LR not in axes.values:
        why = ("the learning rate was searched (each proposal, or each configuration's "
               "candidates, drew its own), not swept over a grid: the trial explorer, and "
               "an edge search's stability edge, show it" if LR in axes.searched
               else "the learning rate does not vary")
        return {"note": f"No learning-rate sensitivity: {why}.",
                "image": None, "caption": "", "table": "", "table_note": ""}
    group = [a for a in axes.names if a != LR]
    curves = lr_curves(lab, group)
    summary = lr_sensitivity(curves, group).merge(stable_lr_range(curves, group), on=group,
                                                  how="left") if group else pd.concat(
        [lr_sensitivity(curves, []), stable_lr_range(curves, [])], axis=1)
    row = "task" if "task" in group else None
    line = "optimizer" if "optimizer" in group else None
    rest = [g for g in group if g not in (row, line)]
    curves, points = curves.copy(), diverged_points(lab, group)
    for frame in (curves, points):
        frame["panel"] = joined(frame, rest)
    curves, points, shown = _cap_panels(curves, points, row)
    image = figures.figure_to_data_uri(plot_lr_sensitivity(
        curves, points, row, "panel" if rest else None, line))
    display = pd.DataFrame({g: summary[g] for g in group})
    display["LR sensitivity"] = summary["sensitivity"].map(tables.fmt)
    display["÷ initial"] = summary["relative"].map(tables.fmt)
    display["best lr"] = summary["best_lr"].map(tables.fmt)
    display["stable lr range"] = [_lr_range(r) for r in summary.itertuples()]
    display["good lrs"] = summary["n_good"]
    kept, note = tables.sample_rows(display)
    html = tables.styled(kept, "lr", shade={"÷ initial": summary.loc[kept.index, "relative"]},
                         right=["LR sensitivity", "÷ initial", "best lr", "good lrs"])
    panels = " x ".join(p for p in (row, ", ".join(rest)) if p) or "one panel"
    caption = (f"Median over seeds of the final validation loss, capped at the initial loss "
               f"(min(final, initial)), vs learning rate; band: min to max over seeds; black "
               f"x: a diverged trial at its capped loss. Lines: "
               f"{line or 'all trials'}; panels: {panels}.{shown}")
    return {"note": "", "image": image, "caption": caption, "table": html,
            "table_note": note}


def _lr_range(row: Any) -> str:
    low, high = row.lr_min_progress, row.lr_max_stable
    if not (np.isfinite(low) and np.isfinite(high)) or low > high:
        return "none"
    upper = f"≥ {high:.3g}" if row.upper_open else f"{high:.3g}"
    return f"{low:.3g} – {upper}"


def _cap_panels(curves: pd.DataFrame, points: pd.DataFrame, row: str | None):
    """Keep the first MAX_PANELS panels (rows x columns, in order)."""
    key = (curves[row].astype(str) + "\x1f" if row else "") + curves["panel"].astype(str)
    facets = list(dict.fromkeys(key))
    if len(facets) <= MAX_PANELS:
        return curves, points, ""
    kept = set(facets[:MAX_PANELS])
    pkey = (points[row].astype(str) + "\x1f" if row else "") + points["panel"].astype(str)
    return (curves[key.isin(kept)], points[pkey.isin(kept)],
            f" Showing the first {MAX_PANELS} of {len(facets)} panels; the table lists "
            f"every group, the trial explorer every trial.")


# ------------------------------------------------------------------------------ gallery
def gallery_parts(run_dir, lab: pd.DataFrame, axes: SweepAxes) -> list[tuple]:
    """The gallery (one figure per status: representative trials' loss and gradient-norm
    curves) as the arguments of `gallery_entry` for each status, in the gallery's order;
    the report draws the figures side by side."""
    picks = gallery.pick_representatives(lab, axes)
    if picks.empty:
        return []
    curves = read_curves(run_dir, trials=picks["trial"].tolist())
    frame = gallery.gallery_curves(picks, curves)
    return [(status, picks[picks["status"] == status], frame[frame["status"] == status])
            for status in dict.fromkeys(picks["status"])]


def gallery_entry(status: str, mine: pd.DataFrame, frame: pd.DataFrame) -> dict[str, Any]:
    """The gallery's figure of one status: its picked trials `mine` and their curves."""
    n = int(mine["n_status"].iloc[0])
    ended = "were pruned" if status == "pruned" else f"ended {status}"
    caption = (f"{n} trial{'s' if n != 1 else ''} {ended}; "
               + (f"showing {len(mine)}, evenly spread from the best to the worst final / "
                  f"initial validation loss. " if n > len(mine) else "showing all. ")
               + "Top: minibatch loss (gray), train and validation evaluations in the "
                 "task's loss; a trial trained on another objective (Huber, standardized "
                 "targets, a hand-written loss) has its minibatch objective on a right-hand "
                 "axis of its own, named there. Bottom: minibatch gradient norm. Every "
                 "axis has a log scale (values <= 0 are not drawn). Dotted: divergence "
                 "step.")
    if frame.empty:
        return {"status": status, "image": None, "caption": "",
                "note": "No curves recorded for these trials."}
    image = gallery.plot_gallery(mine, frame)
    return {"status": status, "image": figures.figure_to_data_uri(image),
            "caption": caption, "note": ""}


# ------------------------------------------------------------------------------- tables
def cell_stats_section(lab: pd.DataFrame, summary: pd.DataFrame,
                       axes: SweepAxes) -> dict[str, Any]:
    """Per configuration: statuses, divergence rate (Wilson 95%), median and IQR of the
    final validation loss over seeds, capped at each trial's initial loss (bootstrap 95%)."""
    names = axes.names
    metric = FINAL if FINAL in lab else "objective"
    rates = divergence_rate(lab, names)
    capped = lab.assign(**{FINAL: capped_loss(lab)}) if INITIAL in lab and metric == FINAL \
        else lab
    spread = seed_spread(capped, names, metric)
    cells = summary.merge(rates[[*names, "rate", "ci_low", "ci_high"]], on=names, how="left") \
        .merge(spread.drop(columns="n"), on=names, how="left") if names else pd.concat(
        [summary, rates[["rate", "ci_low", "ci_high"]], spread.drop(columns="n")], axis=1)
    display = pd.DataFrame({a: cells[a] for a in names})
    display["trials"] = cells["n"]
    for column in [c for c in summary.columns if c.startswith("n_")]:
        # n_defined counts the trials with a finite (capped) metric, not a status
        label = f"{metric} finite" if column == "n_defined" else column[2:]
        display[label] = cells[column]
    display["diverged % [95% CI]"] = [tables.fmt_interval(r, lo, hi, percent=True) for r, lo, hi
                                      in zip(cells["rate"], cells["ci_low"], cells["ci_high"],
                                             strict=True)]
    display[f"median {metric} [95% CI]"] = [
        tables.fmt_interval(m, lo, hi) for m, lo, hi
        in zip(cells["median"], cells["median_low"], cells["median_high"], strict=True)]
    display["IQR [95% CI]"] = [
        tables.fmt_interval(m, lo, hi) for m, lo, hi
        in zip(cells["iqr"], cells["iqr_low"], cells["iqr_high"], strict=True)]
    display["÷ task initial"] = cells["ratio"].map(tables.fmt)
    kept, note = tables.sample_rows(display)
    counts = [c for c in display.columns if c not in names and c.islower()
              and not c.startswith(("median", "÷"))]
    html = tables.styled(kept, "cells", shade={"diverged % [95% CI]":
                                               cells.loc[kept.index, "rate"]},
                         right=[*counts, "÷ task initial"])
    return {"table": html, "note": note, "n_resamples": N_RESAMPLES, "metric": metric}


def metric_tables_section(lab: pd.DataFrame, axes: SweepAxes) -> dict[str, Any]:
    """Every numeric metric by status, and a few key metrics per configuration."""
    metrics = tables.metric_columns(lab)
    if not metrics:
        return {"by_status": "", "per_cell": "", "per_cell_note": "", "metrics": []}
    long = tables.status_metric_frame(lab, metrics)
    by_status = pd.DataFrame({"metric": metrics})
    for status, part in long.groupby("status", sort=False):
        n = int(len(lab[lab["status"] == status]))
        by_status[f"{status} (n={n})"] = [
            "–" if not r.n else f"{tables.fmt(r.median)} [{tables.fmt(r.q25)}, "
                                f"{tables.fmt(r.q75)}]" for r in part.itertuples()]
    status_html = tables.styled(by_status, "bystatus")
    chosen = [m for m in (FINAL, *tables.CELL_METRICS) if m in metrics]
    per_cell_html, note = "", ""
    if axes.names and chosen:
        medians = lab.groupby(axes.names, sort=False)[chosen].median().reset_index()
        kept, note = tables.sample_rows(medians)
        shown = kept.copy()
        for metric in chosen:
            shown[metric] = kept[metric].map(tables.fmt)
        shade = {m: _rank01(medians[m]).loc[kept.index] for m in chosen}
        per_cell_html = tables.styled(shown, "percell", shade=shade, cmap="Blues",
                                      right=chosen)
    return {"by_status": status_html, "per_cell": per_cell_html, "per_cell_note": note,
            "metrics": metrics}


def _rank01(values: pd.Series) -> pd.Series:
    """Percentile rank in [0, 1] (NaN stays NaN): shading that outliers cannot flatten."""
    return values.rank(pct=True)


# -------------------------------------------------------------------------- diagnostics
def diagnostics_section(run_dir, lab: pd.DataFrame, axes: SweepAxes) -> dict[str, Any] | None:
    """Sharpness vs 2/lr and the gradient noise scale, or None when none was recorded."""
    sharp = diagnostics.recorded(lab, diagnostics.SHARPNESS_COLUMNS)
    noise = diagnostics.recorded(lab, diagnostics.NOISE_COLUMNS)
    if not (sharp or noise):
        return None
    parts: list[dict[str, Any]] = []
    if sharp and LR in lab:
        line = "optimizer" if "optimizer" in axes.values else None
        points = diagnostics.sharpness_points(lab, sharp, line)
        if not points.empty:
            above = float((points["sharpness"] > points["limit"]).mean())
            parts.append({"title": "Sharpness vs the stability limit 2/lr", "image":
                          figures.figure_to_data_uri(diagnostics.plot_sharpness(points, sharp)),
                          "caption": f"{sharp.replace('_', ' ')} (top Hessian eigenvalue of the "
                          f"full-batch training loss) per trial vs learning rate; dashed: 2/lr, "
                          f"the largest sharpness at which plain gradient descent is stable "
                          f"(adaptive and momentum methods have other limits). "
                          f"{100 * above:.0f}% of trials lie above it. Values beyond 10x the "
                          f"largest non-diverged value or limit sit at the top edge."})
    if axes.names:
        row, cols = curve_facets(axes)
        selection, fixed = select_curve_trials(lab, axes, row, cols)
        curves = read_curves(run_dir, trials=selection["trial"].tolist())
        held = "; ".join(f"{k} = {v}" for k, v in fixed.items()) or "nothing else varies"
        line = line_axis(axes, [a for a in (row, *cols) if a]) or "trial"
        for metric in ("sharpness", "noise_scale"):
            frame = diagnostics.diag_curves(selection, curves, lab, metric)
            if frame.empty:
                continue
            parts.append({"title": f"{metric.replace('_', ' ').capitalize()} during training",
                          "image": figures.figure_to_data_uri(
                              diagnostics.plot_diag_curves(frame, metric, line)),
                          "caption": f"{metric} recorded every few steps, first seed of each "
                          f"configuration; held fixed: {held}."})
    table = ""
    present = [c for c in ("sharpness_max", "sharpness_ratio_settled", "sharpness_ratio_max",
                           "noise_scale_final")
               if diagnostics.recorded(lab, (c,))]
    if present and axes.names:
        medians = lab.groupby(axes.names, sort=False)[present].median().reset_index()
        kept, _ = tables.sample_rows(medians)
        table = tables.styled(kept.assign(**{c: kept[c].map(tables.fmt) for c in present}),
                              "diag", right=present)
    return {"parts": parts, "table": table}


# ------------------------------------------------------------------------------- claims
def claims_section(claims: pd.DataFrame | None) -> dict[str, Any] | None:
    """The claims table (statement, expectation, effect [95% CI] with its unit, n, p, q,
    verdict), or None."""
    if claims is None or claims.empty:
        return None

    def column(name: str, default: Any = np.nan) -> pd.Series:
        return claims[name] if name in claims.columns else pd.Series(default,
                                                                     index=claims.index)

    expect = [f"same (within ±{tables.fmt(m)})" if e == "same" else str(e)
              for e, m in zip(column("expect", ""), column("margin"), strict=True)]
    display = pd.DataFrame({
        "statement": claims["statement"].astype(str), "expect": expect,
        "effect [95% CI]": [tables.fmt_interval(e, lo, hi) for e, lo, hi in zip(
            claims["effect"], claims["ci_low"], claims["ci_high"], strict=True)],
        "unit": column("unit", "").fillna("").astype(str),
        "n": claims["n_units"] if "n_units" in claims.columns else claims["n_trials"],
        "p": column("p_value").map(tables.fmt),
        "q": column("q_value").map(tables.fmt),
        "verdict": claims["verdict"].astype(str),
    })
    styler = display.style.hide(axis="index").set_uuid("claims").set_table_attributes(
        'class="metrics"').map(lambda v: f"background-color: {VERDICT_COLORS.get(v, '')}"
                               if v in VERDICT_COLORS else "", subset=["verdict"])
    return {"table": styler.to_html()}

