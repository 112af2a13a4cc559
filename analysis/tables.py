"""Static metric tables: tidy frames (compute) rendered through pandas Styler (draw).

Every table is capped at MAX_ROWS rows; a longer one keeps evenly spaced rows and says so
above the table, naming which rows it kept.
Styler ids are fixed (`set_uuid`), so the HTML is the same on every rebuild.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import to_hex

from analysis.aggregate import order_statuses
from analysis.axes import GROUP_LABELS, SEED
from analysis.curves import spread
from analysis.figures import plt

MAX_ROWS = 500
# Known per-trial metrics in reading order; any other numeric column follows, sorted.
METRIC_ORDER = (
    "val_loss_final", "val_loss_best", "val_loss_initial", "excess_loss_final",
    "train_loss_final",
    "train_loss_best", "train_loss_initial", "val_acc_final", "train_acc_final", "gen_gap",
    "steps_to_50pct", "steps_to_90pct", "plateau_steps", "divergence_step",
    "osc_tv_ratio", "up_step_fraction", "loss_diff_autocorr", "update_cosine_mean",
    "spike_count", "spike_max_ratio", "eval_rise_count",
    "grad_norm_median", "grad_norm_max", "grad_norm_final", "grad_norm_growth",
    "layer_grad_ratio_log10", "update_param_ratio", "dead_relu_fraction",
    "saturation_fraction",
    "sharpness_final", "sharpness_max", "precond_sharpness_final", "precond_sharpness_max",
    "sharpness_threshold", "sharpness_ratio_max", "sharpness_ratio_settled",
    "sharpness_ratio_final", "noise_scale_final", "val_loss_end", "loss_blowup_max",
    "steps", "planned_steps", "irreducible_loss",
)
NOT_METRICS = {"trial", SEED, "objective", *GROUP_LABELS}
# Shown per configuration in the per-cell metric table, when present.
CELL_METRICS = ("steps_to_90pct", "osc_tv_ratio", "spike_count", "grad_norm_max",
                "update_param_ratio", "gen_gap", "sharpness_ratio_settled", "val_acc_final",
                "loss_blowup_max")


def metric_columns(trials: pd.DataFrame) -> list[str]:
    """Numeric per-trial metric columns: known ones in METRIC_ORDER, then the rest sorted.

    Config columns (dotted names), ids, seeds and the objective (a copy of a metric) are
    not metrics; a column with no finite value is left out.
    """
    numeric = [c for c in trials.columns if c not in NOT_METRICS and "." not in c
               and pd.api.types.is_numeric_dtype(trials[c])
               and not pd.api.types.is_bool_dtype(trials[c])
               and np.isfinite(trials[c].to_numpy(dtype=float)).any()]
    known = [m for m in METRIC_ORDER if m in numeric]
    return known + sorted(set(numeric) - set(known))


def status_metric_frame(trials: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Median and quartiles of each metric per status (finite values only).

    Long format: `metric`, `status`, `n`, `median`, `q25`, `q75`; statuses in
    order_statuses order, metrics in the given order.
    """
    rows = []
    statuses = order_statuses(trials["status"].astype(str))
    for metric in metrics:
        for status in statuses:
            values = pd.to_numeric(trials.loc[trials["status"] == status, metric],
                                   errors="coerce").to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            q = np.quantile(values, [0.25, 0.5, 0.75]) if len(values) else [np.nan] * 3
            rows.append({"metric": metric, "status": status, "n": len(values),
                         "median": q[1], "q25": q[0], "q75": q[2]})
    return pd.DataFrame(rows, columns=["metric", "status", "n", "median", "q25", "q75"])


def sample_rows(frame: pd.DataFrame, max_rows: int = MAX_ROWS) -> tuple[pd.DataFrame, str]:
    """At most `max_rows` evenly spaced rows (first and last kept) and a note saying so."""
    if len(frame) <= max_rows:
        return frame, ""
    kept = frame.iloc[spread(len(frame), max_rows)]
    return kept, (f"Sampled: this table shows {len(kept)} of {len(frame)} rows, about every "
                  f"{len(frame) / len(kept):.2g}th in the order below (first and last "
                  f"included), not the most interesting ones; every row is in trials.parquet "
                  f"and every trial in the trial explorer.")


def fmt(value: float) -> str:
    """4 significant digits; "–" for NaN."""
    return "–" if pd.isna(value) else f"{value:.4g}"


def fmt_interval(value: float, low: float, high: float, percent: bool = False) -> str:
    """`0.031 [0.02, 0.05]` or `33% [6%, 79%]`; the bracket left out when unknown."""
    if pd.isna(value):
        return "–"
    if percent:
        text = f"{100 * value:.0f}%"
        return text if pd.isna(low) else f"{text} [{100 * low:.0f}, {100 * high:.0f}]"
    return fmt(value) if pd.isna(low) else f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def shade_css(values: pd.Series, cmap: str = "Greys",
              fixed_range: tuple[float, float] | None = None) -> list[str]:
    """Light background per value, scaled between the finite min and max (or
    `fixed_range`); "" for NaN."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    finite = numbers[np.isfinite(numbers)]
    if not len(finite):
        return [""] * len(numbers)
    low, high = fixed_range or (float(finite.min()), float(finite.max()))
    numbers = np.clip(numbers, low, high)
    scaled = (numbers - low) / (high - low) if high > low else np.zeros(len(numbers))
    colors = plt.get_cmap(cmap)(0.05 + 0.45 * np.nan_to_num(scaled))
    return ["" if not np.isfinite(v) else f"background-color: {to_hex(c)}"
            for v, c in zip(numbers, colors, strict=True)]


def styled(frame: pd.DataFrame, uuid: str, shade: dict[str, pd.Series] | None = None,
           cmap: str = "Greys", right: Sequence[str] = (),
           fixed_range: tuple[float, float] | None = None) -> str:
    """Static HTML of `frame` through pandas Styler, index hidden, fixed ids.

    `shade` maps a column to the numbers that tint its cells (a light gradient per column;
    NaN untinted), so a string column such as "33% [6, 79]" is shaded by its rate.
    """
    styler = frame.style.hide(axis="index").set_uuid(uuid).set_table_attributes(
        'class="metrics"')
    for column, values in (shade or {}).items():
        styler = styler.apply(lambda _, v=values: shade_css(v, cmap, fixed_range),
                              subset=[column])
    if right:
        styler = styler.set_properties(subset=list(right), **{"text-align": "right"})
    return styler.to_html()
