"""The parameter and optimizer state of a population: the [T, P] parameter rows, the batched
optimizer that updates them (`study.engine.batched_optimizers`, or the CPU's fused update of
`study.engine.fused`), the gradient and update buffers, and the previous update (for the
update cosine)."""

from __future__ import annotations

import math

import numpy as np
import torch

from study.engine.fused import FusedUpdate
from study.engine.network import Network
from study.engine.population_traces import StepRecord

Tensor = torch.Tensor


class ParameterState:
    """Parameter rows, their optimizer and the work buffers shaped like them (selected with
    the rows)."""

    def __init__(self, net: Network, params: Tensor, optimizer, accumulate: bool) -> None:
        self.net, self.params, self.optimizer = net, params, optimizer
        self.fused = isinstance(optimizer, FusedUpdate)
        # zero_grad forgotten: p.grad keeps summing, step after step
        self.accumulated = torch.zeros_like(params) if accumulate else None
        self.previous = torch.empty_like(params)  # the previous update (after a first one)
        self.previous_norm: Tensor | None = None  # |previous update| [T]; None before one
        sizes = net.sizes
        self.offsets = np.cumsum([0] + [n for fi, fo in sizes for n in (fi * fo, fo)])
        self.first_weight = slice(0, sizes[0][0] * sizes[0][1])
        last = net.n_params - sizes[-1][1] - sizes[-1][0] * sizes[-1][1]
        self.last_weight = slice(last, last + sizes[-1][0] * sizes[-1][1])
        self.allocate()

    def allocate(self) -> None:
        """Work buffers shaped like the parameter rows (again after rows were dropped)."""
        self.views: dict[tuple, list] = {}
        self.grad = torch.empty_like(self.params)
        if not self.fused:  # the eager update's next params and update
            self.spare, self.update = torch.empty_like(self.params), torch.empty_like(self.params)
        else:  # the fused update's gradient: self.grad's memory as per-layer [T, n] blocks
            self.blocks = self.net.part_views(self.grad.view(-1), len(self.params))

    def layers(self, flat: Tensor) -> list:
        """`Network.layers` of a parameter buffer, kept while the buffer lives."""
        key = (flat.data_ptr(), tuple(flat.shape))
        if key not in self.views:
            self.views[key] = self.net.layers(flat)
        return self.views[key]

    def fused_step(self, saved: list, grad_out: Tensor, layers: list,
                   masks: list[Tensor] | None, record: Tensor, loss: Tensor, alive: Tensor,
                   lrs: list[float] | None) -> None:
        """Backward pass, then records 1-6, freezing and update in one kernel call (the
        gradient stays in its per-layer blocks, never concatenated into [T, P])."""
        params = self.params
        self.net.backward_parts(params, saved, grad_out, layers, masks, out=self.blocks)
        self.optimizer.step(params, self.grad.view(-1), self.offsets, self.previous, record,
                            loss, alive, lrs)

    def eager_gradient(self, saved: list, grad_out: Tensor, layers: list,
                       masks: list[Tensor] | None, record: StepRecord) -> Tensor:
        """Backward pass into the gradient buffer; returns the gradient the optimizer sees
        (torch: p.grad) with its norms and the parameter norm recorded."""
        grad, params = self.grad, self.params
        self.net.backward(params, saved, grad_out, out=grad, layers=layers, masks=masks)
        used = grad
        if self.accumulated is not None:
            used = self.accumulated.add_(grad)
        torch.linalg.vector_norm(used, dim=1, out=record.grad_norm)
        torch.linalg.vector_norm(used[:, self.first_weight], dim=1, out=record.grad_norm_first)
        torch.linalg.vector_norm(used[:, self.last_weight], dim=1, out=record.grad_norm_last)
        torch.linalg.vector_norm(params, dim=1, out=record.param_norm)
        return used

    def eager_step(self, used: Tensor, record: StepRecord, alive: Tensor | None,
                   clip: Tensor | None, lrs: list[float] | None) -> None:
        """Clip `used` (per row `clip`), update the rows `alive` (None: all) with the batched
        optimizer (`batched_optimizers`; every device), and record the update's norm and cosine."""
        params, grad = self.params, self.grad
        # [T, P] buffers are reused step after step: params and the next params alternate,
        # and so do this update and the previous one (a fresh tensor costs page faults).
        new, update = self.spare, self.update
        if clip is not None:  # clip_grad_norm_: max_norm / (norm + 1e-6), at most 1
            coef = (clip / (record.grad_norm + 1e-6)).clamp(max=1.0)
            used.mul_(coef[:, None])
        if used is not grad:
            grad.copy_(used)  # the optimizer uses grad as scratch space
        if lrs is not None:
            self.optimizer.set_lr(lrs)
        self.optimizer.step(params, grad, alive, out=new)
        torch.sub(new, params, out=update)
        torch.linalg.vector_norm(update, dim=1, out=record.update_norm)
        if self.previous_norm is None:
            record.update_cosine.fill_(math.nan)
            self.previous_norm = record.update_norm.clone()
        else:  # F.cosine_similarity(eps=1e-30) with the norms already at hand
            torch.linalg.vecdot(update, self.previous, dim=1, out=record.update_cosine)
            record.update_cosine.div_(record.update_norm.clamp_min(1e-30)
                                      .mul_(self.previous_norm.clamp_min(1e-30)))
            self.previous_norm.copy_(record.update_norm)
        self.params, self.spare = new, params
        self.update, self.previous = self.previous, update

    def preconditioner(self) -> Tensor:
        """[T, P] the diagonal preconditioner of each row's optimizer state."""
        return self.optimizer.preconditioner()

    def select(self, kept: Tensor, index: list[int]) -> None:
        """Keep the rows `kept` (`index` on the host)."""
        self.params = self.params[kept]
        self.optimizer.select(kept)
        if self.accumulated is not None:
            self.accumulated = self.accumulated[kept]
        self.previous = self.previous[kept]
        if self.previous_norm is not None:
            self.previous_norm = self.previous_norm[kept]
        self.allocate()
