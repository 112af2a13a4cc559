"""The stability edge of an edge search (`edges.parquet`, written by `study.edge`): per
configuration, the largest learning rate at which every seed trained without diverging.

Drawn against batch size (or the first other axis) with one line per optimizer and one
panel per remaining axis combination. Each point is the edge (`edge`); its bar is the seeds'
spread (`seed_edge_min` .. `seed_edge_max`, the same rule applied to each seed alone); an
open triangle marks an edge above the searched range (no rate diverged). The caption says
the precision reached and what a log grid of the same cost would have resolved
(`grid_precision_same_cost`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.figures import (
    bottom_legend,
    figure_to_data_uri,
    plain_log_ticks,
    plt,
    wrap_at_commas,
    wrapped_grid,
)
from analysis.tables import fmt, styled

# What edges.parquet holds besides the configuration's axis values (study.edge).
EDGE_COLUMNS = ("edge", "edge_high", "precision", "resolved", "bound", "rates_tried",
                "trials", "seed_edge_min", "seed_edge_max", "grid_precision_same_cost")
X_AXIS = "train.batch_size"
LINE_AXIS = "optimizer"


def edge_axes(edges: pd.DataFrame) -> tuple[str | None, str | None, list[str]]:
    """(x axis, line axis, panel axes) among the configuration columns of `edges`: batch
    size on x when present (else the first axis), one line per optimizer when present, a
    panel per combination of the rest."""
    config = [c for c in edges.columns if c not in EDGE_COLUMNS]
    x = X_AXIS if X_AXIS in config else (config[0] if config else None)
    line = LINE_AXIS if LINE_AXIS in config and x != LINE_AXIS else None
    return x, line, [c for c in config if c not in (x, line)]


def ordered(values: pd.Series) -> list[str]:
    """Distinct values as text: numbers ascending, then the rest (e.g. `full`) as found."""
    texts = list(dict.fromkeys(values.astype(str)))
    numeric = sorted((t for t in texts if _number(t) is not None), key=_number)
    return numeric + [t for t in texts if _number(t) is None]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def plot_edges(edges: pd.DataFrame) -> Figure:
    """The edge per configuration, log y, one panel per combination of the panel axes."""
    x, line, panel_axes = edge_axes(edges)
    frame = edges.assign(_x=edges[x].astype(str) if x else "all",
                         _line=edges[line].astype(str) if line else "edge")
    xs = ordered(frame["_x"])
    lines = list(dict.fromkeys(frame["_line"]))
    panels = (list(frame.groupby(panel_axes, sort=False, dropna=False)) if panel_axes
              else [((), frame)])
    fig, axs, ncols, _ = wrapped_grid(len(panels), (3.6, 2.6), len(lines), title_lines=1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, part) in zip(axs, panels, strict=True):
        key = key if isinstance(key, tuple) else (key,)
        for k, name in enumerate(lines):
            rows = part[part["_line"] == name].set_index("_x").reindex(xs)
            pos = np.arange(len(xs)) + (k - (len(lines) - 1) / 2) * 0.08
            edge = rows["edge"].to_numpy(float)
            low = edge - rows["seed_edge_min"].to_numpy(float)
            high = rows["seed_edge_max"].to_numpy(float) - edge
            color = colors[k % len(colors)]
            ax.errorbar(pos, edge, yerr=[np.nan_to_num(low), np.nan_to_num(high)],
                        color=color, marker="o", ms=4, capsize=2, lw=1.2)
            open_top = (rows["bound"] == "above high").to_numpy()
            ax.scatter(pos[open_top], edge[open_top], marker="^", s=40, facecolors="white",
                       edgecolors=color, zorder=3)
        if np.isfinite(part["edge"].to_numpy(float)).any():
            ax.set_yscale("log")
            plain_log_ticks(ax.yaxis)
        else:  # a log axis has no range to show: every configuration here diverged
            ax.set_yticks([])
            ax.text(0.5, 0.5, "diverged at the lowest rate:\nno edge in range",
                    transform=ax.transAxes, ha="center", va="center", color="0.35")
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel(x or "")
        ax.set_ylabel("largest stable lr")
        title = ", ".join(f"{a}={v}" for a, v in zip(panel_axes, key, strict=True))
        ax.set_title(wrap_at_commas(title, 3.6), fontsize=10)
        ax.grid(True, which="major", axis="y", alpha=0.3)
    handles = [Line2D([], [], color=colors[k % len(colors)], marker="o", label=name)
               for k, name in enumerate(lines)]
    bottom_legend(fig, handles, ncols)
    return fig


def _n(count: int) -> str:
    return f"{count} configuration{'' if count == 1 else 's'}"


def edge_section(edges: pd.DataFrame | None) -> dict[str, Any] | None:
    """Figure, caption and table of an edge search's `edges`; None for other runs."""
    if edges is None or edges.empty:
        return None
    reached = edges["precision"].dropna()
    grid = edges["grid_precision_same_cost"].dropna()
    open_top = int((edges["bound"] == "above high").sum())
    below = int((edges["bound"] == "below low").sum())
    caption = (
        "Each point: the largest learning rate at which every seed trained without "
        "diverging (the edge); the next rate tried diverged for at least one seed, "
        f"at most {fmt(100 * reached.max()) if len(reached) else '—'}% higher (median "
        f"{fmt(100 * reached.median()) if len(reached) else '—'}%). Bars: the same rule "
        "applied to each seed alone (the seeds' spread). A log grid over the searched range "
        "with as many rates as the search tried per configuration would have spaced them "
        f"{fmt(100 * grid.median()) if len(grid) else '—'}% apart (median), the precision a "
        "grid of the same cost would have had."
        + (f" Open triangles: no rate up to the range's top diverged ({_n(open_top)}; "
           "the edge lies above)." if open_top else "")
        + (f" {_n(below)} diverged at the lowest rate (no edge in range; not drawn)."
           if below else ""))
    table = edges.copy()
    for column in ("edge", "edge_high", "seed_edge_min", "seed_edge_max"):
        table[column] = table[column].map(fmt)
    for column in ("precision", "grid_precision_same_cost"):
        table[column] = table[column].map(lambda v: f"{fmt(100 * v)}%" if pd.notna(v) else "—")
    drawn = edges["edge"].notna().any()
    if not drawn:
        caption = ("No configuration has an edge in the searched range: every one diverged "
                   "at its lowest rate for some seed (lower `sweep.edge.low` to find it).")
    return {"image": figure_to_data_uri(plot_edges(edges)) if drawn else None,
            "caption": caption,
            "table": styled(table, "edges", right=["edge", "edge_high", "trials"])}
