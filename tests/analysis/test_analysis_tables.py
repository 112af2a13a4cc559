"""analysis.tables.styled writes pandas Styler's HTML byte for byte without Styler.

The reference, `styler_html`, is the Styler chain `styled` used to run; every case compares
the two strings whole. Cases: hand-built frames (each dtype, odd values and column names,
empty frames, every styling combination, Styler options), the tables the report sections
build on the fixture run, and a seeded random sweep. The `direct` fixture makes a case fail
if `styled` fell back to Styler, so the inputs meant for the fast path take it.
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from analysis import findings, sections, tables
from analysis.aggregate import cell_summary
from analysis.axes import sweep_axes
from analysis.load import load_run
from analysis.tables import shade_css, styled
from tests.analysis.conftest import write_sweep_run

UUID = "t"


def styler_html(frame: pd.DataFrame, uuid: str, shade: dict | None = None,
                cmap: str = "Greys", right: Any = (),
                fixed_range: tuple[float, float] | None = None) -> str:
    """The reference: the Styler chain `styled` ran before it built the string itself."""
    styler = frame.style.hide(axis="index").set_uuid(uuid).set_table_attributes(
        'class="metrics"')
    for column, values in (shade or {}).items():
        styler = styler.apply(lambda _, v=values: shade_css(v, cmap, fixed_range),
                              subset=[column])
    if right:
        styler = styler.set_properties(subset=list(right), **{"text-align": "right"})
    return styler.to_html()


@pytest.fixture
def direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if `styled` renders through Styler (its fallback)."""
    def refuse(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("styled fell back to Styler")

    monkeypatch.setattr(tables, "_styler_html", refuse)


def assert_same(frame: pd.DataFrame, uuid: str = UUID, **kwargs: Any) -> None:
    """`styled` gives Styler's string; else fail naming the first line that differs (a
    short message: pytest's own diff of two long tables takes minutes)."""
    got, expected = styled(frame, uuid, **kwargs), styler_html(frame, uuid, **kwargs)
    if got != expected:
        pytest.fail(first_difference(got, expected), pytrace=False)


def first_difference(got: str, expected: str) -> str:
    """The first line where `got` and `expected` differ, or how their lengths differ."""
    got_lines, expected_lines = got.splitlines(True), expected.splitlines(True)
    for number, (mine, theirs) in enumerate(zip(got_lines, expected_lines, strict=False)):
        if mine != theirs:
            return f"line {number + 1}: styled {mine!r} != Styler {theirs!r}"
    return (f"styled has {len(got_lines)} lines, Styler {len(expected_lines)}; "
            f"lengths {len(got)} and {len(expected)}")


def outcome(render: Callable[[], str]) -> tuple:
    """("html", text) or ("error", type, message): what a render call gave (a function's
    repr in the message, which names the caller's lambda, made anonymous)."""
    try:
        return ("html", render())
    except Exception as error:  # any error: the comparison is the point
        message = re.sub(r"<function .*? at 0x[0-9a-f]+>", "<function>", str(error))
        return ("error", type(error), message)


# ---------------------------------------------------------------------------- hand-built
NAN, INF = float("nan"), float("inf")
SPECIAL = ["<b>x</b>", "a & b", 'say "hi"', "it's", "", "–", "÷ 0.5", "1.5", "two\nlines"]

VALUES = {
    "strings": pd.DataFrame({"s": SPECIAL}),
    "floats": pd.DataFrame({"f": [0.0, -0.0, 1.5, -2.25, NAN, INF, -INF, 1e20, -1e-9,
                                  2.5e-7, 123456789.123456789]}),
    "ints": pd.DataFrame({"i": [0, -1, 7, 2**62, -(2**63), 10**12, 3, 4, 5]}),
    "bools": pd.DataFrame({"b": [True, False, True]}),
    "object mixed": pd.DataFrame({"o": pd.Series(
        [None, pd.NA, NAN, 1, 1.5, "x<y", True, np.float64(2.0), np.int64(-3), pd.NaT,
         decimal.Decimal("1.10"), (1, 2), 1 + 2j], dtype=object)}),
    "nullable": pd.DataFrame({"I": pd.array([1, None, -3], dtype="Int64"),
                              "B": pd.array([True, None, False], dtype="boolean"),
                              "F": pd.array([0.5, None, NAN], dtype="Float64")}),
    "narrow numbers": pd.DataFrame({"f32": np.array([0.1, NAN, -3], dtype=np.float32),
                                    "u8": np.array([0, 255, 7], dtype=np.uint8),
                                    "i16": np.array([-5, 0, 5], dtype=np.int16)}),
    "string dtypes": pd.DataFrame({"py": pd.array(["a", None, "<c>"], dtype="string"),
                                   "cat": pd.Categorical(["lo", "hi", None]),
                                   "num cat": pd.Categorical([1.5, 2.0, 1.5])}),
    "times": pd.DataFrame({"t": pd.to_datetime(["2024-01-02 03:04:05", None,
                                                "2020-02-29 00:00:01"]),
                           "d": pd.to_timedelta([1, None, 3600], unit="s"),
                           "tz": pd.to_datetime(["2024-01-02", None, "2024-03-04"]
                                                ).tz_localize("UTC")}),
}

NAMES = {
    "non-string names": pd.DataFrame([[1, 2, 3, 4, 5, 6]],
                                     columns=[0, 1.5, True, None, NAN, -2]),
    "look-alike names": pd.DataFrame([[1, 2, 3]], columns=["1", 1, "1 "]),
    "duplicate names": pd.DataFrame([[1, 2, 3]], columns=["a", "a", "b"]),
    "markup names": pd.DataFrame([[1, 2]], columns=["<th>", 'a "q" & b']),
    "tuple name": pd.DataFrame([[1, 2]], columns=pd.Index([("a", 1), "b"], dtype=object,
                                                          tupleize_cols=False)),
    "date names": pd.DataFrame([[1, 2]], columns=pd.to_datetime(["2024-01-01", "2024-06-30"])),
    "range names": pd.DataFrame(np.arange(6.0).reshape(2, 3)),
    "named columns": pd.DataFrame({"a": [1]}).rename_axis(columns="name"),
    "odd index": pd.DataFrame({"a": [1, 2, 3]}, index=["z", "<y>", "x"]).rename_axis("idx"),
    "multiindex rows": pd.DataFrame({"a": [1, 2, 3]}, index=pd.MultiIndex.from_tuples(
        [("x", 1), ("x", 2), ("y", 1)], names=["k", None])),
}

EMPTY = {
    "no rows": pd.DataFrame({"a": pd.Series([], dtype=float), "b": pd.Series([], dtype=str)}),
    "no columns": pd.DataFrame(index=range(3)),
    "nothing": pd.DataFrame(),
}

# The edge table as analysis.edges.edge_section hands it over (numbers already formatted).
EDGES = pd.DataFrame({
    "task": ["blobs", "blobs"], "optimizer": ["sgd", "adam"], "model.width": [64, 128],
    "optimizer.momentum": [0.9, NAN], "edge": ["0.1", "–"], "edge_high": ["0.115", "–"],
    "precision": ["15%", "—"], "resolved": [True, False], "bound": ["", "below low"],
    "rates_tried": [12, 4], "trials": [36, 12], "seed_edge_min": ["0.1", "–"],
    "seed_edge_max": ["0.13", "–"], "grid_precision_same_cost": ["131%", "131%"]})


@pytest.mark.parametrize("frame", [*VALUES.values(), *NAMES.values(), *EMPTY.values(), EDGES],
                         ids=[*VALUES, *NAMES, *EMPTY, "edges"])
def test_unstyled_frames_match_styler(direct: None, frame: pd.DataFrame) -> None:
    assert_same(frame)


SHOP = pd.DataFrame({"name": ["a", "b", "c", "d"], "rate": ["10% [1, 20]", "–", "50%", "x"],
                     "n": [3, 0, 12, 7], "loss": [0.25, NAN, 1e-3, 2.0],
                     7: ["p", "q", "r", "s"]})
RATES = pd.Series([0.1, NAN, 0.5, 0.9], index=[10, 11, 12, 13])  # index ignored: positional

STYLINGS = {
    "shade": {"shade": {"rate": RATES}},
    "right": {"right": ["n", "loss"]},
    "shade and right on one column": {"shade": {"rate": RATES}, "right": ["rate", "n"]},
    "shades, cmap, fixed range": {"shade": {"rate": RATES, "loss": SHOP["loss"]},
                                  "cmap": "Reds", "fixed_range": (0.0, 1.0),
                                  "right": ("loss", "rate", "name")},
    "shade order differs from column order": {"shade": {"loss": pd.Series([4, 3, 2, 1]),
                                                        "name": pd.Series([1, 1, 1, 1])},
                                              "cmap": "Blues"},
    "all-NaN and constant shades": {"shade": {"rate": pd.Series([NAN] * 4),
                                              "n": pd.Series([2.0] * 4)},
                                    "right": ["n"]},
    "int column label": {"shade": {7: RATES}, "right": [7]},
    "nothing styled": {"shade": {}, "right": []},
}


@pytest.mark.parametrize("kwargs", STYLINGS.values(), ids=STYLINGS.keys())
def test_styled_frames_match_styler(direct: None, kwargs: dict) -> None:
    assert_same(SHOP, **kwargs)
    assert_same(SHOP.iloc[:0], **kwargs)  # no rows: Styler styles nothing
    assert_same(SHOP.set_axis(["w", "x", "y", "z"]), **kwargs)  # another (hidden) index


def test_a_shaded_cell_groups_with_others_only_on_identical_css(direct: None) -> None:
    kwargs = {"shade": {"rate": pd.Series([0.0, 0.0, 1.0, NAN])}, "right": ["rate", "n"]}
    html = styled(SHOP, UUID, **kwargs)
    assert html == styler_html(SHOP, UUID, **kwargs)
    assert "#T_t_row0_col1, #T_t_row1_col1 {\n  background-color:" in html
    assert "#T_t_row0_col2, #T_t_row1_col2, #T_t_row2_col2, #T_t_row3_col1, " in html


OPTIONS = {
    "precision": ("styler.format.precision", 2),
    "no mathjax": ("styler.html.mathjax", False),
    "large element limit": ("styler.render.max_elements", 10**7),
}


@pytest.mark.parametrize("option", OPTIONS.values(), ids=OPTIONS.keys())
def test_styler_options_the_renderer_follows(direct: None, option: tuple) -> None:
    with pd.option_context(*option):
        assert_same(VALUES["floats"], right=["f"])
        assert_same(SHOP, shade={"rate": RATES}, right=["n"])


FALLBACKS = {
    "multiindex columns": (pd.DataFrame([[1, 2.5]], columns=pd.MultiIndex.from_tuples(
        [("a", "x"), ("a", "y")])), {}, None),
    "na_rep option": (VALUES["floats"], {}, ("styler.format.na_rep", "–")),
    "thousands option": (VALUES["ints"], {}, ("styler.format.thousands", ",")),
    "escape option": (VALUES["strings"], {}, ("styler.format.escape", "html")),
    "trimmed rows": (SHOP, {"right": ["n"]}, ("styler.render.max_rows", 2)),
    "trimmed columns": (SHOP, {"shade": {"rate": RATES}}, ("styler.render.max_columns", 2)),
    "trimmed elements": (SHOP, {}, ("styler.render.max_elements", 5)),
    "float label": (NAMES["non-string names"], {"right": [1.5]}, None),
    "label matched loosely": (NAMES["range names"], {"right": [np.int64(1)]}, None),
    "duplicate columns, styled": (NAMES["duplicate names"], {"right": ["b"]}, None),
    "duplicate index, styled": (SHOP.set_axis([0, 0, 1, 1]), {"right": ["n"]}, None),
    "column named twice": (SHOP, {"right": ["n", "n"]}, None),
    "missing column": (SHOP, {"shade": {"nope": RATES}}, None),
    "short shade values": (SHOP, {"shade": {"rate": RATES[:2]}}, None),
    "long shade values": (SHOP, {"shade": {"rate": pd.Series([0.1] * 6)}}, None),
}


@pytest.mark.parametrize(("frame", "kwargs", "option"), FALLBACKS.values(), ids=FALLBACKS.keys())
def test_inputs_left_to_styler_give_styler_output_or_error(
        monkeypatch: pytest.MonkeyPatch, frame: pd.DataFrame, kwargs: dict,
        option: tuple | None) -> None:
    fallbacks = []
    through_styler = tables._styler_html

    def spy(*args: Any) -> str:
        fallbacks.append(args)
        return through_styler(*args)

    monkeypatch.setattr(tables, "_styler_html", spy)
    with pd.option_context(*option) if option else nullcontext():
        expected = outcome(lambda: styler_html(frame, UUID, **kwargs))
        assert outcome(lambda: styled(frame, UUID, **kwargs)) == expected
    assert len(fallbacks) == 1


# ------------------------------------------------------------------- the report's tables
@pytest.fixture(scope="module")
def report_tables(tmp_path_factory: pytest.TempPathFactory) -> list[tuple]:
    """(frame, uuid, kwargs) of each `styled` call the sections make on the sweep fixture
    (lr, per-cell statistics, metrics by status and per cell, suspects)."""
    run = load_run(write_sweep_run(Path(tmp_path_factory.mktemp("tables"))))
    axes = sweep_axes(run.trials, run.meta)
    lab = sections.labeled(run.trials, axes)
    calls: list[tuple] = []

    def record(frame: pd.DataFrame, uuid: str, **kwargs: Any) -> str:
        calls.append((frame.copy(), uuid, kwargs))
        return ""

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tables, "styled", record)
        sections.lr_section(lab, axes)
        sections.cell_stats_section(lab, cell_summary(run.trials, axes), axes)
        sections.metric_tables_section(lab, axes)
        findings.findings_context(lab, axes)
    return calls


def test_the_report_tables_match_styler(direct: None, report_tables: list[tuple]) -> None:
    uuids = [uuid for _, uuid, _ in report_tables]
    assert uuids == ["lr", "cells", "bystatus", "percell", "suspects"]
    for frame, uuid, kwargs in report_tables:
        assert len(frame) and len(frame.columns)
        assert_same(frame, uuid, **kwargs)


# --------------------------------------------------------------------------- random sweep
LABELS = ["a", "b c", "<th>", "1", 1, "÷ initial", "a&b", 7, "median [95% CI]", "x_y"]


def _random_column(rng: np.random.Generator, n: int) -> Any:
    kind = rng.choice(["float", "int", "str", "bool", "object", "Int64", "fmt"])
    if kind == "float":
        values = rng.normal(size=n) * 10.0 ** rng.integers(-9, 22, size=n)
        odd = rng.random(n)
        values[odd < 0.1] = NAN
        values[(odd > 0.9) & (odd <= 0.95)] = -INF
        values[odd > 0.95] = INF
        return values
    if kind == "int":
        return rng.integers(-10**12, 10**12, size=n)
    if kind == "str":
        return [str(rng.choice(SPECIAL)) for _ in range(n)]
    if kind == "bool":
        return rng.random(n) < 0.5
    if kind == "object":
        pool = [None, NAN, pd.NA, 3, -2.5, "s<", True, 1e21]
        return pd.Series([pool[k] for k in rng.integers(0, len(pool), size=n)], dtype=object)
    if kind == "Int64":
        return pd.array([None if v < 0 else int(v) for v in rng.integers(-2, 9, size=n)],
                        dtype="Int64")
    return [tables.fmt(v) for v in rng.normal(size=n) * 10.0 ** rng.integers(-3, 6, size=n)]


def _random_case(seed: int) -> tuple[pd.DataFrame, dict]:
    """A frame of 0-12 rows and 1-6 columns of mixed kinds, and `styled` arguments: some
    columns shaded (NaN, constant or ordinary values; a cmap; maybe a fixed range), some
    right-aligned."""
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(0, 13)), int(rng.integers(1, 7))
    labels = [LABELS[i] for i in rng.permutation(len(LABELS))[:k]]
    frame = pd.DataFrame({i: _random_column(rng, n) for i in range(k)})
    frame.columns = pd.Index(labels, dtype=object)
    shade = {}
    for label in labels:
        if rng.random() < 0.35:
            values = rng.random(n) * 2 - 0.5
            values[rng.random(n) < 0.2] = NAN
            shade[label] = pd.Series(values if rng.random() < 0.8 else np.full(n, 0.3))
    right = [label for label in labels if rng.random() < 0.4]
    kwargs: dict = {"shade": shade, "right": right,
                    "cmap": str(rng.choice(["Greys", "Blues", "Reds"]))}
    if rng.random() < 0.3:
        kwargs["fixed_range"] = (0.0, 1.0)
    return frame, kwargs


@pytest.mark.parametrize("seed", range(60))
def test_random_frames_match_styler(direct: None, seed: int) -> None:
    frame, kwargs = _random_case(seed)
    assert_same(frame, **kwargs)


def test_a_full_size_table_matches_styler(direct: None) -> None:
    rng = np.random.default_rng(1)
    big = pd.DataFrame({f"c{j}": _random_column(rng, tables.MAX_ROWS) for j in range(8)})
    assert_same(big, shade={"c1": pd.Series(rng.random(tables.MAX_ROWS)),
                            "c5": pd.Series(rng.random(tables.MAX_ROWS))},
                right=["c1", "c2", "c5"])
