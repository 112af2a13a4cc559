"""The exponential and tanh of the trial-major kernel (`exp`, `tanh`): for float32, written
in arithmetic LLVM vectorises; for float64, the C library's.

numba compiles `np.exp` and `np.tanh` of a float32 into calls of the C library's `expf` and
`tanhf`, one number per call: about 12 and 83 cycles each on the 2-core Xeon of
docs/performance.md, where a 64 x 64 layer's product spends about 4 cycles per output. A
tanh layer then cost its forward pass 20 times its product, and a 4-class cross-entropy
a fifth of a Blobs evaluation. These functions are the same steps as SLEEF's float32
`expf` and `tanhf` (Cody-Waite reduction by ln 2, SLEEF's minimax polynomial, scaling by
2^q made from its bits: `intrinsics.pow2`), with no library call and no branch, so a loop
over an array that calls them runs 8 lanes at a time: 1.4 cycles per exponential.

Accuracy, over every float32 (tests/study/engine/test_elementary.py checks a dense sample
and the edges; the exhaustive sweep is its `slow` test):

- `exp`: within 1 unit in the last place of the exact value wherever that is a normal
  float (0.99 at worst; the C library's `expf` 0.5, and the two differ in the last bit
  for about a quarter of inputs); 0 below -104, inf above 104, NaN for NaN. Below about
  -87.3 the result is subnormal and rounded twice (at most one unit of the smallest
  subnormal).
- `tanh`: within 3 units in the last place (2.75 at worst, near |x| = 0.18; the C
  library's `tanhf` 2.2); odd, exact at 0 and -0, 1 from |x| > 18.7, NaN for NaN.

torch's own CPU kernels compute exp and tanh with SLEEF's vectorised functions, not the C
library's, so the reference engine rounds its own way too: the kernel's contract with it
(docs/design.md: float32 within 1e-4 over whole runs) already covers a few units in the
last place of an activation. Every trial still runs the same instructions whatever its
population, so it stays bit-identical alone and in any population. float64 keeps the C
library's functions, whose error (half a unit) its tighter contract (1e-6 over whole
runs) can count on. SLEEF's constants are used under its Boost Software License 1.0.

numba compiles these into the kernel's own functions (`overload`, inlined): after
editing this file, delete `study/engine/__pycache__` (see `intrinsics`).
"""

from __future__ import annotations

import math

import numpy as np

try:
    from numba import types
    from numba.extending import overload

    from study.engine.intrinsics import fma_scalar, pow2
except ImportError:  # pragma: no cover - numba is a dependency; this guards broken installs
    overload = None

_F = np.float32
# ln 2 in two parts (the first with trailing zero bits, so q * _LN2_HIGH is exact for the
# q that occur) and 1 / ln 2: SLEEF's L2Uf, L2Lf and R_LN2f.
_LN2_HIGH = _F(0.693145751953125)
_LN2_LOW = _F(1.428606765330187045e-06)
_INV_LN2 = _F(1.442695040888963407359924681001892137426645954152985934135449406931)
# Beyond these |exponents| float32 exp is 0 or inf (and tanh is 1).
_EXP_LOW, _EXP_HIGH = _F(-104.0), _F(104.0)
_TANH_ONE = _F(18.714973875)


def exp(x: float) -> float:
    """e ** x (in compiled code: float32 as above, float64 the C library's)."""
    return math.exp(x)


def tanh(x: float) -> float:
    """tanh(x) (in compiled code: float32 as above, float64 the C library's)."""
    return math.tanh(x)


if overload is not None:
    from numba import njit

    @njit(inline="always")
    def _reduced(x):
        # x = q ln 2 + s with |s| <= ln 2 / 2, and e^s - 1 - s = s^2 u (SLEEF's polynomial),
        # q clamped so that it always converts to an int32 (NaN goes to the clamp).
        q = np.rint(x * _INV_LN2)
        q = q if q < _F(200.0) else _F(200.0)
        q = q if q > _F(-200.0) else _F(-200.0)
        s = fma_scalar(q, -_LN2_HIGH, x)
        s = fma_scalar(q, -_LN2_LOW, s)
        u = _F(0.000198527617612853646278381)
        u = fma_scalar(u, s, _F(0.00139304355252534151077271))
        u = fma_scalar(u, s, _F(0.00833336077630519866943359))
        u = fma_scalar(u, s, _F(0.0416664853692054748535156))
        u = fma_scalar(u, s, _F(0.166666671633720397949219))
        u = fma_scalar(u, s, _F(0.5))
        return np.int32(q), fma_scalar(s * s, u, s)  # q, e^s - 1

    @njit(inline="always")
    def _exp32(x):
        q, m = _reduced(x)
        half = q >> 1  # 2^q in two factors: each a normal float down to 2^-150
        y = (m + _F(1.0)) * pow2(half) * pow2(q - half)
        y = _F(0.0) if x < _EXP_LOW else y
        return _F(np.inf) if x > _EXP_HIGH else y

    @njit(inline="always")
    def _tanh32(x):
        # tanh |x| = d / (d + 2) with d = e^(2|x|) - 1, the sign put back; |x| <= 20 keeps
        # 2^q a normal float, and tanh is 1 in float32 well before.
        y = abs(x)
        q, m = _reduced(_F(2.0) * min(y, _F(20.0)))
        d = m if q == 0 else (m + _F(1.0)) * pow2(q) - _F(1.0)
        t = d / (d + _F(2.0))
        t = _F(1.0) if y > _TANH_ONE else t
        t = _F(np.copysign(t, x))
        return x if x != x else t

    def _by_dtype(function, float32, library) -> None:
        # `function` in compiled code: `float32` for a float32, the C library's `library`
        # for a float64.
        @overload(function, inline="always")
        def _typed(x):
            if x == types.float32:
                return lambda x: float32(x)
            if isinstance(x, types.Float):
                return lambda x: library(x)
            return None

    _by_dtype(exp, _exp32, np.exp)
    _by_dtype(tanh, _tanh32, np.tanh)
