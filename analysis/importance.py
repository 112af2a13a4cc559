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

A search's numeric keys (`searched`: every proposal draws its own value) have no levels
to average over: each enters as the quarters of its proposals' distinct values (its
levels), and a configuration is one proposal (its exact values, trained once per seed). So
"seed" stays what differs between seeds of one configuration, and what a searched key's
values explain within a quarter counts under the interactions.

Intervals: the seed is the replicate (each seed runs the whole grid), so the bootstrap
resamples whole seeds with replacement (`analysis.stats.bootstrap`, N_RESAMPLES times, one
generator for every outcome) and recomputes every share; the interval is the 2.5% and
97.5% percentiles of the resamples where the share is defined. With 3 seeds the
intervals are coarse. An axis with no effect still gets a small positive share from seed
noise (about 1/(number of seeds x configurations per level)); its interval shows that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from analysis.aggregate import capped_loss, task_reference
from analysis.axes import SEED
from analysis.stats import CONFIDENCE, N_RESAMPLES, bootstrap, generator

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
    NaN where the losses are missing, and every outcome NaN for a trial a search's pruner
    stopped (status `pruned`: how its run would have ended is unknown)."""
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
    out.loc[status == "pruned"] = np.nan
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
                    n_resamples: int = N_RESAMPLES, searched: Sequence[str] = ()
                    ) -> pd.DataFrame:
    """Share of each outcome's variance explained by each axis, with bootstrap intervals.

    `searched`: a search's numeric columns (their quarters are their levels, their exact
    values part of the configuration; module docstring). Long format: `outcome`
    (OUTCOMES key), `source` (an axis or searched column, INTERACTIONS or SEED_NOISE),
    `share`, `ci_low`, `ci_high`, `n` (trials with a finite outcome), `n_seeds`. Trials
    whose outcome is NaN are left out of that outcome. Intervals are NaN with one seed.
    """
    values = outcomes(trials)
    codes = {a: pd.factorize(trials[a].astype(str))[0] for a in axes}
    # A configuration: its axes' values and, in a search, its exact searched values (one
    # proposal); a searched key's level is its quarter.
    identity = [*codes.values(), *(pd.factorize(trials[k].astype(str))[0] for k in searched)]
    codes.update({k: quarters(trials[k]) for k in searched})
    seeds = (trials[SEED].astype(str) if SEED in trials.columns
             else pd.Series("0", index=trials.index))
    rows = []
    unique_seeds = sorted(seeds.unique())
    for outcome in OUTCOMES:
        y_all = values[outcome].to_numpy(dtype=float)
        keep = np.isfinite(y_all)
        if keep.sum() < 2:
            continue
        y = y_all[keep]
        levels = {a: pd.factorize(code[keep])[0] for a, code in codes.items()}
        # A cell: one configuration, numbered in order of first appearance
        cell = (pd.DataFrame([c[keep] for c in identity]).T
                .groupby(list(range(len(identity))), sort=False).ngroup().to_numpy()
                if identity else np.zeros(len(y), dtype=int))
        seed_idx = np.searchsorted(unique_seeds, seeds[keep].to_numpy())
        point = variance_shares(y, levels, cell, seed_idx, np.ones((1, len(unique_seeds))))
        low = high = np.full(len(point), np.nan)
        if len(unique_seeds) > 1:
            # Every outcome resamples the same seeds: one generator, the same labels.
            boot = bootstrap((np.arange(len(unique_seeds)),),
                             _shares_of_resampled_seeds(y, levels, cell, seed_idx, list(point)),
                             generator("axis importance"), n_resamples, CONFIDENCE)
            low, high = boot.low, boot.high
        for i, (source, share) in enumerate(point.items()):
            finite = np.isfinite(share[0])
            rows.append({"outcome": outcome, "source": source, "share": float(share[0]),
                         "ci_low": low[i] if finite else np.nan,
                         "ci_high": high[i] if finite else np.nan, "n": int(len(y)),
                         "n_seeds": len(unique_seeds)})
    return pd.DataFrame(rows, columns=["outcome", "source", "share", "ci_low", "ci_high",
                                       "n", "n_seeds"])


def quarters(values: pd.Series) -> np.ndarray:
    """[n] level of each value: which quarter of the distinct values it falls in, by rank
    (0-3; as many levels as distinct values when fewer than four; missing values one level
    of their own after them)."""
    numbers = pd.to_numeric(values, errors="coerce")
    distinct = np.unique(numbers.dropna().to_numpy(dtype=float))
    n = len(distinct)
    rank = np.searchsorted(distinct, numbers.fillna(np.inf).to_numpy(dtype=float))
    return np.where(numbers.isna(), min(4, n), rank * min(4, n) // max(n, 1))


def _shares_of_resampled_seeds(y: np.ndarray, levels: dict[str, np.ndarray],
                               cell: np.ndarray, seed: np.ndarray, sources: list[str]
                               ) -> Callable[..., np.ndarray]:
    """The bootstrap statistic: resampled seed indices ([B, S] or [S]) -> the shares of
    `sources` ([k, B] or [k]), each seed weighted by how often it was drawn."""
    n_seeds = int(seed.max()) + 1 if len(seed) else 0

    def statistic(drawn: np.ndarray, axis: int = -1) -> np.ndarray:
        rows = np.atleast_2d(drawn).astype(int)
        counts = (rows[:, :, None] == np.arange(n_seeds)).sum(axis=1).astype(float)
        shares = variance_shares(y, levels, cell, seed, counts)
        out = np.stack([shares[s] for s in sources])
        return out if np.ndim(drawn) > 1 else out[:, 0]

    return statistic


def ranked_axes(importance: pd.DataFrame, axes: Sequence[str]) -> list[str]:
    """Axes by their mean share over the outcomes that vary, largest first (ties: axis
    order)."""
    mains = importance[importance["source"].isin(axes)]
    mean = mains.groupby("source")["share"].mean()
    return sorted(axes, key=lambda a: (-mean.get(a, 0.0) if np.isfinite(mean.get(a, np.nan))
                                       else 0.0, list(axes).index(a)))
