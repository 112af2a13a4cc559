"""The status of a trial: one word a reader can filter on, by documented rules.

**The judged signal** is the full-split **validation** loss at every evaluation, in the
task's loss and original units (MSE / cross-entropy), whatever the training objective
(Huber, standardized targets, BCE written by hand). Failure modes corrupt the training
split only (outliers, label noise, imbalance, leakage, sorting), so the validation split is
a signal that the corruption does not fake, and the task's noise floor
(`irreducible_loss`) is the right floor for it. Minibatch spikes are read on the training
objective of every step (the optimizer's own dynamics).

Writing L_0 for the initial validation loss (step 0), f for the floor, B for the
input-free loss (the validation loss of the best predictor that ignores the inputs: the
training targets' mean or class frequencies) and E for the end level, the median of the
last `END_FRACTION` of the finite evaluations (at least one), so that in a run of 21 or more
evaluations a single spike at the last one does not decide the status (in a shorter run
the last one or two evaluations decide: with so few, a spike cannot be told from where the
run ended):

1. `diverged`: the engine stopped the trial at a non-finite minibatch loss, gradient norm or
   eval loss (the divergence step is that step); or the run ended blown up: its last
   `DIVERGENCE_EVALS` evaluations (all of them after step 0 when fewer) are above
   `DIVERGENCE_FACTOR` x L_0 (the divergence step is the first evaluation of that final
   streak).
2. `pruned`: a search's pruner stopped the trial (`pruned_step`; README, "Searching"):
   its curves end where the pruner judged it worse than its peers, so they cannot say how
   the run would have ended; its metrics describe the curve up to there.
3. `no_progress`: E - r >= `NO_PROGRESS_FRACTION` x (S - r) with S = min(L_0, B) and
   r = min(f, S): the run ends where it started, above it, or no better than ignoring the
   inputs (a classifier that settles on the class frequencies, whatever its initial loss,
   or a regressor that predicts the mean) learned nothing. r is the floor unless the
   floor lies above the start (pure-noise targets: their floor is exact, log C, or
   estimated on the validation split, and B, estimated from the training split, falls on
   either side of it by chance): then the run must end below its start to make progress.
4. `recovered`: the loss blew up, an evaluation rose above `BLOWUP_FACTOR` x L_0
   (`loss_blowup_max`), and came back down far enough to make progress: a catapult
   (Lewkowycz et al. 2020), not a divergence.
5. `unstable`: at least `UNSTABLE_SPIKES` minibatch-loss spikes (`shape.spikes`), or at
   least `UNSTABLE_RISES` evaluations whose validation loss rose by more than 10% over the
   previous evaluation and by more than 2% of the initial excess L_0 - f
   (`shape.eval_rises`).
6. `slow`: still far from the floor (E - f > `SLOW_FAR` x (L_0 - f)) and still clearly
   descending: the last quarter of the evaluations brought more than `SLOW_DESCENT` of
   the run's whole decrease L_0 - E (a curve that has flattened out brings almost none).
7. `converged`: otherwise (settled: near the floor, or no longer improving).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from study.metrics.arrays import finite

DIVERGENCE_FACTOR = 10.0
DIVERGENCE_EVALS = 3
BLOWUP_FACTOR = 2.0
END_FRACTION = 0.1
NO_PROGRESS_FRACTION = 0.95
UNSTABLE_SPIKES = 2
UNSTABLE_RISES = 2
SLOW_FAR = 0.25
SLOW_DESCENT = 0.1
STATUSES = ("converged", "slow", "unstable", "recovered", "no_progress", "diverged", "pruned")


@dataclass(frozen=True)
class Verdict:
    """[T] arrays: the status, the divergence step (NaN unless diverged), the end level E
    and the largest evaluation loss over the initial one (`loss_blowup_max`)."""

    status: np.ndarray
    divergence_step: np.ndarray
    end_level: np.ndarray
    blowup_max: np.ndarray


def end_level(loss: np.ndarray) -> np.ndarray:
    """[T] median of the last `END_FRACTION` (at least one) of each row's finite values."""
    loss = np.atleast_2d(finite(loss))
    out = np.full(len(loss), np.nan)
    for i, row in enumerate(loss):
        values = row[~np.isnan(row)]
        if len(values):
            out[i] = np.median(values[-max(1, math.ceil(END_FRACTION * len(values))):])
    return out


def blowup_max(loss: np.ndarray) -> np.ndarray:
    """[T] largest finite evaluation loss / the initial one (>= 1; NaN without a finite
    positive initial loss)."""
    loss = np.atleast_2d(finite(loss))
    initial = loss[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        peak = np.where(np.isnan(loss).all(axis=1), np.nan,
                        np.nanmax(np.where(np.isnan(loss), -np.inf, loss), axis=1))
        return np.where(initial > 0, peak / initial, np.nan)


def final_blowup_step(eval_step: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """[T] the step of the first evaluation of the final streak above `DIVERGENCE_FACTOR` x
    the initial loss, when that streak holds the last `DIVERGENCE_EVALS` evaluations (all of
    them after step 0 when fewer); NaN where the run did not end blown up.

    Only finite losses count (non-finite ones are the engine's divergence)."""
    loss = np.atleast_2d(finite(loss))
    eval_step = np.atleast_2d(eval_step)
    out = np.full(len(loss), np.nan)
    for i, row in enumerate(loss):
        valid = ~np.isnan(row)
        values, steps = row[valid], eval_step[i][valid]
        if len(values) < 2 or not values[0] > 0:
            continue
        above = values > DIVERGENCE_FACTOR * values[0]
        need = min(DIVERGENCE_EVALS, len(values) - 1)
        if not above[-need:].all():
            continue
        start = len(above) - int(np.argmin(above[::-1])) if not above.all() else 0
        out[i] = steps[start]
    return out


def classify(*, engine_divergence: np.ndarray, eval_step: np.ndarray, loss: np.ndarray,
             floor: np.ndarray, spike_count: np.ndarray, eval_rises: np.ndarray,
             input_free: np.ndarray | float = np.nan,
             pruned: np.ndarray | bool = False) -> Verdict:
    """The module's rules applied to T trials.

    `loss` [T, E]: the judged signal (validation loss at each evaluation, NaN-padded);
    `engine_divergence` [T]: the step at which the engine stopped each trial (NaN if it ran
    to the end); `input_free` [T]: B (NaN: unknown, only L_0 counts); `pruned` [T]: the
    trials a search's pruner stopped."""
    loss = finite(np.atleast_2d(loss))
    blowup_step = final_blowup_step(eval_step, loss)
    divergence = np.where(np.isnan(engine_divergence), blowup_step, engine_divergence)
    initial = loss[:, 0]
    end = end_level(loss)
    peak = blowup_max(loss)
    n_evals = (~np.isnan(loss)).sum(axis=1)
    quarter = np.maximum(0, np.floor(0.75 * (n_evals - 1))).astype(int)
    at_quarter = loss[np.arange(len(loss)), quarter]
    with np.errstate(invalid="ignore"):
        excess_initial = initial - floor
        excess_end = end - floor
        start = np.fmin(initial, input_free)  # fmin: an unknown B leaves L_0
        # A floor above the start (an estimate, on a finite validation split) cannot be
        # reached for: the run is judged against its start alone.
        reach = np.fmin(floor, start)
        no_progress = ~(end - reach < NO_PROGRESS_FRACTION * (start - reach))
        recovered = peak > BLOWUP_FACTOR
        unstable = (spike_count >= UNSTABLE_SPIKES) | (eval_rises >= UNSTABLE_RISES)
        slow = (excess_end > SLOW_FAR * excess_initial) & (end < initial) & (
            at_quarter - end > SLOW_DESCENT * (initial - end))
    status = np.select(
        [~np.isnan(divergence), np.broadcast_to(pruned, divergence.shape), no_progress,
         recovered, unstable, slow],
        ["diverged", "pruned", "no_progress", "recovered", "unstable", "slow"],
        default="converged",
    )
    return Verdict(status=status, divergence_step=divergence, end_level=end, blowup_max=peak)
