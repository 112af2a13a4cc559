"""`Trace`: everything one trial recorded, the record every engine returns and every metric
reads (engines write it, `study.metrics` reads it; it depends on neither)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

# The per-step records, in the order an engine's record buffer holds them; the last five
# exist only for steps that were applied (an update was made).
STEP_FIELDS = ("step_loss", "grad_norm", "grad_norm_first", "grad_norm_last", "param_norm",
               "update_norm", "update_cosine")
# The records of each evaluation of the full splits, and of its probe batch.
EVAL_FIELDS = ("train_loss", "val_loss", "train_acc", "val_acc", "dead_fraction",
               "saturation_fraction")


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
    optimizer's state defines after `diag_step[i]` updates (`batched_optimizers.preconditioner`,
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
