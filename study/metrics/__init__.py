"""Per-trial stability metrics, computed from traces by pure, vectorized functions.

`summarize_many(traces)` returns one dict per trace with `status` and every name in
`SUMMARY_METRICS`. Definitions live in the docstrings of the functions that compute them
(`status` rules in `study.metrics.status`; curve shape in `shape`; gradients, updates and
activations in `gradients`); units are the task's loss units unless said otherwise. NaN
means "undefined for this trial" (e.g. accuracy of a regression task), never "diverged".

Losses:
- `train_loss_initial`, `val_loss_initial`: loss of the initialization (eval at step 0).
- `train_loss_final`, `val_loss_final`: loss at the last eval, as measured; +inf when the
  engine stopped the trial at a non-finite value (its loss did not stay finite to the end).
  Never capped: capping belongs to the objective told to Optuna (`objective_value`).
- `val_loss_end`: the end level the status is judged on (`status.end_level`: the median
  of the last 10% of the finite validation evals, at least one).
- `loss_blowup_max`: the largest finite validation eval / the initial one (>= 1): how far
  the run blew up, whether or not it came back (`status.blowup_max`).
- `train_loss_best`, `val_loss_best`: minimum over the finite evals.
- `train_acc_final`, `val_acc_final`: accuracy in [0, 1] at the last eval whose loss (of
  that split) is finite; NaN when none is.
- `gen_gap`: val_loss_final - train_loss_final (generalization gap).
- `irreducible_loss`: the task's noise floor, which holds for the validation split (failure
  modes corrupt the training split only); `excess_loss_final`: val_loss_final - floor.
- `input_free_loss`: the validation loss of the best predictor that ignores the inputs
  (training targets' mean / class frequencies, `Dataset.input_free_loss`).
- `divergence_step` (update index, NaN if not diverged); `steps` (updates applied);
  `planned_steps`.

Opt-in diagnostics (NaN unless the trial recorded them, see `study.engine.landscape`;
`sharpness_threshold`, a property of the optimizer, is every trial's):
- `sharpness_final`, `sharpness_max`: top Hessian eigenvalue of the full-batch training
  loss at the last measurement / its maximum over the run (loss units per parameter^2).
- `precond_sharpness_final`, `precond_sharpness_max`: the same for the preconditioned
  Hessian P^-1 H of an adaptive optimizer (NaN for the others).
- `sharpness_threshold`: the curvature the trial's optimizer tolerates
  (`curvature.stability_threshold`: 2 / lr for gradient descent, (2 + 2 beta) / lr for
  heavy-ball momentum, 38 / lr for Adam's preconditioned sharpness at beta1 = 0.9, ...).
- `sharpness_ratio_max`, `sharpness_ratio_settled`, `sharpness_ratio_final`: the curvature
  that threshold applies to (preconditioned for adaptive optimizers), divided by it: its
  maximum, its median from the first measurement at or above 1 on (where a run at the
  edge of stability settles; NaN if it never reached 1), and its last value.
- `noise_scale_final`: gradient noise scale B_simple = tr(Sigma) / |G|^2 at the last
  measurement (in examples: the batch size above which larger batches stop helping much).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from study.metrics import curvature, gradients, shape
from study.metrics.arrays import TraceArrays, finite, last_valid, nan_reduce, pad
from study.metrics.status import STATUSES, classify, final_blowup_step
from study.trace import Trace

SUMMARY_METRICS = (
    "train_loss_initial", "train_loss_final", "train_loss_best",
    "val_loss_initial", "val_loss_final", "val_loss_best", "val_loss_end", "loss_blowup_max",
    "train_acc_final", "val_acc_final", "gen_gap", "excess_loss_final",
    "divergence_step", "steps", "planned_steps", "irreducible_loss", "input_free_loss",
    "steps_to_50pct", "steps_to_90pct", "plateau_steps",
    "osc_tv_ratio", "up_step_fraction", "loss_diff_autocorr", "update_cosine_mean",
    "spike_count", "spike_max_ratio", "eval_rise_count",
    "grad_norm_median", "grad_norm_max", "grad_norm_final", "grad_norm_growth",
    "layer_grad_ratio_log10", "update_param_ratio",
    "dead_relu_fraction", "saturation_fraction",
    "sharpness_final", "sharpness_max", "precond_sharpness_final", "precond_sharpness_max",
    "sharpness_threshold", "sharpness_ratio_max", "sharpness_ratio_settled",
    "sharpness_ratio_final", "noise_scale_final",
)

__all__ = ["STATUSES", "SUMMARY_METRICS", "final_blowup_step", "objective_value",
           "summarize", "summarize_many"]


def summarize_many(traces: Sequence[Trace],
                   thresholds: Sequence[curvature.Threshold] | None = None,
                   pruned: Sequence[bool] | None = None) -> list[dict[str, Any]]:
    """`status` and every metric of `SUMMARY_METRICS` for each trace (vectorized).

    `thresholds` (one per trace, `curvature.stability_threshold` of its optimizer) is only
    needed for the `sharpness_ratio_*` columns; `pruned` (one per trace) marks the traces a
    search's pruner stopped (status `pruned` unless they diverged first)."""
    if not traces:
        return []
    a = TraceArrays.stack(traces)
    t = len(traces)
    engine_div = np.array([np.nan if tr.divergence_step is None else tr.divergence_step
                           for tr in traces], dtype=float)
    spikes = shape.spikes(a.step_loss)
    rises = shape.eval_rises(a.val_loss, a.irreducible_loss)
    verdict = classify(engine_divergence=engine_div, eval_step=a.eval_step, loss=a.val_loss,
                       floor=a.irreducible_loss, input_free=a.input_free_loss,
                       spike_count=np.nan_to_num(spikes["spike_count"]), eval_rises=rises,
                       pruned=np.zeros(t, bool) if pruned is None else np.asarray(pruned, bool))
    cols = _loss_columns(a, stopped=~np.isnan(engine_div), verdict=verdict)
    cols["steps"] = np.array([_updates(tr) for tr in traces], dtype=float)
    cols["planned_steps"] = np.array([tr.planned_steps for tr in traces], dtype=float)
    cols["irreducible_loss"] = a.irreducible_loss
    cols["input_free_loss"] = a.input_free_loss
    cols["steps_to_50pct"] = shape.steps_to_fraction(a.eval_step, a.train_loss, 0.5)
    cols["steps_to_90pct"] = shape.steps_to_fraction(a.eval_step, a.train_loss, 0.9)
    cols["plateau_steps"] = shape.plateau_steps(a.eval_step, a.train_loss)
    cols.update(shape.oscillation(a.step_loss))
    cols["update_cosine_mean"] = gradients.update_cosine(a.update_cosine, a.update_norm)
    cols.update(spikes)
    cols["eval_rise_count"] = rises
    cols.update(gradients.gradient_norms(a.grad_norm))
    cols["layer_grad_ratio_log10"] = gradients.layer_ratio(a.grad_norm_first,
                                                           a.grad_norm_last)
    cols["update_param_ratio"] = gradients.update_ratio(a.update_norm, a.param_norm)
    cols.update(gradients.final_activation_stats(a.dead_fraction, a.saturation_fraction))
    cols.update(_diagnostic_columns(traces, thresholds))
    rows = []
    for i in range(t):
        row: dict[str, Any] = {"status": str(verdict.status[i])}
        for name in SUMMARY_METRICS:
            value = float(cols[name][i])
            row[name] = int(value) if name in _INTEGER and math.isfinite(value) else value
        rows.append(row)
    return rows


def _loss_columns(a: TraceArrays, stopped: np.ndarray, verdict) -> dict[str, np.ndarray]:
    """The loss and accuracy levels of `summarize_many` (a stopped trial's final loss: inf)."""
    cols: dict[str, np.ndarray] = {}
    for split in ("train", "val"):
        loss = getattr(a, f"{split}_loss")
        initial = np.where(np.isfinite(loss[:, 0]), loss[:, 0], np.inf)
        cols[f"{split}_loss_initial"] = initial
        cols[f"{split}_loss_final"] = np.where(stopped, np.inf, last_valid(loss))
        best = nan_reduce(np.nanmin, finite(loss))
        cols[f"{split}_loss_best"] = np.where(np.isnan(best), initial, best)
        # An accuracy is always a number, also of NaN logits: only an eval whose loss is
        # finite measured one.
        acc = np.where(np.isfinite(loss), finite(getattr(a, f"{split}_acc")), np.nan)
        cols[f"{split}_acc_final"] = last_valid(acc)
    cols["val_loss_end"] = np.where(stopped, np.inf, verdict.end_level)
    cols["loss_blowup_max"] = verdict.blowup_max
    with np.errstate(invalid="ignore"):
        cols["gen_gap"] = cols["val_loss_final"] - cols["train_loss_final"]
    cols["excess_loss_final"] = cols["val_loss_final"] - a.irreducible_loss
    cols["divergence_step"] = verdict.divergence_step
    return cols


def _diagnostic_columns(traces: Sequence[Trace],
                        thresholds: Sequence[curvature.Threshold] | None
                        ) -> dict[str, np.ndarray]:
    """The opt-in diagnostics of `summarize_many`: sharpness (plain and preconditioned), its
    ratio to the optimizer's threshold, and the gradient noise scale."""
    cols: dict[str, np.ndarray] = {}
    sharp = finite(pad([tr.sharpness for tr in traces]))
    cols["sharpness_final"] = last_valid(sharp)
    cols["sharpness_max"] = nan_reduce(np.nanmax, sharp)
    precond = finite(pad([tr.precond_sharpness for tr in traces], sharp.shape[1]))
    cols["precond_sharpness_final"] = last_valid(precond)
    cols["precond_sharpness_max"] = nan_reduce(np.nanmax, precond)
    limits = thresholds or [curvature.Threshold(np.nan, False)] * len(traces)
    cols["sharpness_threshold"] = np.array([lim.value for lim in limits], dtype=float)
    uses = np.array([lim.preconditioned for lim in limits], dtype=bool)
    cols.update(curvature.ratios(np.where(uses[:, None], precond, sharp),
                                 cols["sharpness_threshold"]))
    cols["noise_scale_final"] = last_valid(finite(pad([tr.noise_scale for tr in traces])))
    return cols


_INTEGER = {"steps", "planned_steps"}


def summarize(trace: Trace) -> dict[str, Any]:
    """`summarize_many` for one trace."""
    return summarize_many([trace])[0]


def _updates(trace: Trace) -> int:
    """Updates applied: a trial stopped at a non-finite minibatch step k applied k."""
    n = len(trace.step_loss)
    stopped_in_step = trace.divergence_step is not None and n > trace.divergence_step
    return n - 1 if stopped_in_step else n


def objective_value(summary: dict[str, Any], metric: str, direction: str = "minimize"
                    ) -> float:
    """The value told to Optuna (the `objective` column): `summary[metric]`, except that

    - for a `diverged` trial, a loss of one split (`{split}_loss_final` / `_end` / `_best`)
      is capped at that split's initial loss: a diverged run is no better than doing
      nothing, and one blow-up must not dominate a sampler's model of the others;
    - a value that is still not finite, or undefined for a diverged trial, is told as the
      worst value for `direction` (+inf when minimizing, which Optuna stores as COMPLETE
      and ranks last).

    The metric columns themselves are never capped. Raises ValueError when the metric is
    undefined (NaN) for a trial that did not diverge."""
    value = summary[metric]
    diverged = summary.get("status") == "diverged"
    worst = math.inf if direction == "minimize" else -math.inf
    if value is None or math.isnan(value):
        if diverged:
            return worst
        raise ValueError(f"objective metric {metric!r} is undefined for this trial")
    split, _, rest = metric.partition("_loss_")
    initial = summary.get(f"{split}_loss_initial", math.nan)
    if diverged and split in ("train", "val") and rest != "initial" and math.isfinite(initial):
        value = min(value, initial)
    return float(value) if math.isfinite(value) else worst
