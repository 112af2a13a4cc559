"""Across-trial statistics on hand-built frames with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from analysis.stats import (
    _median_iqr,
    bootstrap,
    bootstrap_distribution,
    divergence_rate,
    generator,
    permutation_p,
    q_values,
    seed_spread,
    sign_flip_p,
    wilson_interval,
)


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


def test_bootstrap_is_scipys_percentile_interval_and_resamples_units_with_replacement():
    values = np.random.default_rng(1).lognormal(size=9)
    ours = bootstrap((values,), np.mean, generator("a"))
    theirs = scipy.stats.bootstrap((values,), np.mean, n_resamples=2000, method="percentile",
                                   rng=generator("a"))
    assert (ours.low, ours.high) == (theirs.confidence_interval.low,
                                     theirs.confidence_interval.high)
    # The resamples are rows of indices drawn with replacement from the same generator.
    drawn = values[generator("a").integers(0, 9, (2000, 9))].mean(axis=1)
    assert np.array_equal(ours.distribution, drawn)
    paired = bootstrap((values, 2 * values), lambda a, b, axis: b.sum(axis) / a.sum(axis),
                       generator("a"))
    assert paired.low == pytest.approx(2.0) and paired.high == pytest.approx(2.0)
    single = bootstrap((values[:1],), np.mean, generator("a"))
    assert single.low == single.high == values[0]


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_bootstrap_distribution_is_scipys_bit_for_bit(n):
    rng = np.random.default_rng(n)
    values = rng.lognormal(size=n)
    ties = np.round(values)  # repeated values: the quantiles' interpolation on ties
    slopes = (rng.normal(size=n), rng.uniform(1, 2, size=n))
    cases = [((values,), _median_iqr), ((ties,), _median_iqr), ((values,), np.mean),
             (slopes, lambda sxy, sxx, axis: sxy.sum(axis) / sxx.sum(axis)),
             ((np.arange(n, dtype=float),), lambda i, axis: np.stack([i.max(axis), i.min(axis)]))]
    for samples, statistic in cases:
        ours = bootstrap_distribution(samples, statistic, generator("case", n), 500)
        theirs = scipy.stats.bootstrap(
            samples, statistic, n_resamples=500, vectorized=True, paired=len(samples) > 1,
            method="percentile", rng=generator("case", n)).bootstrap_distribution
        assert ours.shape == theirs.shape
        assert np.array_equal(ours, theirs, equal_nan=True)


def test_generator_draws_depend_on_the_labels_only():
    assert generator("x", 1).random() == generator("x", 1).random()
    assert generator("x", 1).random() != generator("x", 2).random()


def test_sign_flip_p_is_exact_for_few_pairs_and_seeded_for_many():
    # Five positive differences: 1 of the 32 sign patterns reaches the observed mean on
    # each side, so p = 2 / 32.
    assert sign_flip_p(np.arange(1.0, 6.0), generator("p")) == pytest.approx(2 / 32)
    many = np.random.default_rng(2).normal(0.3, 1.0, 40)
    p = sign_flip_p(many, generator("p"))
    assert p == sign_flip_p(many, generator("p")) and 0 < p < 1


def test_sign_flip_p_of_one_pair_is_one():
    """A sweep of one seed pairs each arm once: both sign patterns of one difference are as
    extreme as the observed one."""
    assert sign_flip_p(np.array([0.7]), generator("p")) == 1.0
    assert sign_flip_p(np.array([0.0]), generator("p")) == 1.0


def test_permutation_p_doubles_the_smaller_tail_with_the_plus_one_rule():
    null = np.arange(-10.0, 11.0)  # 21 draws
    assert permutation_p(null, 10.0) == pytest.approx(2 * 2 / 22)
    assert permutation_p(null, -9.0) == pytest.approx(2 * 3 / 22)
    assert permutation_p(null, 0.0) == 1.0


def test_q_values_match_the_textbook_benjamini_hochberg_example():
    assert np.allclose(q_values(np.array([0.01, 0.04, 0.03, 0.005])), [0.02, 0.04, 0.04, 0.02])
    assert q_values(np.array([])).size == 0
