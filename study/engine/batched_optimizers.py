"""Batched optimizers: one update for T trials whose parameters are rows of a [T, P] tensor.

Each class mirrors one `torch.optim` family with per-trial hyperparameter tensors of shape
[T, 1] (trials of a population may differ in every numeric field and flag of their spec).
The arithmetic follows torch's single-tensor implementation operation by operation, with the
same association of products, so a batched step equals `torch.optim`'s step to rounding
(usually bit for bit on the CPU; test_batched_optimizers.py checks it). Two forms recur:

- torch's `a.add(b, alpha=s)` (a fused multiply-add on the CPU) is written
  `torch.addcmul(a, b, s)`, which rounds the same way;
- Python-float scalars of torch (for example `lr / bias_correction1`) are computed in float64
  per trial and rounded once to the parameter dtype, as torch rounds a Python scalar.

`step(params, grad, alive)` returns the new parameters and replaces the state. A row whose
`alive` is False is frozen: its parameters and state keep their values exactly. Rather than a
`torch.where` per state tensor (several times the cost of a multiply on [T, P] on the CPU),
the update is switched off through the row's [T, 1] columns: its non-finite gradient entries
are zeroed first (alive rows have finite gradients, so this changes nothing for them), then
its learning rate becomes 0 and every decay factor 1, so each state tensor computes
`x * 1 + 0 * finite = x`. No row's numbers ever enter another row's arithmetic.
Every trial of a population takes its k-th step together, so the step counter is shared.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from study.optimizers import SGD, Adagrad, Adam, AdamW, OptimizerSpec, RMSprop

Tensor = torch.Tensor
_BLOCK = 256  # steps of per-step scalars computed at a time


class StepScalars:
    """A per-trial, per-step scalar computed exactly as torch does, in Python floats.

    `fn(t, *hyperparameters)` gives the value at step t (1-based). It is evaluated once per
    distinct hyperparameter row and step, `_BLOCK` steps at a time, and served as a [T, 1]
    column in the parameter dtype (torch rounds its Python scalars to the dtype the same way).
    Python's `**` and torch's `pow` may differ in the last bit, hence no tensor arithmetic here.
    """

    def __init__(self, fn, rows: Sequence[tuple[float, ...]], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.fn, self.dtype, self.device = fn, dtype, device
        self.unique = sorted(set(rows))
        where = {row: i for i, row in enumerate(self.unique)}
        self.inverse = torch.tensor([where[row] for row in rows], device=device)
        self.start = 0
        self.table: Tensor | None = None

    def at(self, t: int) -> Tensor:
        if self.table is None or not self.start <= t < self.start + _BLOCK:
            self.start = t
            self.table = self._rows(t, t + _BLOCK)
        return self.table[t - self.start][:, None]

    def columns(self, first: int, last: int) -> Tensor:
        """[T, last - first + 1]: column i is `at(first + i)[:, 0]` (the same values), all
        steps at once."""
        return self._rows(first, last + 1).T

    def _rows(self, first: int, stop: int) -> Tensor:
        """[stop - first, T]: row i holds every trial's value at step first + i."""
        values = [[self.fn(step, *row) for row in self.unique] for step in range(first, stop)]
        table = torch.tensor(values, dtype=torch.float64).reshape(len(values), len(self.unique))
        return table.to(self.dtype).to(self.device).index_select(1, self.inverse)

    def select(self, index: Tensor) -> None:
        self.inverse = self.inverse.index_select(0, index)
        if self.table is not None:
            self.table = self.table.index_select(1, index)


class BatchedOptimizer:
    """Base: per-trial hyperparameters as [T, 1] columns, state tensors as [T, P]."""

    spec_type: type[OptimizerSpec] = OptimizerSpec

    def __init__(self, specs: Sequence[OptimizerSpec], params: Tensor,
                 decay_mask: Tensor | None = None) -> None:
        if not specs:
            raise ValueError("a batched optimizer needs at least one trial")
        for spec in specs:
            if type(spec) is not self.spec_type:
                raise ValueError(
                    f"{type(self).__name__} updates {self.spec_type.__name__} trials only, "
                    f"got {type(spec).__name__}"
                )
        if params.dim() != 2 or params.shape[0] != len(specs):
            raise ValueError(f"params must be [T={len(specs)}, P], got {tuple(params.shape)}")
        self.specs = list(specs)
        self.dtype = params.dtype
        self.device = params.device
        self.t = 0
        self.width = params.shape[1]
        self.lrs: np.ndarray | None = None  # set_lr: this step's learning rate per row
        self._rows_of: dict[str, np.ndarray] = {}  # per_row's arrays, kept with the rows
        # [T, P] bool, True where weight decay applies (torch param groups with a zero
        # weight_decay elsewhere); None: every entry, torch's single group.
        self.decay_mask = (None if decay_mask is None
                           else decay_mask.to(self.device).expand(params.shape))

    def set_lr(self, lrs: Sequence[float] | np.ndarray) -> None:
        """Learning rates (one per row) for the next step, as a scheduler sets
        `param_group["lr"]`; the family's lr-dependent scalars are computed from them
        exactly as torch computes them from the group's Python float: in float64, over the
        rows at once (IEEE operations, the same bits as Python's), then rounded once to
        the dtype (`column`)."""
        self.lrs = np.asarray(lrs, dtype=np.float64)

    def per_row(self, name: str, of=None) -> np.ndarray:
        """float64 [T]: `of(spec)` (default: the spec's field `name`) of each row's spec,
        made once and kept with the rows (`select`)."""
        if name not in self._rows_of:
            get = of or (lambda spec: getattr(spec, name))
            self._rows_of[name] = np.array([get(spec) for spec in self.specs],
                                           dtype=np.float64)
        return self._rows_of[name]

    def beta1_correction(self, t: int) -> np.ndarray:
        """float64 [T]: each row's 1 - beta1**t (`bias_correction1`)."""
        if "beta1 of" not in self._rows_of:
            distinct, where = np.unique(self.per_row("beta1", lambda spec: spec.betas[0]),
                                        return_inverse=True)
            self._rows_of["distinct beta1"], self._rows_of["beta1 of"] = distinct, where
        return bias_correction1(self._rows_of["distinct beta1"], self._rows_of["beta1 of"], t)

    def column(self, values: Sequence[float] | np.ndarray) -> Tensor:
        """Per-trial values as a [T, 1] column in the parameter dtype.

        The values are float64 numbers rounded once to the dtype, as torch rounds a Python
        scalar; compute derived values (`1 - beta`) in float64 before calling this.
        """
        column = torch.tensor(np.asarray(values, dtype=np.float64))[:, None]  # a copy
        # Rounded on the host, then copied without waiting: a blocking copy to a GPU would
        # synchronise every step of a scheduled population (set_lr calls this per step).
        return column.to(self.dtype).to(self.device, non_blocking=True)

    def decayed(self, column: Tensor, off: float) -> Tensor:
        """`column` [T, 1] where weight decay applies and `off` elsewhere ([T, P] under a
        decay mask): `off` is the value that makes the decay step a no-op (0 for the L2 term
        added to the gradient, 1 for AdamW's factor), so undecayed entries round exactly as
        torch's group without weight decay."""
        return column if self.decay_mask is None else torch.where(self.decay_mask, column, off)

    def mask(self, values: Sequence[bool]) -> Tensor:
        return torch.tensor(list(values), dtype=torch.bool, device=self.device)[:, None]

    def scalars(self, fn, rows: Sequence[tuple[float, ...]]) -> StepScalars:
        return StepScalars(fn, rows, self.dtype, self.device)

    def step(self, params: Tensor, grad: Tensor, alive: Tensor | None,
             out: Tensor | None = None) -> Tensor:
        """One update of every alive row (`alive`: [T] bool); returns the new [T, P] params.

        `alive=None` promises that every row is alive and its gradient finite (the CPU
        engine knows it without cost, see `study.engine.population`): the masking is skipped.

        The new parameters go to `out` when given (a buffer the caller reuses; it must not
        overlap `params`), and `params` itself is left as it was. `grad` is overwritten
        (it serves as scratch space). The state is updated in place: big tensors are
        allocated once, which matters on the CPU, where a fresh multi-megabyte tensor costs
        page faults.
        """
        self.t += 1
        live = None
        if alive is not None:
            torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0, out=grad)
            live = alive[:, None]
        if out is None:
            out = torch.empty_like(params)
        self.update(params, grad, live, out)
        return out

    def update(self, params: Tensor, grad: Tensor, live: Tensor | None, out: Tensor) -> None:
        """The family's update into `out`; `live` [T, 1] (None: all); frozen rows come out
        unchanged."""
        raise NotImplementedError

    def preconditioner(self) -> Tensor:
        """[T, P] float64: each row's diagonal preconditioner (see `preconditioner`), NaN
        rows for a family without one."""
        second = self.second_moment()
        if second is None:
            return torch.full((len(self.specs), self.width), float("nan"), dtype=torch.float64,
                              device=self.device)
        return preconditioner(self.specs, self.t, second, self.grad_mean())

    def second_moment(self) -> Tensor | None:
        """The state the preconditioner is made of ([T, P]; None: not adaptive)."""
        return None

    def grad_mean(self) -> Tensor | None:
        """Centered RMSprop's running mean of the gradient ([T, P]; None elsewhere)."""
        return None

    def scratch(self, like: Tensor) -> Tensor:
        """A [T, P] work buffer kept between steps (allocated on first use)."""
        if getattr(self, "_scratch", None) is None or self._scratch.shape != like.shape:
            self._scratch = torch.empty_like(like)
        return self._scratch

    def select(self, index: Tensor) -> None:
        """Keep only rows `index` (in that order): hyperparameters and state alike."""
        for name, value in list(vars(self).items()):
            if isinstance(value, Tensor) and value.dim() >= 1:
                setattr(self, name, value.index_select(0, index))
            elif isinstance(value, StepScalars):
                value.select(index)
        self.specs = [self.specs[i] for i in index.tolist()]
        self._rows_of = {}


def bias_correction1(distinct: np.ndarray, where: np.ndarray, t: int) -> np.ndarray:
    """float64 [T]: each row's 1 - beta1**t (Adam's step size divides by it), where row r's
    beta1 is distinct[where[r]]: Python's `**` once per distinct beta1, as torch computes
    it, not numpy's power, whose last bit may differ."""
    return np.array([1 - b**t for b in distinct.tolist()])[where]


def _or(live: Tensor | None, column: Tensor, frozen: float) -> Tensor:
    """`column` on live rows, `frozen` on the others ([T, 1], cheap); live None: all rows."""
    return column if live is None else torch.where(live, column, frozen)


def _live_only(grad: Tensor, live: Tensor | None) -> Tensor:
    """`grad` with the rows of frozen trials zeroed (`live` None: all rows live)."""
    return grad if live is None else grad * live.to(grad.dtype)


class BatchedSGD(BatchedOptimizer):
    """torch.optim.SGD: weight decay, heavy-ball momentum with dampening, Nesterov.

    A trial without momentum keeps no buffer in torch; here its buffer is refreshed as
    `buf * 0 + grad * 1 = grad`, so one formula serves every row.
    """

    spec_type = SGD

    def __init__(self, specs: Sequence[SGD], params: Tensor,
                 decay_mask: Tensor | None = None) -> None:
        super().__init__(specs, params, decay_mask)
        self.neg_lr = self.column([-s.lr for s in specs])
        self.weight_decay = self.decayed(self.column([s.weight_decay for s in specs]), 0.0)
        self.momentum = self.column([s.momentum for s in specs])
        self.one_minus_dampening = self.column(
            [1 - s.dampening if s.momentum != 0 else 1.0 for s in specs])
        # direction = grad * nesterov + buf * coefficient: Nesterov rows grad + momentum * buf
        # (torch: grad.add(buf, alpha=momentum)), the others buf.
        self.grad_share = self.column([float(s.nesterov) for s in specs])
        self.buf_share = self.column([s.momentum if s.nesterov else 1.0 for s in specs])
        self.use_decay = any(s.weight_decay != 0 for s in specs)
        self.use_momentum = any(s.momentum != 0 for s in specs)
        self.use_nesterov = any(s.nesterov for s in specs)
        self.buf: Tensor | None = None

    def update(self, params: Tensor, grad: Tensor, live: Tensor | None, out: Tensor
               ) -> None:
        neg_lr = self.neg_lr if self.lrs is None else self.column(-self.lrs)
        neg_lr = _or(live, neg_lr, 0.0)
        if self.use_decay:
            grad.addcmul_(params, self.weight_decay)
        if not self.use_momentum:
            torch.addcmul(params, grad, neg_lr, out=out)
            return
        if self.buf is None:
            self.buf = grad.clone()  # torch: the first step copies the gradient (no dampening)
        else:
            momentum = _or(live, self.momentum, 1.0)
            keep_grad = _or(live, self.one_minus_dampening, 0.0)
            self.buf.mul_(momentum).addcmul_(grad, keep_grad)
        direction = self.buf
        if self.use_nesterov:
            direction = grad.mul_(self.grad_share).addcmul_(self.buf, self.buf_share)
        torch.addcmul(params, direction, neg_lr, out=out)


class BatchedAdam(BatchedOptimizer):
    """torch.optim.Adam (L2 weight decay), AdamW (decoupled) and their amsgrad variants.

    amsgrad mixes freely: a row without it keeps `max(0 * max_sq, v) = v` as its maximum.
    """

    spec_type = Adam
    decoupled = False

    def __init__(self, specs: Sequence[Adam], params: Tensor,
                 decay_mask: Tensor | None = None) -> None:
        super().__init__(specs, params, decay_mask)
        self.beta2 = self.column([s.betas[1] for s in specs])
        self.one_minus_beta1 = self.column([1 - s.betas[0] for s in specs])
        self.one_minus_beta2 = self.column([1 - s.betas[1] for s in specs])
        self.eps = self.column([s.eps for s in specs])
        self.weight_decay = self.decayed(self.column([s.weight_decay for s in specs]), 0.0)
        self.decay_factor = self.decayed(  # AdamW
            self.column([1 - s.lr * s.weight_decay for s in specs]), 1.0)
        self.amsgrad = self.column([float(s.amsgrad) for s in specs])
        # torch: step_size = lr / (1 - beta1**t); bias_correction2_sqrt = (1 - beta2**t)**0.5
        self.neg_step_size = self.scalars(lambda t, lr, b1: -(lr / (1 - b1**t)),
                                          [(s.lr, s.betas[0]) for s in specs])
        self.bias_correction2_sqrt = self.scalars(lambda t, b2: (1 - b2**t) ** 0.5,
                                                  [(s.betas[1],) for s in specs])
        self.use_decay = any(s.weight_decay != 0 for s in specs)
        self.use_amsgrad = any(s.amsgrad for s in specs)
        betas2 = {s.betas[1] for s in specs}
        self.shared_beta2 = betas2.pop() if len(betas2) == 1 else None
        self.exp_avg = torch.zeros_like(params)
        self.exp_avg_sq = torch.zeros_like(params)
        self.max_exp_avg_sq = torch.zeros_like(params) if self.use_amsgrad else None

    def update(self, params: Tensor, grad: Tensor, live: Tensor | None, out: Tensor
               ) -> None:
        if self.use_decay:
            if self.decoupled:
                decay = (self.decay_factor if self.lrs is None else self.decayed(
                    self.column(1 - self.lrs * self.per_row("weight_decay")), 1.0))
                params = params * _or(live, decay, 1.0)
            else:
                grad.addcmul_(params, self.weight_decay)
        self.exp_avg.lerp_(grad, _or(live, self.one_minus_beta1, 0.0))
        work = self.scratch(params)
        if live is None and self.shared_beta2 is not None:  # torch's own expression
            beta2 = self.shared_beta2
            self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        else:  # the same arithmetic with a per-row (1 - beta2): one more pass
            torch.mul(grad, _or(live, self.one_minus_beta2, 0.0), out=work)
            self.exp_avg_sq.mul_(_or(live, self.beta2, 1.0)).addcmul_(work, grad)
        second = self.exp_avg_sq
        if self.use_amsgrad:
            torch.maximum(self.max_exp_avg_sq.mul_(self.amsgrad), second,
                          out=self.max_exp_avg_sq)
            second = self.max_exp_avg_sq
        # torch: (sqrt(v) / bias_correction2_sqrt).add_(eps), one pass here
        denom = torch.sqrt(second, out=work)
        torch.addcdiv(self.eps, denom, self.bias_correction2_sqrt.at(self.t), out=denom)
        if self.lrs is None:
            neg_step_size = self.neg_step_size.at(self.t)
        else:
            neg_step_size = self.column(-(self.lrs / self.beta1_correction(self.t)))
        neg_step_size = _or(live, neg_step_size, 0.0)
        step = torch.mul(self.exp_avg, neg_step_size, out=grad)  # grad is no longer needed
        torch.addcdiv(params, step, denom, out=out)


    def second_moment(self) -> Tensor:
        # a row without amsgrad keeps max_exp_avg_sq equal to its exp_avg_sq (see above)
        return self.max_exp_avg_sq if self.use_amsgrad else self.exp_avg_sq


class BatchedAdamW(BatchedAdam):
    """torch.optim.AdamW: `param *= 1 - lr * weight_decay` before the Adam update."""

    spec_type = AdamW
    decoupled = True


class BatchedRMSprop(BatchedOptimizer):
    """torch.optim.RMSprop: weight decay, momentum, centered (each may differ per row).

    A non-centered row subtracts `0 * grad_avg**2` (exactly nothing). Rows with and without
    momentum round differently in torch, so a population holding both picks per row.
    """

    spec_type = RMSprop

    def __init__(self, specs: Sequence[RMSprop], params: Tensor,
                 decay_mask: Tensor | None = None) -> None:
        super().__init__(specs, params, decay_mask)
        self.alpha = self.column([s.alpha for s in specs])
        self.one_minus_alpha = self.column([1 - s.alpha for s in specs])
        self.neg_lr = self.column([-s.lr for s in specs])
        self.eps = self.column([s.eps for s in specs])
        self.weight_decay = self.decayed(self.column([s.weight_decay for s in specs]), 0.0)
        self.momentum = self.column([s.momentum for s in specs])
        self.neg_centered = self.column([-float(s.centered) for s in specs])
        self.with_momentum = self.mask([s.momentum > 0 for s in specs])
        self.use_decay = any(s.weight_decay != 0 for s in specs)
        self.use_centered = any(s.centered for s in specs)
        self.use_momentum = any(s.momentum > 0 for s in specs)
        self.mixed_momentum = self.use_momentum and not all(s.momentum > 0 for s in specs)
        self.square_avg = torch.zeros_like(params)
        self.grad_avg = torch.zeros_like(params) if self.use_centered else None
        self.buf = torch.zeros_like(params) if self.use_momentum else None

    def update(self, params: Tensor, grad: Tensor, live: Tensor | None, out: Tensor
               ) -> None:
        if self.use_decay:
            grad.addcmul_(params, self.weight_decay)
        one_minus_alpha = _or(live, self.one_minus_alpha, 0.0)
        self.square_avg.mul_(_or(live, self.alpha, 1.0)).addcmul_(grad * one_minus_alpha, grad)
        if self.use_centered:
            self.grad_avg.lerp_(grad, one_minus_alpha)
            # torch: square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
            avg = torch.addcmul(self.square_avg, self.grad_avg * self.neg_centered,
                                self.grad_avg).sqrt_()
        else:
            avg = self.square_avg.sqrt()
        avg = avg.add_(self.eps)
        neg_lr = self.neg_lr if self.lrs is None else self.column(-self.lrs)
        neg_lr = _or(live, neg_lr, 0.0)
        if not self.use_momentum:
            torch.addcdiv(params, grad * neg_lr, avg, out=out)
            return
        self.buf.mul_(_or(live, self.momentum, 1.0)).addcdiv_(_live_only(grad, live), avg)
        torch.addcmul(params, self.buf, neg_lr, out=out)
        if self.mixed_momentum:
            plain = torch.addcdiv(params, grad * neg_lr, avg)
            out.copy_(torch.where(self.with_momentum, out, plain))


    def second_moment(self) -> Tensor:
        return self.square_avg

    def grad_mean(self) -> Tensor | None:
        return self.grad_avg


class BatchedAdagrad(BatchedOptimizer):
    """torch.optim.Adagrad: weight decay, lr_decay, initial_accumulator_value."""

    spec_type = Adagrad

    def __init__(self, specs: Sequence[Adagrad], params: Tensor,
                 decay_mask: Tensor | None = None) -> None:
        super().__init__(specs, params, decay_mask)
        # torch: clr = lr / (1 + (t - 1) * lr_decay)
        self.neg_clr = self.scalars(lambda t, lr, decay: -(lr / (1 + (t - 1) * decay)),
                                    [(s.lr, s.lr_decay) for s in specs])
        self.eps = self.column([s.eps for s in specs])
        self.weight_decay = self.decayed(self.column([s.weight_decay for s in specs]), 0.0)
        self.use_decay = any(s.weight_decay != 0 for s in specs)
        initial = self.column([s.initial_accumulator_value for s in specs])
        self.state_sum = initial.expand_as(params).clone()

    def update(self, params: Tensor, grad: Tensor, live: Tensor | None, out: Tensor
               ) -> None:
        if self.use_decay:
            grad.addcmul_(params, self.weight_decay)
        # torch: state_sum.addcmul_(grad, grad, value=1); a frozen row adds 0 * grad
        self.state_sum.addcmul_(_live_only(grad, live), grad)
        std = self.state_sum.sqrt().add_(self.eps)
        if self.lrs is None:
            neg_clr = self.neg_clr.at(self.t)
        else:
            neg_clr = self.column(-(self.lrs / (1 + (self.t - 1) * self.per_row("lr_decay"))))
        neg_clr = _or(live, neg_clr, 0.0)
        torch.addcdiv(params, grad.mul_(neg_clr), std, out=out)


    def second_moment(self) -> Tensor:
        return self.state_sum


def adaptive(spec: OptimizerSpec) -> bool:
    """Whether `spec`'s step divides by a diagonal preconditioner (Adam, AdamW, RMSprop,
    Adagrad)."""
    return isinstance(spec, (Adam, RMSprop, Adagrad))


def preconditioner(specs: Sequence[OptimizerSpec], t: int, second: Tensor,
                   grad_mean: Tensor | None = None) -> Tensor:
    """[T, P] float64: the diagonal preconditioner P of each row after `t` updates, the one
    that writes torch's update `t` as x_t = x_t-1 - lr * P^-1 * (momentum buffer or
    gradient); NaN rows for SGD and for every row at t = 0 (no update yet).

    `second` [T, P]: each row's second-moment state (Adam's exp_avg_sq, or max_exp_avg_sq
    with amsgrad; RMSprop's square_avg; Adagrad's sum); `grad_mean`: centered RMSprop's
    grad_avg. From torch's single-tensor formulas, in float64:

    - Adam / AdamW: x -= (lr / (1 - b1^t)) * m_t / (sqrt(v_t) / sqrt(1 - b2^t) + eps), so
      P = (1 - b1^t) * (sqrt(v_t) / sqrt(1 - b2^t) + eps);
    - RMSprop: x -= lr * g / (sqrt(v) + eps) (with momentum mu: buf = mu * buf + g / (...),
      x -= lr * buf), so P = sqrt(v) + eps; centered: sqrt(v - grad_avg^2) + eps;
    - Adagrad: x -= lr / (1 + (t - 1) * lr_decay) * g / (sqrt(sum) + eps), so
      P = (1 + (t - 1) * lr_decay) * (sqrt(sum) + eps).

    Note:
        This is the preconditioner of the last update, exactly as the state defines it. The
        next update's differs by one more gradient in v (a 1 - beta2 share for Adam) and by
        the step counter's factors (1 - b1^(t+1), Adagrad's decay at t + 1), a relative
        change that vanishes as t grows. Cohen et al. (2022) measure the same P_t.
    """
    out = torch.full(second.shape, float("nan"), dtype=torch.float64, device=second.device)
    if t == 0:
        return out
    for i, spec in enumerate(specs):
        if not adaptive(spec):
            continue
        v = second[i].to(torch.float64)
        if isinstance(spec, Adam):
            beta1, beta2 = spec.betas
            out[i] = (v.sqrt() / (1 - beta2**t) ** 0.5 + spec.eps) * (1 - beta1**t)
        elif isinstance(spec, RMSprop):
            if spec.centered:
                mean = grad_mean[i].to(torch.float64)
                v = v - mean * mean
            out[i] = v.sqrt() + spec.eps
        else:
            out[i] = (v.sqrt() + spec.eps) * (1 + (t - 1) * spec.lr_decay)
    return out


OPTIMIZERS: dict[type[OptimizerSpec], type[BatchedOptimizer]] = {
    SGD: BatchedSGD, Adam: BatchedAdam, AdamW: BatchedAdamW,
    RMSprop: BatchedRMSprop, Adagrad: BatchedAdagrad,
}


def make_optimizer(specs: Sequence[OptimizerSpec], params: Tensor,
                   decay_mask: Tensor | None = None) -> BatchedOptimizer:
    """The batched optimizer for `specs` (one spec type, one row of `params` each);
    `decay_mask` ([P] or [T, P] bool, None: all): the entries weight decay applies to."""
    kinds = {type(s) for s in specs}
    if len(kinds) != 1:
        names = sorted(k.__name__ for k in kinds)
        raise ValueError(f"a population needs one optimizer type, got {names}")
    kind = kinds.pop()
    if kind not in OPTIMIZERS:
        raise ValueError(f"no batched optimizer for {kind.__name__}")
    return OPTIMIZERS[kind](specs, params, decay_mask)


class MixedOptimizer:
    """Rows of several optimizer types in one population, each type's rows contiguous.

    Trials of different optimizer families share the forward and backward pass (one batched
    computation); each contiguous block of one type is updated by that type's batched
    optimizer on views of the [T, P] rows, so every row gets exactly its family's update.
    """

    def __init__(self, specs: Sequence[OptimizerSpec], params: Tensor,
                 decay_mask: Tensor | None = None) -> None:
        self.blocks: list[tuple[int, int, BatchedOptimizer]] = []
        if decay_mask is not None:
            decay_mask = decay_mask.expand(params.shape)
        start = 0
        for _, run in itertools.groupby(specs, key=type):
            stop = start + len(list(run))
            mask = None if decay_mask is None else decay_mask[start:stop]
            self.blocks.append((start, stop, make_optimizer(specs[start:stop],
                                                            params[start:stop], mask)))
            start = stop

    def set_lr(self, lrs: Sequence[float]) -> None:
        for a, b, opt in self.blocks:
            opt.set_lr(lrs[a:b])

    def step(self, params: Tensor, grad: Tensor, alive: Tensor | None,
             out: Tensor | None = None) -> Tensor:
        """`BatchedOptimizer.step` of every block on its rows."""
        if out is None:
            out = torch.empty_like(params)
        for a, b, opt in self.blocks:
            opt.step(params[a:b], grad[a:b], None if alive is None else alive[a:b],
                     out=out[a:b])
        return out

    def preconditioner(self) -> Tensor:
        """`BatchedOptimizer.preconditioner` of every block, rows in order."""
        return torch.cat([opt.preconditioner() for _, _, opt in self.blocks])

    def select(self, index: Tensor) -> None:
        """Keep rows `index` (in that order); each block's kept rows must stay contiguous."""
        blocks = []
        for a, b, opt in self.blocks:
            positions = ((index >= a) & (index < b)).nonzero().squeeze(1)
            if not len(positions):
                continue
            first, last = int(positions[0]), int(positions[-1])
            if last - first + 1 != len(positions):
                raise ValueError("rows of one optimizer type must stay contiguous")
            opt.select(index[positions] - a)
            blocks.append((first, last + 1, opt))
        self.blocks = sorted(blocks, key=lambda block: block[0])


def make_population_optimizer(specs: Sequence[OptimizerSpec], params: Tensor,
                              decay_mask: Tensor | None = None
                              ) -> BatchedOptimizer | MixedOptimizer:
    """One batched optimizer when every spec has one type, else a `MixedOptimizer`
    (the specs' rows must then be grouped by type, see `MixedOptimizer`); `decay_mask` as
    in `make_optimizer`."""
    if len({type(s) for s in specs}) == 1:
        return make_optimizer(specs, params, decay_mask)
    return MixedOptimizer(specs, params, decay_mask)
