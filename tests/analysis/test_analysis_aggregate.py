"""Compute side of the report: axes, cell medians, markers, curve selection (numbers known
by construction in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.aggregate import cell_summary, stability_map, status_counts
from analysis.axes import (
    SweepAxes,
    choose_map_layout,
    format_key,
    order_keys,
    sweep_axes,
    value_key,
)
from analysis.curves import attach_curves, curve_facets, select_curve_trials, trial_curves
from analysis.load import load_run
from study.records import read_curves


@pytest.fixture(scope="module")
def run(sweep_run: Path):
    return load_run(sweep_run)


@pytest.fixture(scope="module")
def axes(run) -> SweepAxes:
    return sweep_axes(run.trials, run.meta)


@pytest.fixture(scope="module")
def summary(run, axes) -> pd.DataFrame:
    return cell_summary(run.trials, axes)


def cell(summary: pd.DataFrame, task: str, opt: str, lr: str, batch: str) -> pd.Series:
    rows = summary[(summary["task"] == task) & (summary["optimizer"] == opt)
                   & (summary["optimizer.lr"] == lr) & (summary["train.batch_size"] == batch)]
    assert len(rows) == 1
    return rows.iloc[0]


@pytest.mark.parametrize("declared", [[8, 32, 128, "full"], [], ["full", 128, 32, 8]])
def test_batch_sizes_order_numerically_with_full_last(declared):
    keys = [value_key(v) for v in ["full", "128", "8", "32", "8"]]
    assert [format_key(k) for k in order_keys(keys, declared)] == ["8", "32", "128", "full"]


def test_string_axes_keep_declared_order():
    keys = order_keys(["blobs", "teacher_mlp", "spirals"], ["teacher_mlp", "blobs"])
    assert keys == ["teacher_mlp", "blobs", "spirals"]


def test_sweep_axes_match_table_values_as_strings(axes):
    # The table stores batch sizes as "32"/"full" (mixed column); metadata as 32/"full".
    assert axes.names == ["task", "optimizer", "optimizer.lr", "train.batch_size"]
    assert axes.values["train.batch_size"] == (32.0, "full")
    assert axes.values["optimizer.lr"] == (0.001, 0.01, 0.1)


def test_status_counts(run):
    counts = status_counts(run.trials)
    assert counts["status"].tolist() == ["converged", "unstable", "no_progress", "diverged"]
    assert counts["n"].tolist() == [33, 1, 8, 6]
    assert counts["fraction"].sum() == pytest.approx(1.0)


def test_cell_medians_over_seeds(summary):
    assert len(summary) == 24
    assert (summary["n"] == 2).all()
    # seeds: 2.0 * 0.01 * 1 * (1, 2) -> median 0.03; task median initial (2.0, 2.2) -> 2.1
    adam = cell(summary, "teacher_mlp", "adam", "0.01", "32")
    assert adam["median_final"] == pytest.approx(0.03)
    assert adam["reference"] == pytest.approx(2.1)
    assert adam["ratio"] == pytest.approx(0.03 / 2.1)
    # seeds: 1.0 * 0.001 * 10 * (1, 2) -> median 0.015; reference 1.05
    sgd = cell(summary, "blobs", "sgd", "0.001", "full")
    assert sgd["median_final"] == pytest.approx(0.015)
    assert sgd["ratio"] == pytest.approx(0.015 / 1.05)


def test_markers_follow_seed_majorities(summary):
    both = cell(summary, "teacher_mlp", "sgd", "0.1", "32")
    assert (both["n_diverged"], both["marker"]) == (2, "diverged")
    assert both["median_final"] == pytest.approx(2.1)  # capped finals = initial losses
    one = cell(summary, "teacher_mlp", "sgd", "0.1", "full")
    assert (one["n_diverged"], one["n_converged"], one["marker"]) == (1, 1, "some_diverged")
    stuck = cell(summary, "blobs", "adam", "0.001", "full")
    assert (stuck["n_no_progress"], stuck["marker"]) == (2, "no_progress")
    mixed = cell(summary, "blobs", "adam", "0.01", "full")
    assert (mixed["n_unstable"], mixed["n_converged"], mixed["marker"]) == (1, 1, "")
    assert (summary["marker"] == "diverged").sum() == 2


def test_a_minority_divergence_shows_before_a_majority_of_another_status() -> None:
    """A cell of 2 no_progress seeds and 1 diverged drew "o": nothing said a seed diverged."""
    from analysis.aggregate import cell_marker

    assert cell_marker(3, 1, 2) == "some_diverged"
    assert cell_marker(3, 1, 0, 2) == "some_diverged"
    assert cell_marker(3, 2, 1) == "diverged"
    assert cell_marker(3, 0, 2, 1) == "no_progress" and cell_marker(3, 0, 0, 2) == "unstable"


def test_summary_rows_follow_axis_order(summary):
    assert summary["task"].unique().tolist() == ["teacher_mlp", "blobs"]
    first = summary.iloc[:2]
    assert first["train.batch_size"].tolist() == ["32", "full"]


def test_stability_map_layout(summary, axes):
    layout = choose_map_layout(axes)
    assert (layout.x, layout.y, layout.row, layout.cols) == (
        "optimizer.lr", "train.batch_size", "task", ("optimizer",))
    smap = stability_map(summary, axes, layout)
    assert smap.y_labels == ("32", "full")
    assert smap.x_labels == ("0.001", "0.01", "0.1")
    assert smap.row_labels == ("teacher_mlp", "blobs")
    assert smap.col_labels == ("sgd", "adam")
    assert smap.normalized
    hit = smap.cells[(smap.cells["row"] == "blobs") & (smap.cells["col"] == "sgd")
                     & (smap.cells["x"] == "0.1") & (smap.cells["y"] == "full")].iloc[0]
    assert (hit["x_pos"], hit["y_pos"]) == (2, 1)
    np.testing.assert_allclose(smap.cells["color_value"], smap.cells["ratio"])


def test_map_layout_without_lr_batch_axes_uses_longest_axes():
    axes = SweepAxes({"task": ("a", "b"), "optimizer": ("sgd", "momentum", "adam"),
                      "model.depth": (1.0, 2.0, 4.0, 8.0)})
    layout = choose_map_layout(axes)
    assert (layout.x, layout.y, layout.row, layout.cols) == (
        "model.depth", "optimizer", "task", ())
    assert choose_map_layout(SweepAxes({"optimizer.lr": (0.1, 1.0)})) is None


def test_curve_selection_first_seed_at_batch_32(run, axes):
    row, cols = curve_facets(axes)
    assert (row, cols) == ("task", ("optimizer",))
    selection, fixed = select_curve_trials(run.trials, axes, row, cols)
    assert fixed == {"train.batch_size": "32"}
    assert len(selection) == 12  # 2 tasks x 2 optimizers x 3 learning rates
    picked = run.trials.set_index("trial").loc[selection["trial"]]
    assert (picked["seed"] == 0).all()
    assert (picked["train.batch_size"] == "32").all()
    assert selection["line"].tolist()[:3] == ["0.001", "0.01", "0.1"]
    diverged = selection["status"] == "diverged"
    assert (selection.loc[diverged, "divergence_step"] == 7).all() and diverged.sum() == 2
    assert selection.loc[~diverged, "divergence_step"].isna().all()


def test_attach_curves_drops_non_finite_tail(run, axes, sweep_run):
    selection, _ = select_curve_trials(run.trials, axes, *curve_facets(axes))
    curves = read_curves(sweep_run, trials=selection["trial"].tolist())
    frame = attach_curves(selection, curves)
    assert np.isfinite(frame["value"]).all()
    diverged = frame[frame["status"] == "diverged"]
    assert diverged["trial"].nunique() == 2
    assert diverged.groupby("trial")["step"].max().tolist() == [5, 5]  # step 10 was inf
    assert set(frame["trial"]) == set(selection["trial"])


def test_unknown_statuses_and_extra_metrics_are_counted(run, axes):
    trials = run.trials.assign(status=run.trials["status"].replace({"unstable": "wobbly"}),
                               spike_count=range(len(run.trials)))
    counts = status_counts(trials)
    assert counts["status"].tolist() == ["converged", "no_progress", "diverged", "wobbly"]
    summary = cell_summary(trials, axes)
    assert cell(summary, "blobs", "adam", "0.01", "full")["n_wobbly"] == 1


def test_trial_curves_hold_every_split_and_metric(single_run):
    frame = trial_curves(read_curves(single_run), trial=0)
    pairs = set(zip(frame["split"], frame["metric"], strict=True))
    assert pairs == {("batch", "loss"), ("batch", "grad_norm"), ("train", "loss"),
                     ("val", "loss")}
    assert frame.groupby(["split", "metric"])["step"].is_monotonic_increasing.all()


def test_majority_unstable_or_recovered_cells_are_marked(run, axes):
    cell = ((run.trials["task"] == "blobs") & (run.trials["optimizer"] == "adam")
            & (run.trials["optimizer.lr"] == 0.01) & (run.trials["train.batch_size"] == "32"))
    statuses = np.where(run.trials.loc[cell, "seed"] == 0, "unstable", "recovered")
    trials = run.trials.copy()
    trials.loc[cell, "status"] = statuses
    summary = cell_summary(trials, axes)
    hit = summary[(summary["task"] == "blobs") & (summary["optimizer"] == "adam")
                  & (summary["optimizer.lr"] == "0.01")
                  & (summary["train.batch_size"] == "32")].iloc[0]
    assert hit["marker"] == "unstable"
    # One unstable seed of two (the fixture's blobs/adam/0.01/full) is not a majority.
    other = summary[(summary["task"] == "blobs") & (summary["optimizer"] == "adam")
                    & (summary["optimizer.lr"] == "0.01")
                    & (summary["train.batch_size"] == "full")].iloc[0]
    assert other["marker"] == ""


def test_map_colored_by_the_share_of_a_status(run, axes):
    summary = cell_summary(run.trials, axes, "diverged")
    smap = stability_map(summary, axes, choose_map_layout(axes), "diverged")
    assert smap.share and not smap.log_color and smap.color_limits == (0.0, 1.0)
    by_cell = summary.set_index(["task", "optimizer", "optimizer.lr", "train.batch_size"])
    assert by_cell.loc[("blobs", "sgd", "0.1", "32"), "median_final"] == 1.0
    assert by_cell.loc[("blobs", "sgd", "0.1", "full"), "median_final"] == 0.5
    assert by_cell.loc[("blobs", "adam", "0.1", "full"), "median_final"] == 0.0


def test_a_few_exploded_cells_do_not_stretch_the_color_scale():
    from analysis.aggregate import robust_limits

    values = pd.Series(np.r_[np.geomspace(0.1, 1.0, 40), 1e9, 3e8])
    low, high = robust_limits(values, log=True)
    assert low == pytest.approx(0.1) and 1.0 <= high < 100
    assert robust_limits(pd.Series([0.2, 0.5, 1.0]), log=True) == pytest.approx((0.2, 1.0))
    assert robust_limits(pd.Series([-1.0, 0.0, 1.0]), log=False) == (-1.0, 1.0)


def test_cells_whose_metric_is_undefined_are_not_called_empty(run, axes):
    from analysis.report import map_section

    trials = run.trials.assign(spike_count=np.where(
        run.trials["train.batch_size"].astype(str) == "full", np.nan, 1.0))
    summary = cell_summary(trials, axes, "spike_count")
    section = map_section(summary, axes, "spike_count")
    assert "Hatched: 12 configuration(s) with trials (24 in all)" in section["caption"]
    exploded = run.trials.assign(grad_norm_max=1.0 + run.trials["trial"] % 7)
    exploded.loc[exploded["trial"] < 2, "grad_norm_max"] = 1e12
    section = map_section(cell_summary(exploded, axes, "grad_norm_max"), axes,
                          "grad_norm_max")
    assert "(0 below, 1 above) take the end color" in section["caption"]
    # A count that is 0 in most cells: the 5th-95th percentiles, not a collapsed 0-1 scale.
    counts = run.trials.assign(spike_count=np.where(run.trials["trial"] % 8 == 0,
                                                    run.trials["trial"] % 5, 0.0))
    smap = stability_map(cell_summary(counts, axes, "spike_count"), axes,
                         choose_map_layout(axes), "spike_count")
    assert smap.color_limits[1] > 1 and not smap.log_color
