"""Static metric tables: tidy frames (compute) rendered as HTML (draw).

Every table is capped at MAX_ROWS rows; a longer one keeps evenly spaced rows and says so
above the table, naming which rows it kept.
`styled` writes the HTML that pandas Styler writes (index hidden, fixed ids through
`set_uuid`, so the same on every rebuild), byte for byte, but builds the string directly:
Styler's jinja templates and render dicts took most of a second per report for a few
tables. tests/analysis/test_tables.py compares the two on many frames; an input whose
output this module cannot promise to match (a MultiIndex header, non-default
`styler.format.*` options, a table Styler would trim, styling it would reject) is still
rendered through Styler.
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
# Styler's table attributes and right alignment, as `styled` always asked for them.
TABLE_ATTRIBUTES = 'class="metrics"'
RIGHT = {"text-align": "right"}
# Styler's formatting options at their defaults; with any other value Styler formats cells
# in ways `_cell_text` does not copy, so such tables go through Styler.
_DEFAULT_FORMAT = {"styler.format.formatter": None, "styler.format.na_rep": None,
                   "styler.format.escape": None, "styler.format.decimal": ".",
                   "styler.format.thousands": None}
# (row, column) position -> CSS (property, value) pairs, in the order Styler collects them.
CellCss = dict[tuple[int, int], list[tuple[str, str]]]


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
    """Static HTML of `frame`, index hidden, fixed ids: what `_styler_html` returns for the
    same arguments, byte for byte (Styler's default formatting: floats with
    `styler.format.precision` decimals, everything else as `str`, nothing escaped).

    `shade` maps a column to the numbers that tint its cells (a light gradient per column;
    NaN untinted), so a string column such as "33% [6, 79]" is shaded by its rate; `right`
    columns are right-aligned. Errors are Styler's (a missing column, duplicate columns
    with shading or alignment).
    """
    shade = shade or {}
    cells = _cell_css(frame, shade, cmap, list(right), fixed_range) \
        if _renders_directly(frame) else None
    if cells is None:
        return _styler_html(frame, uuid, shade, cmap, right, fixed_range)
    float_spec = f".{pd.get_option('styler.format.precision')}f"
    return _style_block(uuid, cells) + _table(frame, uuid, float_spec)


def _styler_html(frame: pd.DataFrame, uuid: str, shade: dict[str, pd.Series],
                 cmap: str, right: Sequence[str],
                 fixed_range: tuple[float, float] | None) -> str:
    """The table through pandas Styler: the reference `styled` reproduces, and its fallback
    for the inputs `_renders_directly` and `_cell_css` turn away."""
    styler = frame.style.hide(axis="index").set_uuid(uuid).set_table_attributes(
        TABLE_ATTRIBUTES)
    for column, values in shade.items():
        styler = styler.apply(lambda _, v=values: shade_css(v, cmap, fixed_range),
                              subset=[column])
    if right:
        styler = styler.set_properties(subset=list(right), **RIGHT)
    return styler.to_html()


def _renders_directly(frame: pd.DataFrame) -> bool:
    """Whether `_table` writes Styler's markup for `frame`: one header row (no MultiIndex
    columns), default formatting options, and no row or column trimmed by the
    `styler.render.*` limits (Styler would write "..." cells)."""
    if frame.columns.nlevels != 1:
        return False
    if any(pd.get_option(k) != v for k, v in _DEFAULT_FORMAT.items()):
        return False
    n_rows, n_cols = frame.shape
    max_rows = pd.get_option("styler.render.max_rows")
    max_cols = pd.get_option("styler.render.max_columns")
    # Styler treats 0 and None alike here: no limit.
    return not ((max_rows and n_rows > max_rows) or (max_cols and n_cols > max_cols)
                or n_rows * n_cols > pd.get_option("styler.render.max_elements"))


def _cell_css(frame: pd.DataFrame, shade: dict[str, pd.Series], cmap: str,
              right: list[str], fixed_range: tuple[float, float] | None) -> CellCss | None:
    """The CSS of each styled data cell as Styler collects it (`apply` per shaded column in
    `shade` order, then `set_properties` for `right`), or None where Styler's result is not
    certain to be this: a label not matched exactly, a column named twice in `right`,
    duplicate rows or columns (Styler raises), shade values of another length."""
    if not (shade or right):
        return {}
    if not (frame.index.is_unique and frame.columns.is_unique):
        return None
    labels = frame.columns.tolist()
    shaded = [_position(labels, column) for column in shade]
    aligned = [_position(labels, column) for column in right]
    if None in shaded or None in aligned or len(set(aligned)) < len(aligned):
        return None
    cells: CellCss = {}
    if not len(frame):  # Styler applies no style function to an empty selection
        return cells
    parsed: dict[str, list[tuple[str, str]]] = {}  # a table repeats its few shades
    for j, values in zip(shaded, shade.values(), strict=True):
        if len(values) != len(frame):
            return None
        for i, css in enumerate(shade_css(values, cmap, fixed_range)):
            if not css:  # Styler skips "" (no style)
                continue
            if ":" not in css:  # Styler raises
                return None
            if css not in parsed:
                parsed[css] = _css_pairs(css)
            cells.setdefault((i, j), []).extend(parsed[css])
    right_css = list(RIGHT.items())
    for j in aligned:
        for i in range(len(frame)):
            cells.setdefault((i, j), []).extend(right_css)
    return cells


def _position(labels: list, column: object) -> int | None:
    """Position of the one label equal to `column` and of its type (str or int), or None:
    pandas' looser matches (1 for 1.0, a date string for a timestamp) go through Styler."""
    if type(column) not in (str, int):
        return None
    hits = [j for j, label in enumerate(labels)
            if type(label) is type(column) and label == column]
    return hits[0] if len(hits) == 1 else None


def _css_pairs(css: str) -> list[tuple[str, str]]:
    """`"a: 1; b: 2"` -> [("a", "1"), ("b", "2")], split as Styler splits it."""
    return [(part.split(":")[0].strip(), ":".join(part.split(":")[1:]).strip())
            for part in css.split(";") if part.strip()]


def _style_block(uuid: str, cells: CellCss) -> str:
    """Styler's `<style>` block: one rule per distinct CSS list, its selectors the cells
    holding it, rules and selectors in row-major order of first appearance."""
    rules: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for i, j in sorted(cells):
        rules.setdefault(tuple(cells[i, j]), []).append(f"#T_{uuid}_row{i}_col{j}")
    text = ['<style type="text/css">\n']
    for props, selectors in rules.items():
        text.append(", ".join(selectors) + " {\n")
        text.extend(f"  {p}: {v};\n" for p, v in props)
        text.append("}\n")
    text.append("</style>\n")
    return "".join(text)


def _table(frame: pd.DataFrame, uuid: str, float_spec: str) -> str:
    """Styler's `<table>` for `frame` with the index hidden: a header row (none without
    columns), then one row per frame row; every cell with its id and classes, and the space
    Styler's template leaves before each `>`."""
    attributes = TABLE_ATTRIBUTES
    if not pd.get_option("styler.html.mathjax"):  # Styler then marks the table so
        attributes = attributes.replace('class="', 'class="tex2jax_ignore mathjax_ignore ')
    labels = frame.columns.tolist()
    text = [f'<table id="T_{uuid}" {attributes}>\n', "  <thead>\n"]
    if labels:
        text.append("    <tr>\n")
        text.extend(f'      <th id="T_{uuid}_level0_col{j}" class="col_heading level0 col{j}" '
                    f'>{_cell_text(label, float_spec)}</th>\n'
                    for j, label in enumerate(labels))
        text.append("    </tr>\n")
    text.append("  </thead>\n  <tbody>\n")
    # Iterating a column yields what Styler's `itertuples` yields (both iterate iloc[:, j]).
    columns = [[_cell_text(v, float_spec) for v in frame.iloc[:, j]]
               for j in range(len(labels))]
    for i in range(len(frame)):
        text.append("    <tr>\n")
        text.extend(f'      <td id="T_{uuid}_row{i}_col{j}" class="data row{i} col{j}" '
                    f'>{column[i]}</td>\n' for j, column in enumerate(columns))
        text.append("    </tr>\n")
    text.append("  </tbody>\n</table>\n")
    return "".join(text)


def _cell_text(value: object, float_spec: str) -> str:
    """Styler's default display of a value: floats and complex numbers formatted with
    `float_spec` (".6f": NaN "nan", inf "inf"), anything else `str` (bools "True", None
    "None", pd.NA "<NA>"), unescaped."""
    if type(value) is str:  # the common case, first
        return value
    if pd.api.types.is_float(value) or pd.api.types.is_complex(value):
        return format(value, float_spec)
    return str(value)
