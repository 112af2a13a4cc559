"""Building blocks of the trial-major kernel that numba does not offer: SIMD vectors held
in registers (`Vector`: `load`, `load_at`, `store_at`, `fma`, `relu`; for sums in float64,
`load_wide`, `zero_wide`, `fma_lanes`, `add_lanes`, `lane_sum`), a square block
transposed in registers (`transpose_block`), 2-D views of a flat row made without
`reshape`'s checks (`matrix`), an atomic counter shared by threads (`fetch_add`) and a
power of two made from its exponent bits (`pow2`, for `study.engine.elementary`).

numba compiles array accesses into loads and stores that LLVM may not keep in registers:
it cannot prove that two arrays do not overlap, so an accumulator held in an array goes
back to memory after every update. A matrix product written with array accumulators ran
at 24-49 GFLOP/s on one core here whatever the blocking; with its accumulators held as
values of this type (SSA values, so nothing can alias them) the same product ran at 69-97
(docs/performance.md).

A `Vector` is `lanes_of(array)` numbers of the dtype (256 bits: 8 float32 or 4 float64),
an LLVM vector. On a processor with narrower registers LLVM splits it; `fma` is LLVM's
`llvm.fma` (one rounding), so an `fma` gives the same bits on every processor.

numba's `reshape` checks and normalises the new shape and calls a C helper to find the
strides, about 60 ns each, and the kernel takes about 25 views of its flat buffers per
step: a batch-8 forward pass took 2.5 us with `reshape` and 1.7 us with `matrix`, which
builds the same view directly.

numba caches the kernel's functions by their own file (`trial_major.py`, `fused.py`), not
by the intrinsics they inline: those files name a digest of what they inline
(`INLINED_DIGEST`), which the tests check, so that an edit here changes them too and the
kernel compiles again.
"""

from __future__ import annotations

try:
    import llvmlite.ir as ir
    from numba import types
    from numba.core import cgutils
    from numba.core.errors import TypingError
    from numba.core.imputils import impl_ret_borrowed
    from numba.extending import intrinsic, models, register_model
    from numba.np.arrayobj import populate_array
except ImportError:  # pragma: no cover - numba is a dependency; this guards broken installs
    intrinsic = None

BITS = 256  # one AVX register

if intrinsic is not None:

    class Vector(types.Type):
        """`lanes` numbers of `dtype` in one register."""

        def __init__(self, dtype: types.Float) -> None:
            self.dtype = dtype
            self.lanes = BITS // dtype.bitwidth
            super().__init__(name=f"Vector({dtype} x {self.lanes})")

    @register_model(Vector)
    class _VectorModel(models.PrimitiveModel):
        def __init__(self, dmm, fe_type: Vector) -> None:
            element = dmm.lookup(fe_type.dtype).get_value_type()
            super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))

    def _row(array, name: str, ndim: int = 1) -> None:
        # Raised at compile time: a strided row would need a gather, not a vector load.
        if not (isinstance(array, types.Array) and array.ndim == ndim and array.layout == "C"
                and isinstance(array.dtype, types.Float)):
            raise TypingError(f"intrinsics.{name} takes a C-contiguous {ndim}-D float array, "
                              f"not {array}")

    def _address(context, builder, array_type, array, indices, index_types):
        # The address of array[indices] (unchecked, no wraparound).
        indices = [context.cast(builder, v, t, types.intp)
                   for v, t in zip(indices, index_types, strict=True)]
        return cgutils.get_item_pointer(context, builder, array_type,
                                        context.make_array(array_type)(context, builder, array),
                                        indices, wraparound=False)

    def _fma_function(builder, llvm_type, suffix: str):
        return cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(llvm_type, [llvm_type] * 3), f"llvm.fma.{suffix}")

    @intrinsic
    def lanes_of(typingctx, array):
        """How many numbers of `array`'s dtype one Vector holds (a constant)."""
        if not (isinstance(array, types.Array) and isinstance(array.dtype, types.Float)):
            raise TypingError(f"intrinsics.lanes_of takes a float array, not {array}")
        count = Vector(array.dtype).lanes

        def codegen(context, builder, signature, args):
            return context.get_constant(types.intp, count)

        return types.intp(array), codegen

    def _load(array, indices, index_types):
        def codegen(context, builder, signature, args):
            address = _address(context, builder, signature.args[0], args[0], args[1:],
                               signature.args[1:])
            llvm_type = context.get_value_type(signature.return_type)
            return builder.load(builder.bitcast(address, llvm_type.as_pointer()),
                                align=array.dtype.bitwidth // 8)

        return Vector(array.dtype)(array, *index_types), codegen

    def _store(array, vector, index_types):
        if not (isinstance(vector, Vector) and vector.dtype == array.dtype):
            raise TypingError(f"intrinsics.store_at: {vector} into {array}")

        def codegen(context, builder, signature, args):
            address = _address(context, builder, signature.args[0], args[0], args[1:-1],
                               signature.args[1:-1])
            llvm_type = context.get_value_type(signature.args[-1])
            builder.store(args[-1], builder.bitcast(address, llvm_type.as_pointer()),
                          align=array.dtype.bitwidth // 8)
            return context.get_dummy_value()

        return types.none(array, *index_types, vector), codegen

    @intrinsic
    def load(typingctx, array, index):
        """array[index:index + lanes] of a 1-D array as a Vector (unchecked bounds)."""
        _row(array, "load")
        return _load(array, (index,), (index,))

    @intrinsic
    def load_at(typingctx, array, row, index):
        """array[row, index:index + lanes] of a 2-D array as a Vector (unchecked bounds):
        no view of the row is made (a view costs a reference count)."""
        _row(array, "load_at", 2)
        return _load(array, (row, index), (row, index))

    @intrinsic
    def store_at(typingctx, array, row, index, vector):
        """array[row, index:index + lanes] = vector (unchecked bounds)."""
        _row(array, "store_at", 2)
        return _store(array, vector, (row, index))

    @intrinsic
    def fma(typingctx, x, scalar, acc):
        """acc + x * scalar in every lane, rounded once (the scalar cast to the dtype)."""
        if not (isinstance(x, Vector) and x == acc):
            raise TypingError(f"intrinsics.fma: {x}, {acc}")

        def codegen(context, builder, signature, args):
            llvm_type = context.get_value_type(signature.args[0])
            value = context.cast(builder, args[1], signature.args[1], x.dtype)
            lane = ir.Constant(ir.IntType(32), 0)
            spread = builder.insert_element(ir.Constant(llvm_type, ir.Undefined), value, lane)
            spread = builder.shuffle_vector(
                spread, ir.Constant(llvm_type, ir.Undefined),
                ir.Constant(ir.VectorType(ir.IntType(32), x.lanes), [0] * x.lanes))
            function = _fma_function(builder, llvm_type, f"v{x.lanes}f{x.dtype.bitwidth}")
            return builder.call(function, [args[0], spread, args[2]])

        return x(x, scalar, acc), codegen

    @intrinsic
    def load_wide(typingctx, array, index):
        """array[index:index + 4] of a 1-D float32 or float64 array as a Vector of 4
        float64 lanes (a float32 widened, exactly; unchecked bounds): the lanes of a sum
        kept in float64."""
        _row(array, "load_wide")
        wide = Vector(types.float64)

        def codegen(context, builder, signature, args):
            address = _address(context, builder, signature.args[0], args[0], args[1:],
                               signature.args[1:])
            narrow = ir.VectorType(context.get_value_type(array.dtype), wide.lanes)
            value = builder.load(builder.bitcast(address, narrow.as_pointer()),
                                 align=array.dtype.bitwidth // 8)
            if array.dtype != types.float64:
                value = builder.fpext(value, context.get_value_type(wide))
            return value

        return wide(array, index), codegen

    @intrinsic
    def zero_wide(typingctx):
        """A Vector of 4 float64 zeros (`load_wide`'s type)."""
        wide = Vector(types.float64)

        def codegen(context, builder, signature, args):
            return ir.Constant(context.get_value_type(wide), None)

        return wide(), codegen

    @intrinsic
    def fma_lanes(typingctx, x, y, acc):
        """acc + x * y lane by lane, each rounded once."""
        if not (isinstance(x, Vector) and x == y == acc):
            raise TypingError(f"intrinsics.fma_lanes: {x}, {y}, {acc}")

        def codegen(context, builder, signature, args):
            llvm_type = context.get_value_type(x)
            function = _fma_function(builder, llvm_type, f"v{x.lanes}f{x.dtype.bitwidth}")
            return builder.call(function, list(args))

        return x(x, y, acc), codegen

    @intrinsic
    def add_lanes(typingctx, x, y):
        """x + y lane by lane."""
        if not (isinstance(x, Vector) and x == y):
            raise TypingError(f"intrinsics.add_lanes: {x}, {y}")

        def codegen(context, builder, signature, args):
            return builder.fadd(args[0], args[1])

        return x(x, y), codegen

    @intrinsic
    def lane_sum(typingctx, x):
        """The sum of a Vector's lanes, pairwise in a fixed order: ((x0 + x1) + (x2 + x3))
        for 4 lanes."""
        if not isinstance(x, Vector):
            raise TypingError(f"intrinsics.lane_sum: {x}")

        def codegen(context, builder, signature, args):
            terms = [builder.extract_element(args[0], ir.Constant(ir.IntType(32), i))
                     for i in range(x.lanes)]
            while len(terms) > 1:
                terms = [builder.fadd(terms[i], terms[i + 1]) for i in range(0, len(terms), 2)]
            return terms[0]

        return x.dtype(x), codegen

    @intrinsic
    def relu(typingctx, x):
        """0 in the lanes of `x` that are <= 0, the lane itself elsewhere (NaN kept, as
        torch.relu keeps it; -0 becomes 0): `v if not v <= 0 else 0` lane by lane, the
        same bits."""
        if not isinstance(x, Vector):
            raise TypingError(f"intrinsics.relu: {x}")

        def codegen(context, builder, signature, args):
            zero = ir.Constant(context.get_value_type(signature.args[0]), None)
            return builder.select(builder.fcmp_ordered("<=", args[0], zero), zero, args[0])

        return x(x), codegen

    @intrinsic
    def fma_scalar(typingctx, a, b, acc):
        """acc + a * b, rounded once, in acc's float dtype (`fma`'s arithmetic, one lane)."""
        if not isinstance(acc, types.Float):
            raise TypingError(f"intrinsics.fma_scalar: {acc}")

        def codegen(context, builder, signature, args):
            llvm_type = context.get_value_type(acc)
            values = [context.cast(builder, v, t, acc)
                      for v, t in zip(args, signature.args, strict=True)]
            function = _fma_function(builder, llvm_type, f"f{acc.bitwidth}")
            return builder.call(function, values)

        return acc(a, b, acc), codegen

    @intrinsic
    def transpose_block(typingctx, src, row, col, dst):
        """dst[col + j, row + i] = src[row + i, col + j] for i, j < lanes: a square block of
        `lanes` rows moved to its transposed place, as `lanes` vector loads, shuffles in
        registers and `lanes` vector stores (unchecked bounds). The numbers are moved, not
        computed: the same bits."""
        _row(src, "transpose_block", 2)
        _row(dst, "transpose_block", 2)
        if src.dtype != dst.dtype:
            raise TypingError(f"intrinsics.transpose_block: {src} into {dst}")
        lanes = Vector(src.dtype).lanes
        index_types = (row, col)

        def codegen(context, builder, signature, args):
            src_type, _, _, dst_type = signature.args
            vector_type = ir.VectorType(context.get_value_type(src.dtype), lanes)
            align = src.dtype.bitwidth // 8
            rows = []
            for i in range(lanes):
                r = builder.add(context.cast(builder, args[1], index_types[0], types.intp),
                                context.get_constant(types.intp, i))
                address = _address(context, builder, src_type, args[0], (r, args[2]),
                                   (types.intp, index_types[1]))
                rows.append(builder.load(builder.bitcast(address, vector_type.as_pointer()),
                                         align=align))
            # Butterfly: at half-width h, rows i and i + h (bit h of i clear) swap their
            # off-diagonal h x h blocks; after every h the block is transposed.
            h = 1
            while h < lanes:
                low = [j for j in range(lanes) if not j & h]
                first, second = [0] * lanes, [0] * lanes
                for j in low:
                    first[j], first[j + h] = j, lanes + j
                    second[j], second[j + h] = j + h, lanes + j + h
                masks = [ir.Constant(ir.VectorType(ir.IntType(32), lanes), m)
                         for m in (first, second)]
                for i in (i for i in range(lanes) if not i & h):
                    a, b = rows[i], rows[i + h]
                    rows[i] = builder.shuffle_vector(a, b, masks[0])
                    rows[i + h] = builder.shuffle_vector(a, b, masks[1])
                h *= 2
            for j in range(lanes):
                r = builder.add(context.cast(builder, args[2], index_types[1], types.intp),
                                context.get_constant(types.intp, j))
                address = _address(context, builder, dst_type, args[3], (r, args[1]),
                                   (types.intp, index_types[0]))
                builder.store(rows[j], builder.bitcast(address, vector_type.as_pointer()),
                              align=align)
            return context.get_dummy_value()

        return types.none(src, row, col, dst), codegen

    @intrinsic
    def matrix(typingctx, flat, offset, rows, cols):
        """flat[offset:offset + rows * cols] as a C-contiguous [rows, cols] view, as
        `reshape` gives it, without its checks (unchecked bounds)."""
        _row(flat, "matrix")
        result = types.Array(flat.dtype, 2, "C", readonly=not flat.mutable)

        def codegen(context, builder, signature, args):
            source = context.make_array(signature.args[0])(context, builder, args[0])
            offset, rows, cols = (context.cast(builder, v, t, types.intp)
                                  for v, t in zip(args[1:], signature.args[1:], strict=True))
            view = context.make_array(result)(context, builder)
            itemsize = context.get_constant(
                types.intp, context.get_abi_sizeof(context.get_data_type(flat.dtype)))
            populate_array(view, data=builder.gep(source.data, [offset]), shape=[rows, cols],
                           strides=[builder.mul(cols, itemsize), itemsize], itemsize=itemsize,
                           meminfo=source.meminfo, parent=source.parent)
            return impl_ret_borrowed(context, builder, result, view._getvalue())

        return result(flat, offset, rows, cols), codegen

    @intrinsic
    def fetch_add(typingctx, counter, index, value):
        """counter[index] += value as one atomic step (sequentially consistent), returning
        the value before: threads running compiled code at once each get a different one.
        `counter` is a C-contiguous int64 array (unchecked bounds)."""
        if not (isinstance(counter, types.Array) and counter.dtype == types.int64
                and counter.ndim == 1 and counter.layout == "C" and counter.mutable):
            raise TypingError(f"intrinsics.fetch_add takes a writable 1-D int64 array, "
                              f"not {counter}")

        def codegen(context, builder, signature, args):
            address = _address(context, builder, signature.args[0], args[0], (args[1],),
                               (signature.args[1],))
            amount = context.cast(builder, args[2], signature.args[2], types.int64)
            return builder.atomic_rmw("add", address, amount, "seq_cst")

        return types.int64(counter, index, value), codegen

    @intrinsic
    def pow2(typingctx, n):
        """2.0 ** n as a float32, made from its exponent bits, for an integer `n` in
        [-126, 127] (unchecked: outside, the bits are another number). Exact; no library
        call, so a loop that calls it can be vectorised."""
        if not isinstance(n, types.Integer):
            raise TypingError(f"intrinsics.pow2 takes an integer, not {n}")

        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            value = context.cast(builder, args[0], signature.args[0], types.int32)
            bits = builder.shl(builder.add(value, ir.Constant(i32, 127)), ir.Constant(i32, 23))
            return builder.bitcast(bits, ir.FloatType())

        return types.float32(n), codegen
