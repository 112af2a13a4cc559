"""The trial-major CPU kernel: each trial's whole run as one loop nest (numba).

The population engine's layer-major path runs a population one operation at a time over all
of its rows: every step streams [T, B, width] activations and [T, P] parameter rows through
memory and pays torch's dispatch per operation. Here a trial is the unit of work instead: one
thread takes a trial and runs all of it, every epoch's batches (forward, loss, backward,
step records, freeze decision, update) and every evaluation of the full splits (losses,
accuracy, activation health on the probe), with the trial's parameters, optimizer state and
activations (about 100 KB for a 2 x 64 MLP) resident in its core's L1/L2 cache. Each
thread (a Python thread running compiled code, without the GIL) takes the next trial from a
shared atomic counter as it finishes one (`_rows`), so a trial that diverges early frees its
thread for the next, no thread ever waits for another, and none comes back to Python until
the call's trials are all taken: the caller's thread may run Python meanwhile
(`Kernel.start`) without slowing them. A thread that needed the GIL between trials would
wait for it up to the interpreter's switch interval (5 ms) whenever another thread runs
Python.

Numbers: the same arithmetic as the layer-major path, in the parameter dtype, with the
update of `study.engine.fused` (torch's single-tensor optimizer formulas, in torch's order).
The matrix products are the kernel's own (`_product`: each entry a chain of fused
multiply-adds in order, its accumulators held in SIMD registers, `intrinsics`), not BLAS's:
a trial agrees with the reference engine (MKL's products, summed in their own order) to the
rounding of its products, the equivalence contract of tests/study/engine/test_population.py.
Nothing is shared between trials, and every loop is the same whatever the population and
the thread, so a trial's numbers are bit-identical alone, in any population and on any
number of threads. Losses, norms and evaluation means are summed in float64.

What it runs (`fits`): CPU populations with numba, no dropout, a ReLU / tanh / sigmoid /
identity MLP, the task's loss (MSE or cross-entropy), Huber's on a regression, MSE on
one-hot targets or weighted cross-entropy on a classification, torch.optim's SGD, Adam,
AdamW (amsgrad or not), RMSprop or Adagrad, gradient clipping or none, zero_grad or not,
weight decay on every layer or on some. The kernel stops at every evaluation and opt-in
diagnostics step (`Kernel.advance`), where the population engine runs its loop in Python
as for the layer-major path: the `on_eval` hook (pruning), early stopping,
ReduceLROnPlateau, learning-rate schedules (`Kernel.schedule`) and the diagnostics.
Everything else takes the layer-major path.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from study.engine.fused import FusedUpdate, fusable, state_preconditioner
from study.engine.network import Network
from study.models import PROBE_SIZE, SATURATION_Z
from study.parallel import run_jobs
from study.trial import LoopSpec, TrialSpec

try:
    import numba
    from numba import njit
    from numba.core import event as numba_event

    from study.engine.elementary import exp, tanh
    from study.engine.fused import _put, _row_update, _sumsq, _update_sums
    from study.engine.intrinsics import (
        fetch_add,
        fma,
        fma_scalar,
        lanes_of,
        load,
        load_at,
        matrix,
        relu,
        store_at,
        transpose_block,
    )
except ImportError:  # pragma: no cover - numba is a dependency; this guards broken installs
    njit = None

Tensor = torch.Tensor
log = logging.getLogger(__name__)

# numba keys a function's disk cache by its own file (its content or its modification time,
# by numba's version), not by the files whose functions it inlines: this digest of those
# (sha256 of their bytes, in this order) makes a change there a change here, so that the
# cache misses and the kernel compiles again. The tests fail, naming the new value, until
# it is current.
INLINED = ("fused.py", "intrinsics.py", "elementary.py")
INLINED_DIGEST = "7900908e0912406b17ba50c77a7ad25328efc30fa245bbd39ea00e9c07d7960c"

# Activation codes of the kernel.
_ACTIVATIONS = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3}
_IDENTITY, _RELU, _TANH, _SIGMOID = range(4)


def fits(trials: Sequence[TrialSpec], device: torch.device) -> bool:
    """Whether a population of `trials` (one `batch_key`) can take the kernel; see the
    module doc."""
    return unfit(trials, device) is None


def unfit(trials: Sequence[TrialSpec], device: torch.device) -> str | None:
    """Why a population of `trials` (one `batch_key`) cannot take the kernel, in a few
    words ("dropout", "the bce_raw training loss", ...); None where it can."""
    first = trials[0]
    loop, model = first.loop, first.model
    if torch.device(device).type != "cpu":
        return f"a {torch.device(device).type} device"
    if first.train.dtype not in ("float32", "float64"):
        return f"{first.train.dtype}"
    if model.activation not in _ACTIVATIONS:
        return f"the {model.activation} activation"
    if model.dropout != 0:
        return "dropout"
    if not (loop.loss == "task" or (loop.loss == "huber" and first.task.loss == "mse")
            or (loop.loss in ("mse_onehot", "weighted_cross_entropy")
                and first.task.loss == "cross_entropy")):
        return f"the {loop.loss} training loss"
    # its update's formulas; clipping and accumulation are the kernel's own (the layer-major
    # fused update has neither)
    if not fusable([t.optimizer for t in trials], clip=False, zero_grad=True):
        return "an optimizer without the fused update" if njit is not None else "no numba"
    return None


if njit is not None:
    # The dot products (the forward pass of a narrow layer, the input gradient of a small
    # batch) reassociate their sums, so that they vectorise; the other loops keep numba's
    # strict order.
    _DOT = {"reassoc", "nsz", "contract"}

    @njit(cache=True, inline="always")
    def _out(v, rectify):
        # What a product stores of a block: v, or relu(v) (`_product`'s `rectify`).
        return relu(v) if rectify else v

    @njit(cache=True, inline="always")
    def _store_pair(z, r, o, lanes, c0, c1, rectify):
        # Row r of a block of 2 vectors: z[r, o:o + 2 * lanes] = c0, c1 (`_out`).
        store_at(z, r, o, _out(c0, rectify))
        store_at(z, r, o + lanes, _out(c1, rectify))

    @njit(cache=True)
    def _product(a, w, b, z, rectify):
        # z[i, o] = b[o] + sum_k a[i, k] * w[k, o], each entry one chain of fused
        # multiply-adds over k in order, whatever the shapes and however the entry is
        # reached; with `rectify` (a literal: its own compilation), relu of that, as
        # `_activate` computes it, applied as the block is stored. Blocks of 4 rows x 2
        # vectors of z stay in registers (`intrinsics.Vector`) for the whole k loop, so
        # each load of w feeds four products and nothing goes back to memory until the
        # block is done. `a` may be a transposed view (the weight gradient h^T g); w and z
        # are C-contiguous.
        rows, inner = a.shape
        n = z.shape[1]
        lanes = lanes_of(z)
        wide = n - n % (2 * lanes)  # columns in blocks of 2 vectors
        single = n - n % lanes  # then of 1 vector; the rest one by one
        i = 0
        while i + 4 <= rows:
            for o in range(0, wide, 2 * lanes):
                c00, c01 = load(b, o), load(b, o + lanes)
                c10, c11, c20, c21, c30, c31 = c00, c01, c00, c01, c00, c01
                for k in range(inner):
                    x0, x1 = load_at(w, k, o), load_at(w, k, o + lanes)
                    a0, a1, a2, a3 = a[i, k], a[i + 1, k], a[i + 2, k], a[i + 3, k]
                    c00 = fma(x0, a0, c00)
                    c01 = fma(x1, a0, c01)
                    c10 = fma(x0, a1, c10)
                    c11 = fma(x1, a1, c11)
                    c20 = fma(x0, a2, c20)
                    c21 = fma(x1, a2, c21)
                    c30 = fma(x0, a3, c30)
                    c31 = fma(x1, a3, c31)
                _store_pair(z, i, o, lanes, c00, c01, rectify)
                _store_pair(z, i + 1, o, lanes, c10, c11, rectify)
                _store_pair(z, i + 2, o, lanes, c20, c21, rectify)
                _store_pair(z, i + 3, o, lanes, c30, c31, rectify)
            i += 4
        for r in range(i, rows):
            for o in range(0, wide, 2 * lanes):
                c0, c1 = load(b, o), load(b, o + lanes)
                for k in range(inner):
                    c0 = fma(load_at(w, k, o), a[r, k], c0)
                    c1 = fma(load_at(w, k, o + lanes), a[r, k], c1)
                _store_pair(z, r, o, lanes, c0, c1, rectify)
        for r in range(rows):
            for o in range(wide, single, lanes):
                c0 = load(b, o)
                for k in range(inner):
                    c0 = fma(load_at(w, k, o), a[r, k], c0)
                store_at(z, r, o, _out(c0, rectify))
            for o in range(single, n):
                s = b[o]
                for k in range(inner):
                    s = fma_scalar(a[r, k], w[k, o], s)
                z[r, o] = s if not (rectify and s <= 0) else z.dtype.type(0)

    @njit(cache=True)
    def _product_tall(a, w, b, z, rectify):
        # `_product` with blocks of 6 rows x 2 vectors first (12 accumulators, 2 loads of
        # w and a broadcast of a: 15 of AVX2's 16 registers): more products in flight, and
        # operands that outgrow L1 (a weight gradient h^T g over 256 rows) read a third
        # fewer times from L2. Each entry is the same chain of fused multiply-adds as
        # `_product`'s. A function of its own: inside `_product`, the 6-row loop slowed
        # its 4-row loop at few inner steps (batch 8). `_product_best` says where it pays.
        rows, inner = a.shape
        lanes = lanes_of(z)
        if z.shape[1] % (2 * lanes):  # columns left over: `_product`'s loops cover them
            _product(a, w, b, z, rectify)
            return
        wide = z.shape[1]
        # Rows as 6p + 4q, so that an even count leaves no row to the one-row loop.
        sixes_end = rows - 4 * (2 if rows % 6 == 2 else 1 if rows % 6 == 4 else 0)
        i = 0
        while i + 6 <= sixes_end:
            for o in range(0, wide, 2 * lanes):
                c00, c01 = load(b, o), load(b, o + lanes)
                c10, c11, c20, c21, c30, c31 = c00, c01, c00, c01, c00, c01
                c40, c41, c50, c51 = c00, c01, c00, c01
                for k in range(inner):
                    x0, x1 = load_at(w, k, o), load_at(w, k, o + lanes)
                    a0 = a[i, k]
                    c00 = fma(x0, a0, c00)
                    c01 = fma(x1, a0, c01)
                    a1 = a[i + 1, k]
                    c10 = fma(x0, a1, c10)
                    c11 = fma(x1, a1, c11)
                    a2 = a[i + 2, k]
                    c20 = fma(x0, a2, c20)
                    c21 = fma(x1, a2, c21)
                    a3 = a[i + 3, k]
                    c30 = fma(x0, a3, c30)
                    c31 = fma(x1, a3, c31)
                    a4 = a[i + 4, k]
                    c40 = fma(x0, a4, c40)
                    c41 = fma(x1, a4, c41)
                    a5 = a[i + 5, k]
                    c50 = fma(x0, a5, c50)
                    c51 = fma(x1, a5, c51)
                _store_pair(z, i, o, lanes, c00, c01, rectify)
                _store_pair(z, i + 1, o, lanes, c10, c11, rectify)
                _store_pair(z, i + 2, o, lanes, c20, c21, rectify)
                _store_pair(z, i + 3, o, lanes, c30, c31, rectify)
                _store_pair(z, i + 4, o, lanes, c40, c41, rectify)
                _store_pair(z, i + 5, o, lanes, c50, c51, rectify)
            i += 6
        _product(a[i:], w, b, z[i:], rectify)

    @njit(cache=True, inline="always")
    def _product_best(a, w, b, z, rectify):
        # `_product_tall` where its 6-row blocks pay, else `_product` (the same bits): from
        # 64 rows, or from 10 rows with 16 inner steps or more. Below, its slices and the
        # rows left to `_product` cost more than the blocks save (one core, best of 11:
        # 64 x 64 x 64 36.5 against 32.2 FLOP per cycle, 64 x 8 x 64 32.7 against 27.7,
        # 10 x 32 x 64 29.3 against 25.3; 8 x 64 x 64 30.6 against 31.8, 16 x 10 x 64 24.7
        # against 28.0, 2 x 8 x 64 6.6 against 10.0).
        rows, inner = a.shape
        if rows >= 64 or (rows >= 10 and inner >= 16):
            _product_tall(a, w, b, z, rectify)
        else:
            _product(a, w, b, z, rectify)

    @njit(cache=True, fastmath=_DOT)
    def _forward_narrow(h, w, b, z):
        # z[i, o] = b[o] + h[i] . w[o]: w [fan_out, fan_in] (torch's layout), one dot each.
        for i in range(h.shape[0]):
            for o in range(z.shape[1]):
                s = h.dtype.type(0)
                for k in range(h.shape[1]):
                    s += h[i, k] * w[o, k]
                z[i, o] = s + b[o]

    @njit(cache=True, error_model="numpy")
    def _activate(z, out, act):
        # out = act(z), row by row, a loop per activation, each vectorised by LLVM
        # (`elementary`'s exp and tanh; IEEE division, as `_update`: 1 + e^-v is never 0).
        # Out of place: an in-place select compiles to masked stores (relu), 8x slower here
        # than writing every entry.
        zero, one = z.dtype.type(0), z.dtype.type(1)
        rows, n = z.shape
        if act == _RELU:
            for i in range(rows):
                for o in range(n):
                    v = z[i, o]
                    out[i, o] = v if not v <= 0 else zero  # torch.relu keeps NaN
        elif act == _TANH:
            for i in range(rows):
                for o in range(n):
                    out[i, o] = tanh(z[i, o])
        elif act == _SIGMOID:
            for i in range(rows):
                for o in range(n):
                    out[i, o] = one / (one + exp(-z[i, o]))
        else:
            for i in range(rows):
                for o in range(n):
                    out[i, o] = z[i, o]

    @njit(cache=True)
    def _exp_all(v):
        # v = e^v entry by entry over a 1-D array, 8 lanes at a time (float32).
        for k in range(v.shape[0]):
            v[k] = exp(v[k])

    @njit(cache=True)
    def _activation_backward(g, a, out, act):
        # out = g * act'(z), from the activation a = act(z), as torch's backward kernels
        # (out of place, as `_activate`).
        zero, one = g.dtype.type(0), g.dtype.type(1)
        for i in range(g.shape[0]):
            for o in range(g.shape[1]):
                if act == _RELU:
                    out[i, o] = g[i, o] if a[i, o] > 0 else zero
                elif act == _TANH:
                    out[i, o] = g[i, o] * (one - a[i, o] * a[i, o])
                elif act == _SIGMOID:
                    out[i, o] = g[i, o] * (one - a[i, o]) * a[i, o]
                else:
                    out[i, o] = g[i, o]

    @njit(cache=True, fastmath=_DOT, inline="always")
    def _dot_row(g, i, w, k):
        # g[i] . w[k]
        s = g.dtype.type(0)
        for o in range(g.shape[1]):
            s += g[i, o] * w[k, o]
        return s

    @njit(cache=True, fastmath=_DOT)
    def _input_grad_dot(g, w, gh):
        # gh[i, k] = g[i] . w[k]: w [fan_in, fan_out]. Blocks of 2 rows of g by 4 rows of w,
        # 8 sums in one loop, so that each load feeds more than one product (1.6x the
        # speed of one dot product at a time at 8 x 64 x 64).
        rows, n = g.shape
        fi = gh.shape[1]
        zero = gh.dtype.type(0)
        i = 0
        while i + 2 <= rows:
            k = 0
            while k + 4 <= fi:
                s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
                for o in range(n):
                    g0, g1 = g[i, o], g[i + 1, o]
                    w0, w1, w2, w3 = w[k, o], w[k + 1, o], w[k + 2, o], w[k + 3, o]
                    s00 += g0 * w0
                    s01 += g0 * w1
                    s02 += g0 * w2
                    s03 += g0 * w3
                    s10 += g1 * w0
                    s11 += g1 * w1
                    s12 += g1 * w2
                    s13 += g1 * w3
                gh[i, k], gh[i, k + 1], gh[i, k + 2], gh[i, k + 3] = s00, s01, s02, s03
                gh[i + 1, k], gh[i + 1, k + 1] = s10, s11
                gh[i + 1, k + 2], gh[i + 1, k + 3] = s12, s13
                k += 4
            for r in range(i, i + 2):
                for kk in range(k, fi):
                    gh[r, kk] = _dot_row(g, r, w, kk)
            i += 2
        for r in range(i, rows):
            for kk in range(fi):
                gh[r, kk] = _dot_row(g, r, w, kk)

    @njit(cache=True)
    def _transpose(w, w_t):
        # w_t = w^T: square blocks of a vector's lanes moved in registers
        # (`transpose_block`, 3.4x an element-by-element loop at 64 x 64), the edges
        # element by element.
        fi, fo = w.shape
        lanes = lanes_of(w)
        k = 0
        while k + lanes <= fi:
            o = 0
            while o + lanes <= fo:
                transpose_block(w, k, o, w_t)
                o += lanes
            for oo in range(o, fo):
                for kk in range(k, k + lanes):
                    w_t[oo, kk] = w[kk, oo]
            k += lanes
        for kk in range(k, fi):
            for o in range(fo):
                w_t[o, kk] = w[kk, o]

    @njit(cache=True)
    def _health(z, live, act, sat_z):
        # On a probe block z [rows, units] of pre-activations (relu: or activations, > 0 or
        # NaN where those are): live[u] |= some z > 0 or NaN (relu: a unit is dead when
        # its largest pre-activation is <= 0; NaN is not dead); returns how many
        # |z| > sat_z (tanh, sigmoid).
        count = 0
        if act == _RELU:
            for r in range(z.shape[0]):
                zr = z[r]
                for u in range(zr.shape[0]):
                    live[u] |= np.uint8(not zr[u] <= 0)
        elif act in (_TANH, _SIGMOID):
            sat = z.dtype.type(sat_z)  # compared in the dtype, as torch compares
            for r in range(z.shape[0]):
                zr = z[r]
                for u in range(zr.shape[0]):
                    count += abs(zr[u]) > sat
        return count

    @njit(cache=True, inline="always")
    def _layer(flat, w_off, fan_in, fan_out, narrow):
        # The weight of a layer as a 2-D view of the flat row, in its storage layout.
        if narrow:
            return matrix(flat, w_off, fan_out, fan_in)
        return matrix(flat, w_off, fan_in, fan_out)

    @njit(cache=True)
    def _forward(p, x, acts, pre, a_off, w_off, b_off, fan_in, fan_out, narrow, act, rows,
                 probe_rows, unit_live, sat_z):
        # The MLP on x [rows, in]; layer i's output (activated, except the last layer's)
        # goes to acts[a_off[i]:] as [rows, fan_out]; `pre` is scratch for pre-activations.
        # The first `probe_rows` rows are the probe: `_health` of each hidden layer's
        # pre-activations (unit_live: all hidden units, layer after layer). Returns the
        # output view and the probe's saturated count.
        h = x
        layers = len(w_off)
        saturated = 0
        base = 0  # the layer's first unit among the hidden units
        for i in range(layers):
            fo = fan_out[i]
            out = matrix(acts, a_off[i], rows, fo)
            hidden = i < layers - 1
            # A relu layer's product applies relu as it stores its blocks: no pass over
            # the pre-activations. Its probe reads the activations: relu(z) > 0 or NaN
            # exactly where z > 0 or NaN, so it finds the same live units.
            rectified = hidden and act == _RELU and not narrow[i]
            z = matrix(pre, 0, rows, fo) if hidden and not rectified else out
            w = _layer(p, w_off[i], fan_in[i], fo, narrow[i])
            b = p[b_off[i]:b_off[i] + fo]
            if narrow[i]:
                _forward_narrow(h, w, b, z)
            elif rectified:
                _product_best(h, w, b, z, True)
            else:
                _product_best(h, w, b, z, False)
            if hidden:
                if probe_rows > 0:
                    saturated += _health(z[:probe_rows], unit_live[base:base + fo], act,
                                         sat_z)
                if not rectified:
                    _activate(z, out, act)
                base += fo
            h = out
        return h, saturated

    @njit(cache=True)
    def _loss_grad(out, yf, yi, classify, into, spare, huber, onehot, weights):
        # The batch's mean loss (float64) and its gradient wrt `out` into into[:rows * C]
        # as g [rows, C]: F.mse_loss / F.cross_entropy with mean reduction and autograd's
        # backward kernels; with `huber` > 0 F.huber_loss(delta=huber) and
        # huber_loss_backward (the gradient of d = out - y is clamp(d, -delta, delta) / n);
        # with `onehot` (classification) the MSE between the raw outputs and one-hot
        # targets; with class `weights` (not empty) F.cross_entropy(weight=weights): the
        # rows' losses weighted by their class's weight, over the batch's sum of weights.
        # `spare`: scratch of 2 * rows entries (cross-entropy).
        rows, c = out.shape
        g = matrix(into, 0, rows, c)
        flat = into[:rows * c]
        total = 0.0
        if classify and onehot:
            scale = out.dtype.type(2.0 / (rows * c))
            one, zero = out.dtype.type(1), out.dtype.type(0)
            for i in range(rows):
                for j in range(c):
                    d = out[i, j] - (one if j == yi[i] else zero)
                    total += np.float64(d) * np.float64(d)
                    g[i, j] = d * scale
            return total / (rows * c)
        if classify:
            inv = out.dtype.type(1.0 / rows)
            # In passes over the rows (maxima, the exponentials of all rows' entries at
            # once, log-sum-exps, log-probabilities, their exponentials, the gradients),
            # each entry's operations the same as in one pass: the exponentials run 8 lanes
            # at a time (`_exp_all`), and a row's log no longer waits on the row before.
            maxima, lses = spare[:rows], spare[rows:2 * rows]
            for i in range(rows):
                m = out[i, 0]
                for j in range(1, c):
                    if out[i, j] > m:
                        m = out[i, j]
                maxima[i] = m
                for j in range(c):
                    g[i, j] = out[i, j] - m
            _exp_all(flat)
            for i in range(rows):
                s = 0.0
                for j in range(c):
                    s += g[i, j]
                lses[i] = out.dtype.type(np.log(s))
            weighted = weights.shape[0] > 0
            for i in range(rows):
                for j in range(c):
                    logp = out[i, j] - maxima[i] - lses[i]
                    g[i, j] = logp
                    if j == yi[i]:
                        total -= logp if not weighted else np.float64(logp * weights[j])
            _exp_all(flat)
            if weighted:
                # log_softmax_backward of -w_y / sum(w) at each row's class: (p - onehot)
                # times w_y / sum(w), the sum in the dtype
                wsum = out.dtype.type(0)
                for i in range(rows):
                    wsum += weights[yi[i]]
                for i in range(rows):
                    share = weights[yi[i]] / wsum
                    for j in range(c):
                        g[i, j] *= share
                        if j == yi[i]:
                            g[i, j] -= share
                return total / np.float64(wsum)
            for i in range(rows):
                for j in range(c):
                    g[i, j] *= inv
                    if j == yi[i]:
                        g[i, j] -= inv
        elif huber > 0:
            inv = out.dtype.type(1.0 / (rows * c))
            delta = np.float64(huber)
            for i in range(rows):
                for j in range(c):
                    d = out[i, j] - yf[i, j]
                    z = abs(np.float64(d))
                    total += 0.5 * z * z if z < delta else delta * (z - 0.5 * delta)
                    g[i, j] = (-huber if d < -huber else huber if d > huber else d) * inv
        else:
            scale = out.dtype.type(2.0 / (rows * c))
            for i in range(rows):
                for j in range(c):
                    d = out[i, j] - yf[i, j]
                    total += np.float64(d) * np.float64(d)
                    g[i, j] = d * scale
        return total / (rows * c) if not classify else total / rows

    @njit(cache=True)
    def _backward(p, grad, x, acts, g0, g1, raw, wt, zeros, a_off, w_off, b_off, fan_in,
                  fan_out, narrow, act, rows):
        # The gradient row `grad` (the parameter layout) from the outputs' gradient in g0
        # [rows, C]; g0 and g1 are scratch for the layers' input gradients, raw for one
        # before its activation's backward, wt for a transposed weight, zeros a row of
        # zeros.
        layers = len(w_off)
        g = matrix(g0, 0, rows, fan_out[layers - 1])
        into_g1 = True  # where the next input gradient goes (g holds the current one)
        for i in range(layers - 1, -1, -1):
            fi, fo = fan_in[i], fan_out[i]
            h = x
            if i > 0:
                h = matrix(acts, a_off[i - 1], rows, fi)
            gb = grad[b_off[i]:b_off[i] + fo]
            for o in range(fo):  # a loop, as fused._put: `gb[:] = 0` compiles broadcasting
                gb[o] = 0
            for r in range(rows):
                for o in range(fo):
                    gb[o] += g[r, o]
            gw = _layer(grad, w_off[i], fi, fo, narrow[i])
            if narrow[i]:  # gw [fo, fi] = g^T h
                _product_best(g.T, h, zeros[:fi], gw, False)
            else:
                _product_best(h.T, g, zeros[:fo], gw, False)
            if i > 0:
                w = _layer(p, w_off[i], fi, fo, narrow[i])
                spare = g1 if into_g1 else g0
                gh = matrix(raw, 0, rows, fi)
                if narrow[i]:  # w [fo, fi]: gh = g w
                    _product_best(g, w, zeros[:fi], gh, False)
                elif rows < 32:  # small batches: a transposed copy costs more than it saves
                    _input_grad_dot(g, w, gh)
                else:  # g w^T as a product with w transposed
                    w_t = matrix(wt, 0, fo, fi)
                    _transpose(w, w_t)
                    _product_best(g, w_t, zeros[:fi], gh, False)
                g = matrix(spare, 0, rows, fi)
                _activation_backward(gh, h, g, act)
                into_g1 = not into_g1

    @njit(cache=True)
    def _evaluate(p, x, yf, yi, classify, scale, n_train, chunk, acts, pre, spare, a_off,
                  w_off, b_off, fan_in, fan_out, narrow, act, probe, sat_z, unit_live, out_rec,
                  train_last):
        # Train and val loss (and accuracy) over x = train rows then val rows, and activation
        # health of the hidden pre-activations on the first `probe` rows, into out_rec [6].
        # `train_last`: the training rows last, as one chunk, so that acts ends holding the
        # forward pass of every training row (the next step's rows, same parameters). Each
        # split's sums run over its rows in order either way: the same numbers. `spare`:
        # scratch of (the most rows of a chunk) x C entries.
        out_rec[:] = np.nan
        layers = len(w_off)
        n = x.shape[0]
        c = fan_out[layers - 1]
        loss = np.zeros(2)
        hits = np.zeros(2)
        unit_live[:] = 0
        saturated = 0
        val_chunks = (n - n_train + chunk - 1) // chunk
        chunks = val_chunks + 1 if train_last else (n + chunk - 1) // chunk
        for part in range(chunks):
            if not train_last:
                start = part * chunk
                rows = min(chunk, n - start)
            elif part < val_chunks:
                start = n_train + part * chunk
                rows = min(chunk, n - start)
            else:
                start, rows = 0, n_train
            # the probe: the first training rows, unshuffled
            h, count = _forward(p, x[start:start + rows], acts, pre, a_off, w_off, b_off,
                                fan_in, fan_out, narrow, act, rows,
                                max(0, min(rows, probe - start)), unit_live, sat_z)
            saturated += count
            # The exponentials of the chunk's cross-entropy first, all at once
            # (`_exp_all`), each of h[r, j] - (the row's maximum) as in the row's own pass.
            e = matrix(spare, 0, rows if classify else 0, c)
            if classify:
                for r in range(rows):
                    m = h[r, 0]
                    for j in range(1, c):
                        if h[r, j] > m:
                            m = h[r, j]
                    for j in range(c):
                        e[r, j] = h[r, j] - m
                _exp_all(spare[:rows * c])
            for r in range(rows):
                split = 0 if start + r < n_train else 1
                if classify:
                    m = h[r, 0]
                    best = 0
                    for j in range(1, c):
                        if h[r, j] > m:
                            m = h[r, j]
                            best = j
                    s = 0.0
                    for j in range(c):
                        s += e[r, j]
                    lse = h.dtype.type(np.log(s))
                    loss[split] -= h[r, yi[start + r]] - m - lse
                    # NaN logits: torch's argmax picks the NaN, never the label's class
                    if best == yi[start + r] and h[r, best] == h[r, best]:
                        hits[split] += 1
                else:
                    for j in range(c):
                        d = (h[r, j] - yf[start + r, j]) * scale[j]
                        loss[split] += np.float64(d) * np.float64(d)
        n_val = n - n_train
        # the means in the dtype, as torch's
        per = c if not classify else 1
        out_rec[0] = x.dtype.type(loss[0] / (n_train * per))
        out_rec[1] = x.dtype.type(loss[1] / (n_val * per))
        if classify:
            out_rec[2] = hits[0] / n_train
            out_rec[3] = hits[1] / n_val
        units = len(unit_live)
        if act == _RELU and units > 0:
            dead = 0
            for u in range(units):
                if not unit_live[u]:
                    dead += 1
            out_rec[4] = dead / units
        if act in (_TANH, _SIGMOID) and units > 0:
            out_rec[5] = saturated / (units * probe)

    @njit(cache=True)
    def _pick(acts, picked, rows, a_off, fan_out, n_train):
        # picked's layers [len(rows), fan_out] = the rows `rows` of acts' layers
        # [n_train, fan_out] (an evaluation's forward pass of the training split).
        for i in range(len(a_off) - 1):
            fo = fan_out[i]
            src = matrix(acts, a_off[i], n_train, fo)
            dst = matrix(picked, a_off[i], len(rows), fo)
            for r in range(len(rows)):
                e = rows[r]
                for u in range(fo):
                    dst[r, u] = src[e, u]

    @njit(cache=True, error_model="numpy")  # IEEE division, vectorised (fused._fused_step)
    def _update(kind, p, grad, update, state1, state2, state3, first, lr, bc2, decay, hp):
        # The fused kernel's update of one row (study.engine.fused): p in place, the
        # update into `update`.
        _row_update(kind, p, grad, update, state1, state2, state3, first, lr, bc2, hp, decay)

    @njit(cache=True, inline="always")
    def _private(a):
        # A copy of the 1-D `a` with memory of its own (and its own reference count).
        out = np.empty(a.shape[0], dtype=a.dtype)
        _put(out, a)
        return out

    @njit(cache=True, inline="always")
    def _put_column(table, k, t, values):
        # table[k, :, t] = values, entry by entry (no view of the shared table).
        for f in range(values.shape[0]):
            table[k, f, t] = values[f]

    @njit(cache=True, inline="always")
    def _segment(t, segment):
        # Trial t from `first_step` updates to `end_step` (each step: batch, forward, loss,
        # backward, records, freeze decision, update), with the evaluations of the full
        # splits after the steps that `eval_index` names (>= 0: which evaluation), and
        # before the first step too where `eval_first`. Its state lives in row t of params,
        # previous (the last update), state1 / state2 / state3 (the optimizer's:
        # `fused._row_update`), prev_norm and live (0: frozen or stopped, nothing more is
        # computed).
        (first_step, end_step, eval_first, eval_index, params, previous, state1, state2,
         state3, prev_norm, live, x_eval, yf_eval, yi_eval, classify, scale, orders,
         epoch_base, epoch_stride, batch, n_train, w_off, b_off, fan_in, fan_out, narrow,
         act, probe, sat_z, kind, hp, step_lr, step_bc2, step_decay, steps_rec, evals_rec,
         chunk, huber, clip, accumulated, decay_parts, onehot, class_weights) = segment
        if not live[t]:
            return
        n_params = params.shape[1]
        layers = len(w_off)
        dtype = params.dtype
        widest = 0
        for i in range(layers):
            widest = max(widest, fan_out[i], fan_in[i])
        a_off = np.zeros(layers + 1, dtype=np.int64)
        hidden = 0
        for i in range(layers):
            a_off[i + 1] = a_off[i] + max(batch, chunk) * fan_out[i]
            if i < layers - 1:
                hidden += fan_out[i]
        n_in = x_eval.shape[2]
        c = fan_out[layers - 1]
        per_epoch = (n_train + batch - 1) // batch
        # numba counts the references to an array's memory, and a view of a row (a layer's
        # weights, a bias) changes the count of the whole population's array: one cache
        # line that the other threads' views write too, so it moved between the cores
        # several times a step. So what a step takes views of is a private copy (counted
        # apart), copied here and back at the end; a step reads its batch's order and
        # writes its records entry by entry, without views.
        x_all = x_eval[t]
        yf_t, yi_t = yf_eval[t], yi_eval[t]
        hp_t = _private(hp[:, t])
        # Weight decay on some layers only (`decay_parts`: [start, end, decayed] of the
        # row's weights and biases): the parts it spares update with none (wd 0, AdamW's
        # factor 1), as the layer-major path's decay mask does entry by entry.
        spared = _private(hp[:, t])
        spared[0] = 0
        weights = _private(class_weights[t])  # weighted cross-entropy's, else empty
        acts = np.empty(a_off[layers], dtype=dtype)
        g0 = np.empty(batch * widest, dtype=dtype)
        g1 = np.empty(batch * widest, dtype=dtype)
        pre = np.empty(max(batch, chunk) * widest, dtype=dtype)
        xb = np.empty((batch, n_in), dtype=dtype)
        yfb = np.empty((batch, yf_eval.shape[2]), dtype=dtype)
        yib = np.empty(batch, dtype=np.int64)
        grad = np.empty(n_params, dtype=dtype)
        spare = np.empty(max(2 * batch, max(batch, chunk) * c), dtype=dtype)
        wt = np.empty(widest * widest, dtype=dtype)
        zeros = np.zeros(widest, dtype=dtype)
        # The parameters change in place (a separate new row would cost its lines' reads
        # and write-backs); the update goes to a scratch row, then the two update rows
        # swap roles: no copy per step.
        p = _private(params[t])
        last, update = _private(previous[t]), np.empty(n_params, dtype=dtype)
        s1, s2, s3 = _private(state1[t]), _private(state2[t]), _private(state3[t])
        # zero_grad forgotten: the gradients of every step summed here (p.grad), and the
        # update made from a copy of the sum (the optimizers write into their gradient).
        accumulate = accumulated.shape[1] > 0
        acc = _private(accumulated[t])
        norm = prev_norm[t]
        whole = batch >= n_train  # one batch per epoch: the split as stored
        # A step right after an evaluation takes its forward pass from the evaluation's,
        # whose last chunk is then the whole training split (`train_last`): as it is for a
        # whole-split step, its rows gathered into `picked` for a smaller batch. A row's
        # numbers do not depend on the rows computed beside it (the products, whichever
        # `_product_best` takes, `_forward_narrow` and `_activate` work row by row): the
        # same bits as computing it.
        train_last = whole or n_train <= chunk
        picked = np.empty(a_off[layers] if train_last and not whole else 0, dtype=dtype)
        unit_live = np.zeros(hidden, dtype=np.uint8)
        rec = np.empty(6)
        rs = np.empty(steps_rec.shape[1], dtype=steps_rec.dtype)  # a step's records
        picks = np.empty(batch, dtype=np.int64)  # a batch's rows
        shared = False  # acts hold the coming step's forward pass (an evaluation's)
        # A step's forward pass has no probe; an int64, not the literal 0, so that it
        # shares the evaluation's compiled `_forward` (a literal compiles another one).
        no_probe = np.int64(0)
        # The parameters' sum of squares for the coming step's record: here, then from the
        # pass after each update (`_update_sums`, the same bits as `_sumsq`).
        square = _sumsq(p)
        k = eval_index[first_step]
        if eval_first and k >= 0:
            _evaluate(p, x_all, yf_t, yi_t, classify, scale[t], n_train, chunk, acts, pre,
                      spare, a_off, w_off, b_off, fan_in, fan_out, narrow, act, probe, sat_z,
                      unit_live, rec, train_last)
            _put_column(evals_rec, k, t, rec)
            if not (np.isfinite(rec[0]) and np.isfinite(rec[1])):
                live[t] = 0
                return
            shared = train_last
        for step in range(first_step, end_step):
            epoch, start = step // per_epoch, (step % per_epoch) * batch
            rows = min(batch, n_train - start)
            o = (epoch - epoch_base) * epoch_stride
            for r in range(rows):
                e = orders[t, o, start + r]
                picks[r] = e
                for k in range(n_in):
                    xb[r, k] = x_all[e, k]
                if classify:
                    yib[r] = yi_t[e]
                else:
                    for j in range(yf_t.shape[1]):
                        yfb[r, j] = yf_t[e, j]
            xr = xb[:rows]
            step_acts = acts
            if shared and not whole:
                _pick(acts, picked, picks[:rows], a_off, fan_out, n_train)
                step_acts = picked
            elif not shared:
                _forward(p, xr, acts, pre, a_off, w_off, b_off, fan_in, fan_out, narrow, act,
                         rows, no_probe, unit_live, sat_z)
            shared = False
            out = matrix(step_acts, a_off[layers - 1], rows, c)
            loss = _loss_grad(out, yfb[:rows], yib[:rows], classify, g0, spare, huber,
                              onehot, weights)
            _backward(p, grad, xr, step_acts, g0, g1, pre, wt, zeros, a_off, w_off, b_off,
                      fan_in, fan_out, narrow, act, rows)
            if accumulate:
                for j in range(n_params):
                    acc[j] += grad[j]
                    grad[j] = acc[j]
            rs[0] = loss
            # One pass per weight and bias, summed in storage order (the fused kernel's
            # norm); a sum of squares is rounded to the dtype before its root.
            total = 0.0
            for i in range(layers):
                part = _sumsq(grad[w_off[i]:b_off[i]])
                if i == 0:
                    rs[2] = part
                if i == layers - 1:
                    rs[3] = part
                total += part
                total += _sumsq(grad[b_off[i]:b_off[i] + fan_out[i]])
            rs[1] = total
            rs[4] = square
            for f in range(1, 5):
                rs[f] = np.sqrt(rs[f])
            if not (np.isfinite(rs[0]) and np.isfinite(rs[1])):
                rs[5] = rs[6] = np.nan  # frozen: no update
                _put_column(steps_rec, step, t, rs)
                live[t] = 0
                break
            # clip_grad_norm_ as the layer-major path computes it, in the dtype: the
            # gradient times clip / (norm + 1e-6) where that is below 1 (times 1: as is).
            coef = clip[t] / (dtype.type(rs[1]) + dtype.type(1e-6))
            if coef < 1:
                for j in range(n_params):
                    grad[j] *= coef
                if accumulate:  # clip_grad_norm_ scales p.grad itself
                    for j in range(n_params):
                        acc[j] *= coef
            if decay_parts.shape[0] == 0:
                _update(kind[t], p, grad, update, s1, s2, s3, step == 0, step_lr[t, step],
                        step_bc2[t, step], step_decay[t, step], hp_t)
            else:
                for k in range(decay_parts.shape[0]):
                    a, b = decay_parts[k, 0], decay_parts[k, 1]
                    on = decay_parts[k, 2] == 1
                    _update(kind[t], p[a:b], grad[a:b], update[a:b], s1[a:b],
                            s2[a:b] if s2.shape[0] else s2, s3[a:b] if s3.shape[0] else s3,
                            step == 0, step_lr[t, step],
                            step_bc2[t, step], step_decay[t, step] if on else dtype.type(1),
                            hp_t if on else spared)
            squares, dot, square = _update_sums(update, last, p)
            rs[5] = squares
            rs[5] = np.sqrt(rs[5])
            if step > 0:  # F.cosine_similarity(eps=1e-30)
                rs[6] = dot / (max(np.float64(rs[5]), 1e-30) * max(np.float64(norm), 1e-30))
            else:
                rs[6] = np.nan
            _put_column(steps_rec, step, t, rs)
            norm = rs[5]
            last, update = update, last
            k = eval_index[step + 1]
            if k >= 0:
                _evaluate(p, x_all, yf_t, yi_t, classify, scale[t], n_train, chunk, acts,
                          pre, spare, a_off, w_off, b_off, fan_in, fan_out, narrow, act, probe,
                          sat_z, unit_live, rec, train_last)
                _put_column(evals_rec, k, t, rec)
                if not (np.isfinite(rec[0]) and np.isfinite(rec[1])):
                    live[t] = 0
                    break
                shared = train_last
        _put(params[t], p)
        _put(previous[t], last)
        _put(state1[t], s1)
        _put(state2[t], s2)
        _put(state3[t], s3)
        _put(accumulated[t], acc)
        prev_norm[t] = norm

    @njit(cache=True, nogil=True)
    def _rows(queue, taken, halt, segment):
        # `_segment` for every trial of `queue`, each taken by whichever thread running
        # this loop asks first (`taken[0]`, an atomic counter the threads share), until all
        # are taken or `halt[0]` is set: a thread never goes back to Python, so it needs
        # the GIL only to start and to end, whatever the caller's thread does meanwhile.
        # `_segment` is inlined here (its arguments one tuple: numba inlines no call with
        # *args, and Python makes a call of 40-odd arguments one), so that the kernel is
        # compiled once: as a function of its own, LLVM compiled it and then, linked into
        # this one, again (6 s and 5 s of a first compilation).
        while fetch_add(halt, 0, 0) == 0:
            i = fetch_add(taken, 0, 1)
            if i >= queue.shape[0]:
                return
            _segment(queue[i], segment)


    class _CompileNotice(numba_event.Listener):
        # numba's "numba:compile" event fires when a function is compiled, not when it is
        # loaded from the cache: the first run on a machine (or of a new version) waits
        # about 20-30 s for the kernel with nothing else on the screen, so it says why, and
        # compiles its largest callees side by side (`_compile_callees`).
        def on_start(self, event) -> None:
            if event.data["dispatcher"] is _rows:
                # `_segment`'s argument types: a trial of the queue, then its `segment`
                queue, _, _, segment = event.data["args"]
                args = (queue.dtype, *segment.types)
                log.info("compiling the CPU kernel for %s (first use on this machine or of "
                         "this version: about 20-30 s, then cached on disk)", args[5].dtype)
                _compile_callees(args)

        def on_end(self, event) -> None:
            pass

    numba_event.register("numba:compile", _CompileNotice())


def callee_signatures(segment: Sequence) -> dict[str, tuple]:
    """The argument types `_segment` calls its largest callees with (`_evaluate`,
    `_backward`, `_update`, `_loss_grad`), from its own argument types `segment` (numba
    types, in `_segment`'s order): rows of its [T, ...] arrays, its scratch arrays (1-D or
    2-D, C order), elements of its arrays, its scalars."""
    from numba import types

    def row(array):  # array[t]: one dimension less, the same layout
        return array.copy(ndim=array.ndim - 1)

    params, x_eval, yf_eval, yi_eval, classify, scale = (segment[5], *segment[12:17])
    n_train, layout, act, probe, sat_z, chunk = (segment[21], segment[22:27], segment[27],
                                                 segment[28], segment[29], segment[37])
    vector = types.Array(params.dtype, 1, "C")  # a row of params, or a scratch array
    matrix = types.Array(params.dtype, 2, "C")  # a batch's rows
    offsets = types.Array(types.int64, 1, "C")
    state1, state2, state3 = segment[7:10]
    kind, hp, step_lr, step_bc2, step_decay = segment[30:35]
    return {
        "_evaluate": (vector, row(x_eval), row(yf_eval), row(yi_eval), classify, row(scale),
                      n_train, chunk, vector, vector, vector, offsets, *layout, act, probe, sat_z,
                      types.Array(types.uint8, 1, "C"), types.Array(types.float64, 1, "C"),
                      types.boolean),
        "_backward": (vector, vector, matrix, *[vector] * 6, offsets, *layout, act,
                      types.int64),
        "_update": (kind.dtype, *[vector] * 3, row(state1), row(state2), row(state3),
                    types.boolean,
                    step_lr.dtype, step_bc2.dtype, step_decay.dtype, hp.copy(ndim=1, layout="C")),
        "_loss_grad": (matrix, matrix, types.Array(types.int64, 1, "C"), classify, vector,
                       vector, segment[38], segment[42], vector),
    }


def _compile_callees(segment: Sequence) -> None:
    """Compile `_evaluate` in one forked process and `_backward`, `_update` and
    `_loss_grad` in another, side by side (about 9 s each, of the kernel's 28 one after
    another), before numba compiles `_rows` with `_segment` inlined (`segment`:
    `_segment`'s argument types): the children write them to numba's disk cache, and
    `_rows` loads them from there. The loaded code gives the same bits as compiling them in
    this process (lr_batch's trials and curves). With one core or off Linux they are
    compiled here, in turn (`study.parallel`); one that fails in a child is compiled again
    with `_rows`, as it would have been."""
    signatures = callee_signatures(segment)
    run_jobs({"evaluation": (_compile_each, ([(_evaluate, signatures["_evaluate"])],)),
              "step": (_compile_each, ([(_backward, signatures["_backward"]),
                                        (_update, signatures["_update"]),
                                        (_loss_grad, signatures["_loss_grad"])],))})


def _compile_each(jobs: Sequence[tuple]) -> None:
    for dispatcher, signature in jobs:
        try:
            dispatcher.compile(signature)
        except Exception as err:  # noqa: BLE001 - `_rows`' own compilation reports it
            log.debug("compiling %s ahead of the kernel failed: %s", dispatcher, err)
            return


def draw_orders(generator: torch.Generator, into: np.ndarray) -> None:
    """Fill `into` [epochs, n_train] with one row's batch orders for its next epochs, drawn
    as the layer-major path draws them (`PopulationData.epoch`: one `torch.randperm` per
    epoch from the row's order generator, epoch after epoch)."""
    for epoch in range(into.shape[0]):
        into[epoch] = torch.randperm(into.shape[1], generator=generator).numpy()


# The most memory the drawn batch orders of a population may take: a call of the kernel
# covers at most the epochs whose orders fit (at least one).
ORDER_BYTES = 64 * 2**20


class Kernel:
    """A population's state on the kernel (row t = trial t, never reordered) and the call
    that advances it: `advance(first, end)` trains every live trial from `first` updates
    to `end`, with the evaluations of `eval_steps` on the way. Between calls the caller
    reads the records, stops trials (`stop`) and sets learning rates (`schedule`): the
    population engine's loop (evaluation hooks, early stopping, plateaus, diagnostics) runs
    there, in Python.

    `data`: the population's `PopulationData`; `steps` [planned, STEP_FIELDS, T] and `evals`
    [evaluations, EVAL_FIELDS, T]: `TraceBuffers`' arrays, written in place. `loop`: the
    population's loop (default: `LoopSpec()`), whose training loss, clipping, zero_grad and
    decay layers the kernel follows; `clip`: each row's clipping threshold where it clips
    (default: the loop's).
    """

    def __init__(self, net: Network, params: Tensor, specs: Sequence, data, batch: int,
                 shuffle: bool, eval_steps: Sequence[int], steps: np.ndarray,
                 evals: np.ndarray, loop: LoopSpec | None = None,
                 clip: Sequence[float | None] | None = None) -> None:
        dtype = params.dtype
        planned, n_train, rows = steps.shape[0], data.n_train, len(specs)
        self.specs, self.dtype = list(specs), dtype
        loop = loop or LoopSpec()
        fused = FusedUpdate(specs, params)  # the hyperparameter table, as the fused update's
        self.params = params.contiguous().numpy()
        self.previous = np.zeros_like(self.params)
        # the optimizer's states, as the fused update makes them (`fused._row_update`)
        self.state1, self.state2, self.state3 = (
            state.numpy() for state in (fused.state1, fused.state2, fused.state3))
        # zero_grad forgotten: each row's summed gradient (p.grad); none otherwise
        self.accumulated = (np.zeros_like(self.params) if not loop.zero_grad
                            else self.params[:, :0].copy())
        self.prev_norm = np.zeros(rows)
        self.live = np.ones(rows, dtype=np.uint8)
        self.kind, self.hp = fused.kind.numpy(), fused.hp.numpy()
        self.fused = fused
        # [T, planned]: each step's scalars, as FusedUpdate serves them step by step
        self.step_lr = fused.step_lr.columns(1, planned).contiguous().numpy()
        self.step_bc2 = fused.step_bc2.columns(1, planned).contiguous().numpy()
        self.step_decay = np.repeat(self.hp[5][:, None], planned, axis=1)
        classify = data.loss == "cross_entropy"
        x_eval = data.x_eval.contiguous().numpy()
        if classify:
            yi = data.y_eval.contiguous().numpy()
            yf = np.zeros((rows, 1, 1), dtype=x_eval.dtype)
        else:
            yf = data.y_eval.contiguous().numpy()
            yi = np.zeros((rows, 1), dtype=np.int64)
        c = net.sizes[-1][1]
        scale = (np.ones((rows, c), dtype=x_eval.dtype) if data.target_scale is None
                 else data.target_scale[:, 0, :].contiguous().numpy())
        # Shuffled batches: orders drawn epoch by epoch as calls need them (`_orders_for`),
        # by the caller before each call, once per order seed (`_launch`); else (no
        # shuffling, or the whole split as stored) one order for every epoch.
        self.generators = data.order_generators if shuffle and batch < n_train else None
        self.order_index = data.order_index  # row -> its generator
        self.per_epoch = -(-n_train // batch)
        self.epoch_base, self.drawn = 0, 0
        self.window = max(1, ORDER_BYTES // (8 * rows * n_train))
        self.orders = np.broadcast_to(np.arange(n_train, dtype=np.int64),
                                      (rows, 1, n_train)).copy()
        w_off, b_off, offset = [], [], 0
        for fi, fo in net.sizes:
            w_off.append(offset)
            b_off.append(offset + fi * fo)
            offset += fi * fo + fo
        # [start, end, decayed] of each weight and bias where weight decay spares some
        # (`decay_layers`: the layers whose weights it applies to); none otherwise
        self.decay_parts = np.asarray(
            [] if loop.decay_layers is None else
            [[start, end, int(i in loop.decay_layers and start == w_off[i])]
             for i, (fi, fo) in enumerate(net.sizes)
             for start, end in ((w_off[i], b_off[i]), (b_off[i], b_off[i] + fo))],
            dtype=np.int64).reshape(-1, 3)
        as_int = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
        sat_z = SATURATION_Z.get(net.activation, math.inf)
        chunk = 256  # evaluation rows per pass
        self.data_args = (x_eval, yf, yi, classify, scale)
        # The training loss: Huber's with this delta (in the dtype, as torch takes it);
        # 0: the task's loss.
        self.huber = x_eval.dtype.type(loop.huber_delta if loop.loss == "huber" else 0.0)
        self.onehot = loop.loss == "mse_onehot"  # MSE on one-hot targets (classification)
        # Each row's class weights (weighted cross-entropy: `PopulationData.class_weights`);
        # none otherwise
        self.class_weights = (data.class_weights.contiguous().numpy()
                              if data.class_weights is not None
                              else np.zeros((rows, 0), dtype=x_eval.dtype))
        # Each row's gradient-clipping threshold (inf: none), in the dtype as the layer-major
        # path rounds it.
        thresholds = ([math.inf] * rows if loop.clip_norm is None
                      else clip if clip is not None else [loop.clip_norm] * rows)
        self.clip = np.asarray(thresholds, dtype=np.float64).astype(x_eval.dtype)
        self.layout = (batch, n_train, as_int(w_off), as_int(b_off),
                       as_int([fi for fi, _ in net.sizes]), as_int([fo for _, fo in net.sizes]),
                       np.asarray(net.narrowing, dtype=np.bool_),
                       _ACTIVATIONS[net.activation], min(PROBE_SIZE, n_train), sat_z)
        self.steps, self.evals, self.chunk = steps, evals, chunk
        self.eval_index = np.full(planned + 1, -1, dtype=np.int64)
        self.eval_index[np.asarray(eval_steps)] = np.arange(len(eval_steps))
        self.threads = torch.get_num_threads()

    def schedule(self, first: int, lrs: Sequence[Sequence[float]]) -> None:
        """This population's learning rates for steps first, first + 1, ...: `lrs[i][t]` is
        trial t's at step first + i (a schedule's, or a plateau's). Each becomes the update's
        step size and AdamW's decay 1 - lr * weight_decay, as `FusedUpdate.step` computes
        them from a step's rates."""
        for i, row in enumerate(lrs):
            step_lr, decay = self.fused.scheduled(first + i + 1, row)
            self.step_lr[:, first + i] = step_lr.numpy()
            self.step_decay[:, first + i] = decay.numpy()

    def advance(self, first: int, end: int, eval_first: bool = False) -> None:
        """Every live trial from `first` updates to `end`, with the evaluations after steps
        first + 1 ... end that the schedule has (and the one at `first` where
        `eval_first`); a trial whose loss, gradient norm or evaluation is non-finite
        freezes (`alive` false from there). Calls move forward only: `first` is where the
        last call ended."""
        while True:  # one kernel call per window of epochs whose orders fit ORDER_BYTES
            stop = self._window_end(first, end)
            self._launch(first, stop, eval_first).wait()
            if stop >= end:
                return
            first, eval_first = stop, False

    def start(self, first: int, end: int, eval_first: bool = False) -> Running:
        """`advance` on the kernel's threads, returning as soon as they have started: the
        caller's thread is free until `Running.wait`, and nothing of the kernel's state may
        be read or changed before it. Where one call cannot cover first ... end (the batch
        orders of its epochs outgrow ORDER_BYTES), it advances here and returns it done."""
        if self._window_end(first, end) < end:
            self.advance(first, end, eval_first)
            return Running.done()
        return self._launch(first, end, eval_first)

    def _window_end(self, first: int, end: int) -> int:
        """Where the call from `first` must stop: `end`, or the end of the window of epochs
        whose orders fit ORDER_BYTES."""
        if self.generators is None:
            return end
        return min(end, (first // self.per_epoch + self.window) * self.per_epoch)

    def _launch(self, first: int, end: int, eval_first: bool) -> Running:
        """Draw the live rows' new batch orders here, then start `_rows` on the threads."""
        stride = 0
        live = np.flatnonzero(self.live).astype(np.int64)
        if self.generators is not None:
            fresh = self._orders_for(first // self.per_epoch, -(-end // self.per_epoch))
            stride = 1
            if fresh.stop > fresh.start:
                # Rows sharing a generator share its orders: drawn once, by the first live
                # row of each; a generator none of whose rows is live draws nothing.
                drew: dict[int, int] = {}
                for t in live.tolist():
                    g = self.order_index[t]
                    if g in drew:
                        self.orders[t, fresh] = self.orders[drew[g], fresh]
                    else:
                        draw_orders(self.generators[g], self.orders[t, fresh])
                        drew[g] = t
        if not len(live):
            return Running.done()
        args = (first, end, eval_first, self.eval_index, self.params, self.previous,
                self.state1, self.state2, self.state3, self.prev_norm, self.live,
                *self.data_args,
                self.orders, self.epoch_base, stride, *self.layout, self.kind, self.hp,
                self.step_lr, self.step_bc2, self.step_decay, self.steps, self.evals,
                self.chunk, self.huber, self.clip, self.accumulated, self.decay_parts,
                self.onehot, self.class_weights)
        taken, halt = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
        # Loaded or compiled here, on the caller's thread, not in a worker: a first
        # compilation forks a process (`_compile_callees`).
        _rows.compile((*(numba.typeof(a) for a in (live, taken, halt)),
                       numba.types.BaseTuple.from_types([numba.typeof(a) for a in args])))
        return Running(lambda: _rows(live, taken, halt, args), min(self.threads, len(live)),
                       halt)

    def _orders_for(self, low: int, high: int) -> slice:
        """Hold the batch orders of epochs low ... high - 1 (`low` never moves back): keep
        those drawn already and make room for the rest; the epochs of `self.orders` that
        each live row must still draw (`draw_orders`) before it trains. A row that is not
        live draws nothing: it never trains again."""
        if high <= self.drawn:
            return slice(0, 0)
        held = self.orders[:, low - self.epoch_base:] if self.drawn > low else \
            self.orders[:, :0]
        orders = np.empty((held.shape[0], held.shape[1] + high - self.drawn, held.shape[2]),
                          dtype=np.int64)
        orders[:, :held.shape[1]] = held
        self.orders = orders
        self.epoch_base, self.drawn = high - orders.shape[1], high
        return slice(held.shape[1], orders.shape[1])

    @property
    def alive(self) -> np.ndarray:
        """[T] bool: the trials still training."""
        return self.live.astype(bool)

    def stop(self, rows: Sequence[int]) -> None:
        """Stop `rows` (early stopping, a pruner): nothing more is computed for them."""
        self.live[list(rows)] = 0

    def preconditioner(self, step: int) -> Tensor:
        """[T, P] float64: each row's preconditioner after `step` updates (NaN for SGD
        rows), as `FusedUpdate.preconditioner`."""
        return state_preconditioner(self.specs, step, *(
            torch.from_numpy(state) for state in (self.state1, self.state2, self.state3)))


class _Seats:
    """The kernel threads working in this process, and a wait for a seat among them.

    A call asks for `threads` threads (`torch.get_num_threads()`, the process's budget),
    and two calls may be in flight at once (the sweep starts a population while the one
    before it ends). A thread works only while fewer than its call's `threads` work, so
    the two share one budget instead of doubling it (`workers=N` gives each worker a
    core's share; `--threads 1` runs one): a thread of the call behind takes its seat as a
    thread of the call ahead runs out of trials, so no core idles at the tail either.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._working = 0

    def take(self, limit: int, halt: np.ndarray) -> bool:
        """Wait until fewer than `limit` threads work, then count this one in (True);
        False, counting nothing, once `halt[0]` is set while it waits."""
        with self._changed:
            while self._working >= limit:
                if halt[0]:
                    return False
                self._changed.wait()
            self._working += 1
            return True

    def leave(self) -> None:
        """Count this thread out (it took a seat)."""
        with self._changed:
            self._working -= 1
            self._changed.notify_all()

    def wake(self) -> None:
        """Have the waiting threads look at their halt flags again."""
        with self._changed:
            self._changed.notify_all()


_SEATS = _Seats()


class Running:
    """A kernel call under way (`Kernel.start`): `threads` threads each running `work`
    (`_rows` over the call's trials), which ends early once `halt[0]` is set; each works
    only while fewer than `threads` kernel threads of this process work (`_Seats`).
    `cpu_s`: the threads' CPU time, once `wait` has returned."""

    def __init__(self, work: Callable[[], None], threads: int, halt: np.ndarray) -> None:
        self._halt, self._errors, self._cpu = halt, [], []

        def worker() -> None:
            if not _SEATS.take(threads, halt):
                return
            cpu = time.thread_time()
            try:
                work()
            except BaseException as err:  # noqa: BLE001 - raised by `wait`, in the caller
                self._errors.append(err)
                halt[0] = 1
            finally:
                self._cpu.append(time.thread_time() - cpu)
                _SEATS.leave()

        self._threads = [threading.Thread(target=worker, name=f"study-kernel-{i}")
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    @classmethod
    def done(cls) -> Running:
        """A call with nothing (left) to do."""
        return cls(lambda: None, 0, np.zeros(1, dtype=np.int64))

    def wait(self) -> None:
        """Until every thread has ended; a thread's exception is raised here. Interrupted
        while it waits (Ctrl-C), it stops the threads first (`cancel`)."""
        try:
            for thread in self._threads:
                thread.join()
        except BaseException:
            self.cancel()
            raise
        if self._errors:
            raise self._errors[0]

    def cancel(self) -> None:
        """Stop every thread after the trial it is on (one waiting for a seat at once),
        and wait for them to end."""
        self._halt[0] = 1
        _SEATS.wake()
        for thread in self._threads:
            thread.join()

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu)
