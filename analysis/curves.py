"""Which trials the loss-curve figure shows, and their curves as tidy frames."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.axes import (
    BATCH_SIZE,
    GROUP_LABELS,
    LR,
    SEED,
    SweepAxes,
    format_key,
    ordered_labels,
    panel_labels,
    value_key,
)

MAX_LINES = 5
PREFERRED_BATCH = 32.0


def line_axis(axes: SweepAxes, facets: Sequence[str]) -> str | None:
    """The axis drawn as separate lines: the learning rate, else the longest non-facet axis."""
    free = [a for a in axes.names if a not in facets]
    if LR in free:
        return LR
    return max(free, key=lambda a: len(axes.values[a]), default=None)


def curve_facets(axes: SweepAxes) -> tuple[str | None, tuple[str, ...]]:
    """Panel rows and columns of the curve gallery: the varying group labels (task, ...).

    `task` gives rows when it varies; the other varying labels (optimizer, ...) together
    give columns; the line axis is never a facet.
    """
    line = LR if LR in axes.values else None
    labels = [a for a in GROUP_LABELS if a in axes.values and a != line]
    row = "task" if "task" in labels else (labels[0] if labels else None)
    return row, tuple(a for a in labels if a != row)


def spread(n: int, k: int = MAX_LINES) -> list[int]:
    """Up to `k` indices spread evenly over range(n), ends included."""
    return sorted({int(i) for i in np.round(np.linspace(0, n - 1, min(n, k)))})


def fixed_values(axes: SweepAxes, skip: Sequence[str]) -> dict[str, object]:
    """One key per axis not in `skip`: batch size 32 when swept, otherwise the middle value."""
    fixed: dict[str, object] = {}
    for name, keys in axes.values.items():
        if name in skip:
            continue
        if name == BATCH_SIZE and PREFERRED_BATCH in keys:
            fixed[name] = PREFERRED_BATCH
        else:
            fixed[name] = keys[(len(keys) - 1) // 2]
    return fixed


def select_curve_trials(trials: pd.DataFrame, axes: SweepAxes, row: str | None,
                        cols: Sequence[str]) -> tuple[pd.DataFrame, dict[str, object]]:
    """Trials to draw: per panel, the first seed at up to MAX_LINES spread line-axis values.

    Returns a frame with `row`, `col`, `line` (display label), `line_pos`, `trial`,
    `status`, `divergence_step` (NaN unless diverged), sorted by panel then line, and the
    values the other axes were fixed at.
    """
    facets = [a for a in (row, *cols) if a]
    line = line_axis(axes, facets)
    fixed = fixed_values(axes, [*facets, *([line] if line else [])])
    keep = pd.Series(True, index=trials.index)
    for name, key in fixed.items():
        keep &= trials[name].map(value_key) == key
    if line:
        keys = axes.values[line]
        chosen = {keys[i]: pos for pos, i in enumerate(spread(len(keys)))}
        line_keys = trials[line].map(value_key)
        keep &= line_keys.isin(list(chosen))
    picked = trials[keep]
    row_lab, col_lab = panel_labels(picked, row, cols)
    frame = pd.DataFrame({
        "row": row_lab, "col": col_lab,
        "line": picked[line].map(lambda v: format_key(value_key(v))) if line else "",
        "line_pos": picked[line].map(lambda v: chosen[value_key(v)]) if line else 0,
        "seed": picked[SEED] if SEED in picked.columns else 0,
        "trial": picked["trial"], "status": picked["status"],
        "divergence_step": (pd.to_numeric(picked["divergence_step"], errors="coerce")
                            if "divergence_step" in picked.columns else np.nan),
    })
    # First seed of every (panel, line) cell.
    frame = frame.sort_values(["seed", "trial"]).drop_duplicates(["row", "col", "line"])
    rows, combos = ordered_labels(axes, row, cols)
    frame = frame.assign(_r=frame["row"].map({r: i for i, r in enumerate(rows)}),
                         _c=frame["col"].map({c: i for i, c in enumerate(combos)}))
    frame = frame.sort_values(["_r", "_c", "line_pos"], ignore_index=True)
    fixed_labels = {name: format_key(key) for name, key in fixed.items()}
    return frame.drop(columns=["_r", "_c", "seed"]), fixed_labels


def attach_curves(selection: pd.DataFrame, curves: pd.DataFrame, split: str = "val",
                  metric: str = "loss") -> pd.DataFrame:
    """Selection rows joined with their `split`/`metric` curve: adds `step` and `value`.

    A diverged trial's non-finite tail is dropped, so its last row is the last finite value
    (where the figure marks the divergence).
    """
    wanted = curves[(curves["split"] == split) & (curves["metric"] == metric)]
    merged = selection.merge(wanted[["trial", "step", "value"]], on="trial", how="inner")
    merged = merged[np.isfinite(merged["value"])]
    return merged.sort_values(["row", "col", "line_pos", "step"], ignore_index=True,
                              key=_stable_key(selection))


def _stable_key(selection: pd.DataFrame):
    """Sort key keeping the selection's panel order for `row`/`col` columns."""
    order = {name: {v: i for i, v in enumerate(dict.fromkeys(selection[name]))}
             for name in ("row", "col")}
    return lambda s: s.map(order[s.name]) if s.name in order else s


def trial_curves(curves: pd.DataFrame, trial: int) -> pd.DataFrame:
    """All finite curve rows of one trial: `split`, `metric`, `step`, `value`, sorted."""
    rows = curves[(curves["trial"] == trial) & np.isfinite(curves["value"])]
    return rows[["split", "metric", "step", "value"]].sort_values(
        ["split", "metric", "step"], ignore_index=True)
