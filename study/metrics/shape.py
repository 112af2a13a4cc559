"""Shape of the loss curve: speed, plateau, oscillation, spikes. Vectorized over trials.

Every function takes NaN-padded [T, S] (or [T, E]) arrays and returns [T]; NaN means the
metric is undefined for that trial (documented per function), never a failure.

Oscillation and spike metrics read the minibatch loss of every step. With small batches
that series carries sampling noise: i.i.d. noise alone gives a lag-1 autocorrelation of
differences near -0.5 and an up-step fraction near 0.5. Compare them across trials of one
batch size, or read them on full-batch trials, where they are pure dynamics.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from study.metrics.arrays import finite, nan_median, nan_reduce

# Changes of the loss smaller than this (relative) are float32 rounding, not dynamics.
RELATIVE_NOISE = 1e-6
# Spikes: trailing window (steps) for the rolling median / MAD of log loss, z threshold,
# and a floor on the robust scale (log units: 0.05 = 5%) so a smooth curve's tiny wiggles
# are not spikes.
SPIKE_WINDOW = 20
SPIKE_Z = 6.0
SPIKE_SCALE_FLOOR = 0.05
MAD_TO_SIGMA = 1.4826
PLATEAU_FRACTION = 0.1
# An evaluation rise must also exceed this share of the initial excess over the floor.
RISE_SHARE = 0.02
# osc_tv_ratio is undefined below this net decrease of log loss (0.1 = the loss fell by
# less than ~10%): a ratio over a near-zero denominator ranks runs that never learned as
# the most oscillatory.
MIN_NET_LOG_DECREASE = 0.1
# ... and below this many standard errors of the difference of the two end medians (the
# end windows' own spread, 1.4826 x MAD, x 1.2533 / sqrt(w) for a median): with batch-8
# noise a 10% fall between two windows can be chance.
NET_DECREASE_Z = 2.0


def steps_to_fraction(eval_step: np.ndarray, loss: np.ndarray, fraction: float) -> np.ndarray:
    """First eval step at which `loss` is at or below initial - fraction x (initial - best).

    Read on the full-split evaluations (step resolution = eval interval). NaN when the loss
    never fell below its initial value.
    """
    loss = finite(loss)
    initial = loss[:, 0]
    best = nan_reduce(np.nanmin, loss)
    target = initial - fraction * (initial - best)
    with np.errstate(invalid="ignore"):
        reached = loss <= target[:, None]
    idx = np.argmax(reached, axis=1)
    steps = eval_step[np.arange(len(loss)), idx]
    return np.where(reached.any(axis=1) & (best < initial), steps, np.nan)


def plateau_steps(eval_step: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Initial plateau length: steps until the loss first falls by 10% of its achieved
    reduction (`steps_to_fraction` at 0.1)."""
    return steps_to_fraction(eval_step, loss, PLATEAU_FRACTION)


def _log_diffs(step_loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log-loss differences with sub-noise changes set to 0, mask of significant ones)."""
    # A loss of exactly 0 (float32 underflow on separable data) has log -inf: differences
    # next to it are NaN and compare False, like a missing step.
    with np.errstate(divide="ignore", invalid="ignore"):
        log_loss = np.log(finite(step_loss))
        d = np.diff(log_loss, axis=1)
        significant = np.abs(np.expm1(d)) > RELATIVE_NOISE  # NaN compares False
    return np.where(np.isnan(d), np.nan, np.where(significant, d, 0.0)), significant


def oscillation(step_loss: np.ndarray) -> dict[str, np.ndarray]:
    """Oscillation of the minibatch loss L_k (see the module note on sampling noise).

    - `osc_tv_ratio`: total variation of log L over its net decrease, both measured between
      robust ends: the first and last windows of ~10% of the finite steps (an odd count w,
      at least 1), whose medians sit at steps i0 and i1 on a monotone curve;
      sum_{i0 <= k < i1} |log L_k+1 - log L_k| / (median_first log L - median_last log L).
      Exactly 1 for a monotone descent, large when the loss goes up and down; NaN when that
      net decrease is below MIN_NET_LOG_DECREASE (0.1: the loss fell by less than ~10%) or
      below NET_DECREASE_Z (2) standard errors of the difference of the two medians (each
      1.2533 x 1.4826 x MAD of its window / sqrt(w)), i.e. not distinguishable from noise.
      Noisy endpoints cannot fake progress: a run that does not learn has no net decrease
      between its end windows, so it is not ranked "most oscillatory".
    - `up_step_fraction`: share of significant changes (relative > 1e-6) that are increases.
    - `loss_diff_autocorr`: lag-1 autocorrelation of the log-loss differences (sub-noise
      changes counted as 0); near -1 for a period-2 oscillation; NaN if they never change.
    """
    d, significant = _log_diffs(step_loss)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_loss = np.log(finite(step_loss))
        tv_ratio = _tv_ratio(np.where(np.isfinite(log_loss), log_loss, np.nan))
        n_sig = significant.sum(axis=1)
        up = (np.nan_to_num(d) > 0).sum(axis=1)
        up_fraction = np.where(n_sig > 0, up / np.maximum(n_sig, 1), np.nan)
        # Mean over the finite differences; a row with none (stopped at step 0) stays NaN
        # without np.nanmean's "Mean of empty slice" warning.
        n_finite = np.isfinite(d).sum(axis=1, keepdims=True)
        mean = np.nansum(d, axis=1, keepdims=True) / np.where(n_finite > 0, n_finite, np.nan)
        centered = d - mean
        num = np.nansum(centered[:, :-1] * centered[:, 1:], axis=1)
        den = np.nansum(centered**2, axis=1)
        autocorr = np.where((den > 0) & (d.shape[1] > 1), num / den, np.nan)
    return {"osc_tv_ratio": tv_ratio, "up_step_fraction": up_fraction,
            "loss_diff_autocorr": autocorr}


def _tv_ratio(log_loss: np.ndarray) -> np.ndarray:
    """osc_tv_ratio (see `oscillation`) of NaN-padded [T, S] log losses."""
    n_rows, width = log_loss.shape
    if width == 0:  # no trial took a step (each stopped at its first evaluation)
        return np.full(n_rows, np.nan)
    valid = np.isfinite(log_loss)
    n = valid.sum(axis=1)  # (T,)
    w = np.maximum(n // 10, 1)
    w = w - (w % 2 == 0)  # odd: a window's median is one of its values
    order = np.argsort(~valid, axis=1, kind="stable")  # finite steps first, in step order
    packed = np.take_along_axis(log_loss, order, axis=1)  # (T, S)
    rank = np.arange(width)[None, :]
    first = np.where(rank < w[:, None], packed, np.nan)
    last = np.where((rank >= (n - w)[:, None]) & (rank < n[:, None]), packed, np.nan)
    rows = np.flatnonzero(n > 0)
    net, se = np.full(n_rows, np.nan), np.full(n_rows, np.nan)
    variance = np.zeros(len(rows))
    medians = []
    for window in (first[rows], last[rows]):
        median = nan_median(window)
        mad = nan_median(np.abs(window - median[:, None]))
        variance += (1.2533 * MAD_TO_SIGMA * mad) ** 2 / w[rows]
        medians.append(median)
    net[rows] = medians[0] - medians[1]
    se[rows] = np.sqrt(variance)
    half = (w - 1) // 2
    i0 = np.take_along_axis(order, np.minimum(half, width - 1)[:, None], axis=1)[:, 0]
    i1 = np.take_along_axis(order, np.clip(n - 1 - half, 0, width - 1)[:, None], axis=1)[:, 0]
    d = np.abs(np.diff(log_loss, axis=1))  # (T, S-1); NaN next to a missing step
    step = np.arange(width - 1)[None, :]
    inside = (step >= i0[:, None]) & (step < i1[:, None])
    tv = np.nansum(np.where(inside, d, np.nan), axis=1)
    enough = net >= np.maximum(MIN_NET_LOG_DECREASE, NET_DECREASE_Z * se)
    return np.where(enough, tv / net, np.nan)


def window_median(windows: np.ndarray) -> np.ndarray:
    """`np.median(windows, axis=-1)`, the same bits (NaN where a window holds a NaN; the
    mean of the two middle values of an even window, summed then halved as `np.mean` does
    them), from one sort of each window: numpy's vectorised sort of short rows is several
    times faster than the partition `np.median` does row by row. Windows hold at least one
    value; an odd window whose middle is a zero may differ from `np.median` in that zero's
    sign (0.0 and -0.0 sort as equals)."""
    ordered = np.sort(windows, axis=-1)  # NaN sorts last
    n = ordered.shape[-1]
    middle = (ordered[..., n // 2] if n % 2 else
              (ordered[..., n // 2 - 1] + ordered[..., n // 2]) / 2)
    return np.where(np.isnan(ordered[..., -1]), np.nan, middle)


def spikes(step_loss: np.ndarray) -> dict[str, np.ndarray]:
    """Loss spikes by robust z-score of log L against the previous `SPIKE_WINDOW` steps.

    z_k = (log L_k - median_w) / max(1.4826 x MAD_w, `SPIKE_SCALE_FLOOR`), median and MAD
    over steps k-20 .. k-1. Step k is spiking when z_k > 6; `spike_count` counts spike
    onsets (a run of consecutive spiking steps is one spike). `spike_max_ratio` is the
    largest L_k / exp(median_w) over the run (how many times above its recent level the
    loss jumped). Both need more than 20 steps: NaN otherwise.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        log_loss = np.log(finite(step_loss))
    t, s = log_loss.shape
    if s <= SPIKE_WINDOW:
        return {"spike_count": np.full(t, np.nan), "spike_max_ratio": np.full(t, np.nan)}
    windows = sliding_window_view(log_loss, SPIKE_WINDOW, axis=1)[:, :-1]  # [T, S-W, W]
    current = log_loss[:, SPIKE_WINDOW:]
    # A window holding a loss of exactly 0 (log -inf) gives NaN statistics: no spike there.
    with np.errstate(invalid="ignore"):
        median = window_median(windows)  # NaN when the window leaves the trial's steps
        mad = window_median(np.abs(windows - median[..., None]))
        scale = np.maximum(MAD_TO_SIGMA * mad, SPIKE_SCALE_FLOOR)
        spiking = (current - median) / scale > SPIKE_Z
        onsets = spiking & ~np.concatenate([np.zeros((t, 1), bool), spiking[:, :-1]], axis=1)
        count = onsets.sum(axis=1).astype(float)
        ratio = nan_reduce(np.nanmax, np.exp(current - median))
    count = np.where(np.isnan(ratio), np.nan, count)
    return {"spike_count": count, "spike_max_ratio": ratio}


def eval_rises(loss: np.ndarray, floor: np.ndarray | float = 0.0, threshold: float = 0.1,
               share: float = RISE_SHARE) -> np.ndarray:
    """Number of evaluations whose loss rose by more than `threshold` (relative) over the
    previous evaluation **and** by more than `share` of the initial excess (loss[0] - floor),
    read on full-split losses (no sampling noise). The second condition keeps the 10% wiggles
    of a run that sits near its floor (0.050 -> 0.055 after falling from 1.1) from counting
    as rises: an edge-of-stability run hovers like that and keeps learning."""
    loss = finite(loss)
    excess = loss[:, :1] - np.asarray(floor, dtype=float).reshape(-1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        step = loss[:, 1:] - loss[:, :-1]
        rises = (loss[:, 1:] > loss[:, :-1] * (1 + threshold)) & (step > share * excess)
    return rises.sum(axis=1).astype(float)
