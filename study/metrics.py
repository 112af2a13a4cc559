"""Summary metrics of one trial, computed from its `Trace` (pure functions, no I/O).

Definitions (units are the task's loss units unless said otherwise; "eval" = a full-split
evaluation, see `Trace`):

- `train_loss_initial`, `val_loss_initial`: loss of the initialization (eval at step 0).
- `train_loss_final`, `val_loss_final`: loss at the last eval. For a `diverged` trial the
  final loss is capped at the initial loss (a diverged run is no better than doing nothing,
  and NaN/inf never enters a table); the status says it diverged.
- `train_loss_best`, `val_loss_best`: minimum over the finite evals.
- `train_acc_final`, `val_acc_final`: accuracy (fraction in [0, 1]) at the last finite eval;
  NaN for regression tasks.
- `grad_norm_max`: largest finite minibatch gradient norm (global L2 over all parameters).
- `divergence_step`: the update index at which the trial diverged (see `status`); NaN if not.
- `steps`: updates applied; `planned_steps`: updates the budget allowed.
- `irreducible_loss`: the task's loss floor (noise variance / Bayes cross-entropy).
- `status`, judged on the train loss in excess of the floor, first rule that applies:
  1. `diverged`: a non-finite minibatch loss, gradient norm or eval loss (the engine stopped
     the trial there), or a train loss above `DIVERGENCE_FACTOR` x max(initial, best) for
     `DIVERGENCE_EVALS` consecutive evals (a finite blow-up; the step is the first such eval);
  2. `no_progress`: final excess >= `NO_PROGRESS_FRACTION` x initial excess;
  3. `converged`: otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from study.engine.base import Trace

DIVERGENCE_FACTOR = 10.0
DIVERGENCE_EVALS = 3
NO_PROGRESS_FRACTION = 0.95
STATUSES = ("converged", "no_progress", "diverged")

SUMMARY_METRICS = (
    "train_loss_initial", "train_loss_final", "train_loss_best",
    "val_loss_initial", "val_loss_final", "val_loss_best",
    "train_acc_final", "val_acc_final",
    "grad_norm_max", "divergence_step", "steps", "planned_steps", "irreducible_loss",
)


def finite_blowup_step(eval_step: np.ndarray, loss: np.ndarray) -> int | None:
    """First eval step of a run of `DIVERGENCE_EVALS` consecutive evals whose loss exceeds
    `DIVERGENCE_FACTOR` x max(initial, best-so-far); None if there is none."""
    run = 0
    best = math.inf
    initial = float(loss[0]) if len(loss) else math.nan
    for i, value in enumerate(loss):
        value = float(value)
        if not math.isfinite(value):
            return None  # non-finite losses are the engine's divergence, not a blow-up
        best = min(best, value)
        if value > DIVERGENCE_FACTOR * max(initial, best):
            run += 1
            if run == DIVERGENCE_EVALS:
                return int(eval_step[i - DIVERGENCE_EVALS + 1])
        else:
            run = 0
    return None


def status_of(trace: Trace) -> tuple[str, int | None]:
    """(status, divergence step) by the rules in the module docstring."""
    if trace.divergence_step is not None:
        return "diverged", trace.divergence_step
    blowup = finite_blowup_step(trace.eval_step, trace.train_loss)
    if blowup is not None:
        return "diverged", blowup
    floor = trace.irreducible_loss
    excess_initial = trace.train_loss[0] - floor
    excess_final = trace.train_loss[-1] - floor
    if excess_final >= NO_PROGRESS_FRACTION * excess_initial:
        return "no_progress", None
    return "converged", None


def _finite(values: np.ndarray | None) -> np.ndarray:
    if values is None:
        return np.array([])
    return values[np.isfinite(values)]


def summarize(trace: Trace) -> dict[str, Any]:
    """Every summary metric of the module docstring plus `status`; never NaN for losses."""
    status, divergence_step = status_of(trace)
    diverged = status == "diverged"
    row: dict[str, Any] = {"status": status}
    for split in ("train", "val"):
        loss = getattr(trace, f"{split}_loss")
        finite = _finite(loss)
        initial = float(loss[0]) if math.isfinite(loss[0]) else math.nan
        row[f"{split}_loss_initial"] = initial
        row[f"{split}_loss_final"] = initial if diverged else float(loss[-1])
        row[f"{split}_loss_best"] = float(finite.min()) if len(finite) else initial
        acc = _finite(getattr(trace, f"{split}_acc"))
        row[f"{split}_acc_final"] = float(acc[-1]) if len(acc) else math.nan
    grads = _finite(trace.grad_norm)
    row["grad_norm_max"] = float(grads.max()) if len(grads) else math.nan
    row["divergence_step"] = math.nan if divergence_step is None else float(divergence_step)
    row["steps"] = int(len(trace.step_loss) - (1 if trace.divergence_step is not None
                                               and len(trace.step_loss) > trace.divergence_step
                                               else 0))
    row["planned_steps"] = int(trace.planned_steps)
    row["irreducible_loss"] = float(trace.irreducible_loss)
    return row


def objective_value(summary: dict[str, Any], metric: str) -> float:
    """The finite value told to Optuna: `summary[metric]`, which `summarize` keeps finite for
    losses (diverged trials are capped at their initial loss)."""
    value = summary[metric]
    if value is None or not math.isfinite(value):
        raise ValueError(f"objective metric {metric!r} is not finite for this trial: {value!r}")
    return float(value)
