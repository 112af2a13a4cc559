"""Stability thresholds per optimizer, checked on quadratics with torch.optim itself, and
the settled ratio on hand-built sharpness traces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from study.metrics.curvature import Threshold, ratios, stability_threshold
from study.optimizers import SGD, Adam, OptimizerSpec


def _stable_on_quadratic(spec: OptimizerSpec, curvature: float, steps: int = 4000) -> bool:
    x = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = spec.build([x])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curvature * x.square()).sum().backward()
        opt.step()
    return bool(x.abs() < 1)


@pytest.mark.parametrize("spec", [
    SGD(lr=0.1), SGD(lr=0.1, momentum=0.9), SGD(lr=0.1, momentum=0.5, dampening=0.5),
    SGD(lr=0.1, momentum=0.9, nesterov=True),
], ids=["gd", "heavy-ball", "dampened", "nesterov"])
def test_threshold_is_where_torch_optim_turns_unstable_on_a_quadratic(spec) -> None:
    limit = stability_threshold(spec)
    assert not limit.preconditioned
    assert _stable_on_quadratic(spec, 0.98 * limit.value)
    assert not _stable_on_quadratic(spec, 1.02 * limit.value)


def test_adam_threshold_is_38_over_lr_on_the_preconditioned_sharpness() -> None:
    limit = stability_threshold(Adam(lr=0.01))
    assert limit == Threshold(pytest.approx(3800.0), True)


def test_settled_ratio_is_the_median_after_the_first_crossing() -> None:
    # Progressive sharpening to the threshold 10, an overshoot to 16, then hovering at 10.
    curve = np.array([[2.0, 5.0, 9.0, 16.0, 10.5, 9.5, 10.0, 10.2, 9.8]])
    out = ratios(curve, np.array([10.0]))
    assert out["sharpness_ratio_max"][0] == pytest.approx(1.6)
    assert out["sharpness_ratio_settled"][0] == pytest.approx(1.01)  # median of 1.6 ... 0.98
    assert out["sharpness_ratio_final"][0] == pytest.approx(0.98)
    never = ratios(np.array([[1.0, 2.0, 3.0]]), np.array([10.0]))
    assert math.isnan(never["sharpness_ratio_settled"][0])
    assert never["sharpness_ratio_max"][0] == pytest.approx(0.3)
