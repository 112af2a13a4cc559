"""The records of a population: preallocated [steps, field, trial] device tensors, written in
place during training and cut into one `Trace` per trial at the end."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from study.trace import EVAL_FIELDS, STEP_FIELDS, Trace
from study.trial import TrialSpec

Tensor = torch.Tensor
LOSS, GRAD_NORM = STEP_FIELDS.index("step_loss"), STEP_FIELDS.index("grad_norm")
TRAIN_LOSS, VAL_LOSS = EVAL_FIELDS.index("train_loss"), EVAL_FIELDS.index("val_loss")
DIAG_FIELDS = ("sharpness", "noise_scale", "precond_sharpness")


class StepRecord(NamedTuple):
    """One step's records by name: views [T] of a [STEP_FIELDS, T] buffer (see `Trace`)."""

    step_loss: Tensor
    grad_norm: Tensor
    grad_norm_first: Tensor
    grad_norm_last: Tensor
    param_norm: Tensor
    update_norm: Tensor
    update_cosine: Tensor


class TraceBuffers:
    """Every record of a population, by original trial index (NaN = not computed: the trace
    is cut before any of those), and which trial each computed row is.

    While the rows are the population's own (`compacted` False) a step writes straight into
    its record tensor; after rows were dropped it writes a [STEP_FIELDS, rows] buffer that
    `commit_step` copies over by id.
    """

    def __init__(self, n: int, planned: int, eval_steps: list[int], diag_steps: list[int],
                 dtype: torch.dtype, device: torch.device) -> None:
        self.planned, self.eval_steps, self.diag_steps = planned, eval_steps, diag_steps
        nan = math.nan
        self.steps = torch.full((planned, len(STEP_FIELDS), n), nan, dtype=dtype,
                                device=device)
        self.evals = torch.full((len(eval_steps), len(EVAL_FIELDS), n), nan,
                                dtype=torch.float64, device=device)
        self.diags = torch.full((len(diag_steps), len(DIAG_FIELDS), n), nan,
                                dtype=torch.float64, device=device)
        self.ids = torch.arange(n, device=device)  # original index of each computed row
        self.id_list = list(range(n))  # the same, on the host
        self.compacted = False  # rows dropped: ids is no longer arange(n)
        self.buffer = self.steps.new_empty(len(STEP_FIELDS), n)
        self.stopped_at: dict[int, int] = {}  # early-stopped trial -> its last step

    def step_buffer(self, step: int) -> Tensor:
        """Where step `step`'s records [STEP_FIELDS, rows] are written."""
        return self.buffer if self.compacted else self.steps[step]

    def commit_step(self, step: int, record: Tensor) -> None:
        if self.compacted:
            self.steps[step].index_copy_(1, self.ids, record)

    def write_eval(self, k: int, record: Tensor) -> None:
        """Evaluation `k`'s records [EVAL_FIELDS, rows]."""
        self.evals[k].index_copy_(1, self.ids, record)

    def write_diagnostics(self, k: int, values: Tensor) -> None:
        """Diagnostics measurement `k`'s values [DIAG_FIELDS, rows]."""
        self.diags[k].index_copy_(1, self.ids, values)

    def validation_losses(self, k: int) -> list[float]:
        """Evaluation `k`'s validation loss of every row, in row order (one sync)."""
        val = self.evals[k, VAL_LOSS].tolist()
        return [val[i] for i in self.id_list]

    def select(self, kept: Tensor, index: list[int]) -> None:
        """Keep the rows `kept` (`index` on the host)."""
        self.ids = self.ids[kept]
        self.id_list = [self.id_list[i] for i in index]
        self.buffer = self.steps.new_empty(len(STEP_FIELDS), len(index))
        self.compacted = True

    def traces(self, trials: Sequence[TrialSpec], irreducible: Sequence[float],
               input_free: Sequence[float], adaptive: Sequence[bool],
               classify: bool) -> list[Trace]:
        """Cut each trial's records at its first non-finite value (as the reference does)."""
        steps = self.steps.to(torch.float64).cpu().numpy().transpose(2, 1, 0)  # [T, F, steps]
        evals = self.evals.cpu().numpy().transpose(2, 1, 0)
        diags = self.diags.cpu().numpy().transpose(2, 1, 0)
        eval_steps = np.asarray(self.eval_steps, dtype=np.int64)
        diag_steps = np.asarray(self.diag_steps, dtype=np.int64)
        out = []
        for t, trial in enumerate(trials):
            if t in self.stopped_at:  # early stopping: alive and finite up to there
                divergence, last = None, self.stopped_at[t]
                n_steps = n_updates = last
            else:
                divergence, n_steps, n_updates = self._cut(steps[t], evals[t], eval_steps)
                last = self.planned if divergence is None else divergence
            n_evals = int(np.searchsorted(eval_steps, last, side="right"))
            n_diags = int(np.searchsorted(diag_steps, last, side="right"))
            s = {name: steps[t, i, :n_steps if i <= GRAD_NORM else n_updates].copy()
                 for i, name in enumerate(STEP_FIELDS)}
            e = {name: evals[t, i, :n_evals].copy() for i, name in enumerate(EVAL_FIELDS)}
            if not classify:
                e["train_acc"] = e["val_acc"] = None
            diag = {}
            if len(diag_steps):
                diag = {"diag_step": diag_steps[:n_diags].copy(),
                        **{name: diags[t, i, :n_diags].copy()
                           for i, name in enumerate(DIAG_FIELDS)}}
                if not (adaptive[t] and trial.diagnostics.sharpness):
                    diag["precond_sharpness"] = None
            out.append(Trace(eval_step=eval_steps[:n_evals].copy(), divergence_step=divergence,
                             planned_steps=self.planned, irreducible_loss=irreducible[t],
                             input_free_loss=input_free[t], **s, **e, **diag))
        return out

    def _cut(self, steps: np.ndarray, evals: np.ndarray, eval_steps: np.ndarray
             ) -> tuple[int | None, int, int]:
        """(divergence step, step entries, update entries) of one trial's records."""
        bad = ~(np.isfinite(steps[LOSS]) & np.isfinite(steps[GRAD_NORM]))
        bad_step = int(np.argmax(bad)) if bad.any() else self.planned + 1
        bad_evals = ~(np.isfinite(evals[TRAIN_LOSS]) & np.isfinite(evals[VAL_LOSS]))
        if bad_evals.any():
            bad_eval = int(eval_steps[np.argmax(bad_evals)])
            if bad_eval <= bad_step:  # an evaluation precedes that step's minibatch
                return bad_eval, bad_eval, bad_eval
        if bad_step <= self.planned:
            return bad_step, bad_step + 1, bad_step
        return None, self.planned, self.planned
