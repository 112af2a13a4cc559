"""Batched optimizers: one update for T trials whose parameters are rows of a [T, P] tensor.

Each class mirrors one `torch.optim` family with per-trial hyperparameter tensors of shape
[T, 1] (trials of a population may differ in every numeric field and flag of their spec).
The arithmetic follows torch's single-tensor implementation operation by operation, with the
same association of products, so a batched step equals `torch.optim`'s step to rounding
(usually bit for bit on the CPU; tests/study/test_optim.py checks it). Two forms recur:

- torch's `a.add(b, alpha=s)` (a fused multiply-add on the CPU) is written
  `torch.addcmul(a, b, s)`, which rounds the same way;
- Python-float scalars of torch (for example `lr / bias_correction1`) are computed in float64
  per trial and rounded once to the parameter dtype, as torch rounds a Python scalar.

`step(params, grad, alive)` returns the new parameters and replaces the state; rows where
`alive` is False keep their parameters and state exactly (selected with `torch.where`, so a
non-finite gradient of one trial never reaches another trial or its own frozen state).
Every trial of a population takes its k-th step together, so the step counter is shared.
"""

from __future__ import annotations

from collections.abc import Sequence

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
            values = [[self.fn(step, *row) for row in self.unique]
                      for step in range(t, t + _BLOCK)]
            table = torch.tensor(values, dtype=torch.float64).to(self.dtype)
            self.table = table.to(self.device).index_select(1, self.inverse)
        return self.table[t - self.start][:, None]

    def select(self, index: Tensor) -> None:
        self.inverse = self.inverse.index_select(0, index)
        if self.table is not None:
            self.table = self.table.index_select(1, index)


class BatchedOptimizer:
    """Base: per-trial hyperparameters as [T, 1] columns, state tensors as [T, P]."""

    spec_type: type[OptimizerSpec] = OptimizerSpec
    state_names: tuple[str, ...] = ()

    def __init__(self, specs: Sequence[OptimizerSpec], params: Tensor) -> None:
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

    def column(self, values: Sequence[float]) -> Tensor:
        """Per-trial float64 values as a [T, 1] float64 column on the device."""
        return torch.tensor(list(values), dtype=torch.float64, device=self.device)[:, None]

    def cast(self, column: Tensor) -> Tensor:
        """A float64 column rounded to the parameter dtype (how torch rounds a Python scalar)."""
        return column.to(self.dtype)

    def scalars(self, fn, rows: Sequence[tuple[float, ...]]) -> StepScalars:
        return StepScalars(fn, rows, self.dtype, self.device)

    def mask(self, values: Sequence[bool]) -> Tensor:
        return torch.tensor(list(values), dtype=torch.bool, device=self.device)[:, None]

    def step(self, params: Tensor, grad: Tensor, alive: Tensor) -> Tensor:
        """One update of every alive row; returns the new [T, P] parameters."""
        self.t += 1
        keep = alive[:, None]
        new_params, new_state = self.update(params, grad)
        for name, value in new_state.items():
            old = getattr(self, name)
            setattr(self, name, value if old is None else torch.where(keep, value, old))
        return torch.where(keep, new_params, params)

    def update(self, params: Tensor, grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def select(self, index: Tensor) -> None:
        """Keep only rows `index` (in that order): hyperparameters and state alike."""
        for name, value in list(vars(self).items()):
            if isinstance(value, Tensor) and value.dim() >= 1:
                setattr(self, name, value.index_select(0, index))
            elif isinstance(value, StepScalars):
                value.select(index)
        self.specs = [self.specs[i] for i in index.tolist()]


class BatchedSGD(BatchedOptimizer):
    """torch.optim.SGD: weight decay, heavy-ball momentum with dampening, Nesterov."""

    spec_type = SGD

    def __init__(self, specs: Sequence[SGD], params: Tensor) -> None:
        super().__init__(specs, params)
        momentum = self.column([s.momentum for s in specs])
        self.neg_lr = self.cast(-self.column([s.lr for s in specs]))
        self.weight_decay = self.cast(self.column([s.weight_decay for s in specs]))
        self.momentum = self.cast(momentum)
        self.one_minus_dampening = self.cast(1 - self.column([s.dampening for s in specs]))
        self.nesterov = self.mask([s.nesterov for s in specs])
        self.no_momentum = self.mask([s.momentum == 0 for s in specs])
        self.use_decay = any(s.weight_decay != 0 for s in specs)
        self.use_momentum = any(s.momentum != 0 for s in specs)
        self.use_nesterov = any(s.nesterov for s in specs)
        self.buf: Tensor | None = None

    def update(self, params: Tensor, grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.use_decay:
            grad = torch.addcmul(grad, params, self.weight_decay)
        if not self.use_momentum:
            return torch.addcmul(params, grad, self.neg_lr), {}
        if self.buf is None:
            buf = grad.clone()  # torch: the first step copies the gradient (no dampening)
        else:
            buf = torch.addcmul(self.buf * self.momentum, grad, self.one_minus_dampening)
        direction = buf
        if self.use_nesterov:
            direction = torch.where(self.nesterov, torch.addcmul(grad, buf, self.momentum), buf)
        direction = torch.where(self.no_momentum, grad, direction)
        return torch.addcmul(params, direction, self.neg_lr), {"buf": buf}


class BatchedAdam(BatchedOptimizer):
    """torch.optim.Adam (L2 weight decay), AdamW (decoupled) and their amsgrad variants."""

    spec_type = Adam
    decoupled = False

    def __init__(self, specs: Sequence[Adam], params: Tensor) -> None:
        super().__init__(specs, params)
        beta1 = self.column([s.betas[0] for s in specs])
        beta2 = self.column([s.betas[1] for s in specs])
        self.beta2 = self.cast(beta2)
        self.one_minus_beta1 = self.cast(1 - beta1)
        self.one_minus_beta2 = self.cast(1 - beta2)
        self.eps = self.cast(self.column([s.eps for s in specs]))
        self.weight_decay = self.cast(self.column([s.weight_decay for s in specs]))
        self.decay_factor = self.cast(self.column([1 - s.lr * s.weight_decay for s in specs]))
        # torch: step_size = lr / (1 - beta1**t); bias_correction2_sqrt = (1 - beta2**t)**0.5
        self.neg_step_size = self.scalars(lambda t, lr, b1: -(lr / (1 - b1**t)),
                                          [(s.lr, s.betas[0]) for s in specs])
        self.bias_correction2_sqrt = self.scalars(lambda t, b2: (1 - b2**t) ** 0.5,
                                                  [(s.betas[1],) for s in specs])
        self.amsgrad = self.mask([s.amsgrad for s in specs])
        self.use_decay = any(s.weight_decay != 0 for s in specs)
        self.use_amsgrad = any(s.amsgrad for s in specs)
        self.exp_avg = torch.zeros_like(params)
        self.exp_avg_sq = torch.zeros_like(params)
        self.max_exp_avg_sq = torch.zeros_like(params) if self.use_amsgrad else None

    def update(self, params: Tensor, grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.use_decay:
            if self.decoupled:
                params = params * self.decay_factor
            else:
                grad = torch.addcmul(grad, params, self.weight_decay)
        exp_avg = torch.lerp(self.exp_avg, grad, self.one_minus_beta1)
        exp_avg_sq = torch.addcmul(self.exp_avg_sq * self.beta2, grad * self.one_minus_beta2, grad)
        state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        second = exp_avg_sq
        if self.use_amsgrad:
            max_sq = torch.maximum(self.max_exp_avg_sq, exp_avg_sq)
            state["max_exp_avg_sq"] = max_sq
            second = torch.where(self.amsgrad, max_sq, exp_avg_sq)
        denom = (second.sqrt() / self.bias_correction2_sqrt.at(self.t)).add_(self.eps)
        return torch.addcdiv(params, exp_avg * self.neg_step_size.at(self.t), denom), state


class BatchedAdamW(BatchedAdam):
    """torch.optim.AdamW: `param *= 1 - lr * weight_decay` before the Adam update."""

    spec_type = AdamW
    decoupled = True


class BatchedRMSprop(BatchedOptimizer):
    """torch.optim.RMSprop: weight decay, momentum, centered."""

    spec_type = RMSprop

    def __init__(self, specs: Sequence[RMSprop], params: Tensor) -> None:
        super().__init__(specs, params)
        alpha = self.column([s.alpha for s in specs])
        self.alpha = self.cast(alpha)
        self.one_minus_alpha = self.cast(1 - alpha)
        self.neg_lr = self.cast(-self.column([s.lr for s in specs]))
        self.eps = self.cast(self.column([s.eps for s in specs]))
        self.weight_decay = self.cast(self.column([s.weight_decay for s in specs]))
        self.momentum = self.cast(self.column([s.momentum for s in specs]))
        self.centered = self.mask([s.centered for s in specs])
        self.with_momentum = self.mask([s.momentum > 0 for s in specs])
        self.use_decay = any(s.weight_decay != 0 for s in specs)
        self.use_centered = any(s.centered for s in specs)
        self.use_momentum = any(s.momentum > 0 for s in specs)
        self.square_avg = torch.zeros_like(params)
        self.grad_avg = torch.zeros_like(params) if self.use_centered else None
        self.buf = torch.zeros_like(params) if self.use_momentum else None

    def update(self, params: Tensor, grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.use_decay:
            grad = torch.addcmul(grad, params, self.weight_decay)
        square_avg = torch.addcmul(self.square_avg * self.alpha, grad * self.one_minus_alpha, grad)
        state = {"square_avg": square_avg}
        avg = square_avg.sqrt()
        if self.use_centered:
            grad_avg = torch.lerp(self.grad_avg, grad, self.one_minus_alpha)
            state["grad_avg"] = grad_avg
            centered = torch.addcmul(square_avg, grad_avg, grad_avg, value=-1).sqrt_()
            avg = torch.where(self.centered, centered, avg)
        avg = avg.add_(self.eps)
        plain = torch.addcdiv(params, grad * self.neg_lr, avg)
        if not self.use_momentum:
            return plain, state
        buf = torch.addcdiv(self.buf * self.momentum, grad, avg)
        state["buf"] = buf
        with_buf = torch.addcmul(params, buf, self.neg_lr)
        return torch.where(self.with_momentum, with_buf, plain), state


class BatchedAdagrad(BatchedOptimizer):
    """torch.optim.Adagrad: weight decay, lr_decay, initial_accumulator_value."""

    spec_type = Adagrad

    def __init__(self, specs: Sequence[Adagrad], params: Tensor) -> None:
        super().__init__(specs, params)
        # torch: clr = lr / (1 + (t - 1) * lr_decay)
        self.neg_clr = self.scalars(lambda t, lr, decay: -(lr / (1 + (t - 1) * decay)),
                                    [(s.lr, s.lr_decay) for s in specs])
        self.eps = self.cast(self.column([s.eps for s in specs]))
        self.weight_decay = self.cast(self.column([s.weight_decay for s in specs]))
        self.use_decay = any(s.weight_decay != 0 for s in specs)
        initial = self.cast(self.column([s.initial_accumulator_value for s in specs]))
        self.state_sum = initial.expand_as(params).clone()

    def update(self, params: Tensor, grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.use_decay:
            grad = torch.addcmul(grad, params, self.weight_decay)
        neg_clr = self.neg_clr.at(self.t)
        state_sum = torch.addcmul(self.state_sum, grad, grad)
        std = state_sum.sqrt().add_(self.eps)
        return torch.addcdiv(params, grad * neg_clr, std), {"state_sum": state_sum}


OPTIMIZERS: dict[type[OptimizerSpec], type[BatchedOptimizer]] = {
    SGD: BatchedSGD, Adam: BatchedAdam, AdamW: BatchedAdamW,
    RMSprop: BatchedRMSprop, Adagrad: BatchedAdagrad,
}


def make_optimizer(specs: Sequence[OptimizerSpec], params: Tensor) -> BatchedOptimizer:
    """The batched optimizer for `specs` (one spec type, one row of `params` each)."""
    kinds = {type(s) for s in specs}
    if len(kinds) != 1:
        names = sorted(k.__name__ for k in kinds)
        raise ValueError(f"a population needs one optimizer type, got {names}")
    kind = kinds.pop()
    if kind not in OPTIMIZERS:
        raise ValueError(f"no batched optimizer for {kind.__name__}")
    return OPTIMIZERS[kind](specs, params)
