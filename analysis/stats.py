"""Across-trial statistics: rates with binomial intervals, medians and IQRs over seeds, and
the resampling every interval and p-value of the report and the claims is drawn from.

Resampling is scipy's (`scipy.stats.bootstrap`, `permutation_test`,
`false_discovery_control`; the bootstrap's draws are made here as scipy makes them, the
same bits, without its per-call overhead) behind three functions: `bootstrap`
(percentile intervals), `sign_flip_p` (paired permutation test) and `q_values`
(Benjamini-Hochberg); `permutation_p` scores a null drawn by the caller (a test scipy has
no form for, such as shuffles within strata) with scipy's two-sided convention. Each resampled
quantity draws from its own generator, `generator(*labels)`, seeded by BOOTSTRAP_SEED and
the CRC32 of labels naming the quantity (a group's labels, a claim's statement): its
interval never depends on which other groups or claims are computed, and reruns give the
same bits.

Groups come out in order of first appearance in the input (callers sort first).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd
import scipy.stats

CONFIDENCE = 0.95
N_RESAMPLES = 2000  # resamples per bootstrap interval
# Permutations per test (scipy's default). A claim's verdict turns on q <= 0.05: on
# real_data's claims near it, p's spread over resampling seeds was 0.0065 with 2000 and
# 0.0018 with 9999 permutations, at a cost of milliseconds per claim.
N_PERMUTATIONS = 9999
BOOTSTRAP_SEED = 20230901
DIVERGED = "diverged"
_TIES = 1e-14  # relative tolerance counting a resampled statistic as equal to the observed


@dataclass(frozen=True)
class Resampled:
    """A percentile bootstrap: the interval's ends and the statistic on every resample
    (shape (n_resamples,), or (k, n_resamples) for a statistic with k values)."""

    low: np.ndarray
    high: np.ndarray
    distribution: np.ndarray


def generator(*labels: object, seed: int = BOOTSTRAP_SEED) -> np.random.Generator:
    """The generator of one resampled quantity: seeded by `seed` and the CRC32 of `labels`
    joined, so the same labels always draw the same numbers."""
    label = "\x1f".join(map(str, labels)).encode()
    return np.random.default_rng([seed, zlib.crc32(label)])


def bootstrap(samples: Sequence[np.ndarray], statistic: Callable[..., np.ndarray],
              rng: np.random.Generator, n_resamples: int = N_RESAMPLES,
              confidence: float = CONFIDENCE) -> Resampled:
    """Percentile bootstrap interval of `statistic(*samples, axis=-1)` (vectorized).

    Several samples are resampled together, row by row (paired: one unit is one index
    into all of them). Resamples where the statistic is not finite are left out of the
    percentiles. With one unit, every resample is that unit (scipy needs two).
    """
    samples = tuple(np.asarray(s, dtype=float) for s in samples)
    if len(samples[0]) < 2:
        point = np.asarray(statistic(*samples, axis=-1), dtype=float)
        distribution = np.repeat(point[..., None], n_resamples, axis=-1)
    else:
        distribution = bootstrap_distribution(samples, statistic, rng, n_resamples)
    tails = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
    finite = np.isfinite(distribution)
    if finite.all():  # the same bits as nanpercentile, without its row-by-row loop
        low, high = np.percentile(distribution, tails, axis=-1)
    else:
        with warnings.catch_warnings():  # never finite: NaN ends, said by the NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanpercentile(np.where(finite, distribution, np.nan), tails,
                                         axis=-1)
    return Resampled(low, high, distribution)


def bootstrap_distribution(samples: Sequence[np.ndarray], statistic: Callable[..., np.ndarray],
                           rng: np.random.Generator,
                           n_resamples: int = N_RESAMPLES) -> np.ndarray:
    """`scipy.stats.bootstrap(samples, statistic, n_resamples=n_resamples, vectorized=True,
    paired=len(samples) > 1, rng=rng).bootstrap_distribution`, the same draws and bits,
    for 1-D samples of two or more units (paired ones of one length).

    scipy draws one (n_resamples, n) array of unit indices and applies the statistic to
    the samples taken at them; this does the same without scipy's checks and its own
    interval (unused here), which cost about 2 ms a call: the report bootstraps hundreds
    of groups of a few seeds each. A test compares it with scipy bit for bit.
    """
    n = len(samples[0])
    units = rng.integers(0, n, (n_resamples, n))
    with warnings.catch_warnings():  # degenerate resamples are an answer: [v, v] or NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(statistic(*(s[units] for s in samples), axis=-1), dtype=float)


def sign_flip_p(differences: np.ndarray, rng: np.random.Generator,
                n_resamples: int = N_PERMUTATIONS) -> float:
    """Two-sided p-value that paired differences have mean 0: a permutation test flipping
    the sign of each difference (`scipy.stats.permutation_test`; exact, over all 2^n sign
    patterns, when there are at most `n_resamples` of them). One difference: 1 (both of its
    sign patterns are as far from 0 as the observed one; scipy needs two)."""
    if len(differences) < 2:
        return 1.0
    result = scipy.stats.permutation_test(
        (np.asarray(differences, dtype=float),), _mean, permutation_type="samples",
        vectorized=True, n_resamples=n_resamples, alternative="two-sided", rng=rng,
        batch=1000)  # memory bounded for many pairs; the same draws and p as unbatched
    return float(result.pvalue)


def permutation_p(null: np.ndarray, observed: float) -> float:
    """Two-sided p-value of `observed` against `null` (random permutations), with
    `scipy.stats.permutation_test`'s convention: twice the smaller one-sided p-value, each
    (1 + #{null at least as extreme}) / (1 + len(null)), at most 1."""
    tie = _TIES * abs(observed)
    greater = (1 + np.sum(null >= observed - tie)) / (1 + len(null))
    less = (1 + np.sum(null <= observed + tie)) / (1 + len(null))
    return float(min(1.0, 2 * min(greater, less)))


def q_values(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (`scipy.stats.false_discovery_control`)."""
    p = np.asarray(p, dtype=float)
    return scipy.stats.false_discovery_control(p, method="bh") if p.size else p


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def wilson_interval(k: np.ndarray | int, n: np.ndarray | int,
                    confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion k/n (vectorized).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at k = 0 or
    k = n: 0 of 10 gives [0, 0.278]. n = 0 gives NaN bounds.
    """
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z * z / n
        center = (p + z * z / (2 * n)) / denom
        half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        low, high = np.clip(center - half, 0, 1), np.clip(center + half, 0, 1)
    # Exact ends: the bound at k = 0 (k = n) is 0 (1), not 1e-17 from rounding.
    low = np.where((k == 0) & (n > 0), 0.0, low)
    high = np.where((k == n) & (n > 0), 1.0, high)
    return low, high


def divergence_rate(trials: pd.DataFrame, by: Sequence[str],
                    confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Share of diverged trials per group, with a Wilson interval.

    Columns: `by`..., `n`, `n_diverged`, `rate`, `ci_low`, `ci_high`.
    """
    diverged = (trials["status"].astype(str) == DIVERGED).astype(int)
    grouped = diverged.groupby([trials[c] for c in by], sort=False, dropna=False) if by \
        else diverged.groupby(pd.Series(0, index=trials.index))
    out = grouped.agg(n="size", n_diverged="sum").reset_index(drop=not by)
    out["rate"] = out["n_diverged"] / out["n"]
    out["ci_low"], out["ci_high"] = wilson_interval(out["n_diverged"], out["n"], confidence)
    return out


def seed_spread(trials: pd.DataFrame, by: Sequence[str], metric: str,
                n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """Median and interquartile range of `metric` per group, with bootstrap intervals.

    Columns: `by`..., `n` (finite values), `median`, `q25`, `q75`, `iqr` (= q75 - q25,
    numpy's linear interpolation), and `median_low`/`median_high`, `iqr_low`/`iqr_high`:
    percentile bootstrap intervals from `n_resamples` resamples of the group's values with
    replacement (`bootstrap`), drawn from `generator(*group labels, metric, seed=seed)`.

    Note:
        With few seeds the bootstrap distribution is coarse: with 3 values the median's
        interval is essentially [min, max] and the IQR's starts at 0. A group with one
        value gets that value as its median interval and NaN for the IQR interval; a group
        with no finite value gets NaN throughout.
    """
    values = pd.to_numeric(trials[metric], errors="coerce")
    keys = [trials[c] for c in by] if by else [pd.Series(0, index=trials.index)]
    rows = []
    for key, group in values.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        finite = group.to_numpy(dtype=float)
        finite = finite[np.isfinite(finite)]
        rng = generator(*key, metric, seed=seed)
        rows.append({**dict(zip(by, key, strict=False)),  # by = []: key is the dummy 0
                     **_spread(finite, rng, n_resamples, confidence)})
    columns = [*by, "n", "median", "q25", "q75", "iqr", "median_low", "median_high",
               "iqr_low", "iqr_high"]
    return pd.DataFrame(rows, columns=columns)


def _spread(values: np.ndarray, rng: np.random.Generator, n_resamples: int,
            confidence: float) -> dict[str, float]:
    n = len(values)
    if n == 0:
        return dict(n=0, median=np.nan, q25=np.nan, q75=np.nan, iqr=np.nan,
                    median_low=np.nan, median_high=np.nan, iqr_low=np.nan, iqr_high=np.nan)
    q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    if n == 1:
        med_ci, iqr_ci = (median, median), (np.nan, np.nan)
    else:
        boot = bootstrap((values,), _median_iqr, rng, n_resamples, confidence)
        med_ci, iqr_ci = (boot.low[0], boot.high[0]), (boot.low[1], boot.high[1])
    return dict(n=n, median=median, q25=q25, q75=q75, iqr=q75 - q25,
                median_low=med_ci[0], median_high=med_ci[1],
                iqr_low=iqr_ci[0], iqr_high=iqr_ci[1])


def _median_iqr(x: np.ndarray, axis: int = -1) -> np.ndarray:
    q25, median, q75 = np.quantile(x, [0.25, 0.5, 0.75], axis=axis)
    return np.stack([median, q75 - q25])
