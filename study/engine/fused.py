"""The fused CPU update: optimizer step and step records in one visit per row (numba).

Eager PyTorch streams every [T, P] tensor once per operation. A batch-8 step of 117 trials
makes about 19 passes over 2.3 MB tensors, more than the 8 MB L3 cache of the reference
machine holds, so the step is bound by memory traffic (docs/performance.md). This kernel
takes one row at a time, while it sits in L1/L2, through:

1. its gradient and parameter norms;
2. the freeze decision (non-finite loss or gradient norm);
3. the SGD / Adam / AdamW / RMSprop / Adagrad update;
4. the update, its norm and its cosine with the previous update.

Numbers: the arithmetic is `batched_optimizers`'s (torch's single-tensor formulas, in the same
order, in the parameter dtype, every operation rounded on its own). torch's own CPU kernels
may fuse some products into FMAs, so a row agrees with `batched_optimizers` to a few units in the
last place, not bit for bit (tests/study/engine/test_fused.py). Norms are summed in float64.
Rows never interact, so a trial's numbers do not depend on its population.

The population engine uses it on the CPU when numba is installed and the population fits
(`fusable`): every trial's optimizer one of torch.optim's SGD, Adam, AdamW (amsgrad or not),
RMSprop or Adagrad, no gradient clipping, zero_grad called. Everything else, and every
CUDA population, takes the eager path.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch

from study.engine.base import fused_family
from study.engine.batched_optimizers import StepScalars, bias_correction1, preconditioner
from study.optimizers import SGD, Adagrad, Adam, AdamW, OptimizerSpec, RMSprop

try:  # an optional accelerator: without numba the eager path runs
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; this guards broken installs
    numba = njit = prange = None

Tensor = torch.Tensor

# numba keys a function's disk cache by its own file (its content or its modification time,
# by numba's version), not by the files whose functions it inlines: this digest of those
# (sha256 of their bytes, in this order) makes a change there a change here, so that the
# cache misses and the kernel compiles again. The tests fail, naming the new value, until
# it is current.
INLINED = ("intrinsics.py",)
INLINED_DIGEST = "18693c953c6d0745f2971494512363e8e956fc29ffb86144172f645ff787a0f9"

# Rows of the per-trial hyperparameter table [len(_HP), T], by family: SGD (momentum,
# keep = 1 - dampening, Nesterov's shares of gradient and buffer), Adam / AdamW (beta2,
# 1 - beta2, eps, AdamW's decay 1 - lr * wd, 1 - beta1, amsgrad), RMSprop (alpha,
# 1 - alpha, eps, momentum, centered), Adagrad (eps).
_HP = ("weight_decay", "momentum_beta2_or_alpha", "keep_or_one_minus_beta2_or_alpha",
       "grad_share_or_eps", "buf_share_or_momentum", "decay", "one_minus_beta1",
       "amsgrad_or_centered")
(_WD, _MOM_B2, _KEEP_OMB2, _SHARE_EPS, _BUFSHARE, _DECAY, _OMB1, _FLAG) = range(len(_HP))
_SGD, _ADAM, _ADAMW, _RMSPROP, _ADAGRAD = range(5)
# the families of `base.fused_family`
_KINDS = {SGD: _SGD, Adam: _ADAM, AdamW: _ADAMW, RMSprop: _RMSPROP, Adagrad: _ADAGRAD}


def available() -> bool:
    """Whether numba imported (the fused path can run)."""
    return njit is not None


def load_implementations() -> None:
    """Load numba's implementations of Python and numpy into its CPU target now (what its
    first compilation or cache load does, once per process), without importing
    scipy.linalg.

    Among them are numba's numpy.linalg functions, and to learn whether a BLAS is there
    numba imports scipy.linalg: about 0.2 CPU-seconds on the run's critical path (the
    first population waits for its kernel), for functions the kernels never call. With
    that import failing, numba computes `np.vdot` with a loop of its own; its `np.dot`
    and `np.linalg` functions import scipy when a function that calls them is compiled,
    as before. Where scipy.linalg is imported already, numba loads them as it would.
    Calling it again does nothing more.
    """
    target = numba.core.registry.cpu_target.target_context
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        target.refresh()
        return
    sys.modules["scipy.linalg.cython_blas"] = None  # an import of it raises ImportError
    try:
        target.refresh()
    finally:
        del sys.modules["scipy.linalg.cython_blas"]


def fusable(specs: Sequence[OptimizerSpec], clip: bool, zero_grad: bool) -> bool:
    """Whether a population with these optimizers and loop can take the fused path."""
    return available() and not clip and zero_grad and all(map(fused_family, specs))


if njit is not None:
    from study.engine.intrinsics import (
        add_lanes,
        fma_lanes,
        fma_scalar,
        lane_sum,
        load_wide,
        zero_wide,
    )

    # The norms' sums, in float64 and in one order written out: entries widened 4 at a time
    # into 8 accumulators of 4 lanes (a round of 32 entries: entries j..j+3 of a round to
    # the first, and so on), each term added with one rounding; the accumulators added in a
    # fixed tree, then the entries after the last round one by one. Enough products in
    # flight to hide the adds' latency (a sum of squares of 4,929 float32 entries: 233 ns
    # against 324 for the plain loop vectorised by LLVM under fastmath, in an order LLVM
    # chooses, which may change with the processor), and the same bits on every one.
    # `_sumsq` and `_dot` give the same bits as the sums of `_update_sums`, which does
    # three of them in one pass.
    _ROUND = 32

    @njit(cache=True, inline="always")
    def _total(c0, c1, c2, c3, c4, c5, c6, c7):
        return lane_sum(add_lanes(add_lanes(add_lanes(c0, c1), add_lanes(c2, c3)),
                                  add_lanes(add_lanes(c4, c5), add_lanes(c6, c7))))

    @njit(cache=True)
    def _sumsq(a):
        # sum of a[j]^2 (a 1-D float array) in float64
        n = a.shape[0]
        c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = zero_wide()
        j = 0
        while j + _ROUND <= n:
            x = load_wide(a, j)
            c0 = fma_lanes(x, x, c0)
            x = load_wide(a, j + 4)
            c1 = fma_lanes(x, x, c1)
            x = load_wide(a, j + 8)
            c2 = fma_lanes(x, x, c2)
            x = load_wide(a, j + 12)
            c3 = fma_lanes(x, x, c3)
            x = load_wide(a, j + 16)
            c4 = fma_lanes(x, x, c4)
            x = load_wide(a, j + 20)
            c5 = fma_lanes(x, x, c5)
            x = load_wide(a, j + 24)
            c6 = fma_lanes(x, x, c6)
            x = load_wide(a, j + 28)
            c7 = fma_lanes(x, x, c7)
            j += _ROUND
        s = _total(c0, c1, c2, c3, c4, c5, c6, c7)
        for k in range(j, n):
            s = fma_scalar(a[k], a[k], s)
        return s

    @njit(cache=True)
    def _dot(a, b):
        # sum of a[j] * b[j] in float64, `_sumsq`'s order
        n = a.shape[0]
        c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = zero_wide()
        j = 0
        while j + _ROUND <= n:
            c0 = fma_lanes(load_wide(a, j), load_wide(b, j), c0)
            c1 = fma_lanes(load_wide(a, j + 4), load_wide(b, j + 4), c1)
            c2 = fma_lanes(load_wide(a, j + 8), load_wide(b, j + 8), c2)
            c3 = fma_lanes(load_wide(a, j + 12), load_wide(b, j + 12), c3)
            c4 = fma_lanes(load_wide(a, j + 16), load_wide(b, j + 16), c4)
            c5 = fma_lanes(load_wide(a, j + 20), load_wide(b, j + 20), c5)
            c6 = fma_lanes(load_wide(a, j + 24), load_wide(b, j + 24), c6)
            c7 = fma_lanes(load_wide(a, j + 28), load_wide(b, j + 28), c7)
            j += _ROUND
        s = _total(c0, c1, c2, c3, c4, c5, c6, c7)
        for k in range(j, n):
            s = fma_scalar(a[k], b[k], s)
        return s

    @njit(cache=True)
    def _update_sums(u, last, p):
        # (_sumsq(u), _dot(u, last), _sumsq(p)) in one pass over the three rows, the same
        # bits: after an update, its norm, its cosine with the last one, and the new
        # parameters' norm (the next step's), while the rows are in L1.
        n = u.shape[0]
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero_wide()
        b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = zero_wide()
        c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = zero_wide()
        j = 0
        while j + _ROUND <= n:
            x = load_wide(u, j)
            a0 = fma_lanes(x, x, a0)
            b0 = fma_lanes(x, load_wide(last, j), b0)
            y = load_wide(p, j)
            c0 = fma_lanes(y, y, c0)
            x = load_wide(u, j + 4)
            a1 = fma_lanes(x, x, a1)
            b1 = fma_lanes(x, load_wide(last, j + 4), b1)
            y = load_wide(p, j + 4)
            c1 = fma_lanes(y, y, c1)
            x = load_wide(u, j + 8)
            a2 = fma_lanes(x, x, a2)
            b2 = fma_lanes(x, load_wide(last, j + 8), b2)
            y = load_wide(p, j + 8)
            c2 = fma_lanes(y, y, c2)
            x = load_wide(u, j + 12)
            a3 = fma_lanes(x, x, a3)
            b3 = fma_lanes(x, load_wide(last, j + 12), b3)
            y = load_wide(p, j + 12)
            c3 = fma_lanes(y, y, c3)
            x = load_wide(u, j + 16)
            a4 = fma_lanes(x, x, a4)
            b4 = fma_lanes(x, load_wide(last, j + 16), b4)
            y = load_wide(p, j + 16)
            c4 = fma_lanes(y, y, c4)
            x = load_wide(u, j + 20)
            a5 = fma_lanes(x, x, a5)
            b5 = fma_lanes(x, load_wide(last, j + 20), b5)
            y = load_wide(p, j + 20)
            c5 = fma_lanes(y, y, c5)
            x = load_wide(u, j + 24)
            a6 = fma_lanes(x, x, a6)
            b6 = fma_lanes(x, load_wide(last, j + 24), b6)
            y = load_wide(p, j + 24)
            c6 = fma_lanes(y, y, c6)
            x = load_wide(u, j + 28)
            a7 = fma_lanes(x, x, a7)
            b7 = fma_lanes(x, load_wide(last, j + 28), b7)
            y = load_wide(p, j + 28)
            c7 = fma_lanes(y, y, c7)
            j += _ROUND
        su = _total(a0, a1, a2, a3, a4, a5, a6, a7)
        du = _total(b0, b1, b2, b3, b4, b5, b6, b7)
        sp = _total(c0, c1, c2, c3, c4, c5, c6, c7)
        for k in range(j, n):
            su = fma_scalar(u[k], u[k], su)
            du = fma_scalar(u[k], last[k], du)
            sp = fma_scalar(p[k], p[k], sp)
        return su, du, sp

    @njit(cache=True, inline="always")
    def _put(dst, src):
        # dst[:] = src as a loop: outside a parallel loop, a slice assignment compiles
        # numba's broadcasting and its error messages, about 3 s of the trial-major
        # kernel's first compilation.
        for j in range(src.shape[0]):
            dst[j] = src[j]

    @njit(cache=True, inline="always")
    def _part(blocks, offsets, rows, k, r):
        # Row r of gradient part k: parts lie one after another in `blocks`, each a
        # contiguous [rows, width] block (Network.part_views).
        width = offsets[k + 1] - offsets[k]
        start = rows * offsets[k] + r * width
        return blocks[start:start + width]

    # SGD's and Adam's row functions are inlined into the kernel (numba's inline="always"):
    # compiled apart, their loops were not vectorised (4x slower). Loop-invariant choices
    # are made outside the loops for the same reason; a choice that needs a second loop over
    # the row finds it in L1/L2. amsgrad's, RMSprop's and Adagrad's are compiled apart:
    # numba copies an inlined function's IR into every call site, and inlined they took
    # the kernel's first compilation from about 22 to 30 s, for no speed measurable on
    # optimizer_compare (46,000-47,000 trial-steps per CPU-second either way).
    @njit(cache=True, inline="always")
    def _sgd_row(p, g, upd, buf, first, neg_lr, wd, momentum, keep, grad_share, buf_share):
        # engine.batched_optimizers.BatchedSGD, one row, p in place: grad += p * wd;
        # buf = buf * m + grad * keep (first step: buf = grad); direction = buf or
        # grad * share + buf * share (Nesterov); p = p + direction * -lr.
        n = p.shape[0]
        if wd != 0:
            for j in range(n):
                g[j] = g[j] + p[j] * wd
        if momentum != 0 and grad_share == 0:
            # Heavy ball: the buffer and the new row in one pass over the row.
            if first:
                for j in range(n):
                    buf[j] = g[j]
                    _sgd_tail(j, buf, p, upd, neg_lr)
            else:
                for j in range(n):
                    buf[j] = buf[j] * momentum + g[j] * keep
                    _sgd_tail(j, buf, p, upd, neg_lr)
            return
        direction = g
        if momentum != 0:  # Nesterov
            if first:
                for j in range(n):
                    buf[j] = g[j]
            else:
                for j in range(n):
                    buf[j] = buf[j] * momentum + g[j] * keep
            for j in range(n):
                g[j] = g[j] * grad_share + buf[j] * buf_share
        for j in range(n):
            _sgd_tail(j, direction, p, upd, neg_lr)

    @njit(cache=True, inline="always")
    def _sgd_tail(j, direction, p, upd, neg_lr):
        # Entry j of SGD's update along `direction` and the new p[j] (as stored: in the
        # dtype), the update first: it reads the old p[j].
        q = p[j] + direction[j] * neg_lr
        upd[j] = q - p[j]
        p[j] = q

    @njit(cache=True, inline="always")
    def _adam_row(p, g, upd, m, v, top, decoupled, neg_step, bc2, wd, beta2, omb2, eps, decay,
                  omb1, amsgrad):
        # engine.batched_optimizers.BatchedAdam, one row: L2 decay into the gradient (Adam) or a
        # decayed parameter (AdamW); m = lerp(m, grad, 1 - beta1) in torch's two-branch
        # form; v = v * beta2 + (grad * (1 - beta2)) * grad; denom = eps + sqrt(v) / bc2;
        # p = p' + (m * -step_size) / denom, in place. The moments and the new row in one
        # pass over the row (a fifth to a quarter faster than a pass each), a loop per
        # choice. amsgrad: `_amsgrad_row`, with the largest v so far in `top`.
        if amsgrad:
            _amsgrad_row(p, g, upd, m, v, top, decoupled, neg_step, bc2, wd, beta2, omb2,
                         eps, decay, omb1)
            return
        n = p.shape[0]
        if wd != 0 and not decoupled:
            for j in range(n):
                g[j] = g[j] + p[j] * wd
        shrink = wd != 0 and decoupled
        if omb1 < 0.5:
            if shrink:
                for j in range(n):
                    m[j] = m[j] + omb1 * (g[j] - m[j])
                    _adam_tail(j, p.dtype.type(p[j] * decay), p, g, m, v, upd, neg_step,
                               bc2, beta2, omb2, eps)
            else:
                for j in range(n):
                    m[j] = m[j] + omb1 * (g[j] - m[j])
                    _adam_tail(j, p[j], p, g, m, v, upd, neg_step, bc2, beta2, omb2, eps)
        else:
            # A pass of its own: w is a float64, and with the rest in the same loop the
            # float32 loop was not vectorised (2x slower).
            w = omb1 * 0 + 1 - omb1  # 1 - weight in the dtype, as torch computes it
            for j in range(n):
                m[j] = g[j] - (g[j] - m[j]) * w
            if shrink:
                for j in range(n):
                    _adam_tail(j, p.dtype.type(p[j] * decay), p, g, m, v, upd, neg_step,
                               bc2, beta2, omb2, eps)
            else:
                for j in range(n):
                    _adam_tail(j, p[j], p, g, m, v, upd, neg_step, bc2, beta2, omb2, eps)

    @njit(cache=True, inline="always")
    def _adam_tail(j, start, p, g, m, v, upd, neg_step, bc2, beta2, omb2, eps):
        # Entry j of Adam's second moment, update and new p[j], from the new first moment
        # m[j] (read back as stored: rounded to the dtype) and `start`, the parameter
        # (AdamW: decayed, rounded to the dtype as a stored entry); the update first.
        gj = g[j]
        vj = v[j] * beta2 + (gj * omb2) * gj
        v[j] = vj
        q = start + (m[j] * neg_step) / (eps + np.sqrt(vj) / bc2)
        upd[j] = q - p[j]
        p[j] = q

    @njit(cache=True, error_model="numpy")
    def _amsgrad_row(p, g, upd, m, v, top, decoupled, neg_step, bc2, wd, beta2, omb2, eps,
                     decay, omb1):
        # `_adam_row` with amsgrad: top = maximum(top, v) (torch.maximum: a NaN wins), and
        # the denominator from top, eps + sqrt(top) / bc2. A pass for the first moment, one
        # for the rest.
        n = p.shape[0]
        if wd != 0 and not decoupled:
            for j in range(n):
                g[j] = g[j] + p[j] * wd
        _lerp_row(m, g, omb1)
        shrink = wd != 0 and decoupled
        for j in range(n):
            gj = g[j]
            vj = v[j] * beta2 + (gj * omb2) * gj
            v[j] = vj
            most = top[j]
            if vj > most or vj != vj:
                most = vj
            top[j] = most
            start = p.dtype.type(p[j] * decay) if shrink else p[j]
            q = start + (m[j] * neg_step) / (eps + np.sqrt(most) / bc2)
            upd[j] = q - p[j]
            p[j] = q

    @njit(cache=True, error_model="numpy")
    def _lerp_row(m, g, weight):
        # m = torch.lerp(m, g, weight) in torch's two-branch form: m + weight * (g - m) for
        # a weight below 0.5, else g - (g - m) * (1 - weight), each branch's arithmetic
        # `_adam_row`'s for its first moment (so that amsgrad's is the same).
        n = m.shape[0]
        if weight < 0.5:
            for j in range(n):
                m[j] = m[j] + weight * (g[j] - m[j])
        else:
            w = weight * 0 + 1 - weight
            for j in range(n):
                m[j] = g[j] - (g[j] - m[j]) * w

    @njit(cache=True, error_model="numpy")
    def _rmsprop_row(p, g, upd, buf, square, mean, neg_lr, wd, alpha, oma, eps, momentum,
                     centered):
        # engine.batched_optimizers.BatchedRMSprop, one row: L2 decay into the gradient;
        # square = square * alpha + (grad * (1 - alpha)) * grad; centered: mean =
        # lerp(mean, grad, 1 - alpha) and avg = sqrt(square - mean * mean) + eps, else
        # sqrt(square) + eps (avg held in `upd` until the update overwrites it); momentum:
        # buf = buf * momentum + grad / avg and p = p + buf * -lr, else p = p + (grad *
        # -lr) / avg.
        n = p.shape[0]
        if wd != 0:
            for j in range(n):
                g[j] = g[j] + p[j] * wd
        for j in range(n):
            square[j] = square[j] * alpha + (g[j] * oma) * g[j]
        if centered:
            _lerp_row(mean, g, oma)
            for j in range(n):
                upd[j] = np.sqrt(square[j] - mean[j] * mean[j]) + eps
        else:
            for j in range(n):
                upd[j] = np.sqrt(square[j]) + eps
        if momentum != 0:
            for j in range(n):
                buf[j] = buf[j] * momentum + g[j] / upd[j]
                _sgd_tail(j, buf, p, upd, neg_lr)
        else:
            for j in range(n):
                q = p[j] + (g[j] * neg_lr) / upd[j]
                upd[j] = q - p[j]
                p[j] = q

    @njit(cache=True, error_model="numpy")
    def _adagrad_row(p, g, upd, total, neg_clr, wd, eps):
        # engine.batched_optimizers.BatchedAdagrad, one row: L2 decay into the gradient;
        # total = total + grad * grad; p = p + (grad * -clr) / (sqrt(total) + eps), clr the
        # step's decayed learning rate.
        n = p.shape[0]
        if wd != 0:
            for j in range(n):
                g[j] = g[j] + p[j] * wd
        for j in range(n):
            gj = g[j]
            s = total[j] + gj * gj
            total[j] = s
            q = p[j] + (gj * neg_clr) / (np.sqrt(s) + eps)
            upd[j] = q - p[j]
            p[j] = q

    @njit(cache=True, inline="always")
    def _row_update(kind, p, g, upd, state1, state2, state3, first, step_lr, bc2, hp, decay):
        # One row's update by its family (`_KINDS`), from its hyperparameters `hp` (a
        # column of the table, `_HP`), its step's scalars and AdamW's `decay`; p in place,
        # the update into `upd`. state1: SGD's and RMSprop's momentum buffer, Adam's first
        # moment; state2: Adam's and RMSprop's second moment, Adagrad's sum; state3:
        # amsgrad's largest second moment, centered RMSprop's mean gradient (else empty).
        if kind == _SGD:
            _sgd_row(p, g, upd, state1, first, step_lr, hp[_WD], hp[_MOM_B2], hp[_KEEP_OMB2],
                     hp[_SHARE_EPS], hp[_BUFSHARE])
        elif kind == _RMSPROP:
            _rmsprop_row(p, g, upd, state1, state2, state3, step_lr, hp[_WD], hp[_MOM_B2],
                         hp[_KEEP_OMB2], hp[_SHARE_EPS], hp[_BUFSHARE], hp[_FLAG] != 0)
        elif kind == _ADAGRAD:
            _adagrad_row(p, g, upd, state2, step_lr, hp[_WD], hp[_SHARE_EPS])
        else:
            _adam_row(p, g, upd, state1, state2, state3, kind == _ADAMW, step_lr, bc2,
                      hp[_WD], hp[_MOM_B2], hp[_KEEP_OMB2], hp[_SHARE_EPS], decay, hp[_OMB1],
                      hp[_FLAG] != 0)

    # IEEE division (error_model="numpy") rather than Python's ZeroDivisionError: the check
    # for a zero divisor kept Adam's division from being vectorised (about 4x slower on a
    # row of 4,676). Adam's divisor is at least eps > 0: the same bits either way.
    @njit(parallel=True, cache=True, error_model="numpy")
    def _fused_step(params, blocks, offsets, previous, state1, state2, state3, loss, alive,
                    rec, prev_norm, has_prev, first, kind, hp, step_lr, step_bc2):
        rows, n = params.shape
        parts = len(offsets) - 1
        for r in prange(rows):
            p, prev = params[r], previous[r]
            # A sum of squares is rounded to the dtype before its root: like torch's norm in
            # float32, a norm past the dtype's range reads inf (the reference's divergence).
            total = 0.0
            for k in range(parts):
                total += _sumsq(_part(blocks, offsets, rows, k, r))
            rec[1, r] = total
            rec[2, r] = _sumsq(_part(blocks, offsets, rows, 0, r))  # the first weight
            rec[3, r] = _sumsq(_part(blocks, offsets, rows, parts - 2, r))  # the last one
            rec[4, r] = _sumsq(p)
            for k in range(1, 5):
                rec[k, r] = np.sqrt(rec[k, r])
            live = alive[r] and np.isfinite(loss[r]) and np.isfinite(rec[1, r])
            alive[r] = live
            # The parameters in place (lines already in the cache), the update to a
            # scratch row (L1/L2) and then over the previous update, which the cosine
            # reads first.
            update = np.zeros(n, dtype=params.dtype)
            if live:  # a frozen row keeps its parameters and state: no update
                for k in range(parts):  # block by block of the gradient parts
                    lo, hi = offsets[k], offsets[k + 1]
                    _row_update(kind[r], p[lo:hi], _part(blocks, offsets, rows, k, r),
                                update[lo:hi], state1[r, lo:hi], state2[r, lo:hi],
                                state3[r, lo:hi], first, step_lr[r], step_bc2[r], hp[:, r],
                                hp[_DECAY, r])
            rec[5, r] = _sumsq(update)
            rec[5, r] = np.sqrt(rec[5, r])
            if has_prev:  # F.cosine_similarity(eps=1e-30)
                rec[6, r] = _dot(update, prev) / (
                    max(np.float64(rec[5, r]), 1e-30) * max(np.float64(prev_norm[r]), 1e-30))
            else:
                rec[6, r] = np.nan
            prev_norm[r] = rec[5, r]
            prev[:] = update


def _step_lr(t: int, lr: float, kind: int, beta1: float, lr_decay: float) -> float:
    """The signed step size of step t, in Python floats as torch computes it: -lr (SGD,
    RMSprop), -(lr / (1 - beta1**t)) (Adam, AdamW), -(lr / (1 + (t - 1) * lr_decay))
    (Adagrad)."""
    if kind in (_ADAM, _ADAMW):
        return -(lr / (1 - beta1**t))
    if kind == _ADAGRAD:
        return -(lr / (1 + (t - 1) * lr_decay))
    return -lr


def _step_bc2(t: int, kind: int, beta2: float) -> float:
    """torch's (1 - beta2**t) ** 0.5 (Adam, AdamW); 1 for the others (unused)."""
    return (1 - beta2**t) ** 0.5 if kind in (_ADAM, _ADAMW) else 1.0


def _hyperparameters(spec: OptimizerSpec) -> tuple[float, ...]:
    """`spec`'s column of the hyperparameter table, in `_HP`'s order."""
    if isinstance(spec, SGD):
        keep = 1 - spec.dampening if spec.momentum != 0 else 1.0
        buf_share = spec.momentum if spec.nesterov else 1.0
        return (spec.weight_decay, spec.momentum, keep, float(spec.nesterov), buf_share, 1.0,
                0.0, 0.0)
    if isinstance(spec, RMSprop):
        return (spec.weight_decay, spec.alpha, 1 - spec.alpha, spec.eps, spec.momentum, 1.0,
                0.0, float(spec.centered))
    if isinstance(spec, Adagrad):
        return (spec.weight_decay, 0.0, 0.0, spec.eps, 0.0, 1.0, 0.0, 0.0)
    return (spec.weight_decay, spec.betas[1], 1 - spec.betas[1], spec.eps, 1.0,
            1 - spec.lr * spec.weight_decay, 1 - spec.betas[0], float(spec.amsgrad))


class FusedUpdate:
    """Optimizer state and hyperparameters of a fusable population, one row per trial.

    `step` replaces `BatchedOptimizer.step` and the step records of the eager path; see the
    module doc. Compaction calls `select` with the kept rows, as for `MixedOptimizer`.
    """

    def __init__(self, specs: Sequence[OptimizerSpec], params: Tensor) -> None:
        if not fusable(specs, clip=False, zero_grad=True):
            raise ValueError("FusedUpdate takes populations of torch.optim's SGD, Adam, AdamW, "
                             "RMSprop and Adagrad")
        load_implementations()
        self.specs = list(specs)
        self.dtype = params.dtype
        self.t = 0
        # As many kernel threads as torch has (local workers each get cores / workers).
        # Starting numba's thread pool (its OpenMP layer) resets the OpenMP thread count
        # torch shares with it to NUMBA_NUM_THREADS: torch's own setting is put back.
        threads = torch.get_num_threads()
        numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, threads)))
        torch.set_num_threads(threads)
        self.kind = torch.tensor([_KINDS[type(s)] for s in specs], dtype=torch.int64)
        self._scheduling_rows()
        # Python floats rounded once to the dtype, as torch rounds a Python scalar.
        self.hp = torch.tensor([_hyperparameters(s) for s in specs],
                               dtype=torch.float64).T.to(self.dtype).contiguous()
        rows = [(s.lr, _KINDS[type(s)], getattr(s, "betas", (0.0, 0.0))[0],
                 getattr(s, "lr_decay", 0.0)) for s in specs]
        self.step_lr = StepScalars(_step_lr, rows, self.dtype, params.device)
        self.step_bc2 = StepScalars(
            _step_bc2, [(_KINDS[type(s)], getattr(s, "betas", (0.0, 0.0))[1]) for s in specs],
            self.dtype, params.device)
        # `_row_update`'s states: state1 for every row (unused by Adagrad's), state2 and
        # state3 [T, 0] where no row needs them. Adagrad's sum starts at its
        # initial_accumulator_value (in the dtype, as torch rounds it).
        self.state1 = torch.zeros_like(params)
        initial = [getattr(s, "initial_accumulator_value", 0.0) for s in specs]
        self.state2 = (torch.tensor(initial, dtype=self.dtype)[:, None].expand_as(params).clone()
                       if any(not isinstance(s, SGD) for s in specs)
                       else params.new_zeros(len(specs), 0))
        third = any(getattr(s, "amsgrad", False) or getattr(s, "centered", False)
                    for s in specs)
        self.state3 = torch.zeros_like(params) if third else params.new_zeros(len(specs), 0)
        self.prev_norm = torch.zeros(len(specs), dtype=self.dtype)

    def step(self, params: Tensor, blocks: Tensor, offsets: np.ndarray, previous: Tensor,
             rec: Tensor, loss: Tensor, alive: Tensor, lrs: Sequence[float] | None = None
             ) -> None:
        """One step of every row, in place: `params` become the new parameters, `previous`
        (the last step's update) becomes this step's update (new - old parameters), `rec`
        [STEP_FIELDS, T] gets records 1-6 (0, the loss, is the caller's), and `alive` turns
        false for rows whose loss or gradient norm is not finite: those keep their
        parameters and state (update 0).

        `blocks`: the gradient as `Network.backward_parts` wrote it into
        `Network.part_views(blocks, T)`: one contiguous [T, n] block per weight and bias, in
        storage order, one after another (scratch space for the update). `offsets`: the
        blocks' column offsets in a parameter row (int64, one more than there are blocks).

        `lrs`: this step's learning rate per row when a schedule sets it (else the specs'
        lr).
        """
        self.t += 1
        t = self.t
        if lrs is None:
            step_lr = self.step_lr.at(t)[:, 0]
            hp = self.hp
        else:
            hp = self.hp.clone()
            step_lr, hp[_DECAY] = self.scheduled(t, lrs)
        _fused_step(params.numpy(), blocks.numpy(), offsets,
                    previous.numpy(), self.state1.numpy(), self.state2.numpy(),
                    self.state3.numpy(), loss.numpy(), alive.numpy(), rec.numpy(),
                    self.prev_norm.numpy(),
                    t > 1, t == 1, self.kind.numpy(), hp.numpy(),
                    step_lr.contiguous().numpy(), self.step_bc2.at(t)[:, 0].contiguous().numpy())

    def scheduled(self, t: int, lrs: Sequence[float]) -> tuple[Tensor, Tensor]:
        """([T] step size, [T] AdamW decay 1 - lr * weight_decay) of step t from each row's
        learning rate `lrs` at that step (a schedule's), in the dtype, as the eager
        optimizers compute them.

        Over all rows at once, with `_step_lr`'s float64 operations row by row: the bias
        correction 1 - beta1**t per distinct beta1 in Python, Adagrad's 1 + (t - 1) *
        lr_decay, then one division and one negation per row (IEEE, so the same bits as
        Python's floats)."""
        lr = np.asarray(lrs, dtype=np.float64)
        divisor = np.where(self._adagrad_rows, 1 + (t - 1) * self._lr_decay,
                           bias_correction1(self._beta1s, self._beta1_of, t))
        step_lr = np.where(self._plain_rows, -lr, -(lr / divisor))
        decay = 1 - lr * self._weight_decay
        return torch.from_numpy(step_lr).to(self.dtype), torch.from_numpy(decay).to(self.dtype)

    def _scheduling_rows(self) -> None:
        """What `scheduled` needs of each row's spec, as arrays: whether its step size is
        -lr (SGD, RMSprop), whether it is Adagrad's, its lr_decay, the index of its beta1
        among the distinct ones, its weight decay."""
        kinds = self.kind.numpy()
        self._plain_rows = (kinds == _SGD) | (kinds == _RMSPROP)
        self._adagrad_rows = kinds == _ADAGRAD
        self._lr_decay = np.array([getattr(s, "lr_decay", 0.0) for s in self.specs],
                                  dtype=np.float64)
        beta1 = [getattr(s, "betas", (0.0, 0.0))[0] for s in self.specs]
        self._beta1s, self._beta1_of = np.unique(np.asarray(beta1, dtype=np.float64),
                                                 return_inverse=True)
        self._weight_decay = np.array([s.weight_decay for s in self.specs], dtype=np.float64)

    def preconditioner(self) -> Tensor:
        """[T, P] float64: `batched_optimizers.preconditioner` of each row (NaN for SGD rows)."""
        return state_preconditioner(self.specs, self.t, self.state1, self.state2, self.state3)

    def select(self, index: Tensor) -> None:
        """Keep only rows `index` (in that order)."""
        self.kind = self.kind[index]
        self.hp = self.hp[:, index].contiguous()
        self.state1, self.state2 = self.state1[index], self.state2[index]
        self.state3 = self.state3[index]
        self.prev_norm = self.prev_norm[index]
        self.step_lr.select(index)
        self.step_bc2.select(index)
        self.specs = [self.specs[i] for i in index.tolist()]
        self._scheduling_rows()


def state_preconditioner(specs: Sequence[OptimizerSpec], t: int, state1: Tensor,
                         state2: Tensor, state3: Tensor) -> Tensor:
    """[T, P] float64: `batched_optimizers.preconditioner` of each row after `t` updates
    from the fused update's states (`_row_update`; NaN for SGD rows): the second moment is
    state2, or state3 for an amsgrad row; a centered RMSprop row's mean gradient is state3."""
    if state2.shape[1] == 0:  # SGD only
        return torch.full(state1.shape, float("nan"), dtype=torch.float64)
    second, mean = state2, None
    if state3.shape[1]:
        amsgrad = torch.tensor([getattr(s, "amsgrad", False) for s in specs])
        second = torch.where(amsgrad[:, None], state3, state2)
        mean = state3
    return preconditioner(specs, t, second, mean)
