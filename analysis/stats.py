"""Across-trial statistics (DataFrame in, DataFrame out): rates with binomial intervals,
medians and IQRs over seeds with bootstrap intervals.

Groups come out in order of first appearance in the input (callers sort first); every
function is deterministic: the bootstrap draws from a generator seeded by the group's own
labels, so a group's interval never depends on which other groups are present.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
N_RESAMPLES = 2000  # bootstrap resamples per group (percentile method)
BOOTSTRAP_SEED = 20230901
DIVERGED = "diverged"


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
    replacement. The generator is seeded by (`seed`, CRC32 of the group labels and metric).

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
        label = "\x1f".join(map(str, (*key, metric))).encode()
        rng = np.random.default_rng([seed, zlib.crc32(label)])
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
    tails = [(1 - confidence) / 2, (1 + confidence) / 2]
    if n == 1:
        med_ci, iqr_ci = (median, median), (np.nan, np.nan)
    else:
        samples = values[rng.integers(0, n, size=(n_resamples, n))]  # (B, n)
        quarts = np.quantile(samples, [0.25, 0.5, 0.75], axis=1)  # (3, B)
        med_ci = tuple(np.quantile(quarts[1], tails))
        iqr_ci = tuple(np.quantile(quarts[2] - quarts[0], tails))
    return dict(n=n, median=median, q25=q25, q75=q75, iqr=q75 - q25,
                median_low=med_ci[0], median_high=med_ci[1],
                iqr_low=iqr_ci[0], iqr_high=iqr_ci[1])
