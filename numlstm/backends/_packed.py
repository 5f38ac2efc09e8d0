"""Packed-weight GEMM for the recurrent product of the CPU time loop.

At every step of an LSTM time loop the CPU backend computes ``out = rows @ W`` with
``rows`` a few batch rows (``M x K``, ``K = H``) and the same recurrent weight ``W``
(``K x N``, ``N = 4H``). A BLAS call repacks ``W`` at every step; here ``W`` is packed
once per time loop by :func:`pack` into panels of ``NR`` columns,

    ``packed[p, k, :] = W[k, p * NR : (p + 1) * NR]``   (zero-padded at the ragged end),

and :func:`packed_matmul` computes the product with a register-blocked micro-kernel: an
``MR x (PANELS * NR)`` block of ``out`` lives in vector registers across the whole ``k``
loop; at each ``k`` it loads one row of each panel (``NR`` contiguous values, two 64-byte
vectors), broadcasts ``rows[r, k]`` and issues one fused multiply-add per vector.

The same kernel serves the gradient pass after the backward time loop, ``δW = δa^T X``
summed over blocks of steps: there ``rows`` is the transpose of a block of ``δa`` (any
strides are read), and the packed factor is a slice ``packed[:, k0:k1]`` of a packed
buffer (panels need not be adjacent in memory, only each panel's rows).

The micro-kernel is a Numba ``@intrinsic`` that emits LLVM IR with explicit vector types
(``<16 x float>``, ``<8 x double>``) and ``llvm.fmuladd`` (fused where the CPU has FMA).
On x86, LLVM keeps such 512-bit vectors whole (zmm registers) unless the function carries
``"min-legal-vector-width"`` at most 256; Numba's functions carry none, which X86 reads as
"no limit", so the tuning that prefers 256-bit vectors on recent Intel CPUs only steers the
auto-vectoriser. The intrinsic still marks its function with
``"min-legal-vector-width"="512"`` and ``"prefer-vector-width"="512"`` to state the intent
(LLVM drops the former when it inlines a callee that lacks it, which again means no limit).
On a CPU without AVX-512 the same IR is legalised into narrower vectors, so the code stays
correct everywhere (only slower); no x86-specific intrinsic is used.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _buffers

__all__ = [
    "aligned_empty",
    "empty_packed",
    "pack",
    "packed_matmul",
    "packed_shape",
    "panel_width",
    "transpose",
    "wide_vectors",
]

#: Bytes in one vector register of the widest target (AVX-512: 64).
VECTOR_BYTES = 64
#: The micro-kernels prefetch each panel this many bytes (8 rows of ``k``) ahead of their
#: loads. It pays where ``W`` does not stay in L2: one thread, float32, 8 x 512 x 1024
#: (2 MB, a thread's block of the split by units) 137-153 -> 157-171 GF/s; and helps a
#: little in cache (32 x 256 x 1024: 180-187 -> 185-197). End to end, the grid of
#: ``python -m bench`` showed no change beyond its noise (about 2 %, in-process A/B).
#: ``llvm.prefetch`` never faults, so prefetching past a panel's end is harmless.
PREFETCH_BYTES = 1024
#: Vectors per panel: a panel row of ``NR`` values is two 64-byte vectors.
PANEL_VECTORS = 2

#: Attributes that ask X86 to keep 512-bit vectors whole (see the module docstring).
_WIDE_VECTOR_ATTRIBUTES = ('"min-legal-vector-width"="512"', '"prefer-vector-width"="512"')


def _add_wide_vector_attributes(function):
    """Mark an LLVM function with :data:`_WIDE_VECTOR_ATTRIBUTES`.

    llvmlite's AttributeSet only accepts names it knows; a string attribute is printed
    verbatim, so it goes in through the underlying set.
    """
    for attribute in _WIDE_VECTOR_ATTRIBUTES:
        set.add(function.attributes, attribute)


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM's auto-vectoriser use 512-bit vectors in the calling function.

    Recent Intel CPUs tune LLVM to prefer 256-bit vectors; the gate loops of the CPU
    kernels call this so that they run 16 float32 (8 float64) lanes wide where the CPU has
    AVX-512 (measured 5.5 -> 4.8 ns per hidden unit and step in float32, 14.4 -> 11.8 in
    float64). Elsewhere it changes nothing. It emits no code.
    """

    def codegen(context, builder, signature, args):
        _add_wide_vector_attributes(builder.function)
        return context.get_dummy_value()

    return types.none(), codegen


def panel_width(dtype):
    """Columns per packed panel, ``NR``, for a dtype.

    Parameters
    ----------
    dtype : numpy dtype or str
        ``float32`` or ``float64``.

    Returns
    -------
    int
        ``NR``: 32 for float32, 16 for float64 (two 64-byte vectors).
    """
    itemsize = np.dtype(dtype).itemsize
    return PANEL_VECTORS * VECTOR_BYTES // itemsize


def packed_shape(k, n, dtype):
    """Shape of the packed copy of a ``(k, n)`` weight.

    Parameters
    ----------
    k, n : int
        Rows (the reduction length) and columns of ``W``.
    dtype : numpy dtype or str
        ``float32`` or ``float64``.

    Returns
    -------
    tuple of int
        ``(ceil(n / NR), k, NR)``.
    """
    nr = panel_width(dtype)
    return (-(-n // nr), k, nr)


def aligned_empty(shape, dtype):
    """An uninitialised C-contiguous array whose first element is 64-byte aligned, on a
    buffer of :data:`._buffers.pool` (one that no array uses any more, or a new one).

    Parameters
    ----------
    shape : tuple of int
    dtype : numpy dtype or str

    Returns
    -------
    numpy.ndarray
    """
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    if size == 0:  # nothing to align (the buffers a cell does not use)
        return np.empty(shape, dtype)
    raw = _buffers.pool.take(size + VECTOR_BYTES)
    return np.ndarray(shape, dtype, raw, -_address(raw) % VECTOR_BYTES)


@njit(cache=True, nogil=True)
def _address(array):
    """The address of ``array``'s first element: 0.18 us compiled, against 0.8 us for
    ``array.ctypes.data`` (``aligned_empty`` 1.6 -> 0.85 us; a layer's call allocates up to
    12 aligned buffers, forward and backward)."""
    return array.ctypes.data


def empty_packed(k, n, dtype):
    """An uninitialised packed buffer, 64-byte aligned so panel loads never split a line.

    Parameters
    ----------
    k, n : int
        Rows and columns of ``W``.
    dtype : numpy dtype or str
        ``float32`` or ``float64``.

    Returns
    -------
    numpy.ndarray
        C-contiguous, of shape :func:`packed_shape` ``(k, n, dtype)``.
    """
    return aligned_empty(packed_shape(k, n, dtype), dtype)


@njit(cache=True, nogil=True, error_model="numpy")
def pack(w, packed):
    """Copy ``w`` (``K x N``) into panels: ``packed[p, k, j] = w[k, p * NR + j]``.

    Parameters
    ----------
    w : ndarray, shape (K, N)
        The weight, e.g. ``w_hh_t`` (the transpose of ``weight_hh``).
    packed : ndarray, shape (ceil(N / NR), K, NR)
        Output, e.g. from :func:`empty_packed`, or a slice ``buffer[:, :K]`` of a larger
        one; columns past ``N`` in the last panel are set to zero.

    Notes
    -----
    Full panels are copied by whole rows of ``NR`` values, a constant, so that LLVM turns
    each into two vector moves where ``w``'s rows are contiguous (``W_ih``, ``W_hh`` for
    the backward pass: 1.9 -> 0.7 us for a 256 x 32 float32 weight). Where ``w`` is the
    transpose of such a weight (the forward pass's ``W^T``), each panel is a block of
    ``NR`` rows of ``W`` transposed by :func:`transpose` (float32, 32 x 256: 2.7 -> 1.4 us;
    256 x 1024: 89 -> 47 us); for other strides, in tiles of 8 rows of ``k``. The ragged
    last panel goes value by value.
    """
    k_count, n = w.shape
    panels, _, nr = packed.shape
    if packed.shape[1] != k_count or panels * nr < n or (panels - 1) * nr >= max(n, 1):
        raise ValueError("pack: packed has the wrong shape for w")
    if nr != PANEL_VECTORS * VECTOR_BYTES // packed.itemsize:
        raise ValueError("pack: packed's panels are not NR values wide")
    full_panels = n // (PANEL_VECTORS * VECTOR_BYTES // packed.itemsize)
    if w.strides[1] == w.itemsize:
        for p in range(full_panels):
            for k in range(k_count):
                _copy_panel_row(w[k, p * nr : (p + 1) * nr], packed[p, k])
    elif w.strides[0] == w.itemsize and packed.strides[2] == packed.itemsize:
        # w is the transpose of a row-major weight: each panel is a transposed block of rows.
        w_t = w.T
        for p in range(full_panels):
            transpose(w_t[p * nr : (p + 1) * nr], packed[p])
    else:
        for p in range(full_panels):
            k0 = 0
            while k0 + 8 <= k_count:
                for j in range(PANEL_VECTORS * VECTOR_BYTES // packed.itemsize):
                    for k in range(k0, k0 + 8):
                        packed[p, k, j] = w[k, p * nr + j]
                k0 += 8
            for k in range(k0, k_count):
                _copy_panel_row(w[k, p * nr : (p + 1) * nr], packed[p, k])
    for p in range(full_panels, panels):
        j0 = p * nr
        width = n - j0
        for k in range(k_count):
            for j in range(width):
                packed[p, k, j] = w[k, j0 + j]
            for j in range(width, nr):
                packed[p, k, j] = 0.0


@njit(cache=True, nogil=True, inline="always")
def _copy_panel_row(source, row):
    """``row[:] = source[:NR]``, with ``NR`` known when compiled (from the dtype)."""
    for j in range(PANEL_VECTORS * VECTOR_BYTES // row.itemsize):
        row[j] = source[j]


def _vector_types(context, dtype):
    """LLVM types for an intrinsic on ``dtype``: ``intp``, the element type, its size in
    bytes, the lanes of one :data:`VECTOR_BYTES` vector, and that vector type."""
    element = context.get_data_type(dtype)
    size = dtype.bitwidth // 8
    lanes = VECTOR_BYTES // size
    return context.get_value_type(types.intp), element, size, lanes, ir.VectorType(element, lanes)


def _make_kernel(mr, panels):
    """Build the micro-kernel for ``mr`` rows and ``panels`` adjacent panels.

    The kernel ``kernel(rows, i0, packed, p0, out, j0, ncols, accumulate, bias)``
    computes::

        out[i0:i0+mr, j0:j0+ncols] (+)= bias[j0:j0+ncols] + rows[i0:i0+mr, :] @ W[:, j0:j0+ncols]

    with ``j0 = p0 * NR`` and ``0 < ncols <= panels * NR``; columns from ``ncols`` on are
    never written (masked stores). ``bias`` is a 1-D array or None (a compile-time choice);
    it is where the accumulators start. The ``mr * panels * 2`` accumulator vectors are
    SSA values carried by phi nodes across the ``k`` loop.
    """

    @intrinsic
    def kernel(typingctx, rows, i0, packed, p0, out, j0, ncols, accumulate, bias):
        sig = types.void(
            rows,
            types.intp,
            packed,
            types.intp,
            out,
            types.intp,
            types.intp,
            types.boolean,
            bias,
        )

        def codegen(context, builder, signature, args):
            rows_ty, _, packed_ty, _, out_ty, _, _, _, bias_ty = signature.args
            rows_val, i0, packed_val, p0, out_val, j0, ncols, accumulate, bias_val = args
            _add_wide_vector_attributes(builder.function)

            intp, element, size, lanes, vector = _vector_types(context, rows_ty.dtype)
            i32 = ir.IntType(32)
            nr = PANEL_VECTORS * lanes
            columns = panels * PANEL_VECTORS  # vectors across the block

            def const(value):
                return ir.Constant(intp, value)

            rows_arr = context.make_array(rows_ty)(context, builder, rows_val)
            packed_arr = context.make_array(packed_ty)(context, builder, packed_val)
            out_arr = context.make_array(out_ty)(context, builder, out_val)
            k_count = cgutils.unpack_tuple(builder, packed_arr.shape, 3)[1]
            rows_stride, k_stride = cgutils.unpack_tuple(builder, rows_arr.strides, 2)
            if rows_ty.layout == "C":
                k_stride = const(size)  # a constant step lets LLVM fold it into addresses
            out_stride = cgutils.unpack_tuple(builder, out_arr.strides, 2)[0]

            def at(base, offset, typ):
                """Typed pointer ``base + offset`` bytes."""
                return builder.bitcast(cgutils.pointer_add(builder, base, offset), typ)

            row_ptrs = [
                cgutils.pointer_add(
                    builder, rows_arr.data, builder.mul(builder.add(i0, const(r)), rows_stride)
                )
                for r in range(mr)
            ]
            panel_bytes = cgutils.unpack_tuple(builder, packed_arr.strides, 3)[0]
            panel_ptrs = [
                cgutils.pointer_add(
                    builder, packed_arr.data, builder.mul(builder.add(p0, const(q)), panel_bytes)
                )
                for q in range(panels)
            ]
            fmuladd = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(vector, [vector] * 3),
                f"llvm.fmuladd.v{lanes}f{size * 8}",
            )
            prefetch = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32]),
                "llvm.prefetch.p0",
            )
            zero = ir.Constant(vector, None)
            undef = ir.Constant(vector, ir.Undefined)
            splat_mask = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
            mask_type = ir.VectorType(ir.IntType(1), lanes)
            lane_index = ir.Constant(ir.VectorType(intp, lanes), list(range(lanes)))
            masked_load = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(vector, [vector.as_pointer(), i32, mask_type, vector]),
                f"llvm.masked.load.v{lanes}f{size * 8}.p0",
            )
            masked_store = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [vector, vector.as_pointer(), i32, mask_type]),
                f"llvm.masked.store.v{lanes}f{size * 8}.p0",
            )
            align = ir.Constant(i32, size)

            def prefetch_line(base, offset):
                """Prefetch the line at ``base + offset`` bytes (read, all cache levels)."""
                pointer = at(base, offset, ir.IntType(8).as_pointer())
                read, keep, data = (ir.Constant(i32, v) for v in (0, 3, 1))
                builder.call(prefetch, [pointer, read, keep, data])

            def lane_mask(c):
                """Lanes of the block's ``c``-th vector that lie before column ``ncols``."""
                left = builder.sub(ncols, const(c * lanes))
                splat = builder.shuffle_vector(
                    builder.insert_element(
                        ir.Constant(ir.VectorType(intp, lanes), ir.Undefined),
                        left,
                        ir.Constant(i32, 0),
                    ),
                    ir.Constant(ir.VectorType(intp, lanes), ir.Undefined),
                    splat_mask,
                )
                return builder.icmp_signed("<", lane_index, splat)

            # Where the accumulators start: 0, or the bias (the same for every row), read
            # with masked loads so that a ragged block reads nothing past ncols.
            start = [zero] * columns
            if isinstance(bias_ty, types.Array):
                bias_arr = context.make_array(bias_ty)(context, builder, bias_val)
                bias_ptr = cgutils.pointer_add(builder, bias_arr.data, builder.mul(j0, const(size)))
                start = [
                    builder.call(
                        masked_load,
                        [
                            at(bias_ptr, const(c * VECTOR_BYTES), vector.as_pointer()),
                            align,
                            lane_mask(c),
                            zero,
                        ],
                    )
                    for c in range(columns)
                ]

            # With accumulate, the block of out is read after the k loop: fetch it now, so
            # that the loop hides the wait where out is not in cache (the gradient pass's
            # partial weight gradients beyond L2: float32, H = 512, 1.02-1.10 -> 0.97-1.02
            # of BLAS's time; no change in the forward pass, in-process A/B).
            out_ptrs = [
                cgutils.pointer_add(
                    builder,
                    out_arr.data,
                    builder.add(
                        builder.mul(builder.add(i0, const(r)), out_stride),
                        builder.mul(j0, const(size)),
                    ),
                )
                for r in range(mr)
            ]
            with builder.if_then(accumulate):
                for r in range(mr):
                    for c in range(columns):
                        prefetch_line(out_ptrs[r], const(c * VECTOR_BYTES))

            # The k loop: acc[r][c] += rows[i0 + r, k] * packed[p0 + c // 2, k, vector c % 2].
            entry = builder.basic_block
            loop = builder.append_basic_block("packed.k")
            done = builder.append_basic_block("packed.k.done")
            builder.cbranch(builder.icmp_signed(">", k_count, const(0)), loop, done)

            builder.position_at_end(loop)
            k = builder.phi(intp, "k")
            k.add_incoming(const(0), entry)
            acc = [[builder.phi(vector) for _ in range(columns)] for _ in range(mr)]
            for acc_r in acc:
                for c, phi in enumerate(acc_r):
                    phi.add_incoming(start[c], entry)
            panel_offset = builder.mul(k, const(nr * size))
            b = []
            for c in range(columns):
                q, v = divmod(c, PANEL_VECTORS)
                offset = builder.add(panel_offset, const(v * VECTOR_BYTES))
                b.append(builder.load(at(panel_ptrs[q], offset, vector.as_pointer()), align=size))
                # Each vector is one 64-byte line: prefetch the line PREFETCH_BYTES ahead.
                prefetch_line(panel_ptrs[q], builder.add(offset, const(PREFETCH_BYTES)))
            row_offset = builder.mul(k, k_stride)
            new_acc = []
            for r in range(mr):
                a = builder.load(at(row_ptrs[r], row_offset, element.as_pointer()), align=size)
                a = builder.shuffle_vector(
                    builder.insert_element(undef, a, ir.Constant(i32, 0)), undef, splat_mask
                )
                new_acc.append(
                    [builder.call(fmuladd, [a, b[c], acc[r][c]]) for c in range(columns)]
                )
            k_next = builder.add(k, const(1))
            latch = builder.basic_block
            k.add_incoming(k_next, latch)
            for r in range(mr):
                for c in range(columns):
                    acc[r][c].add_incoming(new_acc[r][c], latch)
            builder.cbranch(builder.icmp_signed("<", k_next, k_count), loop, done)

            builder.position_at_end(done)
            result = []
            for r in range(mr):
                result.append([])
                for c in range(columns):
                    phi = builder.phi(vector)
                    phi.add_incoming(start[c], entry)
                    phi.add_incoming(new_acc[r][c], latch)
                    result[r].append(phi)

            # Store the block; a ragged block uses masked loads and stores.

            def store_block(ragged, add):
                for c in range(columns):
                    if ragged:
                        mask = lane_mask(c)
                    for r in range(mr):
                        ptr = at(out_ptrs[r], const(c * VECTOR_BYTES), vector.as_pointer())
                        value = result[r][c]
                        if ragged:
                            if add:
                                old = builder.call(masked_load, [ptr, align, mask, zero])
                                value = builder.fadd(old, value)
                            builder.call(masked_store, [value, ptr, align, mask])
                        else:
                            if add:
                                value = builder.fadd(builder.load(ptr, align=size), value)
                            builder.store(value, ptr, align=size)

            full = builder.icmp_signed("==", ncols, const(panels * nr))
            with builder.if_else(full) as (then, otherwise):
                for block, ragged in ((then, False), (otherwise, True)):
                    with block:
                        with builder.if_else(accumulate) as (add, overwrite):
                            with add:
                                store_block(ragged, True)
                            with overwrite:
                                store_block(ragged, False)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


def _transpose_masks(lanes):
    """Shuffle masks that transpose a square tile of ``lanes`` vectors.

    Stage ``s`` swaps the off-diagonal ``s x s`` blocks of every ``2s x 2s`` block (``s``
    from ``lanes / 2`` down to 1): vector ``i`` (with bit ``s`` clear) and vector
    ``i + s`` exchange, in every chunk of ``2s`` lanes, the second half of ``i``'s with
    the first half of ``i + s``'s. After all stages lane ``c`` of vector ``r`` holds what
    lane ``r`` of vector ``c`` held. Returns, per stage, ``(s, low, high)``: the masks of
    ``shufflevector(v[i], v[i + s])`` giving the new ``v[i]`` and ``v[i + s]``.
    """
    stages = []
    s = lanes // 2
    while s >= 1:
        low, high = [], []
        for c in range(lanes):
            chunk, offset = divmod(c, 2 * s)
            base = chunk * 2 * s
            if offset < s:  # first half: from i (low) / from i's second half (high)
                low.append(base + offset)
                high.append(base + s + offset)
            else:  # second half: from i + s's first half (low) / its second half (high)
                low.append(lanes + base + offset - s)
                high.append(lanes + base + offset)
        stages.append((s, low, high))
        s //= 2
    return stages


@intrinsic
def _transpose_tile(typingctx, src, i0, j0, dst):
    """``dst[j0 + r, i0 + c] = src[i0 + c, j0 + r]`` for ``r, c`` below ``L``, the lanes of a
    64-byte vector (16 float32, 8 float64): ``L`` vector loads, ``L log2 L`` two-vector
    shuffles and ``L`` vector stores. Both arrays need unit stride along their rows."""
    sig = types.void(src, types.intp, types.intp, dst)

    def codegen(context, builder, signature, args):
        src_ty, _, _, dst_ty = signature.args
        src_val, i0, j0, dst_val = args
        _add_wide_vector_attributes(builder.function)
        intp, _, size, lanes, vector = _vector_types(context, src_ty.dtype)
        i32 = ir.IntType(32)
        src_arr = context.make_array(src_ty)(context, builder, src_val)
        dst_arr = context.make_array(dst_ty)(context, builder, dst_val)
        src_stride = cgutils.unpack_tuple(builder, src_arr.strides, 2)[0]
        dst_stride = cgutils.unpack_tuple(builder, dst_arr.strides, 2)[0]
        size_const = ir.Constant(intp, size)

        def row_pointer(array, stride, row, column):
            offset = builder.add(builder.mul(row, stride), builder.mul(column, size_const))
            pointer = cgutils.pointer_add(builder, array.data, offset)
            return builder.bitcast(pointer, vector.as_pointer())

        v = [
            builder.load(
                row_pointer(src_arr, src_stride, builder.add(i0, ir.Constant(intp, c)), j0),
                align=size,
            )
            for c in range(lanes)
        ]
        for s, low, high in _transpose_masks(lanes):
            low_mask = ir.Constant(ir.VectorType(i32, lanes), low)
            high_mask = ir.Constant(ir.VectorType(i32, lanes), high)
            for i in range(lanes):
                if i & s == 0:
                    v[i], v[i + s] = (
                        builder.shuffle_vector(v[i], v[i + s], low_mask),
                        builder.shuffle_vector(v[i], v[i + s], high_mask),
                    )
        for r in range(lanes):
            pointer = row_pointer(dst_arr, dst_stride, builder.add(j0, ir.Constant(intp, r)), i0)
            builder.store(v[r], pointer, align=size)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def transpose(src, dst):
    """``dst[:n, :m] = src.T`` for ``src`` of shape ``(m, n)``, by square tiles of one
    64-byte vector a side, shuffled in registers.

    Parameters
    ----------
    src : ndarray, shape (m, n)
        Unit stride along its rows.
    dst : ndarray, shape (>= n, >= m)
        Same dtype; unit stride along its rows.

    Notes
    -----
    The gradient pass reads ``δa^T`` as the left factor of :func:`packed_matmul`. Read
    straight from ``δa`` (``4H`` values a row), each step of ``k`` lands on a new cache
    line, all of them in one set of the L1 cache at ``H = 256``. One thread, float32, a
    block of 128 rows at ``H = 256`` times 256 packed columns: 393 us in place, 372 us
    from a transposed copy, which takes 15 us (the gradient pass as a whole: see
    ``TRANSPOSE_MIN_ROW_BYTES`` in :mod:`numlstm.backends.cpu`).
    """
    m, n = src.shape
    if dst.shape[0] < n or dst.shape[1] < m:
        raise ValueError("transpose: dst is smaller than src.T")
    if (m > 1 and n > 1) and (src.strides[1] != src.itemsize or dst.strides[1] != dst.itemsize):
        raise ValueError("transpose: src and dst need unit stride along their rows")
    lanes = VECTOR_BYTES // src.itemsize
    m_full, n_full = m - m % lanes, n - n % lanes
    for i0 in range(0, m_full, lanes):
        for j0 in range(0, n_full, lanes):
            _transpose_tile(src, i0, j0, dst)
    for i in range(m_full):
        for j in range(n_full, n):
            dst[j, i] = src[i, j]
    for i in range(m_full, m):
        for j in range(n):
            dst[j, i] = src[i, j]


# Micro-kernel shapes: MR rows x PANELS panels, MR * PANELS * 2 accumulator vectors.
_kernel_6x2 = _make_kernel(6, 2)
_kernel_6x1 = _make_kernel(6, 1)
_kernel_8x1 = _make_kernel(8, 1)
_kernel_4x2 = _make_kernel(4, 2)
_kernel_4x1 = _make_kernel(4, 1)
_kernel_2x4 = _make_kernel(2, 4)
_kernel_2x1 = _make_kernel(2, 1)
_kernel_1x4 = _make_kernel(1, 4)
_kernel_1x1 = _make_kernel(1, 1)
#: Panels per group of the outer loop of packed_matmul (the widest kernel's panels).
_GROUP = 4
#: From this many rows on, blocks of 6 rows x 2 panels: 24 accumulators load less per FMA
#: than the 8 x 1 block. Measured 165 -> 175-185 GF/s at (3216, 256, 1024) (the input
#: projection, ``δa W_ih``), and for one step's rows (one thread, float32, M x K x N):
#: 170 -> 193 at 32 x 256 x 1024, 174 -> 211 at 12 x 128 x 512, 177 -> 193 at 24 x 128 x
#: 512; float64 gains alike. The 8 x 1 block stays for fewer rows (187 against 183 GF/s at
#: 8 x 64 x 256), where the 6-row blocks would leave a third of the rows to narrow ones.
#: End to end, no change beyond the benchmark's noise (about 2 %, in-process A/B).
_MANY_ROWS = 12


@njit(cache=True, nogil=True)
def packed_matmul(rows, packed, out, n, accumulate, bias=None):
    """``out[:, :n] = bias + rows @ W`` (or ``+=`` when ``accumulate``), ``W`` packed by
    :func:`pack`.

    Parameters
    ----------
    rows : ndarray, shape (M, K)
        Left factor, with any strides: a row slice of a larger array, or the transpose of
        one (each step of ``k`` then reads a new cache line, so unit stride along ``K`` is
        the fast case).
    packed : ndarray, shape (ceil(n / NR), K, NR)
        ``W`` packed by :func:`pack`, or a slice ``packed[:, k0:k1]`` of it (the rows
        ``k0:k1`` of ``W``); each panel's rows must be contiguous. Same dtype as ``rows``
        and ``out``.
    out : ndarray, shape (M, >= n)
        Result; unit stride along its columns. Columns from ``n`` on are not touched.
    n : int
        Columns of ``W``.
    accumulate : bool
        Add to ``out`` instead of overwriting it.
    bias : ndarray, shape (>= n,), optional
        Added to every row (contiguous); the accumulators start from it, so it costs one
        load per block and no pass over ``out``.

    Notes
    -----
    Allocates nothing: it is called at every step of a time loop.
    """
    m, k_count = rows.shape
    panels, _, nr = packed.shape
    itemsize = rows.itemsize
    if packed.shape[1] != k_count or out.shape[0] != m or out.shape[1] < n:
        raise ValueError("packed_matmul: shapes do not match")
    if panels * nr < n or nr * itemsize != 128:
        raise ValueError("packed_matmul: packed does not hold n columns")
    if k_count > 0 and (
        packed.strides[2] != itemsize or (k_count > 1 and packed.strides[1] != nr * itemsize)
    ):
        raise ValueError("packed_matmul: each panel of packed needs contiguous rows")
    if n > 1 and out.strides[1] != itemsize:
        raise ValueError("packed_matmul: out needs unit stride along its columns")
    if bias is not None and (bias.shape[0] < n or (n > 1 and bias.strides[0] != itemsize)):
        raise ValueError("packed_matmul: bias needs n contiguous values")
    if n <= 0:
        return
    n_panels = (n + nr - 1) // nr
    # Panels outer, rows inner: a group of up to GROUP panels of W stays in cache while
    # every block of rows goes through it, so W is read from memory once per call.
    for p0 in range(0, n_panels, _GROUP):
        group = min(_GROUP, n_panels - p0)
        group_width = min(group * nr, n - p0 * nr)  # columns of W in this group
        i = 0
        while i < m:
            left = m - i
            if left >= 6 and m >= _MANY_ROWS:
                p = p0
                while p + 2 <= p0 + group:
                    _kernel_6x2(
                        rows, i, packed, p, out, p * nr, min(2 * nr, n - p * nr), accumulate, bias
                    )
                    p += 2
                if p < p0 + group:
                    _kernel_6x1(
                        rows, i, packed, p, out, p * nr, min(nr, n - p * nr), accumulate, bias
                    )
                i += 6
            elif left >= 8:
                for p in range(p0, p0 + group):
                    _kernel_8x1(
                        rows, i, packed, p, out, p * nr, min(nr, n - p * nr), accumulate, bias
                    )
                i += 8
            elif left >= 4:
                p = p0
                while p + 2 <= p0 + group:
                    _kernel_4x2(
                        rows, i, packed, p, out, p * nr, min(2 * nr, n - p * nr), accumulate, bias
                    )
                    p += 2
                if p < p0 + group:
                    _kernel_4x1(
                        rows, i, packed, p, out, p * nr, min(nr, n - p * nr), accumulate, bias
                    )
                i += 4
            elif left >= 2:
                if group == 4:
                    _kernel_2x4(rows, i, packed, p0, out, p0 * nr, group_width, accumulate, bias)
                else:
                    for p in range(p0, p0 + group):
                        _kernel_2x1(
                            rows, i, packed, p, out, p * nr, min(nr, n - p * nr), accumulate, bias
                        )
                i += 2
            else:
                if group == 4:
                    _kernel_1x4(rows, i, packed, p0, out, p0 * nr, group_width, accumulate, bias)
                else:
                    for p in range(p0, p0 + group):
                        _kernel_1x1(
                            rows, i, packed, p, out, p * nr, min(nr, n - p * nr), accumulate, bias
                        )
                i += 1
