"""Curvature against each optimizer's stability threshold (edge of stability).

On a quadratic with curvature lambda, an optimizer with learning rate lr is stable only
while lambda stays below a threshold that depends on the optimizer:

- gradient descent: 2 / lr;
- heavy-ball momentum beta (torch's SGD, dampening d): (2 + 2 beta) / ((1 - d) lr);
- Nesterov momentum beta: (2 + 2 beta) / ((1 + 2 beta) lr);
- adaptive methods read the **preconditioned** curvature lambda_max(P^-1 H), with P the
  diagonal preconditioner of the step (Cohen et al. 2022, "Adaptive gradient methods at the
  edge of stability"): Adam / AdamW with beta1, (2 + 2 beta1) / ((1 - beta1) lr) (38 / lr
  at beta1 = 0.9); RMSprop with momentum mu, (2 + 2 mu) / lr; Adagrad, 2 / lr.

Full-batch training sharpens until the curvature reaches the threshold and then hovers
there (Cohen et al. 2021): the ratio curvature / threshold rises to 1 and stays near it.
`ratios` reports where it settles (the median after the first crossing) beside its maximum,
which overshoots. Weight decay adds its coefficient to the curvature the optimizer sees;
the measured sharpness is the loss's alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from study.metrics.arrays import finite, last_valid, nan_median, nan_reduce
from study.optimizers import SGD, Adagrad, Adam, OptimizerSpec, RMSprop


@dataclass(frozen=True)
class Threshold:
    """The curvature an optimizer tolerates, and whether it applies to the preconditioned
    sharpness (adaptive optimizers) or the plain Hessian's."""

    value: float
    preconditioned: bool


def stability_threshold(spec: OptimizerSpec) -> Threshold:
    """The module's threshold for `spec` (NaN for a centered RMSprop: no closed form)."""
    lr = spec.lr
    if isinstance(spec, SGD):
        beta = spec.momentum
        if spec.nesterov:
            return Threshold((2 + 2 * beta) / ((1 + 2 * beta) * lr), False)
        step = lr * (1 - spec.dampening) if beta > 0 else lr
        return Threshold((2 + 2 * beta) / step if step > 0 else math.inf, False)
    if isinstance(spec, Adam):
        beta1 = spec.betas[0]
        return Threshold((2 + 2 * beta1) / ((1 - beta1) * lr), True)
    if isinstance(spec, RMSprop):
        value = math.nan if spec.centered else (2 + 2 * spec.momentum) / lr
        return Threshold(value, True)
    if isinstance(spec, Adagrad):
        return Threshold(2 / lr, True)
    return Threshold(math.nan, False)


def ratios(curvature: np.ndarray, threshold: np.ndarray) -> dict[str, np.ndarray]:
    """[T] `sharpness_ratio_max`, `sharpness_ratio_settled` (median of curvature / threshold
    over the measurements from the first one at or above 1 on; NaN if it never reached 1)
    and `sharpness_ratio_final`, from curvature [T, M] (NaN-padded) and threshold [T]."""
    ratio = finite(curvature) / np.asarray(threshold, dtype=float)[:, None]
    with np.errstate(invalid="ignore"):
        crossed = np.fmax.accumulate(np.where(np.isnan(ratio), -np.inf, ratio), axis=1) >= 1
    after = np.where(crossed, ratio, np.nan)
    return {"sharpness_ratio_max": nan_reduce(np.nanmax, ratio),
            "sharpness_ratio_settled": nan_median(after),
            "sharpness_ratio_final": last_valid(ratio)}
