"""Report sections on the fixture runs: numbers in the tables, optional sections, options,
and byte-identical rebuilds."""

from __future__ import annotations

import io
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import LogNorm, Normalize

from analysis import figures
from analysis.__main__ import main
from analysis.aggregate import cell_summary, stability_map
from analysis.axes import choose_map_layout, sweep_axes
from analysis.gallery import pick_representatives
from analysis.load import load_run
from analysis.report import ReportError, map_section, render_html
from analysis.sections import claims_section, labeled
from analysis.tables import metric_columns, sample_rows, status_metric_frame
from tests.analysis.conftest import CLAIMS

BUILT = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def run(sweep_report: Path):
    return load_run(sweep_report.parent)


@pytest.fixture(scope="module")
def html(sweep_report: Path) -> str:
    return sweep_report.read_text()


@pytest.fixture(scope="module")
def summary(run):
    return cell_summary(run.trials, sweep_axes(run.trials, run.meta))


def test_rebuild_is_byte_identical_apart_from_the_build_line(run, html):
    again = render_html(run, built=BUILT)
    strip = re.compile(r'<p class="built">.*?</p>')
    assert html != again
    assert strip.sub("", html) == strip.sub("", again)
    assert len(strip.findall(html)) == 1 and "Built 2024-01-02 03:04:05 UTC" in again


def test_cell_table_rates_and_bootstrap_intervals(html):
    # teacher_mlp/sgd/0.1/32: both seeds diverged -> 100% [34, 100] (Wilson, n = 2)
    assert "100% [34, 100]" in html and "50% [9, 91]" in html
    # teacher_mlp/adam/0.01/32: finals 0.02 and 0.04 -> median 0.03 in [0.02, 0.04]
    assert "0.03 [0.02, 0.04]" in html
    assert "2000 resamples" in html


def test_lr_table_lists_sensitivity_and_stable_range(html):
    # blobs/sgd/32: capped medians 0.0015, 0.015, 1.05 -> mean - best = 0.354
    assert ">0.354<" in html
    # teacher_mlp/adam/full: 0.001 no progress, nothing diverged -> 0.01 - >= 0.1
    assert "0.01 – ≥ 0.1" in html


def test_metric_tables_include_extra_metrics_and_skip_config_columns(run, html):
    metrics = metric_columns(run.trials)
    assert metrics[:3] == ["val_loss_final", "val_loss_initial", "train_loss_final"]
    assert "osc_tv_ratio" in metrics and "spike_count" in metrics
    assert not {"trial", "seed", "objective", "optimizer.lr", "train.epochs"} & set(metrics)
    assert "val_acc_final" in metrics  # NaN for one task, finite for the other
    long = status_metric_frame(run.trials, ["spike_count"]).set_index("status")
    assert long.loc["diverged", "median"] == 3 and long.loc["diverged", "n"] == 6
    assert "Key metrics per configuration" in html and ">osc_tv_ratio<" in html


def test_sample_rows_keeps_ends_and_says_so():
    frame = pd.DataFrame({"x": range(1000)})
    kept, note = sample_rows(frame, 10)
    assert len(kept) == 10 and kept["x"].iloc[0] == 0 and kept["x"].iloc[-1] == 999
    assert "10 of 1000" in note
    assert sample_rows(frame.iloc[:5], 10)[1] == ""


def test_gallery_picks_spread_per_status(run):
    axes = sweep_axes(run.trials, run.meta)
    picks = pick_representatives(labeled(run.trials, axes), axes, per_status=3)
    assert list(dict.fromkeys(picks["status"])) == ["converged", "unstable", "no_progress",
                                                    "diverged"]
    counts = picks.groupby("status", sort=False)["trial"].size().to_dict()
    assert counts == {"converged": 3, "unstable": 1, "no_progress": 3, "diverged": 3}
    converged = picks[picks["status"] == "converged"]
    ratios = run.trials.set_index("trial").loc[converged["trial"]]
    ratio = (ratios["val_loss_final"] / ratios["val_loss_initial"]).to_numpy()
    assert ratio[0] == pytest.approx(0.001) and ratio[-1] == ratio.max()  # best ... worst
    title = picks.loc[picks["status"] == "unstable", "title"].item()
    assert title.endswith("blobs, adam, lr=0.01, bs=full, seed=0")


def test_optional_sections_absent_without_their_data(html):
    for heading in ("Claims", "Diagnostics"):
        assert f">{heading}</h2>" not in html


def test_claims_and_diagnostics_sections_when_present(full_report):
    out = full_report.read_text()
    claims = out[out.index('<h2 id="claims">Claims</h2>'):out.index('id="cell-summary"')]
    assert "larger lr diverges more" in claims and "0.42 [0.2, 0.6]" in claims
    assert "supported" in claims and "#d7ecd9" in claims
    section = out[out.index('<h2 id="diagnostics">Diagnostics</h2>'):]
    # scatter vs 2/lr, sharpness curves, noise-scale curves
    assert section.count("<img") == 3
    assert "0% of trials lie above it" in section  # sharpness = 1/lr < 2/lr
    assert ">sharpness_ratio_settled<" in section and ">0.95<" in section


def test_claims_section_needs_rows():
    assert claims_section(None) is None and claims_section(CLAIMS.iloc[:0]) is None


def test_map_colored_by_another_metric(run, summary):
    axes = sweep_axes(run.trials, run.meta)
    other = cell_summary(run.trials, axes, "osc_tv_ratio")
    section = map_section(other, axes, "osc_tv_ratio")
    assert "Color (log scale): median over seeds of osc_tv_ratio" in section["caption"]
    negative = run.trials.assign(loss_diff_autocorr=np.linspace(-1, 0.5, len(run.trials)))
    section = map_section(cell_summary(negative, axes, "loss_diff_autocorr"), axes,
                          "loss_diff_autocorr")
    assert "Color (linear scale): median over seeds of loss_diff_autocorr" in section["caption"]
    assert section["image"].startswith("data:image/png;base64,")
    with pytest.raises(ReportError, match="neither a numeric column"):
        render_html(run, map_metric="nope")


def test_cli_rejects_unknown_map_metric(sweep_run, capsys):
    assert main([str(sweep_run), "--map-metric", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0] and "osc_tv_ratio" in err[0]


def test_claims_table_shows_units_n_p_q_and_equivalence_margins():
    from analysis.claims import evaluate_claims

    rng = np.random.default_rng(0)
    trials = pd.DataFrame([{"seed": s, "mitigation": m, "val_loss_final": 1.0 + rng.normal(0, 0.01)
                            - (0.5 if m == "fix" else 0.0)}
                           for s in range(12) for m in ("none", "fix", "noop")])
    claims = evaluate_claims(trials, [
        {"statement": "fix lowers loss", "metric": "val_loss_final", "expect": "lower",
         "compare": {"axis": "mitigation", "arm": "fix", "baseline": "none"}},
        {"statement": "noop changes nothing", "metric": "val_loss_final", "expect": "same",
         "margin": 0.05, "compare": {"axis": "mitigation", "arm": "noop", "baseline": "none"}},
    ], {"mitigation": ["none", "fix", "noop"]})
    html = claims_section(claims)["table"]
    for header in (">unit<", ">n<", ">p<", ">q<", ">verdict<"):
        assert header in html
    assert "val_loss_final difference (arm - baseline)" in html
    assert "same (within ±0.05)" in html
    assert html.count(">supported<") == 2


def test_a_diverged_curve_is_marked_at_its_divergence_step():
    from analysis.figures import draw_curve_panel, plt

    steps = np.arange(0, 60, 10)
    ended = pd.DataFrame({"line_pos": 0, "line": "a", "trial": 1, "status": "diverged",
                          "step": steps, "value": [1.0, 0.5, 20.0, 40.0, 80.0, 90.0],
                          "divergence_step": 20.0})
    stopped = pd.DataFrame({"line_pos": 1, "line": "b", "trial": 2, "status": "diverged",
                            "step": steps[:3], "value": [1.0, 0.8, 0.6],
                            "divergence_step": 27.0})
    ax = draw_curve_panel(pd.concat([ended, stopped]), 2)
    marks = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert sorted(float(m.get_xdata()[0]) for m in marks) == [20.0, 27.0]
    plt.close(ax.figure)


def test_a_training_objective_other_than_the_task_loss_gets_its_own_labelled_axis():
    from analysis.figures import plot_trial_curves, plt
    from analysis.gallery import plot_gallery

    steps = np.arange(0, 40, 10)
    frame = pd.concat([
        pd.DataFrame({"pos": 0, "trial": 1, "panel": "loss", "split": "batch",
                      "step": np.arange(40), "value": np.linspace(0.5, 0.05, 40)}),
        pd.DataFrame({"pos": 0, "trial": 1, "panel": "loss", "split": "val", "step": steps,
                      "value": [40.0, 20.0, 10.0, 9.0]}),
        pd.DataFrame({"pos": 0, "trial": 1, "panel": "grad_norm", "split": "batch",
                      "step": np.arange(40), "value": 1.0}),
    ])
    picks = pd.DataFrame({"status": ["converged"], "trial": [1], "pos": [0], "n_status": [1],
                          "divergence_step": [np.nan], "title": ["trial 1"],
                          "objective": ["huber"]})
    fig = plot_gallery(picks, frame)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "minibatch huber" in labels
    plt.close(fig)
    one = frame.assign(metric=np.where(frame["panel"] == "grad_norm", "grad_norm", "loss"))
    fig = plot_trial_curves(one, "mse (standardized targets)")
    assert "minibatch mse (standardized targets)" in [ax.get_ylabel() for ax in fig.axes]
    plt.close(fig)
    # The task's own loss shares the axis with the evaluations: no extra axis.
    fig = plot_gallery(picks.assign(objective="task"), frame)
    assert not any(label.startswith("minibatch") for label in
                   (ax.get_ylabel() for ax in fig.axes))
    plt.close(fig)


def test_a_sampled_table_says_so_above_itself():
    from analysis.tables import sample_rows

    kept, note = sample_rows(pd.DataFrame({"x": range(312)}), max_rows=200)
    assert len(kept) == 200 and kept["x"].iloc[[0, -1]].tolist() == [0, 311]
    assert note.startswith("Sampled: this table shows 200 of 312 rows, about every 1.6th")
    assert sample_rows(pd.DataFrame({"x": range(312)}))[1] == ""  # 312 rows: all shown
    template = (Path(__file__).parents[2] / "analysis/templates/report.html").read_text()
    assert template.index("cells.note }}") < template.index("cells.table | safe")


def test_map_markers_drawn_per_symbol_and_ink_give_the_pixels_of_one_per_cell(run, summary):
    """A panel draws one line of markers per symbol and ink (`draw_stability_panel`): the
    PNG must be the one a line per marked cell gives, with the same ink on each."""
    axes = sweep_axes(run.trials, run.meta)
    smap = stability_map(summary, axes, choose_map_layout(axes))
    low, high = smap.color_limits
    norm = LogNorm(low, high) if smap.log_color else Normalize(low, high)
    cells = smap.cells
    assert (cells["marker"] != "").sum() >= 2

    def png(per_cell: bool) -> tuple[bytes, int]:
        fig = figures.plt.figure(figsize=(3, 2))
        ax = fig.gca()
        plain = cells.assign(marker="") if per_cell else cells
        figures.draw_stability_panel(plain, smap, norm, ax=ax)
        if per_cell:  # as the panel drew them before: one line per marked cell
            cmap = figures.plt.get_cmap(figures.CMAP)
            for cell in cells[cells["marker"] != ""].itertuples():
                drawn = np.isfinite(cell.color_value) and (
                    cell.color_value > 0 or not smap.log_color)
                rgba = cmap(norm(cell.color_value)) if drawn else (1, 1, 1, 1)
                ink = "black" if figures._luminance(rgba) > 0.5 else "white"
                ax.plot(cell.x_pos, cell.y_pos, linestyle="none",
                        marker=figures.SYMBOLS[cell.marker], markersize=9,
                        markeredgewidth=2, color=ink, markerfacecolor="none")
        lines = len(ax.lines)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=60, metadata={"Software": None})
        figures.plt.close(fig)
        return buffer.getvalue(), lines

    grouped, grouped_lines = png(per_cell=False)
    one_each, cell_lines = png(per_cell=True)
    assert grouped == one_each
    assert grouped_lines < cell_lines
