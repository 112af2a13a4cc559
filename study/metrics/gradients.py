"""Gradients, updates and activations: why a run was unstable. Vectorized over trials.

Inputs are NaN-padded [T, S] step records (see `study.trace.Trace`); a trial whose
engine did not record a field gets NaN for the metrics that need it.
"""

from __future__ import annotations

import numpy as np

from study.metrics.arrays import finite, last_valid, nan_median, nan_reduce

GROWTH_SHARE = 0.1  # first / last share of steps compared by grad_norm_growth


def gradient_norms(grad_norm: np.ndarray) -> dict[str, np.ndarray]:
    """Global minibatch gradient norm |g_k| (L2 over all parameters), finite steps only.

    - `grad_norm_median`, `grad_norm_max`, `grad_norm_final` (last finite step);
    - `grad_norm_growth`: log10(median |g| over the last 10% of steps / median over the
      first 10%) (at least one step each); > 0 when gradients grew during training.
    """
    g = finite(grad_norm)
    n = (~np.isnan(g)).sum(axis=1)
    k = np.maximum(1, np.floor(GROWTH_SHARE * n)).astype(int)
    cols = np.arange(g.shape[1])[None, :]
    head = np.where(cols < k[:, None], g, np.nan)
    # The last k finite steps: finite steps form a prefix, so they are n-k .. n-1.
    tail = np.where((cols >= (n - k)[:, None]) & (cols < n[:, None]), g, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        growth = np.log10(nan_median(tail) / nan_median(head))
    return {
        "grad_norm_median": nan_median(g),
        "grad_norm_max": nan_reduce(np.nanmax, g),
        "grad_norm_final": last_valid(g),
        "grad_norm_growth": np.where(np.isfinite(growth), growth, np.nan),
    }


def layer_ratio(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """`layer_grad_ratio_log10`: median over steps of log10(|grad W_first| / |grad W_last|),
    the Frobenius norms of the first and last weight matrices' gradients. Strongly negative:
    gradients vanish toward the input (deep sigmoid stacks); positive: they explode."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log10(finite(first) / finite(last))
    return nan_median(finite(r))


def update_ratio(update_norm: np.ndarray, param_norm: np.ndarray) -> np.ndarray:
    """`update_param_ratio`: median over steps of |theta_k+1 - theta_k| / |theta_k| (global
    L2 norms); ~1e-3 is the folklore healthy value, >> 1e-2 means steps too large."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = finite(update_norm) / finite(param_norm)
    return nan_median(finite(r))


def update_cosine(cosines: np.ndarray, update_norm: np.ndarray | None = None) -> np.ndarray:
    """`update_cosine_mean`: mean over steps of cos(delta_k, delta_k-1) between successive
    parameter updates; near -1 the iterate bounces across a valley (even when the loss
    moves monotonically), near +1 it moves steadily in one direction. A step where either
    update is exactly zero (`update_norm` [T, S], |delta_k|) has no angle: the engines
    record 0 there, which is left out (NaN when no step has one)."""
    cosines = finite(cosines)
    if update_norm is not None and update_norm.shape == cosines.shape:
        zero = update_norm == 0
        zero[:, 1:] |= zero[:, :-1]  # delta_k-1 is zero too
        cosines = np.where(zero, np.nan, cosines)
    return nan_reduce(np.nanmean, cosines)


def final_activation_stats(dead: np.ndarray, saturated: np.ndarray) -> dict[str, np.ndarray]:
    """Hidden-unit health at the last evaluation, on a fixed probe batch (the first 256
    training examples):

    - `dead_relu_fraction`: share of hidden units whose pre-activation is <= 0 on every
      probe example (they pass no gradient; relu-family activations, NaN for others);
    - `saturation_fraction`: share of (example, unit) pre-activations in the flat tails of
      sigmoid (|z| > 4.6, output within 0.01 of 0 or 1) or tanh (|z| > 2.65, |output| >
      0.99); NaN for other activations.
    """
    return {"dead_relu_fraction": last_valid(finite(dead)),
            "saturation_fraction": last_valid(finite(saturated))}
