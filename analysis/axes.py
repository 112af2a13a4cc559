"""What varied in a run, in which order, and how figures lay those axes out.

Axis values are compared through `value_key`: numbers (and numeric strings such as the
batch size "32" that Parquet stores as text when "full" shares the column) become floats,
everything else stays a string. So the metadata's `8` and the table's `"8"` are one value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

Key = float | str

LR = "optimizer.lr"
BATCH_SIZE = "train.batch_size"
SEED = "seed"
# Label columns written from the config-group choices; inferred axes come from these and
# from dotted config columns when the metadata declares none.
GROUP_LABELS = ("task", "model", "optimizer", "failure", "mitigation")


def value_key(value: Any) -> Key:
    """Comparable key of one axis value: a finite float when it parses as one, else str."""
    if isinstance(value, bool):
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else str(value)


def format_key(key: Key) -> str:
    """Short display label: `0.0001`, `32`, `1e-05`, `full`."""
    return f"{key:g}" if isinstance(key, float) else key


def order_keys(keys: Iterable[Key], declared: Sequence[Any] = ()) -> list[Key]:
    """Distinct keys in display order.

    Numbers ascend, then strings in declared order, then any undeclared strings sorted; so
    batch sizes read 8, 32, 128, full.
    """
    distinct = set(keys)
    numbers = sorted(k for k in distinct if isinstance(k, float))
    strings = [k for k in distinct if isinstance(k, str)]
    declared_keys = [value_key(v) for v in declared]
    ranked = [k for k in dict.fromkeys(declared_keys) if k in strings]
    return numbers + ranked + sorted(set(strings) - set(ranked))


@dataclass(frozen=True)
class SweepAxes:
    """The axes that vary in a run (seed excluded), each with its ordered keys, and
    `searched`: the numeric keys a search drew (every proposal its own value; no levels)."""

    values: Mapping[str, tuple[Key, ...]]
    searched: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return list(self.values)

    def __len__(self) -> int:
        return len(self.values)


def sweep_axes(trials: pd.DataFrame, meta: Mapping[str, Any]) -> SweepAxes:
    """Axes with more than one value among `trials`, in declared order.

    Declared axes (`meta["axes"]`) that are table columns come first; when none is
    declared, group-label and dotted config columns that vary are used instead. A search's
    numeric keys (`meta["searched"]`) that vary are `searched`.
    """
    declared: Mapping[str, Sequence[Any]] = meta.get("axes") or {}
    searched = tuple(k for k in meta.get("searched") or () if k in trials.columns
                     and trials[k].nunique() > 1)
    names = [a for a in declared if a in trials.columns and a != SEED]
    if not declared and not searched:
        names = [c for c in trials.columns
                 if c != SEED and (c in GROUP_LABELS or "." in c)]
    values: dict[str, tuple[Key, ...]] = {}
    for name in names:
        keys = order_keys(trials[name].dropna().map(value_key), declared.get(name, ()))
        if len(keys) > 1:
            values[name] = tuple(keys)
    return SweepAxes(values, searched)


def searched_values(trials: pd.DataFrame, axes: SweepAxes) -> dict[str, str]:
    """{searched key: "N values from LOW to HIGH"} of a search's numeric keys (`searched`)."""
    out = {}
    for name in axes.searched:
        values = pd.to_numeric(trials[name], errors="coerce").dropna()
        out[name] = (f"searched: {values.nunique()} values from {values.min():.3g} to "
                     f"{values.max():.3g}")
    return out


def pooled_note(axes: SweepAxes) -> str:
    """What a configuration's statistics pool besides its seeds in a search: "" in a grid."""
    if not axes.searched:
        return ""
    return (f" and over every searched value of {', '.join(axes.searched)} (a configuration "
            f"of a search pools its proposals; of an edge search, its candidate rates)")


def joined(frame: pd.DataFrame, columns: Sequence[str]) -> pd.Series | str:
    """Each row's values of `columns` as text joined by ", " (a Series, also of no rows:
    pandas' row-wise join of no rows gives a frame); "" without columns."""
    if not columns:
        return ""
    text = frame[columns[0]].astype(str)
    for column in columns[1:]:
        text = text + ", " + frame[column].astype(str)
    return text


@dataclass(frozen=True)
class MapLayout:
    """Which axis goes where in the stability map: x, y, panel rows, panel columns."""

    x: str
    y: str
    row: str | None
    cols: tuple[str, ...]


def choose_map_layout(axes: SweepAxes) -> MapLayout | None:
    """Learning rate (x) by batch size (y) when both vary, else the two axes with most values.

    Remaining axes facet the map: `task` (or the first remaining axis) gives panel rows,
    the others together give panel columns. None when fewer than two axes vary.
    """
    if len(axes) < 2:
        return None
    names = axes.names
    if LR in names and BATCH_SIZE in names:
        x, y = LR, BATCH_SIZE
    else:
        # Stable sort keeps declared order among ties; the learning rate wins a tie for x.
        ranked = sorted(names, key=lambda a: (-len(axes.values[a]), a != LR))
        x, y = ranked[0], ranked[1]
    rest = [a for a in names if a not in (x, y)]
    row = "task" if "task" in rest else (rest[0] if rest else None)
    cols = tuple(a for a in rest if a != row)
    return MapLayout(x=x, y=y, row=row, cols=cols)


def panel_labels(trials: pd.DataFrame, row: str | None,
                 cols: Sequence[str]) -> tuple[pd.Series, pd.Series]:
    """Per-trial panel row and column labels (empty strings when there is no facet)."""
    index = trials.index
    row_label = (trials[row].map(lambda v: format_key(value_key(v))) if row
                 else pd.Series("", index=index))
    if cols:
        parts = [trials[c].map(lambda v: format_key(value_key(v))) for c in cols]
        col_label = parts[0].str.cat(parts[1:], sep=", ") if len(parts) > 1 else parts[0]
    else:
        col_label = pd.Series("", index=index)
    return row_label.astype(str), col_label.astype(str)


def ordered_labels(axes: SweepAxes, row: str | None, cols: Sequence[str]) -> tuple[
        list[str], list[str]]:
    """Panel row and column labels in axis order (every combination of `cols`)."""
    rows = [format_key(k) for k in axes.values[row]] if row else [""]
    combos: list[str] = [""]
    for i, col in enumerate(cols):
        labels = [format_key(k) for k in axes.values[col]]
        combos = [f"{c}, {lab}" if i else lab for c in combos for lab in labels]
    return rows, combos
