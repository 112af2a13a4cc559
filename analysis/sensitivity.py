"""Learning-rate sensitivity: final loss vs learning rate, the Wortsman et al. (2023) number
and the stable learning-rate range, per group (task x optimizer x batch size x any other
varying axis). Compute functions return tidy frames; `plot_lr_sensitivity` draws them.

Definitions (loss = `val_loss_final`, the task's loss units):

- capped loss of a trial: min(final loss, initial loss); a non-finite final counts as the
  initial loss (a diverged run is no better than not training). The figure caps; the
  table it reads never does.
- per learning rate: `median` of the capped loss over seeds, `low`/`high` its min/max.
- LR sensitivity (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
  training instabilities"): E_lr[min(loss(lr), initial)] - min_lr loss(lr), the mean over
  the grid's learning rates (log-spaced in the sweeps, so an expectation over log lr) of
  the median capped loss, minus the best of those medians. 0 = every learning rate is as
  good as the best; it grows with the loss lost to badly chosen learning rates. `relative`
  divides it by the median initial loss, so tasks with different loss scales compare.
- stable LR range: `lr_min_progress`, the smallest learning rate at which every seed made
  progress (status neither diverged nor no_progress); `lr_max_stable`, the largest learning
  rate below the smallest one at which any seed diverged (every grid value when none did:
  `upper_open` then says the edge lies beyond the grid). NaN when there is no such value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, NullLocator

from analysis.aggregate import FINAL, INITIAL, capped_loss
from analysis.axes import LR, value_key
from analysis.figures import (
    bottom_legend,
    log_y_if_wide,
    plt,
    set_panel_title,
    wrap_at_commas,
    wrapped_grid,
)

FAILED = ("diverged", "no_progress")


def lr_curves(trials: pd.DataFrame, group: Sequence[str], lr: str = LR,
              metric: str = FINAL) -> pd.DataFrame:
    """One row per group x learning rate, learning rates ascending within a group.

    Columns: `group`..., `lr` (float), `n`, `n_diverged`, `n_no_progress`, `median`,
    `low`, `high` (median, min and max over seeds of the capped loss) and `initial`
    (median initial loss). Groups keep their order of first appearance in `trials`.
    """
    status = trials["status"].astype(str)
    work = pd.DataFrame({
        **{g: trials[g] for g in group},
        "lr": trials[lr].map(value_key).astype(float),
        "capped": capped_loss(trials, metric),
        "initial": pd.to_numeric(trials[INITIAL], errors="coerce"),
        "diverged": (status == "diverged").astype(int),
        "no_progress": (status == "no_progress").astype(int),
    })
    out = work.groupby([*group, "lr"], sort=False, dropna=False).agg(
        n=("capped", "size"), n_diverged=("diverged", "sum"),
        n_no_progress=("no_progress", "sum"), median=("capped", "median"),
        low=("capped", "min"), high=("capped", "max"), initial=("initial", "median"),
    ).reset_index()
    order = _group_order(out, group)
    return out.assign(_g=order).sort_values(["_g", "lr"], kind="stable").drop(
        columns="_g").reset_index(drop=True)


def lr_sensitivity(curves: pd.DataFrame, group: Sequence[str]) -> pd.DataFrame:
    """Wortsman LR sensitivity per group, from `lr_curves` rows.

    Columns: `group`..., `n_lrs`, `sensitivity`, `relative` (/ median initial loss),
    `best_lr`, `best_loss`, `initial`.
    """
    rows = []
    for key, part in _groups(curves, group):
        medians = part["median"].to_numpy(dtype=float)
        finite = np.isfinite(medians)
        initial = float(part["initial"].median())
        if not finite.any():
            rows.append({**key, "n_lrs": len(part), "sensitivity": np.nan,
                         "relative": np.nan, "best_lr": np.nan, "best_loss": np.nan,
                         "initial": initial})
            continue
        best = int(np.nanargmin(np.where(finite, medians, np.inf)))
        value = float(np.mean(medians[finite]) - medians[best])
        rows.append({**key, "n_lrs": int(finite.sum()), "sensitivity": value,
                     "relative": value / initial if initial > 0 else np.nan,
                     "best_lr": float(part["lr"].iloc[best]),
                     "best_loss": float(medians[best]), "initial": initial})
    return pd.DataFrame(rows, columns=[*group, "n_lrs", "sensitivity", "relative",
                                       "best_lr", "best_loss", "initial"])


def stable_lr_range(curves: pd.DataFrame, group: Sequence[str]) -> pd.DataFrame:
    """Stable learning-rate range per group, from `lr_curves` rows (module docstring).

    Columns: `group`..., `lr_min_progress`, `lr_max_stable`, `upper_open`, `n_good` (grid
    values inside the range where every seed made progress and none diverged).
    """
    rows = []
    for key, part in _groups(curves, group):
        lrs = part["lr"].to_numpy(dtype=float)
        diverged = part["n_diverged"].to_numpy() > 0
        good = ~diverged & (part["n_no_progress"].to_numpy() == 0)
        first_bad = int(np.argmax(diverged)) if diverged.any() else len(lrs)
        lr_max = float(lrs[first_bad - 1]) if first_bad > 0 else np.nan
        lr_min = float(lrs[good][0]) if good.any() else np.nan
        inside = good & (lrs >= lr_min) & (lrs <= lr_max) if np.isfinite(
            lr_min * lr_max) else np.zeros(len(lrs), bool)
        rows.append({**key, "lr_min_progress": lr_min, "lr_max_stable": lr_max,
                     "upper_open": not diverged.any(), "n_good": int(inside.sum())})
    return pd.DataFrame(rows, columns=[*group, "lr_min_progress", "lr_max_stable",
                                       "upper_open", "n_good"])


def diverged_points(trials: pd.DataFrame, group: Sequence[str], lr: str = LR,
                    metric: str = FINAL) -> pd.DataFrame:
    """Diverged trials as points: `group`..., `lr`, `value` (capped loss), `trial`."""
    hit = trials[trials["status"].astype(str) == "diverged"]
    return pd.DataFrame({**{g: hit[g] for g in group},
                         "lr": hit[lr].map(value_key).astype(float),
                         "value": capped_loss(hit, metric), "trial": hit["trial"]},
                        ).reset_index(drop=True)


def _group_order(frame: pd.DataFrame, group: Sequence[str]) -> pd.Series:
    if not group:
        return pd.Series(0, index=frame.index)
    keys = list(zip(*(frame[g] for g in group), strict=True))
    first = {k: i for i, k in reversed(list(enumerate(dict.fromkeys(keys))))}
    return pd.Series([first[k] for k in keys], index=frame.index)


def _groups(curves: pd.DataFrame, group: Sequence[str]):
    """(labels dict, rows sorted by lr) per group, in order of first appearance."""
    if not group:
        yield {}, curves.sort_values("lr", kind="stable")
        return
    for key, part in curves.groupby(list(group), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        yield dict(zip(group, key, strict=True)), part.sort_values("lr", kind="stable")


# ------------------------------------------------------------------------------- drawing
def draw_lr_panel(curves: pd.DataFrame, points: pd.DataFrame, line: str | None,
                  line_labels: Sequence[str], ax: Axes | None = None) -> Axes:
    """Median capped loss vs learning rate (log x; log y when wide), one line per `line`
    value with a min-max seed band; diverged trials as black "x" at their capped loss."""
    ax = ax or plt.figure().gca()
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(line_labels), 1)))
    markers = "osD^v<>p*h"
    for i, label in enumerate(line_labels):
        part = curves[curves[line] == label] if line else curves
        if part.empty:
            continue
        part = part[part["median"] > 0]
        ax.fill_between(part["lr"], part["low"], part["high"], color=colors[i], alpha=0.2,
                        linewidth=0)
        ax.plot(part["lr"], part["median"], color=colors[i], marker=markers[i % 10],
                markersize=4, linewidth=1.5)
    if not points.empty:
        ax.plot(points["lr"], points["value"], linestyle="none", marker="x", color="black",
                markersize=6, markeredgewidth=1.5)
    if not (np.isfinite(curves["median"]).any() or np.isfinite(points["value"]).any()):
        # Nothing finite drawn (every trial blew up from its start): a log axis has no
        # range of its own, so it takes the rates'.
        rates = pd.concat([curves["lr"], points["lr"]]).astype(float)
        rates = rates[np.isfinite(rates) & (rates > 0)]
        if len(rates):
            ax.set_xlim(rates.min() / 1.5, rates.max() * 1.5)
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no finite loss to draw", transform=ax.transAxes, ha="center",
                va="center", color="0.35")
    ax.set_xscale("log")
    # Every decade labelled, no minor ticks: unlabelled minor ticks (8 per decade) cost
    # most of the drawing time.
    ax.xaxis.set_major_locator(LogLocator(numticks=12))
    ax.xaxis.set_minor_locator(NullLocator())
    log_y_if_wide(ax, pd.concat([curves["low"], curves["high"], points["value"]]))
    ax.set_xlabel("learning rate")
    ax.grid(True, which="major", alpha=0.3)
    return ax


def plot_lr_sensitivity(curves: pd.DataFrame, points: pd.DataFrame, row: str | None,
                        col: str | None, line: str | None) -> Figure:
    """Panels: `row` x `col` values (in order of appearance); lines: `line` values."""
    rows = list(dict.fromkeys(curves[row])) if row else [None]
    cols = list(dict.fromkeys(curves[col])) if col else [None]
    lines = list(dict.fromkeys(curves[line])) if line else [""]
    facets = [(r, c) for r in rows for c in cols]
    panel = (2.1, 1.7)
    titles = [wrap_at_commas(", ".join(str(p) for p in facet if p is not None), panel[0])
              for facet in facets]
    fig, axes, ncols, per_row = wrapped_grid(
        len(facets), panel, len(lines) + 1, title_lines=max(t.count("\n") + 1 for t in titles),
        inches_per_entry=2.6, sharex=True, gap_w=0.55)
    for k, ((r, c), title) in enumerate(zip(facets, titles, strict=True)):
        keep = pd.Series(True, index=curves.index)
        pkeep = pd.Series(True, index=points.index)
        for name, value in ((row, r), (col, c)):
            if name:
                keep &= curves[name] == value
                pkeep &= points[name] == value
        ax = axes[k]
        draw_lr_panel(curves[keep], points[pkeep], line, lines, ax=ax)
        set_panel_title(ax, title, 10)
        ax.set_ylabel("final val loss (capped)" if k % per_row == 0 else "")
        if k + per_row < len(facets):
            ax.set_xlabel("")
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(lines), 1)))
    handles = [Line2D([], [], color=colors[i], marker="osD^v<>p*h"[i % 10],
                      label=f"{line}={lab}" if line else "median over seeds")
               for i, lab in enumerate(lines)]
    handles.append(Line2D([], [], linestyle="none", marker="x", color="black",
                          label="diverged trial (at its capped loss)"))
    bottom_legend(fig, handles, ncols)
    return fig
