"""Every figure of a report on a wide sweep (64 facets) is readable at the page's width:
no figure wider than the report's column (so none is shrunk), no text under 10 px, no
axes (a color bar included) covering another, and every gallery axis on the log scale its
caption names."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import figures, report
from analysis.load import load_run
from analysis.report import render_html
from study import parallel
from study.records import write_curves, write_trials

# The fixture draws a wide report first (about 15 s): these run with the slow tests.
pytestmark = pytest.mark.slow

AXES = {"task": ["teacher_mlp", "linear_regression"],
        "failure": ["none", "outliers", "unscaled", "outliers+unscaled"],
        "mitigation": ["none", "standardize_inputs", "standardize_targets", "huber"],
        "optimizer": ["sgd", "adam"], "optimizer.lr": [0.003, 0.03, 0.3]}
PAGE_PX = 1152  # the template's 72rem column
MIN_TEXT_PX = 10


def write_wide_run(run_dir: Path) -> Path:
    rows = [dict(zip([*AXES, "seed"], values, strict=True))
            for values in itertools.product(*AXES.values(), [0, 1])]
    trials = pd.DataFrame(rows)
    n = len(trials)
    rng = np.random.default_rng(1)
    status = rng.choice(["converged", "unstable", "diverged", "no_progress"], n)
    initial = np.where(trials["failure"].str.contains("unscaled"), 1e9, 1.0)  # exploded
    final = np.where(status == "diverged", np.inf, initial * rng.uniform(0.01, 1, n))
    trials = trials.assign(trial=np.arange(n), status=status, objective=final, model="mlp",
                           val_loss_initial=initial, val_loss_final=final,
                           divergence_step=np.where(status == "diverged", 20.0, np.nan),
                           training_objective=np.where(trials["mitigation"] == "huber",
                                                       "huber", "task"),
                           spike_count=rng.poisson(1, n).astype(float))
    write_trials(run_dir, trials, {"sweep": "wide", "seeds": [0, 1], "axes": AXES,
                                   "objective": {"metric": "val_loss_final",
                                                 "direction": "minimize"}})
    steps = np.arange(41)
    parts = []
    for row in trials.itertuples():
        loss = row.val_loss_initial * np.exp(-steps / 20) * (1 + 0.3 * rng.random(41))
        grad = np.where(steps % 7 == 0, 0.0, 5e3 * rng.random(41))  # zeros: log must hold
        for split, metric, values, at in (("batch", "loss", loss, steps),
                                          ("batch", "grad_norm", grad, steps),
                                          ("train", "loss", loss[::10], steps[::10]),
                                          ("val", "loss", loss[::10], steps[::10])):
            parts.append(pd.DataFrame({"trial": row.trial, "step": at, "split": split,
                                       "metric": metric, "value": values}))
    write_curves(run_dir, "pop", pd.concat(parts, ignore_index=True))
    return run_dir


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Each figure the report draws, measured just before it is encoded."""
    run = load_run(write_wide_run(tmp_path_factory.mktemp("wide")))
    seen: list[dict] = []
    encode = figures.figure_to_data_uri

    def measure(fig):
        fig.canvas.draw()
        visible = [ax for ax in fig.axes if ax.get_visible()]
        texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_fontsize")
                                        and hasattr(a, "get_text"))
                 if t.get_visible() and t.get_text().strip()]
        seen.append({
            "width_px": fig.get_figwidth() * figures.DPI,
            "smallest_px": min((t.get_fontsize() * figures.DPI / 72 for t in texts),
                               default=99),
            "boxes": [ax.get_position().bounds for ax in visible],
            "yscales": [ax.get_yscale() for ax in visible if ax.get_lines()],
            "title": fig.axes[0].get_title() if fig.axes else "",
        })
        return encode(fig)

    mp = pytest.MonkeyPatch()
    mp.setattr(figures, "figure_to_data_uri", measure)
    # One process: figures drawn in forked workers would be measured there.
    mp.setattr(report, "run_jobs", lambda jobs: parallel.run_jobs(jobs, workers=1))
    try:
        html = render_html(run)
    finally:
        mp.undo()
    return [*seen, {"html": html}]


def figures_of(drawn):
    return [d for d in drawn if "width_px" in d]


def test_no_figure_is_wider_than_the_page(drawn):
    widths = [d["width_px"] for d in figures_of(drawn)]
    assert len(widths) >= 6 and max(widths) <= PAGE_PX, widths


def test_no_text_under_ten_pixels(drawn):
    small = [(d["title"], d["smallest_px"]) for d in figures_of(drawn)
             if d["smallest_px"] < MIN_TEXT_PX]
    assert not small


def overlap(a, b) -> bool:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    return ax0 < bx0 + bw and bx0 < ax0 + aw and ay0 < by0 + bh and by0 < ay0 + ah


def test_no_axes_covers_another(drawn):
    for d in figures_of(drawn):
        boxes = d["boxes"]
        for i, j in itertools.combinations(range(len(boxes)), 2):
            if np.allclose(boxes[i], boxes[j]):
                continue  # a twin axis (a right-hand objective axis) shares its panel
            assert not overlap(boxes[i], boxes[j]), (d["title"], boxes[i], boxes[j])


def test_gallery_axes_are_log_as_the_caption_says(drawn):
    html = drawn[-1]["html"]
    assert "Every axis has a log scale" in html
    galleries = [d for d in figures_of(drawn) if d["title"].startswith("trial ")]
    assert galleries and all(set(d["yscales"]) == {"log"} for d in galleries)


def test_curve_panels_are_wrapped_and_capped(drawn):
    html = drawn[-1]["html"]
    assert "Showing the first 18 of 64 panels" in html
    assert "Showing the first 16 of 32 panels" in html  # optimizer is the line
    assert "take the end color" in html  # the 1e9 initial losses saturate, not stretch
