"""Across-trial statistics on hand-built frames with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.stats import divergence_rate, seed_spread, wilson_interval


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (0, 10, 0.0, 0.27753), (5, 10, 0.23659, 0.76341), (10, 10, 0.72247, 1.0),
    (1, 3, 0.06149, 0.79234),
])
def test_wilson_interval_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert float(lo) == pytest.approx(low, abs=1e-5)
    assert float(hi) == pytest.approx(high, abs=1e-5)


def test_wilson_interval_vectorized_and_empty():
    lo, hi = wilson_interval(np.array([0, 2]), np.array([0, 4]))
    assert np.isnan(lo[0]) and np.isnan(hi[0])
    assert lo[1] < 0.5 < hi[1]


def test_divergence_rate_per_group():
    trials = pd.DataFrame({
        "opt": ["sgd"] * 4 + ["adam"] * 2,
        "status": ["diverged", "converged", "diverged", "no_progress", "converged", "slow"],
    })
    out = divergence_rate(trials, ["opt"])
    assert out["opt"].tolist() == ["sgd", "adam"]  # order of first appearance
    assert out["n"].tolist() == [4, 2]
    assert out["n_diverged"].tolist() == [2, 0]
    assert out["rate"].tolist() == [0.5, 0.0]
    assert out["ci_low"].iloc[1] == 0.0 and out["ci_high"].iloc[1] == pytest.approx(0.65762,
                                                                                   abs=1e-5)
    whole = divergence_rate(trials, [])
    assert (whole["n"].item(), whole["n_diverged"].item()) == (6, 2)


def test_seed_spread_median_iqr_and_intervals():
    trials = pd.DataFrame({"cell": ["a"] * 5 + ["b"] * 3 + ["c", "d"],
                           "loss": [1.0, 2.0, 3.0, 4.0, 100.0, 5.0, np.nan, 7.0, 9.0, np.nan]})
    out = seed_spread(trials, ["cell"], "loss").set_index("cell")
    a = out.loc["a"]
    assert (a["n"], a["median"], a["q25"], a["q75"], a["iqr"]) == (5, 3.0, 2.0, 4.0, 2.0)
    assert 1.0 <= a["median_low"] <= 3.0 <= a["median_high"] <= 100.0
    assert 0.0 <= a["iqr_low"] <= a["iqr_high"]
    b = out.loc["b"]  # NaN dropped: two values
    assert (b["n"], b["median"]) == (2, 6.0)
    assert b["median_low"] == pytest.approx(5.0) and b["median_high"] == pytest.approx(7.0)
    c = out.loc["c"]  # one value: its median interval is the value, no IQR interval
    assert (c["n"], c["median"], c["median_low"], c["median_high"]) == (1, 9.0, 9.0, 9.0)
    assert np.isnan(c["iqr_low"])
    assert out.loc["d", "n"] == 0 and np.isnan(out.loc["d", "median"])


def test_seed_spread_is_deterministic_and_independent_of_other_groups():
    rng = np.random.default_rng(0)
    trials = pd.DataFrame({"cell": np.repeat(["a", "b", "c"], 8), "loss": rng.random(24)})
    full = seed_spread(trials, ["cell"], "loss")
    again = seed_spread(trials, ["cell"], "loss")
    pd.testing.assert_frame_equal(full, again)
    alone = seed_spread(trials[trials["cell"] == "b"], ["cell"], "loss")
    pd.testing.assert_frame_equal(full[full["cell"] == "b"].reset_index(drop=True), alone)
    other_seed = seed_spread(trials, ["cell"], "loss", seed=1)
    assert not np.allclose(full["median_low"], other_seed["median_low"])
