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

from study.metrics.arrays import finite, first_valid, last_valid, nan_reduce

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
# osc_tv_ratio is undefined below this net decrease of log loss (0.1 = the loss fell by
# less than ~10%): a ratio over a near-zero denominator ranks runs that never learned as
# the most oscillatory.
MIN_NET_LOG_DECREASE = 0.1


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
    with np.errstate(divide="ignore", invalid="ignore"):
        log_loss = np.log(finite(step_loss))
    d = np.diff(log_loss, axis=1)
    significant = np.abs(np.expm1(d)) > RELATIVE_NOISE  # NaN compares False
    return np.where(np.isnan(d), np.nan, np.where(significant, d, 0.0)), significant


def oscillation(step_loss: np.ndarray) -> dict[str, np.ndarray]:
    """Oscillation of the minibatch loss L_k (see the module note on sampling noise).

    - `osc_tv_ratio`: total variation of log L over its net decrease,
      sum |log L_k+1 - log L_k| / (log L_first - log L_last); 1 for a monotone descent,
      large when the loss goes up and down; NaN when the net decrease of log L is below
      MIN_NET_LOG_DECREASE (0.1: the loss fell by less than ~10%), where the ratio of a
      run that barely moved would be huge for no oscillation of note.
    - `up_step_fraction`: share of significant changes (relative > 1e-6) that are increases.
    - `loss_diff_autocorr`: lag-1 autocorrelation of the log-loss differences (sub-noise
      changes counted as 0); near -1 for a period-2 oscillation; NaN if they never change.
    """
    d, significant = _log_diffs(step_loss)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_loss = np.log(finite(step_loss))
        net = first_valid(log_loss) - last_valid(log_loss)
        tv = np.nansum(np.abs(d), axis=1)
        tv_ratio = np.where(net >= MIN_NET_LOG_DECREASE, tv / net, np.nan)
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
    median = np.median(windows, axis=2)  # NaN when the window leaves the trial's steps
    mad = np.median(np.abs(windows - median[..., None]), axis=2)
    scale = np.maximum(MAD_TO_SIGMA * mad, SPIKE_SCALE_FLOOR)
    with np.errstate(invalid="ignore"):
        spiking = (current - median) / scale > SPIKE_Z
    onsets = spiking & ~np.concatenate([np.zeros((t, 1), bool), spiking[:, :-1]], axis=1)
    count = onsets.sum(axis=1).astype(float)
    ratio = nan_reduce(np.nanmax, np.exp(current - median))
    count = np.where(np.isnan(ratio), np.nan, count)
    return {"spike_count": count, "spike_max_ratio": ratio}


def eval_rises(loss: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Number of evaluations whose loss rose by more than `threshold` (relative) over the
    previous evaluation (read on full-split losses: no sampling noise)."""
    loss = finite(loss)
    with np.errstate(invalid="ignore", divide="ignore"):
        rises = loss[:, 1:] > loss[:, :-1] * (1 + threshold)
    return rises.sum(axis=1).astype(float)
