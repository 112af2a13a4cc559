"""Renderers: each takes a frame computed elsewhere (and `ax=None`) and draws it.

Everything here is drawing; numbers are decided in aggregate.py and curves.py. Colors come
from viridis (monotone in lightness) and states are marked by symbols, so figures stay
readable printed in grayscale.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import Colormap, LogNorm, Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import LogFormatter, LogLocator, NullLocator, ScalarFormatter  # noqa: E402

from analysis.aggregate import MARKERS, StabilityMap  # noqa: E402

CMAP = "viridis"
SYMBOLS = {"diverged": "x", "no_progress": "o", "unstable": "^", "some_diverged": "+"}
MISSING_COLOR = "#d9d9d9"
UNDEFINED_COLOR = "#f4f4f4"  # trials exist, but the metric is undefined for all of them
UNDEFINED_HATCH = "////"
DPI = 100
# The report's column is 72rem = 1152 px; at DPI 100 a figure this wide or narrower is
# shown at 100%, so its text keeps its size (10 pt = 14 px; nothing below 8 pt = 11 px).
PAGE_WIDTH_IN = 11.4


def figure_to_data_uri(fig: Figure) -> str:
    """PNG of `fig` as a `data:image/png;base64,...` URI; closes the figure."""
    buffer = io.BytesIO()
    try:
        trim_log_ticks(fig)
        fig.savefig(buffer, format="png", dpi=DPI,
                    metadata={"Software": None})
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class DrawnLogLocator(LogLocator):
    """A `LogLocator` that returns only the locations matplotlib draws.

    A log axis's locators return every location of the decades around the view (a minor
    locator 8 per decade), and the axis makes a tick (two lines and two texts, about 0.7
    ms) for each before it keeps those in the view: about 40% of the report's ticks were
    made and never drawn. This one drops the locations outside the view before the axis
    makes ticks for them, keeping a margin far wider than matplotlib's own tolerance
    (`_interval_contains_close`, 1e-10 of the view), so every drawn tick is kept and the
    figure is the same pixel for pixel. Log formatters ignore the locations they are given
    (they label by the view), so no label changes either; a linear axis's formatter uses
    them, so linear axes keep their locators.
    """

    MARGIN = 1e-6  # of the view's width, in the axis's (log) coordinates

    def __call__(self):
        locs = np.asarray(super().__call__())
        if self.axis is None or not len(locs):
            return locs
        transform = self.axis.get_transform()
        low, high = sorted(transform.transform(np.asarray(self.axis.get_view_interval())))
        slack = self.MARGIN * (high - low)
        with np.errstate(divide="ignore", invalid="ignore"):
            where = transform.transform(locs)
        return locs[(where >= low - slack) & (where <= high + slack)]


def trim_log_ticks(fig: Figure) -> None:
    """Make every plain `LogLocator` of `fig`'s axes a `DrawnLogLocator` (the same
    settings: only the class changes), so that drawing makes no tick it does not draw."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for locator in (axis.get_major_locator(), axis.get_minor_locator()):
                if type(locator) is LogLocator:
                    locator.__class__ = DrawnLogLocator


def set_panel_title(ax: Axes, title: str, fontsize: float) -> None:
    """`ax.set_title(title, fontsize=fontsize)`, pinned at the top of the panel where
    matplotlib's automatic placement would not move it. Call it once the panel and its
    twins hold their data and limits.

    At every draw matplotlib places a title above the x axis's tick labels when they are
    on top, and above the y axis's offset text (the "1e-5" or "+1e6" of a linear axis); to
    find the offset text it lays out every tick label of the axis once more, 6-10% of the
    report's drawing. A panel whose twins (the axes drawn in its place, itself included)
    all have their x ticks at the bottom and a y axis without offset text (log, labelled,
    or linear with ticks that need none) keeps its title at y = 1.0 either way: the same
    pixels, without the layout.
    """
    where = ax.get_position().bounds
    twins = {a for group in (ax.get_shared_x_axes(), ax.get_shared_y_axes())
             for a in group.get_siblings(ax) if a.get_position().bounds == where}
    fixed = all(a.xaxis.get_ticks_position() == "bottom"
                and a.xaxis.get_label_position() == "bottom"
                and not _offset_text(a) for a in twins)
    ax.set_title(title, fontsize=fontsize, y=1.0 if fixed else None)


def _offset_text(ax: Axes) -> str:
    """The offset text the y axis of `ax` will show with its present limits ("" for none)."""
    formatter = ax.yaxis.get_major_formatter()
    if ax.get_yscale() == "log" or not isinstance(formatter, ScalarFormatter):
        return ""
    formatter.set_locs(ax.yaxis.get_majorticklocs())
    return formatter.get_offset()


class PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers (0.6, 0.001, 1e-05), not mathtext powers.

    Which ticks get a label is LogFormatter's choice (minor ticks only on short ranges).
    """

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:.2g}" if super().__call__(x, pos) else ""


def plain_log_ticks(axis) -> None:
    """Use PlainLogFormatter for the major and minor ticks of a log-scaled `axis`."""
    axis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False,
                                               minor_thresholds=(1, 0.5)))


def log_y_if_wide(ax: Axes, values: pd.Series, factor: float = 3.0) -> bool:
    """Log y (plain tick labels) when the positive values span more than `factor`."""
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.empty or positive.max() / positive.min() <= factor or (values <= 0).any():
        return False
    ax.set_yscale("log")
    if positive.max() / positive.min() > 100:
        # Wide range: a few labelled decades, no minor ticks (hundreds of them are slow).
        ax.yaxis.set_major_locator(LogLocator(numticks=6))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    else:
        plain_log_ticks(ax.yaxis)
    return True


def log_y(ax: Axes, values: pd.Series) -> None:
    """Log y with plain tick labels whenever some value is positive (values <= 0 are not
    drawn on a log axis): a figure whose caption says "log scale" always has one."""
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.empty:
        return
    ax.set_yscale("log")
    if positive.max() / positive.min() > 100:
        ax.yaxis.set_major_locator(LogLocator(numticks=6))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    else:
        plain_log_ticks(ax.yaxis)


def short_label(label: str) -> str:
    """Tick-sized label: integers as is, other numbers to 2 significant digits (0.00032)."""
    try:
        value = float(label)
    except ValueError:
        return label
    return str(int(value)) if value.is_integer() and abs(value) < 1e6 else f"{value:.2g}"


# ----------------------------------------------------------------------- stability map
def draw_stability_panel(cells: pd.DataFrame, smap: StabilityMap, norm: Normalize,
                         ax: Axes | None = None) -> Axes:
    """Heatmap of one panel's `color_value` with a symbol on every marked cell."""
    ax = ax or plt.figure().gca()
    cmap: Colormap = plt.get_cmap(CMAP)
    grid = np.full((len(smap.y_labels), len(smap.x_labels)), np.nan)
    grid[cells["y_pos"].to_numpy(), cells["x_pos"].to_numpy()] = cells["color_value"]
    ax.set_facecolor(MISSING_COLOR)
    shown = np.where(grid > 0, grid, np.nan) if smap.log_color else grid
    ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, norm=norm,
              origin="lower", aspect="auto", interpolation="nearest")
    for cell in cells[~np.isfinite(cells["color_value"]) & (cells["n"] > 0)].itertuples():
        ax.add_patch(Rectangle((cell.x_pos - 0.5, cell.y_pos - 0.5), 1, 1,
                               facecolor=UNDEFINED_COLOR, edgecolor="0.6",
                               hatch=UNDEFINED_HATCH, linewidth=0))
    # One line of markers per symbol and ink, not one per cell: a Line2D costs about 1.5
    # ms to make and draw, and a map marks up to a few hundred cells. Markers sit in
    # distinct cells, so the order they are drawn in changes no pixel.
    marked: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for cell in cells[cells["marker"] != ""].itertuples():
        drawn = np.isfinite(cell.color_value) and (cell.color_value > 0 or not smap.log_color)
        rgba = cmap(norm(cell.color_value)) if drawn else (1, 1, 1, 1)
        ink = "black" if _luminance(rgba) > 0.5 else "white"
        xs, ys = marked.setdefault((cell.marker, ink), ([], []))
        xs.append(cell.x_pos)
        ys.append(cell.y_pos)
    for (marker, ink), (xs, ys) in marked.items():
        ax.plot(xs, ys, linestyle="none", marker=SYMBOLS[marker], markersize=9,
                markeredgewidth=2, color=ink, markerfacecolor="none")
    ax.set_xticks(range(len(smap.x_labels)), [short_label(x) for x in smap.x_labels],
                  rotation=45, ha="right")
    ax.set_yticks(range(len(smap.y_labels)), [short_label(y) for y in smap.y_labels])
    ax.set_xlabel(smap.layout.x)
    ax.set_ylabel(smap.layout.y)
    return ax


def plot_stability_map(smap: StabilityMap) -> Figure:
    """One heatmap panel per (row, col) facet, wrapped into as many columns as fit the
    page; a color bar in a margin of its own (it never covers a panel) and a symbol legend.
    """
    facets = [(r, c) for r in smap.row_labels for c in smap.col_labels]
    titles = [wrap_at_commas(", ".join(p for p in facet if p), 0.42 * len(smap.x_labels)
                             + 0.3) for facet in facets]
    longest_y = max((len(short_label(y)) for y in smap.y_labels), default=1)
    longest_x = max((len(short_label(x)) for x in smap.x_labels), default=1)
    xticks = 0.3 + 0.065 * longest_x  # 45-degree labels
    handles = _map_legend(smap, len(facets))
    fig, axes, _, ncols = wrapped_grid(
        len(facets), (0.3 + 0.3 * len(smap.x_labels), 0.25 + 0.3 * len(smap.y_labels)),
        n_legend=len(handles), title_lines=max(t.count("\n") + 1 for t in titles),
        left=0.5 + 0.075 * longest_y, right=1.45, xlabel=xticks + 0.25,
        gap_w=0.25, gap_h_extra=xticks - 0.45, inches_per_entry=3.6)
    low, high = smap.color_limits
    norm = LogNorm(low, high) if smap.log_color else Normalize(low, high)
    for k, ((row, col), title) in enumerate(zip(facets, titles, strict=True)):
        ax = axes[k]
        panel = smap.cells[(smap.cells["row"] == row) & (smap.cells["col"] == col)]
        draw_stability_panel(panel, smap, norm, ax=ax)
        set_panel_title(ax, title, 10)
        if k % ncols:
            ax.set_ylabel("")
            ax.tick_params(labelleft=False)
        if k + ncols < len(facets):
            ax.set_xlabel("")
    mappable = plt.cm.ScalarMappable(norm=norm, cmap=CMAP)
    label = ("final / initial val loss (medians)" if smap.normalized
             else f"share of seeds {smap.metric}" if smap.share
             else f"median {smap.metric}")
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max",
              (True, True): "both"}[(smap.n_below > 0, smap.n_above > 0)]
    first = axes[0].get_position()
    width, height = fig.get_size_inches()
    bar_height = min(first.height * height * 1.4 + 0.6, 3.2) / height
    cax = fig.add_axes((1 - 1.15 / width, first.y1 - bar_height, 0.18 / width, bar_height))
    colorbar = fig.colorbar(mappable, cax=cax, label=label, extend=extend)
    if smap.log_color:
        plain_log_ticks(colorbar.ax.yaxis)
    if handles:
        bottom_legend(fig, handles, legend_columns(fig, len(handles), 3.6))
    return fig


def _map_legend(smap: StabilityMap, n_panels: int) -> list:
    handles = [Line2D([], [], linestyle="none", marker=SYMBOLS[m], color="black",
                      markerfacecolor="none", markeredgewidth=2, label=text)
               for m, text in MARKERS.items() if (smap.cells["marker"] == m).any()]
    if len(smap.cells) < n_panels * len(smap.x_labels) * len(smap.y_labels):
        handles.append(Patch(color=MISSING_COLOR, label="no trials"))
    if (~np.isfinite(smap.cells["color_value"]) & (smap.cells["n"] > 0)).any():
        handles.append(Patch(facecolor=UNDEFINED_COLOR, edgecolor="0.6", hatch=UNDEFINED_HATCH,
                             label=f"{smap.metric} undefined for these trials"))
    return handles


def wrap_at_commas(title: str, width_in: float, fontsize: float = 10) -> str:
    """Break `title` at ", " so each line fits `width_in` inches at `fontsize` points
    (about 0.55 em per character)."""
    chars = max(int(width_in * 72 / (0.55 * fontsize)), 8)
    lines, current = [], ""
    for part in title.split(", "):
        candidate = f"{current}, {part}" if current else part
        if len(candidate) > chars and current:
            lines.append(current + ",")
            current = part
        else:
            current = candidate
    return "\n".join([*lines, current])


def wrapped_grid(n_panels: int, panel: tuple[float, float], n_legend: int,
                 title_lines: int = 1, inches_per_entry: float = 3.3, sharex: bool = False,
                 left: float = 0.85, right: float = 0.2, xlabel: float = 0.62,
                 gap_w: float = 0.65, gap_h_extra: float = 0.0
                 ) -> tuple[Figure, list[Axes], int, int]:
    """`n_panels` axes of `panel` size (inches) wrapped into as many columns as fit
    PAGE_WIDTH_IN, with fixed margins: `left` for tick labels and a y label, room above each
    panel for a title of `title_lines` lines, `xlabel` under each row, and a legend strip of
    `n_legend` entries at the bottom. Returns (figure, the n_panels axes in reading order,
    legend columns, grid columns); spare grid cells are hidden. Place the legend with
    `bottom_legend`.

    The figure is never wider than the page, so the report shows it at 100%: a 10-point
    label stays 14 px on screen. Fixed margins instead of constrained layout, which measures
    every tick label once more before drawing: it took half of a 16-panel figure's drawing
    time.
    """
    entry_h, title_h = 0.3, 0.19
    top = 0.15 + title_h * title_lines
    gap_h = (0.45 if sharex else 0.8) + title_h * (title_lines - 1) + gap_h_extra
    fit = int((PAGE_WIDTH_IN - left - right + gap_w) // (panel[0] + gap_w))
    cols = max(1, min(n_panels, fit))
    rows = -(-n_panels // cols)
    width = left + right + cols * panel[0] + (cols - 1) * gap_w
    ncols = _columns_that_fit(width, n_legend, inches_per_entry)
    bottom = xlabel + entry_h * -(-n_legend // ncols) + 0.1
    height = top + bottom + rows * panel[1] + (rows - 1) * gap_h
    fig, grid = plt.subplots(rows, cols, squeeze=False, sharex=sharex, figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                        bottom=bottom / height, wspace=gap_w / panel[0],
                        hspace=gap_h / panel[1])
    flat = list(grid.ravel())
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    if sharex:
        # The lowest visible panel of each column shows the x tick labels.
        for k in range(max(n_panels - cols, 0), n_panels):
            flat[k].tick_params(labelbottom=True)
    return fig, flat[:n_panels], ncols, cols


def bottom_legend(fig: Figure, handles: list, ncols: int) -> None:
    """The legend strip `wrapped_grid` left room for, centred at the bottom edge."""
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0),
               frameon=False, ncols=ncols)


def legend_columns(fig: Figure, n_entries: int, inches_per_entry: float = 3.3) -> int:
    """As many legend columns as fit the figure's width (legend text is not shrunk)."""
    return _columns_that_fit(fig.get_figwidth(), n_entries, inches_per_entry)


def _columns_that_fit(width: float, n_entries: int, inches_per_entry: float) -> int:
    return max(1, min(n_entries, int(width // inches_per_entry)))


def _luminance(rgba: tuple[float, ...]) -> float:
    r, g, b = rgba[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


# -------------------------------------------------------------------------- loss curves
def draw_curve_panel(frame: pd.DataFrame, n_lines: int, ax: Axes | None = None) -> Axes:
    """Lines of one panel (log y); diverged trials dashed and ending in an "x".

    `frame` rows: `line_pos`, `line`, `trial`, `status`, `step`, `value` (finite values
    only), optionally `divergence_step`. The y range is capped at 10x the largest first
    value, so blow-ups do not flatten the rest; they are drawn at the cap. The "x" of a
    diverged trial is at its divergence step: a trial the engine stopped after its last
    evaluation ends at (divergence_step, cap); one that ended blown up is marked at the
    first evaluation of its final blow-up.
    """
    ax = ax or plt.figure().gca()
    colors = plt.get_cmap("plasma")(np.linspace(0.0, 0.85, max(n_lines, 1)))
    positive = frame[frame["value"] > 0]
    if positive.empty:
        return ax
    start = positive.loc[positive["step"] == positive["step"].min(), "value"].max()
    # Blow-ups are drawn at the cap, so a divergence stays visible at the top edge.
    cap = 10.0 * float(start)
    if not (positive["status"] == "diverged").any():
        cap = min(float(positive["value"].max()), cap)
    for (pos, _), line in positive.groupby(["line_pos", "trial"], sort=True):
        values = np.minimum(line["value"].to_numpy(), cap)
        diverged = line["status"].iloc[0] == "diverged"
        ax.plot(line["step"], values, color=colors[pos],
                linestyle="--" if diverged else "-", linewidth=1.6)
        if diverged:
            mark_step, mark_value = line["step"].iloc[-1], values[-1]
            blew_up_at = line.get("divergence_step", pd.Series(np.nan)).iloc[0]
            steps = line["step"].to_numpy()
            if np.isfinite(blew_up_at) and blew_up_at > mark_step:
                # Stopped between evaluations: finish the line at the top edge, at the step.
                ax.plot([mark_step, blew_up_at], [mark_value, cap], color=colors[pos],
                        linestyle="--", linewidth=1.6)
                mark_step, mark_value = blew_up_at, cap
            elif np.isfinite(blew_up_at) and (steps == blew_up_at).any():
                # Ended blown up: the mark sits where the final blow-up began.
                mark_step = blew_up_at
                mark_value = values[int(np.flatnonzero(steps == blew_up_at)[0])]
            ax.plot(mark_step, mark_value, marker="x", color="black", markersize=9,
                    markeredgewidth=2, clip_on=False)
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.set_ylim(float(positive["value"].min()) / 1.5, cap * 1.5)
    ax.set_xlabel("step")
    ax.grid(True, which="major", alpha=0.3)
    return ax


def plot_loss_curves(frame: pd.DataFrame, line_axis: str, ylabel: str) -> Figure:
    """One curve panel per (row, col) facet in frame order, wrapped into as many columns as
    fit the page; a shared legend of line values."""
    facets = list(dict.fromkeys(zip(frame["row"], frame["col"], strict=True)))
    panel = (2.9, 1.9)
    titles = [wrap_at_commas(", ".join(p for p in facet if p), panel[0]) for facet in facets]
    lines = frame[["line_pos", "line"]].drop_duplicates().sort_values("line_pos")
    n_lines = int(lines["line_pos"].max()) + 1
    fig, axes, ncols, per_row = wrapped_grid(
        len(facets), panel, len(lines) + 1,
        title_lines=max(t.count("\n") + 1 for t in titles))
    for k, ((row, col), title) in enumerate(zip(facets, titles, strict=True)):
        ax = axes[k]
        draw_curve_panel(frame[(frame["row"] == row) & (frame["col"] == col)], n_lines,
                         ax=ax)
        set_panel_title(ax, title, 10)
        ax.set_ylabel(ylabel if k % per_row == 0 else "")
    colors = plt.get_cmap("plasma")(np.linspace(0.0, 0.85, max(n_lines, 1)))
    handles = [Line2D([], [], color=colors[p],
                      label=f"{line_axis}={short_label(lab)}" if lab else "first seed")
               for p, lab in zip(lines["line_pos"], lines["line"], strict=True)]
    handles.append(Line2D([], [], color="black", linestyle="--", marker="x",
                          label="diverged (x = where it blew up)"))
    bottom_legend(fig, handles, ncols)
    return fig


def plot_trial_curves(frame: pd.DataFrame, objective: str = "task") -> Figure:
    """One trial: loss (minibatch, train, val), gradient norm and accuracy when recorded.

    `frame` rows: `split`, `metric`, `step`, `value` (see curves.trial_curves). `objective`:
    the trial's `training_objective`; when it is not `task`, the minibatch loss is another
    loss than the evaluations' and is drawn on a right-hand axis of its own, named there.
    """
    metrics = [m for m in ("loss", "grad_norm", "accuracy") if (frame["metric"] == m).any()]
    fig, axes = plt.subplots(1, max(len(metrics), 1), squeeze=False,
                             figsize=(4.2 * max(len(metrics), 1), 3.2), layout="constrained")
    styles = {"batch": dict(linewidth=0.8, alpha=0.45), "train": dict(marker="o", ms=3),
              "val": dict(marker="s", ms=3, linestyle="--")}
    for ax, metric in zip(axes[0], metrics, strict=False):
        own_axis = metric == "loss" and objective != "task"
        for split, style in styles.items():
            rows = frame[(frame["metric"] == metric) & (frame["split"] == split)]
            if rows.empty:
                continue
            if own_axis and split == "batch":
                twin = ax.twinx()
                twin.plot(rows["step"], rows["value"], color="0.55", **style)
                twin.set_ylabel(f"minibatch {objective}", color="0.4")
                if (rows["value"] > 0).all():
                    twin.set_yscale("log")
                continue
            ax.plot(rows["step"], rows["value"], label=f"{split}", **style)
        shown = frame[(frame["metric"] == metric)
                      & ~((frame["split"] == "batch") & own_axis)]
        if own_axis:
            ax.set_ylabel("task loss (evaluations)")
        if metric != "accuracy" and (shown["value"] > 0).all():
            ax.set_yscale("log")
            plain_log_ticks(ax.yaxis)
        ax.set_title(metric.replace("_", " "), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return fig
