"""The engine contract: `Trace` (what a trial recorded) and `Engine` (who trains)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch

from study.trial import TrialSpec


@dataclass(frozen=True)
class Trace:
    """Everything one trial recorded, float64 numpy arrays on the CPU.

    Step k is the k-th update (0-based): `step_loss[k]` is the minibatch loss and
    `grad_norm[k]` the global L2 norm of the gradient at the parameters after k updates,
    before update k is applied. Evaluations of the full splits ran after `eval_step[i]`
    updates (0 = the initialization). `train_acc` / `val_acc` are None for regression.

    Optional step records (None when an engine does not record them): `grad_norm_first` /
    `grad_norm_last` = Frobenius norm of the gradient of the first / last weight matrix,
    `param_norm[k]` = |theta_k|, `update_norm[k]` = |theta_k+1 - theta_k| and
    `update_cosine[k]` = cos(theta_k+1 - theta_k, theta_k - theta_k-1) (NaN at k = 0);
    they stop one entry short of `step_loss` when the last step diverged (no update).
    Optional eval records on a fixed probe batch (the first 256 training examples):
    `dead_fraction` (share of hidden units with pre-activation <= 0 on every probe example,
    relu-family activations only) and `saturation_fraction` (share of hidden pre-activations
    in the flat tails of sigmoid, |z| > 4.6, or tanh, |z| > 2.65); NaN where undefined.

    Opt-in diagnostics (`TrialSpec.diagnostics`): `sharpness[i]` and `noise_scale[i]` after
    `diag_step[i]` updates (NaN for the one not asked for); None when none was asked for.
    `precond_sharpness[i]`: with sharpness asked for and an adaptive optimizer (Adam, AdamW,
    RMSprop, Adagrad), the top eigenvalue of P^-1 H, P the diagonal preconditioner that the
    optimizer's state defines after `diag_step[i]` updates (`study.optim.preconditioner`,
    the threshold it meets: `study.metrics.curvature`); NaN at step 0 (no update yet) and
    where the parameters are not finite; None otherwise.

    A trial stops at the first non-finite minibatch loss, gradient norm or eval loss:
    `divergence_step` is that step (the non-finite value is the last entry recorded), and
    None when the trial ran all `planned_steps`.
    """

    step_loss: np.ndarray
    grad_norm: np.ndarray
    eval_step: np.ndarray
    train_loss: np.ndarray
    val_loss: np.ndarray
    train_acc: np.ndarray | None
    val_acc: np.ndarray | None
    divergence_step: int | None
    planned_steps: int
    irreducible_loss: float
    input_free_loss: float = math.nan  # Dataset.input_free_loss of the data it trained on
    grad_norm_first: np.ndarray | None = None
    grad_norm_last: np.ndarray | None = None
    param_norm: np.ndarray | None = None
    update_norm: np.ndarray | None = None
    update_cosine: np.ndarray | None = None
    dead_fraction: np.ndarray | None = None
    saturation_fraction: np.ndarray | None = None
    diag_step: np.ndarray | None = None
    sharpness: np.ndarray | None = None
    noise_scale: np.ndarray | None = None
    precond_sharpness: np.ndarray | None = None

    def equal(self, other: Trace) -> bool:
        """Bit-identical (NaN equal to NaN)."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if a is None or b is None or not np.array_equal(a, b, equal_nan=True):
                    return False
            elif a != b and not (isinstance(a, float) and isinstance(b, float)
                                 and math.isnan(a) and math.isnan(b)):
                return False
        return True


# Called after every evaluation with the validation loss of each trial still training (by
# its index in the `trials` given to `Engine.run`); returns the indices to stop there.
OnEval = Callable[[int, dict[int, float]], Iterable[int]]


class Engine(Protocol):
    """Trains a population: `run(trials, device)` returns one Trace per trial, in order.

    `run(..., on_eval=hook)` calls `hook(step, {index: validation loss})` after every
    evaluation; the trials it names stop there, as early stopping stops them (their traces
    end at that evaluation, not diverged). A pruner decides through it.

    Contract: a trial's trace depends only on its own spec (never on the other trials in
    `trials`), divergence is recorded and never raised, and trials may share nothing but
    structure (see `population_key`).
    """

    name: str

    def run(self, trials: Sequence[TrialSpec], device: torch.device,
            on_eval: OnEval | None = None) -> list[Trace]: ...


def population_key(trial: TrialSpec) -> tuple:
    """Trials with equal keys share structure and may train as one batched computation.

    Structure = task (whole spec: same data shapes and loss), model shape, activation and
    dropout, training schedule and dtype, and the loop (training loss,
    zero_grad, shuffling, whether gradients are clipped, the learning-rate schedule, early
    stopping). Trials of different optimizer families share the forward and backward pass
    and differ only in their update (`study.optim.MixedOptimizer`). Numbers that differ
    within a population: learning rate and every other optimizer hyperparameter, init scheme
    and scale, clipping threshold, seeds, and the data
    (failure modes and mitigations that transform the data keep its shapes: each trial
    trains on its own draw).
    """
    model = trial.model
    return (
        trial.task,
        (model.depth, model.width, model.activation, model.dropout, model.dropout_at_eval),
        trial.train,
        trial.diagnostics,
        trial.loop.structure(),
    )
