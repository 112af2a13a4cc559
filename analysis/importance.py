"""Which swept axis matters: a variance decomposition of each outcome over the grid, with
bootstrap intervals over seeds (DataFrame in, DataFrame out).

For an outcome y (one number per trial) the trial-level sum of squares splits as in a
factorial ANOVA:

    SS_total = sum_a SS_main(a) + SS_interactions + SS_seed

- SS_main(a) = sum over the levels l of axis a of n_l (mean_l - mean)^2: what axis a
  explains on its own, averaged over every other axis (its first-order effect);
- SS_seed = sum over trials of (y - mean of its configuration)^2: what changes between
  seeds of one configuration (noise the grid cannot explain);
- SS_pair(a, b) = SS_between(a x b cells) - SS_main(a) - SS_main(b): what the pair explains
  beyond its two main effects (a two-way interaction: e.g. which learning rates are bad
  depends on the optimizer);
- SS_interactions = the rest: what only combinations of three or more axes explain.

`share` = SS / SS_total (eta squared; on a full grid with every configuration equally
seeded, the first-order Sobol index of the axis over the grid's uniform design). Shares
add up to 1; on an unbalanced grid the interaction term can come out slightly negative
and is then reported as is.

Intervals: the seed is the replicate (each seed runs the whole grid), so the bootstrap
resamples whole seeds with replacement (N_RESAMPLES times, a fixed generator) and
recomputes every share; the interval is the 2.5% and 97.5% percentiles. With 3 seeds the
intervals are coarse. An axis with no effect still gets a small positive share from seed
noise (about 1/(number of seeds x configurations per level)); its interval shows that.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.aggregate import capped_loss, task_reference
from analysis.axes import SEED

N_RESAMPLES = 1000
BOOTSTRAP_SEED = 20240519
CONFIDENCE = 0.95
INTERACTIONS = "higher-order interactions"
SEED_NOISE = "seed (within a configuration)"
PAIR = " × "
# Outcome name -> what it measures, as the report names it.
OUTCOMES = {
    "diverged": "divergence (share of trials diverged)",
    "erratic": "instability (share unstable or recovered)",
    "log_loss": "final loss (log10 of capped final / task's initial val loss)",
}


def outcomes(trials: pd.DataFrame) -> pd.DataFrame:
    """Per trial: `diverged` (0/1), `erratic` (0/1: status unstable or recovered) and
    `log_loss` = log10(min(final, initial) val loss / the task's median initial val loss);
    NaN where the losses are missing."""
    status = trials["status"].astype(str)
    out = pd.DataFrame({"diverged": (status == "diverged").astype(float),
                        "erratic": status.isin(["unstable", "recovered"]).astype(float)},
                       index=trials.index)
    if {"val_loss_final", "val_loss_initial"} <= set(trials.columns):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = capped_loss(trials) / task_reference(trials)
            out["log_loss"] = np.log10(ratio.where(ratio > 0))
    else:
        out["log_loss"] = np.nan
    return out


def variance_shares(y: np.ndarray, levels: dict[str, np.ndarray], cell: np.ndarray,
                    seed: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Shares of the sum of squares of `y` ([n]) when seed s counts `counts[b, s]` times,
    for every row b of `counts` ([B, S]; one row of ones = the data as observed).

    `levels[a]` ([n] ints) is each trial's level of axis a, `cell` ([n] ints) its
    configuration, `seed` ([n] ints in [0, S)) its seed. Returns {axis: [B], "a × b": [B]
    for every pair, INTERACTIONS: [B] (three-way and higher), SEED_NOISE: [B]}; NaN where
    the total is 0 (the outcome does not vary). Works on per-seed sums, so a bootstrap of
    B resamples costs B x S x groups, not B x trials.
    """
    y = y - y.mean()  # centred: the sums of squares below do not cancel
    n_seeds = counts.shape[1]
    ones = np.ones_like(y)
    total_n = counts @ np.bincount(seed, minlength=n_seeds)  # (B,)
    mean = (counts @ np.bincount(seed, weights=y, minlength=n_seeds)) / total_n
    ss_total = counts @ np.bincount(seed, weights=y * y, minlength=n_seeds) \
        - total_n * mean**2

    def between(code: np.ndarray) -> np.ndarray:
        """Between-group sum of squares, sum_g N_g (mean_g - mean)^2, per resample."""
        groups = int(code.max()) + 1
        index = seed * groups + code
        n_g = counts @ np.bincount(index, ones, n_seeds * groups).reshape(n_seeds, groups)
        s_g = counts @ np.bincount(index, y, n_seeds * groups).reshape(n_seeds, groups)
        with np.errstate(divide="ignore", invalid="ignore"):
            m_g = np.where(n_g > 0, s_g / n_g, 0.0)
        return (n_g * (m_g - mean[:, None]) ** 2).sum(axis=1)

    with np.errstate(divide="ignore", invalid="ignore"):
        shares: dict[str, np.ndarray] = {}
        explained = np.zeros(len(counts))
        mains = {}
        for axis, code in levels.items():
            mains[axis] = between(code)
            shares[axis] = mains[axis] / ss_total
            explained += mains[axis]
        names = list(levels)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                pair = levels[a] * (int(levels[b].max()) + 1) + levels[b]
                ss = between(pd.factorize(pair)[0]) - mains[a] - mains[b]
                shares[f"{a}{PAIR}{b}"] = ss / ss_total
                explained += ss
        ss_seed = ss_total - between(cell)
        shares[INTERACTIONS] = (ss_total - explained - ss_seed) / ss_total
        shares[SEED_NOISE] = ss_seed / ss_total
    scale = counts @ np.bincount(seed, weights=y * y + 1e-300, minlength=n_seeds)
    flat = ss_total <= 1e-12 * scale
    return {k: np.where(flat, np.nan, v) for k, v in shares.items()}


def axis_importance(trials: pd.DataFrame, axes: Sequence[str],
                    n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED
                    ) -> pd.DataFrame:
    """Share of each outcome's variance explained by each axis, with bootstrap intervals.

    Long format: `outcome` (OUTCOMES key), `source` (an axis, INTERACTIONS or SEED_NOISE),
    `share`, `ci_low`, `ci_high`, `n` (trials with a finite outcome), `n_seeds`. Trials
    whose outcome is NaN are left out of that outcome. Intervals are NaN with one seed.
    """
    values = outcomes(trials)
    seeds = (trials[SEED].astype(str) if SEED in trials.columns
             else pd.Series("0", index=trials.index))
    rows = []
    rng = np.random.default_rng(seed)
    unique_seeds = sorted(seeds.unique())
    draws = rng.integers(0, len(unique_seeds), size=(n_resamples, len(unique_seeds)))
    counts = np.stack([np.bincount(d, minlength=len(unique_seeds)) for d in draws])
    for outcome in OUTCOMES:
        y_all = values[outcome].to_numpy(dtype=float)
        keep = np.isfinite(y_all)
        if keep.sum() < 2:
            continue
        y = y_all[keep]
        part = trials.loc[keep]
        levels = {a: pd.factorize(part[a].astype(str))[0] for a in axes}
        cell = (pd.factorize(part[list(axes)].astype(str).agg("\x1f".join, axis=1))[0]
                if axes else np.zeros(len(y), dtype=int))
        seed_idx = np.searchsorted(unique_seeds, seeds[keep].to_numpy())
        observed = np.ones((1, len(unique_seeds)))
        point = variance_shares(y, levels, cell, seed_idx, observed)
        boot = (variance_shares(y, levels, cell, seed_idx, counts.astype(float))
                if len(unique_seeds) > 1 else None)
        tails = [(1 - CONFIDENCE) / 2 * 100, (1 + CONFIDENCE) / 2 * 100]
        for source, share in point.items():
            low = high = np.nan
            if boot is not None and np.isfinite(share[0]):
                finite = boot[source][np.isfinite(boot[source])]
                if len(finite):
                    low, high = np.percentile(finite, tails)
            rows.append({"outcome": outcome, "source": source, "share": float(share[0]),
                         "ci_low": low, "ci_high": high, "n": int(len(y)),
                         "n_seeds": len(unique_seeds)})
    return pd.DataFrame(rows, columns=["outcome", "source", "share", "ci_low", "ci_high",
                                       "n", "n_seeds"])


def ranked_axes(importance: pd.DataFrame, axes: Sequence[str]) -> list[str]:
    """Axes by their mean share over the outcomes that vary, largest first (ties: axis
    order)."""
    mains = importance[importance["source"].isin(axes)]
    mean = mains.groupby("source")["share"].mean()
    return sorted(axes, key=lambda a: (-mean.get(a, 0.0) if np.isfinite(mean.get(a, np.nan))
                                       else 0.0, list(axes).index(a)))
