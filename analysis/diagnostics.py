"""Opt-in diagnostics, shown only when a sweep recorded them: sharpness (top Hessian
eigenvalue) against the stability threshold of each trial's optimizer
(`study.metrics.curvature`), and the gradient noise scale B_simple (McCandlish et al. 2018).

Inputs: trials.parquet columns `sharpness_final`, `sharpness_max`,
`sharpness_ratio_settled` / `sharpness_ratio_max` (curvature / the optimizer's threshold;
1 = at the limit), `noise_scale_final`; curves with split "diag", metrics "sharpness",
"precond_sharpness" and "noise_scale".
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.axes import LR, value_key
from analysis.figures import legend_columns, log_y_if_wide, plain_log_ticks, plt

SHARPNESS_COLUMNS = ("sharpness_max", "sharpness_final")
NOISE_COLUMNS = ("noise_scale_final",)
DIAG_SPLIT = "diag"
PER_ROW = 3  # 3 x 3.4 + 0.8 = 11 in: within the report's 11.4 in column
STATUS_MARKERS = {"converged": "o", "slow": "s", "unstable": "D", "recovered": "P",
                  "no_progress": "^", "diverged": "x"}


def recorded(trials: pd.DataFrame, columns: tuple[str, ...]) -> str | None:
    """The first of `columns` that holds a finite value, else None."""
    for column in columns:
        if column in trials and np.isfinite(
                pd.to_numeric(trials[column], errors="coerce")).any():
            return column
    return None


def sharpness_points(trials: pd.DataFrame, column: str, line: str | None) -> pd.DataFrame:
    """Per trial with a finite positive value: `lr`, `sharpness`, `limit` (= 2 / lr),
    `status`, `group` (the `line` axis label, "" without one)."""
    value = pd.to_numeric(trials[column], errors="coerce")
    keep = np.isfinite(value) & (value > 0)
    lr = trials.loc[keep, LR].map(value_key).astype(float)
    return pd.DataFrame({
        "lr": lr, "sharpness": value[keep], "limit": 2.0 / lr,
        "status": trials.loc[keep, "status"].astype(str),
        "group": trials.loc[keep, line].astype(str) if line else "",
    }).reset_index(drop=True)


def plot_sharpness(points: pd.DataFrame, column: str) -> Figure:
    """Sharpness vs learning rate (log-log), a panel per group, the 2/lr limit dashed.

    The y axis ends at 10x the largest of (non-diverged sharpness, 2/lr); larger values
    (diverged trials) are drawn at that edge."""
    groups = list(dict.fromkeys(points["group"]))
    fig, axes = _wrapped_panels(len(groups), 3.3, sharey=True)
    lrs = np.geomspace(points["lr"].min(), points["lr"].max(), 50)
    # Diverged trials can report absurd sharpness (1e50): cap the axis, draw them at the top.
    calm = points.loc[points["status"] != "diverged", "sharpness"]
    top = 10 * max(float(calm.max()) if len(calm) else 0, float(points["limit"].max()))
    points = points.assign(sharpness=np.minimum(points["sharpness"], top))
    statuses = list(dict.fromkeys(points["status"]))
    colors = dict(zip(statuses, plt.get_cmap("viridis")(np.linspace(0, 0.85, len(statuses))),
                      strict=True))
    for ax, group in zip(axes, groups, strict=True):
        part = points[points["group"] == group]
        for status in statuses:
            sel = part[part["status"] == status]
            ax.plot(sel["lr"], sel["sharpness"], linestyle="none", color=colors[status],
                    marker=STATUS_MARKERS.get(status, "v"), markersize=4, alpha=0.8,
                    markerfacecolor="none")
        ax.plot(lrs, 2.0 / lrs, color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("learning rate")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(column.replace("_", " "))
    handles = [Line2D([], [], linestyle="none", color=colors[s], markerfacecolor="none",
                      marker=STATUS_MARKERS.get(s, "v"), label=s) for s in statuses]
    handles.append(Line2D([], [], color="black", linestyle="--", label="2 / lr"))
    fig.legend(handles=handles, loc="outside lower center", frameon=False,
               ncols=legend_columns(fig, len(handles), 1.6))
    return fig


def diag_curves(selection: pd.DataFrame, curves: pd.DataFrame, trials: pd.DataFrame,
                metric: str) -> pd.DataFrame:
    """Diagnostic `metric` curves of the selected trials (curves.select_curve_trials rows):
    selection columns plus `step`, `value` (finite) and `lr` of the trial."""
    wanted = curves[(curves["split"] == DIAG_SPLIT) & (curves["metric"] == metric)]
    merged = selection.merge(wanted[["trial", "step", "value"]], on="trial", how="inner")
    lrs = trials.set_index("trial")[LR].map(value_key).astype(float)
    merged["lr"] = merged["trial"].map(lrs)
    return merged[np.isfinite(merged["value"])].sort_values(
        ["row", "col", "line_pos", "step"], kind="stable", ignore_index=True)


def plot_diag_curves(frame: pd.DataFrame, metric: str, line: str) -> Figure:
    """Diagnostic curves per panel (row, col); for sharpness each line's 2/lr is dotted."""
    panels = list(dict.fromkeys(zip(frame["row"], frame["col"], strict=True)))
    fig, axes = _wrapped_panels(len(panels), 3.2)
    n_lines = int(frame["line_pos"].max()) + 1
    colors = plt.get_cmap("plasma")(np.linspace(0.0, 0.85, max(n_lines, 1)))
    for ax, (row, col) in zip(axes, panels, strict=True):
        part = frame[(frame["row"] == row) & (frame["col"] == col)]
        for (pos, _), trace in part.groupby(["line_pos", "trial"], sort=True):
            ax.plot(trace["step"], trace["value"], color=colors[pos], linewidth=1.4)
            if metric == "sharpness":
                ax.axhline(2.0 / trace["lr"].iloc[0], color=colors[pos], linestyle=":",
                           linewidth=1)
        log_y_if_wide(ax, part["value"])
        ax.set_title(", ".join(p for p in (row, col) if p), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(metric.replace("_", " "))
    lines = frame[["line_pos", "line"]].drop_duplicates().sort_values("line_pos")
    handles = [Line2D([], [], color=colors[p], label=f"{line}={lab}")
               for p, lab in zip(lines["line_pos"], lines["line"], strict=True)]
    if metric == "sharpness":
        handles.append(Line2D([], [], color="black", linestyle=":", label="2 / lr (same color)"))
    fig.legend(handles=handles, loc="outside lower center", frameon=False,
               ncols=legend_columns(fig, len(handles), 1.8))
    return fig


def _wrapped_panels(n: int, height: float, sharey: bool = False) -> tuple[Figure, list]:
    """n panels 3.4 in wide, at most PER_ROW a row (the figure stays within the page's
    width, so it is shown unshrunk); spare grid cells hidden."""
    cols = max(1, min(n, PER_ROW))
    rows = -(-n // cols)
    fig, grid = plt.subplots(rows, cols, squeeze=False, sharey=sharey,
                             figsize=(3.4 * cols + 0.8, height * rows), layout="constrained")
    flat = list(grid.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]
