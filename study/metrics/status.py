"""The status of a trial: one word a reader can filter on, by documented rules.

Judged on the full-split train loss in excess of the task's irreducible loss (its noise
floor), so a run that drops only 1% because noise dominates can be `converged`. The first
rule that applies wins:

1. `diverged`: the engine stopped the trial at a non-finite minibatch loss, gradient norm or
   eval loss; or the loss exceeded `DIVERGENCE_FACTOR` x max(initial, best so far) for
   `DIVERGENCE_EVALS` consecutive evals (a finite blow-up; its step is the first such eval).
   A transient spike of a few times the initial loss that recovers is not divergence.
2. `no_progress`: final excess >= `NO_PROGRESS_FRACTION` x initial excess.
3. `unstable`: at least `UNSTABLE_SPIKES` minibatch-loss spikes (`shape.spikes`), or at least
   `UNSTABLE_RISES` evals whose loss rose by more than 10% over the previous eval.
4. `slow`: still far from the floor (final excess > `SLOW_FAR` x initial excess) and still
   clearly descending: the last quarter of the evals brought more than `SLOW_DESCENT` of
   the run's whole decrease (a curve that has flattened out brings almost none).
5. `converged`: otherwise (settled: near the floor, or no longer improving).
"""

from __future__ import annotations

import numpy as np

from study.metrics.arrays import finite, last_valid

DIVERGENCE_FACTOR = 10.0
DIVERGENCE_EVALS = 3
NO_PROGRESS_FRACTION = 0.95
UNSTABLE_SPIKES = 2
UNSTABLE_RISES = 2
SLOW_FAR = 0.25
SLOW_DESCENT = 0.1
STATUSES = ("converged", "slow", "unstable", "no_progress", "diverged")


def finite_blowup_step(eval_step: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """[T] first eval step of `DIVERGENCE_EVALS` consecutive evals whose loss exceeds
    `DIVERGENCE_FACTOR` x max(initial, best so far); NaN where there is none.

    Only finite losses count (non-finite ones are the engine's divergence)."""
    loss = np.atleast_2d(finite(loss))
    eval_step = np.atleast_2d(eval_step)
    best = np.fmin.accumulate(np.where(np.isnan(loss), np.inf, loss), axis=1)
    limit = DIVERGENCE_FACTOR * np.maximum(loss[:, :1], best)
    with np.errstate(invalid="ignore"):
        bad = loss > limit
    n = bad.shape[1] - DIVERGENCE_EVALS + 1
    if n <= 0:
        return np.full(len(loss), np.nan)
    run = np.ones((len(loss), n), bool)
    for offset in range(DIVERGENCE_EVALS):
        run &= bad[:, offset:offset + n]
    first = np.argmax(run, axis=1)
    steps = eval_step[np.arange(len(loss)), first].astype(float)
    return np.where(run.any(axis=1), steps, np.nan)


def classify(*, engine_divergence: np.ndarray, eval_step: np.ndarray, train_loss: np.ndarray,
             floor: np.ndarray, spike_count: np.ndarray, eval_rises: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """([T] status strings, [T] divergence step or NaN) by the module's rules.

    `engine_divergence` is the step at which the engine stopped each trial (NaN if it ran
    to the end)."""
    blowup = finite_blowup_step(eval_step, train_loss)
    divergence = np.where(np.isnan(engine_divergence), blowup, engine_divergence)
    loss = finite(train_loss)
    excess_initial = loss[:, 0] - floor
    final = last_valid(loss)
    excess_final = final - floor
    n_evals = (~np.isnan(loss)).sum(axis=1)
    quarter = np.maximum(0, np.floor(0.75 * (n_evals - 1))).astype(int)
    at_quarter = loss[np.arange(len(loss)), quarter]
    with np.errstate(invalid="ignore"):
        no_progress = excess_final >= NO_PROGRESS_FRACTION * excess_initial
        unstable = (spike_count >= UNSTABLE_SPIKES) | (eval_rises >= UNSTABLE_RISES)
        slow = (excess_final > SLOW_FAR * excess_initial) & (final < loss[:, 0]) & (
            at_quarter - final > SLOW_DESCENT * (loss[:, 0] - final))
    status = np.select(
        [~np.isnan(divergence), no_progress, unstable, slow],
        ["diverged", "no_progress", "unstable", "slow"], default="converged",
    )
    return status, divergence
