"""Batched optimizers against torch.optim, one trial at a time, step by step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from study.engine.batched_optimizers import (
    adaptive,
    make_optimizer,
    make_population_optimizer,
    preconditioner,
)
from study.optimizers import SGD, Adagrad, Adam, AdamW, RMSprop

SHAPES = [(5, 3), (5,), (2, 5), (2,)]  # a tiny MLP's weights and biases, flattened per trial
P = sum(torch.Size(s).numel() for s in SHAPES)
STEPS = 25

FAMILIES = {
    "sgd": [SGD(lr=0.1), SGD(lr=0.03, weight_decay=0.1), SGD(lr=0.05, momentum=0.9),
            SGD(lr=0.02, momentum=0.5, dampening=0.3, weight_decay=0.01),
            SGD(lr=0.04, momentum=0.9, nesterov=True)],
    "adam": [Adam(lr=1e-2), Adam(lr=3e-2, betas=(0.8, 0.99), eps=1e-6),
             Adam(lr=1e-3, weight_decay=0.1), Adam(lr=1e-2, amsgrad=True)],
    # one beta2 for every row: the update takes torch's own scalar expression
    "adam_shared_beta2": [Adam(lr=1e-2), Adam(lr=3e-2, betas=(0.8, 0.999), eps=1e-6),
                          Adam(lr=1e-3, weight_decay=0.1)],
    "adamw": [AdamW(lr=1e-2), AdamW(lr=5e-2, weight_decay=0.3, betas=(0.5, 0.9)),
              AdamW(lr=1e-2, amsgrad=True, weight_decay=0.0)],
    "rmsprop": [RMSprop(lr=1e-2), RMSprop(lr=3e-3, alpha=0.9, centered=True),
                RMSprop(lr=1e-2, momentum=0.9), RMSprop(lr=1e-3, momentum=0.5, centered=True,
                                                        weight_decay=0.05, eps=1e-5)],
    "adagrad": [Adagrad(lr=0.1), Adagrad(lr=0.05, lr_decay=0.1),
                Adagrad(lr=0.2, initial_accumulator_value=0.5, weight_decay=0.01, eps=1e-6)],
}


def _gradients(params: torch.Tensor, step: int) -> torch.Tensor:
    """A deterministic, state-dependent gradient: curvature plus per-step noise."""
    noise = torch.randn(params.shape[-1], generator=torch.Generator().manual_seed(step),
                        dtype=torch.float64).to(params.dtype)
    return 0.7 * params + noise


def _torch_run(spec, start: torch.Tensor, lrs=None) -> list[torch.Tensor]:
    """Per-step flat parameters of one trial trained by torch.optim (`lrs[step]`: the
    group's learning rate at each step, as a scheduler sets it)."""
    tensors, offset = [], 0
    for shape in SHAPES:
        n = torch.Size(shape).numel()
        tensors.append(start[offset:offset + n].reshape(shape).clone().requires_grad_())
        offset += n
    opt = spec.build(tensors)
    out = []
    for step in range(STEPS):
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        grad = _gradients(flat[None], step)[0]
        offset = 0
        for t in tensors:
            t.grad = grad[offset:offset + t.numel()].reshape(t.shape).clone()
            offset += t.numel()
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[step]
        opt.step()
        out.append(torch.cat([t.detach().reshape(-1) for t in tensors]))
    return out


@pytest.mark.parametrize("mask", ["all_true", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_torch_optim_step_by_step(family: str, dtype: torch.dtype, mask: str) -> None:
    """Both ways of saying "every row alive": a mask of True, and None (no masking)."""
    specs = FAMILIES[family]
    start = torch.randn(len(specs), P, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64).to(dtype)
    expected = [_torch_run(spec, start[i]) for i, spec in enumerate(specs)]
    params = start.clone()
    opt = make_optimizer(specs, params)
    alive = torch.ones(len(specs), dtype=torch.bool) if mask == "all_true" else None
    for step in range(STEPS):
        params = opt.step(params, _gradients(params, step), alive)
        for i in range(len(specs)):
            # Same operations in the same order: equal to the last bit on the CPU.
            torch.testing.assert_close(params[i], expected[i][step], rtol=0, atol=0)


def _schedule(spec, step: int) -> float:
    """A learning rate that changes every step (a cosine decay of the spec's own)."""
    return spec.lr * (0.55 + 0.45 * math.cos(math.pi * step / STEPS))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scheduled_rates_match_torch_optim_also_after_rows_are_dropped(
        family: str, dtype: torch.dtype) -> None:
    """A scheduled step's lr-dependent scalars, made over the rows at once in float64
    (`set_lr`), are the ones torch makes from the group's Python float: the same bits,
    and they follow the rows when some are dropped."""
    specs = FAMILIES[family]
    start = torch.randn(len(specs), P, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64).to(dtype)
    expected = [_torch_run(spec, start[i], [_schedule(spec, k) for k in range(STEPS)])
                for i, spec in enumerate(specs)]
    params, rows = start.clone(), list(range(len(specs)))
    opt = make_optimizer(specs, params)
    for step in range(STEPS):
        if step == STEPS // 2:  # keep the last row and the second, in that order
            rows = [len(specs) - 1, 1]
            opt.select(torch.tensor(rows))
            params = params[rows]
        opt.set_lr(np.array([_schedule(specs[i], step) for i in rows]))
        params = opt.step(params, _gradients(params, step), None)
        for k, i in enumerate(rows):
            torch.testing.assert_close(params[k], expected[i][step], rtol=0, atol=0)


def _state(opt) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vars(opt).items()  # _scratch is work space, not state
            if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == P
            and not k.startswith("_")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_frozen_trial_keeps_params_and_state_and_never_leaks(family: str) -> None:
    specs = FAMILIES[family]
    start = torch.randn(len(specs), P, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
    params = start.clone()
    opt = make_optimizer(specs, params)
    alive = torch.ones(len(specs), dtype=torch.bool)
    for step in range(3):
        params = opt.step(params, _gradients(params, step), alive)
    frozen_params, frozen_state = params[1].clone(), _state(opt)
    alive[1] = False
    for step in range(3, STEPS):
        grad = _gradients(params, step)
        grad[1] = float("nan") if step % 2 else 1e30  # non-finite, or finite garbage
        grad[1, 0] = float("inf")
        params = opt.step(params, grad, alive)
    assert torch.equal(params[1], frozen_params)
    for name, value in _state(opt).items():
        assert torch.equal(value[1], frozen_state[name][1]), name
    for i in (0, 2):  # the live rows follow torch.optim to the last bit
        torch.testing.assert_close(params[i], _torch_run(specs[i], start[i])[-1], rtol=0, atol=0)


def test_select_keeps_rows_in_order() -> None:
    specs = FAMILIES["rmsprop"]
    params = torch.randn(len(specs), P, dtype=torch.float64)
    opt = make_optimizer(specs, params)
    params = opt.step(params, _gradients(params, 0), torch.ones(len(specs), dtype=torch.bool))
    square_avg = opt.square_avg.clone()
    opt.select(torch.tensor([3, 1]))
    assert opt.specs == [specs[3], specs[1]]
    assert torch.equal(opt.square_avg, square_avg[[3, 1]])
    assert opt.neg_lr.shape == (2, 1)


def test_mixed_types_are_rejected() -> None:
    with pytest.raises(ValueError, match="one optimizer type"):
        make_optimizer([Adam(), AdamW()], torch.zeros(2, 3))


PRECONDITIONED = [Adam(lr=1e-2), Adam(lr=3e-2, betas=(0.8, 0.99), eps=1e-3, amsgrad=True),
                  AdamW(lr=1e-2, weight_decay=0.0), RMSprop(lr=1e-2),
                  RMSprop(lr=3e-3, alpha=0.9, centered=True, eps=1e-3),
                  RMSprop(lr=1e-2, momentum=0.9), Adagrad(lr=0.1, lr_decay=0.1, eps=1e-3)]


@pytest.mark.parametrize("spec", PRECONDITIONED, ids=lambda s: repr(s)[:60])
def test_preconditioner_rewrites_torchs_update_as_lr_times_p_inverse_times_the_buffer(
        spec) -> None:
    """x_t - x_t-1 = -lr * P_t^-1 * m_t (Adam), -lr * P_t^-1 * g_t (RMSprop, Adagrad), and
    with RMSprop's momentum buf_t = mu * buf_t-1 + P_t^-1 g_t: P_t read from torch's state
    after update t; NaN before the first update; the batched optimizer's P equals it."""
    start = torch.randn(P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = start.clone().requires_grad_()
    opt = spec.build([x])
    batched = make_optimizer([spec, spec], torch.stack([start, start]))
    params = torch.stack([start, start])
    assert torch.isnan(batched.preconditioner()).all()
    second_key = ("max_exp_avg_sq" if getattr(spec, "amsgrad", False) else
                  {Adam: "exp_avg_sq", AdamW: "exp_avg_sq", RMSprop: "square_avg",
                   Adagrad: "sum"}[type(spec)])
    buf_before = torch.zeros(P, dtype=torch.float64)
    for step in range(STEPS):
        before = x.detach().clone()
        grad = _gradients(before[None], step)[0]
        x.grad = grad.clone()
        opt.step()
        params = batched.step(params, _gradients(params, step), None)
        state = opt.state[x]
        t = int(state["step"])
        p = preconditioner([spec], t, state[second_key][None],
                           state["grad_avg"][None] if "grad_avg" in state else None)[0]
        torch.testing.assert_close(batched.preconditioner(), torch.stack([p, p]), rtol=0,
                                   atol=0)
        scaled = (before - x.detach()) / spec.lr  # P^-1 * (the buffer the step used)
        if isinstance(spec, Adam):
            want = state["exp_avg"] / p
        elif getattr(spec, "momentum", 0) > 0:
            want = spec.momentum * buf_before + grad / p
            buf_before = state["momentum_buffer"].clone()
        else:
            want = grad / p
        torch.testing.assert_close(scaled, want, rtol=1e-9, atol=1e-12)


def test_preconditioner_is_nan_for_sgd_rows_and_mixed_populations_keep_row_order() -> None:
    specs = [SGD(lr=0.1), SGD(lr=0.1, momentum=0.9), Adam(lr=1e-2), Adagrad(lr=0.1)]
    params = torch.randn(len(specs), P, generator=torch.Generator().manual_seed(4),
                         dtype=torch.float64)
    opt = make_population_optimizer(specs, params)
    params = opt.step(params, _gradients(params, 0), None)
    got = opt.preconditioner()
    assert got.shape == (4, P) and torch.isnan(got[:2]).all()
    assert torch.isfinite(got[2:]).all() and (got[2:] > 0).all()
    adagrad = opt.blocks[-1][2]
    torch.testing.assert_close(got[3], adagrad.state_sum[0].sqrt() + 1e-10, rtol=0, atol=0)
    assert adaptive(Adam()) and adaptive(RMSprop()) and not adaptive(SGD())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_scalars_columns_are_the_values_served_step_by_step(dtype) -> None:
    """`columns(first, last)` (the trial-major kernel's [T, steps] table) holds what `at(t)`
    serves at each step, across several of its blocks, for repeated and distinct rows."""
    from study.engine.batched_optimizers import _BLOCK, StepScalars

    rows = [(0.1, 0.9), (0.03, 0.5), (0.1, 0.9), (1e-3, 0.999)]
    scalars = StepScalars(lambda t, lr, beta: lr / (1 - beta**t), rows, dtype,
                          torch.device("cpu"))
    last = 2 * _BLOCK + 7
    step_by_step = torch.cat([scalars.at(t) for t in range(1, last + 1)], dim=1)
    table = StepScalars(scalars.fn, rows, dtype, torch.device("cpu")).columns(1, last)
    assert table.dtype == dtype and table.shape == (len(rows), last)
    assert torch.equal(table, step_by_step)
    assert torch.equal(scalars.columns(5, 9), step_by_step[:, 4:9])
    assert scalars.columns(3, 2).shape == (len(rows), 0)
