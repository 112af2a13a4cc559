"""LR sensitivity (Wortsman et al. 2023) and stable LR range on hand-built trials."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.sensitivity import (
    capped_loss,
    diverged_points,
    lr_curves,
    lr_sensitivity,
    stable_lr_range,
)

GROUP = ["optimizer"]


def trial(opt: str, lr: float, final: float, status: str = "converged",
          initial: float = 1.0) -> dict:
    return {"optimizer": opt, "optimizer.lr": lr, "val_loss_final": final,
            "val_loss_initial": initial, "status": status, "trial": 0}


@pytest.fixture
def trials() -> pd.DataFrame:
    rows = [
        # sgd: medians over two seeds per lr: 0.01 -> 0.5, 0.1 -> 0.2, 1 -> capped 1.0
        trial("sgd", 0.01, 0.4, "no_progress"), trial("sgd", 0.01, 0.6),
        trial("sgd", 0.1, 0.1), trial("sgd", 0.1, 0.3),
        trial("sgd", 1.0, 1.0, "diverged"), trial("sgd", 1.0, np.nan, "diverged"),
        # adam: nothing diverges; a finite final above the initial loss is capped at it
        trial("adam", 0.1, 0.3), trial("adam", 0.01, 5.0, "slow"),
    ]
    frame = pd.DataFrame(rows)
    return frame.assign(trial=range(len(frame)))


def test_capped_loss_takes_min_with_initial_and_fills_non_finite():
    frame = pd.DataFrame({"val_loss_final": [0.5, 3.0, np.nan, np.inf],
                          "val_loss_initial": [1.0, 2.0, 2.0, 4.0]})
    assert capped_loss(frame).tolist() == [0.5, 2.0, 2.0, 4.0]


def test_lr_curves_medians_bands_and_order(trials):
    curves = lr_curves(trials, GROUP)
    assert curves["optimizer"].tolist() == ["sgd"] * 3 + ["adam"] * 2
    assert curves["lr"].tolist() == [0.01, 0.1, 1.0, 0.01, 0.1]  # ascending within group
    sgd = curves[curves["optimizer"] == "sgd"]
    np.testing.assert_allclose(sgd["median"], [0.5, 0.2, 1.0])
    np.testing.assert_allclose(sgd["low"], [0.4, 0.1, 1.0])
    np.testing.assert_allclose(sgd["high"], [0.6, 0.3, 1.0])
    assert sgd["n_diverged"].tolist() == [0, 0, 2]
    assert sgd["n_no_progress"].tolist() == [1, 0, 0]


def test_wortsman_sensitivity(trials):
    out = lr_sensitivity(lr_curves(trials, GROUP), GROUP).set_index("optimizer")
    # sgd: mean(0.5, 0.2, 1.0) - 0.2; adam: mean(1.0 capped, 0.3) - 0.3
    assert out.loc["sgd", "sensitivity"] == pytest.approx((0.5 + 0.2 + 1.0) / 3 - 0.2)
    assert out.loc["adam", "sensitivity"] == pytest.approx(0.35)
    assert out.loc["sgd", "best_lr"] == 0.1 and out.loc["sgd", "best_loss"] == 0.2
    assert out.loc["sgd", "relative"] == pytest.approx(out.loc["sgd", "sensitivity"])
    assert out.loc["sgd", "n_lrs"] == 3


def test_sensitivity_is_zero_when_every_lr_is_as_good():
    flat = pd.DataFrame([trial("sgd", lr, 0.3) for lr in (0.01, 0.1, 1.0)]).assign(
        trial=range(3))
    out = lr_sensitivity(lr_curves(flat, GROUP), GROUP)
    assert out["sensitivity"].item() == 0.0


def test_stable_lr_range(trials):
    out = stable_lr_range(lr_curves(trials, GROUP), GROUP).set_index("optimizer")
    # sgd: 0.01 has a no-progress seed, 1.0 diverged -> [0.1, 0.1]
    assert (out.loc["sgd", "lr_min_progress"], out.loc["sgd", "lr_max_stable"]) == (0.1, 0.1)
    assert not out.loc["sgd", "upper_open"] and out.loc["sgd", "n_good"] == 1
    # adam: no divergence -> the largest lr, open upper edge; "slow" counts as progress
    assert (out.loc["adam", "lr_min_progress"], out.loc["adam", "lr_max_stable"]) == (0.01, 0.1)
    assert out.loc["adam", "upper_open"] and out.loc["adam", "n_good"] == 2


def test_stable_range_stops_at_first_divergence_and_empty_when_smallest_diverges():
    rows = [trial("a", 0.01, 0.2), trial("a", 0.1, 1.0, "diverged"), trial("a", 1.0, 0.2),
            trial("b", 0.01, 1.0, "diverged"), trial("b", 0.1, 0.5, "no_progress")]
    frame = pd.DataFrame(rows).assign(trial=range(5))
    out = stable_lr_range(lr_curves(frame, GROUP), GROUP).set_index("optimizer")
    assert out.loc["a", "lr_max_stable"] == 0.01  # 1.0 is fine again, but beyond the edge
    assert np.isnan(out.loc["b", "lr_max_stable"]) and np.isnan(out.loc["b", "lr_min_progress"])
    assert out.loc["b", "n_good"] == 0


def test_diverged_points_at_capped_value(trials):
    points = diverged_points(trials, GROUP)
    assert points["lr"].tolist() == [1.0, 1.0]
    assert points["value"].tolist() == [1.0, 1.0]


def test_a_panel_with_no_finite_loss_is_drawn_on_the_rates_range() -> None:
    """Every trial blew up from its start (its initial loss not finite, so every capped
    loss is inf): nothing finite to draw, and a log x axis with no data had no range
    (matplotlib raised, and the report ended in a traceback)."""
    from analysis.figures import figure_to_data_uri
    from analysis.sensitivity import plot_lr_sensitivity

    frame = pd.DataFrame([trial(opt, lr, np.nan, "diverged", initial=np.inf)
                          for opt in ("sgd", "adam") for lr in (0.01, 0.1, 1.0)])
    frame = frame.assign(trial=range(len(frame)))
    curves = lr_curves(frame, GROUP)
    assert not np.isfinite(curves["median"]).any()
    figure = plot_lr_sensitivity(curves, diverged_points(frame, GROUP), None, None,
                                 "optimizer")
    ax = figure.axes[0]
    low, high = ax.get_xlim()
    assert ax.get_xscale() == "log" and low < 0.01 and high > 1.0
    assert figure_to_data_uri(figure).startswith("data:image/png;base64,")
