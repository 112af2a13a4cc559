"""The trial-major kernel's exp and tanh (study.engine.elementary): float32 within 1 (exp)
and 3 (tanh) units in the last place of the exact value on every exponent range, their
edges (NaN, infinities, signed zeros, overflow and underflow), the same bits in a
vectorised loop as alone, and float64 the C library's bit for bit. The slow test sweeps
every float32."""

from __future__ import annotations

import math

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from numba import njit, prange  # noqa: E402

from study.engine.elementary import exp, tanh  # noqa: E402

EXP_ULPS, TANH_ULPS = 1.0, 3.0


@njit(error_model="numpy")
def _apply(which, x, out):
    for k in range(x.shape[0]):
        out[k] = exp(x[k]) if which == 0 else tanh(x[k])


def _run(which: int, x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    _apply(which, x, out)
    return out


def _ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of the last place of float32(exact) (normal results)."""
    unit = np.spacing(np.abs(exact.astype(np.float32))).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / unit


def _worst(which: int, x: np.ndarray) -> float:
    if not len(x):
        return 0.0
    exact = (np.exp if which == 0 else np.tanh)(x.astype(np.float64))
    info = np.finfo(np.float32)
    normal = (np.abs(exact) >= info.tiny) & (np.abs(exact) <= info.max)
    return float(_ulps(_run(which, x)[normal], exact[normal]).max())


def _every_nth_float(step: int) -> np.ndarray:
    """Every `step`-th float32 bit pattern, NaNs and infinities left out: all exponents,
    both signs."""
    x = np.arange(0, 2**32, step, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return x[np.isfinite(x)]


def test_exp_is_within_one_unit_on_every_exponent() -> None:
    x = _every_nth_float(997)
    x = x[(x > -104) & (x < 89)]
    assert _worst(0, x) <= EXP_ULPS


def test_tanh_is_within_three_units_on_every_exponent() -> None:
    assert _worst(1, _every_nth_float(997)) <= TANH_ULPS


def test_the_edges() -> None:
    f = np.float32
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 88.72283, 88.7229, 104.5, -87.33655,
                  -103.9, -104.5, 1e-45, -1e-45], dtype=f)
    e = _run(0, x)
    assert np.isnan(e[0]) and e[1] == np.inf and e[2] == 0 and e[3] == 1 and e[4] == 1
    assert np.isfinite(e[5]) and e[6] == np.inf and e[7] == np.inf  # float32's overflow
    tiny = np.float64(np.finfo(f).smallest_subnormal)
    exact = np.exp(x[8:11].astype(np.float64))
    assert np.all(np.abs(e[8:11] - exact) <= tiny)  # subnormal: within one subnormal
    assert e[10] == 0 and e[11] == 1 and e[12] == 1
    t = _run(1, x)
    assert np.isnan(t[0]) and t[1] == 1 and t[2] == -1
    assert t[3] == 0 and not np.signbit(t[3]) and t[4] == 0 and np.signbit(t[4])
    assert t[11] == x[11] and t[12] == x[12]  # tanh x = x below the float's resolution
    big = np.array([9.1, 18.0, 18.8, 30.0, 1e30], dtype=f)
    assert np.all(_run(1, big) == 1) and np.all(_run(1, -big) == -1)


@pytest.mark.parametrize("which", [0, 1])
def test_a_number_is_the_same_bits_in_a_vectorised_loop_and_alone(which: int) -> None:
    # A loop of 37 runs vector lanes and a scalar remainder: every entry must be what the
    # function gives that number alone, so a trial's numbers cannot depend on where in a
    # row (or population) they fall.
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(37) * 20).astype(np.float32)
    together = _run(which, x)
    alone = np.array([_run(which, x[k:k + 1])[0] for k in range(len(x))])
    assert np.array_equal(together.view(np.uint32), alone.view(np.uint32))


def test_float64_is_the_c_library_bit_for_bit() -> None:
    x = np.random.default_rng(1).standard_normal(1000) * 30

    @njit
    def library(x, out):
        for k in range(x.shape[0]):
            out[k] = np.exp(x[k]) + np.tanh(x[k])

    want = np.empty_like(x)
    library(x, want)
    got = _run(0, x) + _run(1, x)
    assert np.array_equal(got, want)


@njit(parallel=True)
def _worst_over_every_float32(which):
    # The largest error in units of the last place over every float32 whose exact result
    # is a normal float32 (exp: inputs in (-104, 89)), against the float64 function; the
    # bit patterns in 65,536 blocks, spread over the cores.
    worst = np.zeros(1 << 16)
    tiny, top = np.finfo(np.float32).tiny, np.finfo(np.float32).max
    for high in prange(1 << 16):
        bits = np.empty(1 << 16, dtype=np.uint32)
        for k in range(1 << 16):
            bits[k] = (high << 16) | k
        x = bits.view(np.float32)
        out = np.empty(1 << 16, dtype=np.float32)
        for k in range(1 << 16):
            out[k] = exp(x[k]) if which == 0 else tanh(x[k])
        for k in range(1 << 16):
            v = np.float64(x[k])
            if not np.isfinite(v) or (which == 0 and not -104.0 < v < 89.0):
                continue
            exact = np.exp(v) if which == 0 else np.tanh(v)
            if not tiny <= abs(exact) <= top:
                continue
            unit = math.ldexp(1.0, math.frexp(np.float32(exact))[1] - 24)
            worst[high] = max(worst[high], abs(np.float64(out[k]) - exact) / unit)
    return worst.max()


@pytest.mark.slow
def test_every_float32() -> None:
    assert _worst_over_every_float32(0) <= EXP_ULPS
    assert _worst_over_every_float32(1) <= TANH_ULPS
