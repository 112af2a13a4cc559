"""The trial-major kernel's building blocks (study.engine.intrinsics) and its products
(`trial_major._product`, `_input_grad_dot`): against float64 numpy on every path of their
blocking, each entry of `_product` the same bits however it is reached, `matrix` views as
`reshape` gives them, and transposes (`transpose_block`, `trial_major._transpose`) exact.
"""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from study.engine.intrinsics import (  # noqa: E402
    add_lanes,
    fma_lanes,
    lane_sum,
    lanes_of,
    load_at,
    load_wide,
    matrix,
    transpose_block,
    zero_wide,
)
from study.engine.trial_major import _input_grad_dot, _product, _transpose  # noqa: E402

# rows: 4-row blocks and the rest; columns: blocks of 2 vectors, of 1, then one by one
ROWS = [1, 3, 4, 7, 9]
COLUMNS = [1, 7, 8, 16, 17, 24, 64, 70]


def _operands(rows, inner, cols, dtype, transposed, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((inner, rows) if transposed else (rows, inner)).astype(dtype)
    a = a.T if transposed else a
    w = rng.standard_normal((inner, cols)).astype(dtype)
    b = rng.standard_normal(cols).astype(dtype)
    return a, w, b


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-13)])
@pytest.mark.parametrize("transposed", [False, True])
def test_the_product_matches_numpy_on_every_path(dtype, tol, transposed):
    for rows in ROWS:
        for cols in COLUMNS:
            for inner in (1, 2, 10, 64):
                a, w, b = _operands(rows, inner, cols, dtype, transposed)
                z = np.full((rows, cols), np.nan, dtype=dtype)
                _product(a, w, b, z, False)
                exact = a.astype(np.float64) @ w.astype(np.float64) + b
                scale = np.abs(a).astype(np.float64) @ np.abs(w) + np.abs(b)
                assert np.all(np.abs(z - exact) <= tol * scale), (rows, inner, cols)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_entry_is_the_same_bits_however_it_is_reached(dtype):
    # A 9 x 70 product takes every path: 4-row blocks, the last row alone, column blocks of
    # two vectors and of one, and columns one by one. Each entry must equal the same entry
    # computed alone (a 1 x 1 product: the scalar chain of fused multiply-adds), so a
    # trial's numbers cannot depend on its batch's size or its layer's width.
    a, w, b = _operands(9, 64, 70, dtype, transposed=False, seed=1)
    z = np.empty((9, 70), dtype=dtype)
    _product(a, w, b, z, False)
    alone = np.empty((1, 1), dtype=dtype)
    for i in range(9):
        for o in range(70):
            _product(a[i:i + 1], np.ascontiguousarray(w[:, o:o + 1]), b[o:o + 1], alone,
                     False)
            assert z[i, o] == alone[0, 0], (i, o)


@pytest.mark.parametrize("cols", [1, 16])  # one by one, and on vectors
def test_each_entry_sums_over_k_in_order_rounding_once_per_multiply_add(cols):
    # In order: 2**24 + 0.5 + 0.5 + 0.5 is 2**24 in float32 step by step (each 0.5 is
    # half a unit, rounded to even), 2**24 + 2 if the halves were summed first.
    a = np.array([[2.0**24, 1.0, 1.0, 1.0]], dtype=np.float32)
    w = np.tile(np.array([[1.0], [0.5], [0.5], [0.5]], dtype=np.float32), (1, cols))
    z = np.empty((1, cols), dtype=np.float32)
    _product(a, w, np.zeros(cols, dtype=np.float32), z, False)
    assert np.all(z == np.float32(2.0**24))
    # Once: (1 + 2**-12)**2 - 1 is 2**-11 + 2**-24 exactly (a float32); rounding the
    # product to float32 first would lose the 2**-24.
    x = np.float32(1 + 2.0**-12)
    _product(np.array([[x]], dtype=np.float32), np.full((1, cols), x, dtype=np.float32),
             np.full(cols, -1.0, dtype=np.float32), z, False)
    assert np.all(z == np.float32(2.0**-11 + 2.0**-24))


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-13)])
def test_the_input_gradient_matches_numpy_on_every_path(dtype, tol):
    # gh = g w^T in blocks of 2 rows of g by 4 rows of w, and the rest one dot at a time
    rng = np.random.default_rng(2)
    for rows in ROWS:
        for fan_in in (1, 3, 4, 6, 9):
            for fan_out in (1, 8, 17, 64):
                g = rng.standard_normal((rows, fan_out)).astype(dtype)
                w = rng.standard_normal((fan_in, fan_out)).astype(dtype)
                gh = np.full((rows, fan_in), np.nan, dtype=dtype)
                _input_grad_dot(g, w, gh)
                exact = g.astype(np.float64) @ w.T.astype(np.float64)
                scale = np.abs(g).astype(np.float64) @ np.abs(w.T)
                assert np.all(np.abs(gh - exact) <= tol * scale), (rows, fan_in, fan_out)


def test_matrix_is_the_view_reshape_gives():
    @numba.njit
    def view(flat, offset, rows, cols):
        return matrix(flat, offset, rows, cols)

    flat = np.arange(40, dtype=np.float32)
    m = view(flat, 6, 3, 5)
    np.testing.assert_array_equal(m, flat[6:21].reshape(3, 5))
    assert m.flags["C_CONTIGUOUS"] and m.strides == (20, 4)
    m[2, 4] = -1  # a view: the flat row sees the write
    assert flat[20] == -1


def test_a_vector_load_refuses_a_strided_row_at_compile_time():
    # A vector load reads `lanes` neighbours: on a strided array it would read the wrong
    # numbers, so the kernel's compilation stops instead.
    @numba.njit
    def first(m):
        return load_at(m, 0, 0)

    with pytest.raises(numba.core.errors.TypingError, match="C-contiguous 2-D float array"):
        first(np.zeros((8, 16), dtype=np.float32)[:, ::2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_transposed_block_lands_in_its_transposed_place_and_nothing_else_moves(dtype):
    @numba.njit
    def block(src, row, col, dst):
        transpose_block(src, row, col, dst)
        return lanes_of(src)

    src = np.arange(11 * 13, dtype=dtype).reshape(11, 13) * dtype(1.5) - 7
    dst = np.full((13, 11), -1, dtype=dtype)
    lanes = block(src, 2, 3, dst)
    assert lanes == 256 // (8 * np.dtype(dtype).itemsize)
    expected = np.full_like(dst, -1)
    expected[3:3 + lanes, 2:2 + lanes] = src[2:2 + lanes, 3:3 + lanes].T
    np.testing.assert_array_equal(dst, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_transpose_is_exact_on_every_edge(dtype):
    # whole blocks of lanes, then the columns and the rows left over, NaN and signs kept
    rng = np.random.default_rng(1)
    for rows in (1, 3, 4, 8, 10, 17, 64):
        for cols in (1, 5, 8, 16, 21, 64):
            w = rng.standard_normal((rows, cols)).astype(dtype)
            w[0, -1], w[-1, 0] = np.nan, -0.0
            w_t = np.full((cols, rows), 7, dtype=dtype)
            _transpose(w, w_t)
            assert w_t.tobytes() == np.ascontiguousarray(w.T).tobytes(), (rows, cols)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_wide_lanes_hold_entries_exactly_and_sum_in_a_fixed_tree(dtype):
    # load_wide: four entries as float64 (a float32 widened exactly); fma_lanes rounds each
    # lane once; lane_sum adds (l0 + l1) + (l2 + l3).
    @numba.njit
    def wide(a, b, c, j):
        acc = fma_lanes(load_wide(a, j), load_wide(b, j), zero_wide())
        return lane_sum(add_lanes(acc, load_wide(c, j)))

    a = np.array([9.0, 0.1, 1e-30, 3.0, 2.0**27], dtype=dtype)
    b = np.array([2.0**26, 7.0, 1e30, 1.0, 1.0], dtype=dtype)
    c = np.array([0.0, 1.0, 0.0, 0.0, 0.0], dtype=dtype)
    products = [float(x) * float(y) for x, y in zip(a[1:], b[1:], strict=True)]
    assert wide(a, b, c, 1) == (products[0] + 1.0 + products[1]) + (products[2] + products[3])
    top = np.array([2.0**27, 1.0, 1.0, 0.0]), np.array([2.0**26, 1.0, 1.0, 0.0])
    assert wide(*top, np.zeros(4), 0) == 2.0**53  # 2**53 + 1, tied to even, then + 1 again
    top[0][1:3], top[1][1:3] = (0.0, 1.0), (0.0, 1.0)
    top[0][3], top[1][3] = 1.0, 1.0
    assert wide(*top, np.zeros(4), 0) == 2.0**53 + 2  # the two ones meet first


def test_a_wide_load_refuses_a_strided_row_at_compile_time():
    @numba.njit
    def first(a):
        return lane_sum(load_wide(a, 0))

    with pytest.raises(numba.core.errors.TypingError, match="C-contiguous 1-D float array"):
        first(np.zeros(16, dtype=np.float32)[::2])
