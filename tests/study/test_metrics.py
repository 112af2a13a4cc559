"""Summary metrics on hand-built traces with known answers."""

from __future__ import annotations

import math

import numpy as np

from study.engine.base import Trace
from study.metrics import finite_blowup_step, objective_value, status_of, summarize


def _trace(train_loss, *, val_loss=None, divergence_step=None, floor=0.0, steps=None,
           grad=None) -> Trace:
    train = np.asarray(train_loss, dtype=float)
    n_steps = steps if steps is not None else 10 * (len(train) - 1)
    return Trace(
        step_loss=np.linspace(1, 0.1, n_steps),
        grad_norm=np.asarray(grad if grad is not None else np.full(n_steps, 2.0)),
        eval_step=np.arange(len(train)) * 10,
        train_loss=train,
        val_loss=np.asarray(val_loss if val_loss is not None else train, dtype=float),
        train_acc=None, val_acc=None, divergence_step=divergence_step,
        planned_steps=10 * (len(train) - 1), irreducible_loss=floor,
    )


def test_monotone_decay_converges() -> None:
    row = summarize(_trace([1.0, 0.5, 0.25, 0.1]))
    assert row["status"] == "converged"
    assert row["train_loss_final"] == 0.1 and row["train_loss_best"] == 0.1
    assert math.isnan(row["divergence_step"])
    assert row["grad_norm_max"] == 2.0


def test_nan_at_step_17_is_diverged_at_17_with_capped_final_loss() -> None:
    grad = np.full(18, 1.0)
    grad[17] = np.nan
    trace = _trace([1.0, 0.8, 0.6], steps=18, grad=grad, divergence_step=17)
    row = summarize(trace)
    assert row["status"] == "diverged" and row["divergence_step"] == 17
    assert row["train_loss_final"] == 1.0 == row["val_loss_final"]  # capped at initial
    assert row["train_loss_best"] == 0.6
    assert row["steps"] == 17
    assert objective_value(row, "val_loss_final") == 1.0


def test_finite_billionfold_growth_is_diverged_at_first_of_three_bad_evals() -> None:
    loss = [1.0, 0.5, 20.0, 1e3, 1e6, 1e10]
    assert finite_blowup_step(np.arange(6) * 10, np.array(loss)) == 20
    assert status_of(_trace(loss)) == ("diverged", 20)


def test_transient_spike_that_recovers_is_not_diverged() -> None:
    status, _ = status_of(_trace([1.0, 0.5, 4.0, 30.0, 0.3, 0.1]))
    assert status == "converged"


def test_no_progress_is_judged_on_excess_over_the_floor() -> None:
    # Raw loss falls 1% but the floor is 0.99: excess 0.01 -> 0.0001, converged.
    assert status_of(_trace([1.0, 0.995, 0.9901], floor=0.99))[0] == "converged"
    # Raw loss falls 3% from 1.0 with floor 0: excess barely moves -> no progress.
    assert status_of(_trace([1.0, 0.99, 0.97]))[0] == "no_progress"
