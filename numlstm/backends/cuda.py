"""The CUDA backend: persistent ``@cuda.jit`` kernels for one layer and one direction.

A forward pass of one layer and direction is two launches, whatever the sequence length:

1. :func:`gemm_kernel` (or :func:`gemm_kernel_wide` for large products) computes the input
   term of every step at once, ``a^x = x W_ih^T + b`` (``(T B, I) x (I, 4H)``), each
   thread a register tile of the product;
2. :func:`forward_loop` runs the whole time loop in one cooperative launch, and also
   copies the initial states in and the final states out. Each block owns a slice of
   hidden units, with all four gates of those units, so the cell update of a unit stays
   inside the thread that computes its gates; a grid-wide barrier
   (``cuda.cg.this_grid().sync()``) separates the steps (two with projection, or with the
   LTM/STM cell's use layer, whose products need every unit of the step). Large batches
   run tiled: blocks own slices of 32 units times slices of the batch, and each thread
   takes one unit for :data:`BATCH_TILE` sequences, so that each weight it reads serves
   them all. With fewer (sequence, unit) items than threads, as with small batches, a
   group of threads shares each item's dot products with ``W_hh`` and sums them in shared
   memory, so that every thread has work.

A backward pass is :func:`backward_loop` (one cooperative launch for the time loop, two
barriers per step, three for the LTM/STM cell; its product ``δa_t W_hh`` tiled like the
forward loop for large batches) followed by GEMMs over all steps for ``d_x`` and the
weight gradients, :func:`column_sum_kernel` for the bias gradients (and
:func:`peephole_gradient_kernel` for the peephole cell).
The gate math is :mod:`numlstm.gates`, the same ``@njit`` functions the CPU kernels call:
a CUDA kernel compiles them for the device.

The layout of every buffer is that of :mod:`numlstm.backends.cpu` (the same ring of state
slots, the same tape), so the two backends can be read side by side. Arrays: NumPy in,
NumPy out (parameters kept on the device between calls, see
:func:`numlstm.backends.cuda_array.device_parameter`); CUDA arrays in, device arrays out.

Host-side work is kept small, since at small sizes it takes longer than the kernels:
absent operands are shared arrays of size zero, sequence lengths are uploaded once per
distinct batch, and the launch sizes of the cooperative kernels are asked of the driver
once per kernel and dtype.

Tunables are module attributes: :data:`THREADS`, :data:`MAX_BLOCKS`,
:data:`TILED_MIN_ITEMS`, :data:`UNIT_WIDTH` and :data:`GEMM_WIDE_MIN_BLOCKS` (read at each
launch), :data:`BATCH_TILE` and the GEMM tile sizes (read when a kernel is compiled). Under
the CUDA simulator a cooperative grid has one block, so one block then runs every unit of
a layer through the same strided loops that share the units among many blocks on a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import config, cuda, types

from ..equations import implements
from ..gates import (
    cell_backward,
    cell_backward_ltm_stm,
    cell_backward_peephole,
    cell_forward,
    cell_forward_ltm_stm,
    cell_forward_peephole,
    use_gate_backward_ltm_stm,
    use_gate_ltm_stm,
)
from . import _layout, cuda_array
from .cpu import LayerGrads

name = "cuda"

#: The array namespace the shared orchestration uses on this backend.
xp = cuda_array

#: Threads per block of the persistent (time-loop) kernels.
THREADS = 256

#: Sequences per thread in the time loops' tiled mode (read when a kernel is compiled).
BATCH_TILE = 4

#: Hidden units per block in the tiled mode: a warp's threads read a warp of neighbouring
#: weights.
UNIT_WIDTH = 32

#: Both time loops run tiled from this many (sequence, unit) pairs ``B H`` on. Measured on
#: an H100 (T = 100, forward ms, tiled against grouped): (256, 1024) 68 against 132,
#: (256, 512) 17 against 38, (64, 1024) 29 against 35, but (64, 512) 15.7 against 12.3,
#: (8, 512) 9.7 against 3.3 (``bench/results/gpu-h100-modes.txt``).
TILED_MIN_ITEMS = 64 * 1024

#: Upper bound on the blocks of a persistent kernel (None: as many as can be co-resident,
#: which a cooperative launch requires). Tests lower it to check uneven slices of units.
MAX_BLOCKS = None

#: Steps per launch pair in inference, where nothing is saved: bounds the gate buffer by
#: ``INFERENCE_CHUNK * B * 4H`` whatever the sequence length, while keeping the launches
#: constant for sequences up to this length.
INFERENCE_CHUNK = 1024

#: Threads per block at most on any CUDA GPU: the size of the persistent kernels' shared
#: scratch for partial sums, whatever :data:`THREADS` is.
_MAX_BLOCK_THREADS = 1024


@cuda.jit(device=True)
def _threads_per_item(items, threads):
    """How many threads share each of ``items`` dot products: the largest power of two
    with ``items`` groups fitting in ``threads`` threads (1 when they do not), at most a
    block (a group's threads sum up through the block's shared memory)."""
    split = 1
    while 2 * split * items <= threads and 2 * split <= cuda.blockDim.x:
        split *= 2
    return split


@cuda.jit(device=True)
def _sum_groups(partial, rows, split):
    """Add up ``partial[:rows, tid]`` over each group of ``split`` consecutive threads of the
    block, into the group's first thread. Every thread of the block must call it (it
    synchronises the block), after writing its own partial sums."""
    tid = cuda.threadIdx.x
    cuda.syncthreads()
    width = split // 2
    while width > 0:
        if tid % split < width:
            for q in range(rows):
                partial[q, tid] += partial[q, tid + width]
        cuda.syncthreads()
        width //= 2


def _make_gemm_kernel(threads, micro, depth, name="gemm_kernel"):
    """A tiled GEMM kernel: ``c = op(a) @ op(b) + bias + bias2``, one ``E x E`` tile per block.

    Blocks are ``(threads, threads)`` threads; each thread accumulates a ``micro x micro``
    tile of ``c`` in registers (rows ``ty + threads i``, columns ``tx + threads j``), so
    that each value read from shared memory serves ``micro`` products: ``E = threads *
    micro``. Tiles of ``op(a)`` and ``op(b)``, ``depth`` deep, pass through shared memory,
    read along each array's contiguous axis so that neighbouring threads read neighbouring
    words. ``threads``, ``micro`` and ``depth`` are compile-time constants.
    """
    edge = threads * micro
    if edge * depth % (threads * threads):
        raise ValueError(
            f"a tile's {edge} x {depth} values must share out among {threads}^2 threads"
        )
    padded = edge + 1  # a padded row keeps the transposing writes off one bank
    loads = edge * depth // (threads * threads)  # elements of each tile per thread

    def gemm(a, b, bias, bias2, c, trans_a, trans_b):
        # Shared tiles hold op(a)[rows, k0:k0 + depth] and op(b)[k0:k0 + depth, cols] with
        # the depth index first.
        tile_a = cuda.shared.array((depth, padded), dtype=c.dtype)
        tile_b = cuda.shared.array((depth, padded), dtype=c.dtype)
        acc = cuda.local.array((micro, micro), dtype=c.dtype)
        a_k = cuda.local.array(micro, dtype=c.dtype)
        b_k = cuda.local.array(micro, dtype=c.dtype)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        lane = ty * threads + tx
        row0 = cuda.blockIdx.y * edge
        col0 = cuda.blockIdx.x * edge
        rows, cols = c.shape
        n_depth = a.shape[0] if trans_a else a.shape[1]
        zero = c.dtype.type(0)
        for i in range(micro):
            for j in range(micro):
                acc[i, j] = zero
        for k0 in range(0, n_depth, depth):
            for s in range(loads):
                e = lane + s * threads * threads
                if trans_a:  # a is (K, M): neighbouring threads take neighbouring rows of c
                    kk, i = e // edge, e % edge
                    inside = row0 + i < rows and k0 + kk < n_depth
                    tile_a[kk, i] = a[k0 + kk, row0 + i] if inside else zero
                else:  # a is (M, K): neighbouring threads take neighbouring k
                    i, kk = e // depth, e % depth
                    inside = row0 + i < rows and k0 + kk < n_depth
                    tile_a[kk, i] = a[row0 + i, k0 + kk] if inside else zero
                if trans_b:  # b is (N, K)
                    j, kk = e // depth, e % depth
                    inside = col0 + j < cols and k0 + kk < n_depth
                    tile_b[kk, j] = b[col0 + j, k0 + kk] if inside else zero
                else:  # b is (K, N)
                    kk, j = e // edge, e % edge
                    inside = col0 + j < cols and k0 + kk < n_depth
                    tile_b[kk, j] = b[k0 + kk, col0 + j] if inside else zero
            cuda.syncthreads()
            for k in range(depth):
                for i in range(micro):
                    a_k[i] = tile_a[k, ty + threads * i]
                for j in range(micro):
                    b_k[j] = tile_b[k, tx + threads * j]
                for i in range(micro):
                    for j in range(micro):
                        acc[i, j] += a_k[i] * b_k[j]
            cuda.syncthreads()
        for i in range(micro):
            row = row0 + ty + threads * i
            for j in range(micro):
                col = col0 + tx + threads * j
                if row < rows and col < cols:
                    value = acc[i, j]
                    if bias.shape[0] > 0:
                        value += bias[col]
                    if bias2.shape[0] > 0:
                        value += bias2[col]
                    c[row, col] = value

    gemm.__name__ = gemm.__qualname__ = name  # the module attribute it is bound to
    gemm.__doc__ = f"""``c = op(a) @ op(b) + bias + bias2`` in tiles of {edge} x {edge}: see
    :func:`_make_gemm_kernel`. Launch with blocks of ``({threads}, {threads})`` threads on a
    grid of ``(ceil(N / {edge}), ceil(M / {edge}))`` blocks.

    Parameters
    ----------
    a : (M, K) array, or (K, M) with ``trans_a``
    b : (K, N) array, or (N, K) with ``trans_b``
    bias, bias2 : (N,) arrays, or (0,) for none
        Added to every row of ``c``.
    c : (M, N) array, out
        Must not alias ``a`` or ``b``.
    trans_a, trans_b : bool
        Use the transpose of ``a`` (``b``).
    """
    kernel = cuda.jit(gemm)
    kernel.threads, kernel.edge = threads, edge
    return kernel


#: Threads per side of a GEMM block, the register tile of each thread, and the depth of
#: the shared tiles, of the two GEMM kernels (read when this module is imported).
GEMM_THREADS, GEMM_MICRO, GEMM_MICRO_WIDE, GEMM_DEPTH = 16, 4, 8, 16

_gemm_equations = implements(
    "input-projection", "d-input", "d-weights", "d-projection-weights", backend="cuda"
)

#: The GEMM for small products (tiles of 64 x 64).
gemm_kernel = _gemm_equations(_make_gemm_kernel(GEMM_THREADS, GEMM_MICRO, GEMM_DEPTH))

#: The GEMM for large products (tiles of 128 x 128: each value read serves more products).
gemm_kernel_wide = _gemm_equations(
    _make_gemm_kernel(GEMM_THREADS, GEMM_MICRO_WIDE, GEMM_DEPTH, "gemm_kernel_wide")
)

#: The wide GEMM runs where it still gives at least this many blocks (measured on an H100:
#: the weight gradients at B = 256, H = 1024, 256 wide blocks, ran faster wide).
GEMM_WIDE_MIN_BLOCKS = 256


@implements(
    "recurrent-projection",
    "input-gate",
    "forget-gate",
    "cell-candidate",
    "output-gate",
    "cell-update",
    "hidden-update",
    "projection",
    "padding",
    "peephole-input-gate",
    "peephole-forget-gate",
    "peephole-output-gate",
    "kept-memory",
    "use-layer",
    "use-gate-output",
    backend="cuda",
)
@cuda.jit
def forward_loop(
    w_hh,
    w_hh_t,
    w_hr_t,
    peephole,
    w_u_t,
    b_u,
    lengths,
    reverse,
    t_lo,
    t_hi,
    unit_width,
    tiled,
    h0,
    c0,
    gates,
    c_seq,
    h_seq,
    r_seq,
    m_seq,
    u_seq,
    y,
    h_n,
    c_n,
):
    """Forward time loop of one layer and direction, steps ``t_lo`` to ``t_hi - 1``.

    A cooperative launch: each block owns ``u = unit_width`` hidden units (all four gates of
    each) of a slice of the batch (the whole batch unless tiled). Its (sequence, unit)
    items are shared among its threads: in tiles of :data:`BATCH_TILE` sequences a thread,
    or in groups of :func:`_threads_per_item` threads per item. Shapes as in
    :func:`numlstm.backends.cpu.forward_kernel` (``C`` steps of gates, ``S`` state slots,
    ``R`` kept projections); every array C-contiguous, none aliasing another.

    Parameters
    ----------
    w_hh, w_hh_t : (4H, P), (P, 4H) arrays
        The recurrent weights and their transpose: threads that share one unit's dot
        products read ``W_hh``'s rows, threads of one unit each read ``W_hh^T``'s, so that
        neighbouring threads read neighbouring words either way.
    w_hr_t : (H, P) array
        Transposed projection weights, or ``(0, 0)`` without projection.
    peephole : (3, H) array
        The peephole cell's weights (rows i, f, o), or ``(0, 0)``.
    w_u_t, b_u : (H, H), (H,) arrays
        The LTM/STM cell's use layer (``W_u`` transposed), or ``(0, 0)`` and ``(0,)``.
    lengths : (B,) int64 array
    reverse : bool
    t_lo, t_hi : int
        The steps of this launch; ``gates[t - t_lo]`` belongs to step ``t``.
    unit_width : int
        Hidden units per slice: the grid is ``ceil(H / unit_width)`` slices of units
        times as many slices of the batch as fit in it, one block per pair.
    tiled : bool
        Each thread computes one unit for :data:`BATCH_TILE` sequences, the weights it
        reads serving them all (for large batches); otherwise each (sequence, unit) item
        is a thread, or a group of threads that share its dot products.
    h0, c0 : (B, P), (B, H) arrays, or ``(0, 0)`` for zeros
        The initial states, copied into their slot of the rings by the launch that runs
        the direction's first step.
    gates : (C, B, 4H) array, in/out
        Enters with ``a^x_t`` (input term and biases), leaves with the activations
        i, f, g, o.
    c_seq, h_seq : (S, B, H), (S, B, P) arrays, in/out
        Rings of states.
    r_seq : (R, B, H) array, out
        ``o_t * tanh(c_t)`` before projection (``R == 0`` without projection).
    m_seq, u_seq : (R, B, H) arrays, out
        The LTM/STM cell's kept memory and use layer (``R == 0`` for another cell).
    y : (T, B, P) array, out
        The output: ``h_t`` at real steps, zeros at padded ones.
    h_n, c_n : (B, P), (B, H) arrays, out
        The final states, written by the launch that runs the direction's last step.
    """
    grid = cuda.cg.this_grid()
    batch = gates.shape[1]
    hidden = c_seq.shape[2]
    n_out = h_seq.shape[2]
    slots = c_seq.shape[0]
    projecting = w_hr_t.shape[0] > 0
    use_layer = w_u_t.shape[0] > 0
    zero = y.dtype.type(0)
    unit_slices = (hidden + unit_width - 1) // unit_width
    per_block = -(-batch // max(1, cuda.gridDim.x // unit_slices))
    j_lo = (cuda.blockIdx.x % unit_slices) * unit_width
    b_lo = (cuda.blockIdx.x // unit_slices) * per_block
    units = min(unit_width, hidden - j_lo)
    sequences = max(0, min(batch, b_lo + per_block) - b_lo)
    tid = cuda.threadIdx.x
    partial = cuda.shared.array((4, _MAX_BLOCK_THREADS), dtype=y.dtype)
    acc = cuda.local.array((4, BATCH_TILE), dtype=y.dtype)
    rows = cuda.local.array(BATCH_TILE, dtype=types.int64)
    items = sequences * units
    split = _threads_per_item(items, cuda.blockDim.x)
    groups = -(-sequences // BATCH_TILE)
    steps_total = y.shape[0]
    if (t_hi == steps_total) if reverse else (t_lo == 0):
        # This launch runs the direction's first step, whose previous slot takes h0, c0.
        first = t_hi % slots if reverse else t_lo % slots
        _copy_states(h0, c0, h_seq[first], c_seq[first])
        grid.sync()
    for n in range(t_hi - t_lo):
        t = t_hi - 1 - n if reverse else t_lo + n
        prev = (t + 1) % slots if reverse else t % slots
        cur = t % slots if reverse else (t + 1) % slots
        a = gates[t - t_lo]
        for base in range(0, groups * units if tiled else 0, cuda.blockDim.x):
            # Each thread: unit j (neighbouring threads, neighbouring units), BATCH_TILE
            # sequences, whose rows of h_{t-1} every thread of a warp reads alike.
            item = base + tid
            j = j_lo + item % units
            b0 = b_lo + (item // units) * BATCH_TILE
            if item < groups * units:
                for q in range(BATCH_TILE):
                    rows[q] = min(b0 + q, b_lo + sequences - 1)
                    for gate in range(4):
                        acc[gate, q] = zero
                for k in range(n_out):
                    w_i = w_hh_t[k, j]
                    w_f = w_hh_t[k, hidden + j]
                    w_g = w_hh_t[k, 2 * hidden + j]
                    w_o = w_hh_t[k, 3 * hidden + j]
                    for q in range(BATCH_TILE):
                        h_k = h_seq[prev, rows[q], k]
                        acc[0, q] += h_k * w_i
                        acc[1, q] += h_k * w_f
                        acc[2, q] += h_k * w_g
                        acc[3, q] += h_k * w_o
            _update_tile(
                item < groups * units,
                a,
                t,
                b0,
                j,
                acc,
                b_lo + sequences,
                prev,
                cur,
                lengths,
                peephole,
                c_seq,
                h_seq,
                r_seq,
                m_seq,
                y,
            )
        # Otherwise each (sequence, unit) item is a group of `split` threads that share its
        # four dot products with W_hh, so that a few items still keep the block busy; the
        # group's first thread updates the unit.
        for base in range(0, 0 if tiled else items * split, cuda.blockDim.x):
            item = (base + tid) // split
            b = b_lo + item // units
            j = j_lo + item % units
            active = item < items
            real = active and t < lengths[b]
            s_i = s_f = s_g = s_o = zero
            if real and split == 1:  # neighbouring threads read neighbouring units
                for k in range(n_out):
                    h_k = h_seq[prev, b, k]
                    s_i += h_k * w_hh_t[k, j]
                    s_f += h_k * w_hh_t[k, hidden + j]
                    s_g += h_k * w_hh_t[k, 2 * hidden + j]
                    s_o += h_k * w_hh_t[k, 3 * hidden + j]
            elif real:  # neighbouring threads of a group read neighbouring weights
                for k in range(tid % split, n_out, split):
                    h_k = h_seq[prev, b, k]
                    s_i += h_k * w_hh[j, k]
                    s_f += h_k * w_hh[hidden + j, k]
                    s_g += h_k * w_hh[2 * hidden + j, k]
                    s_o += h_k * w_hh[3 * hidden + j, k]
            partial[0, tid] = s_i
            partial[1, tid] = s_f
            partial[2, tid] = s_g
            partial[3, tid] = s_o
            _sum_groups(partial, 4, split)
            if active and tid % split == 0:
                _update_unit(
                    a,
                    t,
                    b,
                    j,
                    partial[0, tid],
                    partial[1, tid],
                    partial[2, tid],
                    partial[3, tid],
                    prev,
                    cur,
                    lengths,
                    peephole,
                    c_seq,
                    h_seq,
                    r_seq,
                    m_seq,
                    y,
                )
            cuda.syncthreads()  # the next round overwrites partial
        if use_layer:
            grid.sync()
            m_t = m_seq[t % m_seq.shape[0]]
            u_t = u_seq[t % u_seq.shape[0]]
            for item in range(cuda.grid(1), batch * hidden, cuda.gridsize(1)):
                b = item // hidden
                j = item % hidden
                if t < lengths[b]:
                    a_u = b_u[j]
                    for k in range(hidden):
                        a_u += m_t[b, k] * w_u_t[k, j]
                    u, h = use_gate_ltm_stm(a_u, a[b, 3 * hidden + j])
                    u_t[b, j] = u
                    h_seq[cur, b, j] = h
                    y[t, b, j] = h
                else:
                    u_t[b, j] = zero
                    h_seq[cur, b, j] = h_seq[prev, b, j]
                    y[t, b, j] = zero
        if projecting:
            grid.sync()
            r_t = r_seq[t % r_seq.shape[0]]
            for item in range(cuda.grid(1), batch * n_out, cuda.gridsize(1)):
                b = item // n_out
                p = item % n_out
                if t < lengths[b]:
                    h = zero
                    for j in range(hidden):
                        h += r_t[b, j] * w_hr_t[j, p]
                    h_seq[cur, b, p] = h
                    y[t, b, p] = h
                else:
                    h_seq[cur, b, p] = h_seq[prev, b, p]
                    y[t, b, p] = zero
        grid.sync()
    if (t_lo == 0) if reverse else (t_hi == steps_total):  # the direction's last step
        last = t_lo % slots if reverse else t_hi % slots
        _copy_states(h_seq[last], c_seq[last], h_n, c_n)


@cuda.jit(device=True)
def _update_tile(
    active, a, t, b0, j, acc, b_end, prev, cur, lengths, peephole, c_seq, h_seq, r_seq, m_seq, y
):
    """The cell updates of unit ``j`` for the sequences ``b0`` to ``b0 + BATCH_TILE - 1``
    below ``b_end``, given their recurrent products ``acc[gate, q]`` (nothing if not
    ``active``): see :func:`_update_unit`."""
    if active:
        for q in range(BATCH_TILE):
            if b0 + q < b_end:
                _update_unit(
                    a,
                    t,
                    b0 + q,
                    j,
                    acc[0, q],
                    acc[1, q],
                    acc[2, q],
                    acc[3, q],
                    prev,
                    cur,
                    lengths,
                    peephole,
                    c_seq,
                    h_seq,
                    r_seq,
                    m_seq,
                    y,
                )


@cuda.jit(device=True)
def _update_unit(
    a, t, b, j, s_i, s_f, s_g, s_o, prev, cur, lengths, peephole, c_seq, h_seq, r_seq, m_seq, y
):
    """The cell update of unit ``j`` of sequence ``b`` at step ``t``, given the recurrent
    products ``s`` of its four gates: see :func:`forward_loop` for the arrays."""
    hidden = c_seq.shape[2]
    zero = y.dtype.type(0)
    real = t < lengths[b]
    if real:
        a_i = a[b, j] + s_i
        a_f = a[b, hidden + j] + s_f
        a_g = a[b, 2 * hidden + j] + s_g
        a_o = a[b, 3 * hidden + j] + s_o
        c_prev = c_seq[prev, b, j]
        if peephole.shape[0] > 0:
            i, f, g, o, c, r = cell_forward_peephole(
                a_i, a_f, a_g, a_o, c_prev, peephole[0, j], peephole[1, j], peephole[2, j]
            )
        elif m_seq.shape[0] > 0:
            # r is the kept memory here: the use layer's input, not h_t.
            i, f, g, o, c, r = cell_forward_ltm_stm(a_i, a_f, a_g, a_o, c_prev)
        else:
            i, f, g, o, c, r = cell_forward(a_i, a_f, a_g, a_o, c_prev)
        a[b, j] = i
        a[b, hidden + j] = f
        a[b, 2 * hidden + j] = g
        a[b, 3 * hidden + j] = o
        c_seq[cur, b, j] = c
    else:
        c_seq[cur, b, j] = c_seq[prev, b, j]
        r = zero  # padded: the projection's weight gradient reads zeros here
    if r_seq.shape[0] > 0:
        r_seq[t % r_seq.shape[0], b, j] = r
    elif m_seq.shape[0] > 0:
        m_seq[t % m_seq.shape[0], b, j] = r
    else:
        h_seq[cur, b, j] = r if real else h_seq[prev, b, j]
        y[t, b, j] = r


@cuda.jit(device=True)
def _copy_states(h_src, c_src, h_dst, c_dst):
    """``h_dst[...] = h_src`` and ``c_dst[...] = c_src``, shared out over the whole grid;
    a source of size zero stands for zeros."""
    zero = h_dst.dtype.type(0)
    batch, n_out = h_dst.shape
    hidden = c_dst.shape[1]
    for item in range(cuda.grid(1), batch * max(n_out, hidden), cuda.gridsize(1)):
        b = item // max(n_out, hidden)
        k = item % max(n_out, hidden)
        if k < n_out:
            h_dst[b, k] = h_src[b, k] if h_src.shape[0] > 0 else zero
        if k < hidden:
            c_dst[b, k] = c_src[b, k] if c_src.shape[0] > 0 else zero


@implements(
    "d-hidden",
    "d-projection",
    "d-output-gate",
    "d-cell",
    "d-input-gate",
    "d-forget-gate",
    "d-cell-candidate",
    "d-initial-state",
    "d-peephole-cell",
    "d-use-gate",
    "d-use-layer",
    "d-kept-memory",
    "d-ltm-stm-cell",
    "d-ltm-stm-forget-gate",
    backend="cuda",
)
@cuda.jit
def backward_loop(
    w_hh,
    w_hh_t,
    w_hr,
    peephole,
    w_u,
    lengths,
    reverse,
    tiled,
    gates,
    c_seq,
    u_seq,
    d_y,
    d_h_n,
    d_c_n,
    d_h,
    d_c,
    d_gates,
    d_hs,
    d_u,
):
    """Backward time loop of one layer and direction, in one cooperative launch.

    Per step: every thread of the grid forms ``δh_t`` (its share of ``(b, p)``); after a
    barrier each block runs :func:`numlstm.gates.cell_backward` (or its variant's) for
    its hidden units (the slices of :func:`forward_loop`); after another, the grid forms
    ``δa_t W_hh``, the recurrent part of the next ``δh``. The LTM/STM cell first runs its
    use gate's backward over the grid, and after a barrier each unit reads ``W_u^T δa^u_t``.

    Parameters
    ----------
    w_hh, w_hh_t : (4H, P), (P, 4H) arrays
        The recurrent weights and their transpose (read as in :func:`forward_loop`).
    w_hr : (P, H) array, or ``(0, 0)`` without projection
    peephole : (3, H) array, or ``(0, 0)``
    w_u : (H, H) array, or ``(0, 0)``
    lengths : (B,) int64 array
    reverse : bool
    tiled : bool
        Each thread computes one output of ``δa_t W_hh`` for :data:`BATCH_TILE` sequences
        (for large batches); otherwise each (sequence, output) item is a thread, or a
        group of threads that share its dot product.
    gates, c_seq, u_seq : arrays
        The tape of a forward pass with ``C == T``, ``S == T + 1`` (and ``R == T``).
    d_y : (T, B, P) array
        Gradient at the output; ignored at padded steps.
    d_h_n, d_c_n : (B, P), (B, H) arrays, or ``(0, 0)`` for zeros
        Gradients at the final states.
    d_h, d_c : (B, P), (B, H) arrays, out
        The running ``δh`` and ``δc``, which leave holding ``δh_0`` and ``δc_0``.
    d_gates : (T, B, 4H) array, out
        ``δa_t`` (zero at padded steps).
    d_hs : (T, B, P) array, out
        ``δh_t`` at every step (zero at padded steps).
    d_u : (T, B, H) array, out
        The LTM/STM cell's ``δa^u_t`` (zero at padded steps); ``(0, B, H)`` otherwise.
    """
    grid = cuda.cg.this_grid()
    steps_total, batch, four_hidden = gates.shape
    hidden = four_hidden // 4
    n_out = d_h.shape[1]
    projecting = w_hr.shape[0] > 0
    peepholes = peephole.shape[0] > 0
    use_layer = w_u.shape[0] > 0
    zero = d_y.dtype.type(0)
    units = (hidden + cuda.gridDim.x - 1) // cuda.gridDim.x
    j_lo = cuda.blockIdx.x * units
    tid = cuda.threadIdx.x
    partial = cuda.shared.array((1, _MAX_BLOCK_THREADS), dtype=d_y.dtype)
    products = batch * n_out
    split = _threads_per_item(products, cuda.gridsize(1))
    acc = cuda.local.array(BATCH_TILE, dtype=d_y.dtype)
    rows = cuda.local.array(BATCH_TILE, dtype=types.int64)
    groups = -(-batch // BATCH_TILE)
    first = 0 if reverse else steps_total - 1
    for item in range(cuda.grid(1), batch * hidden, cuda.gridsize(1)):
        d_c[item // hidden, item % hidden] = (
            d_c_n[item // hidden, item % hidden] if d_c_n.shape[0] > 0 else zero
        )
    for item in range(cuda.grid(1), batch * n_out, cuda.gridsize(1)):
        b = item // n_out
        k = item % n_out
        d_h[b, k] = d_h_n[b, k] if d_h_n.shape[0] > 0 else zero
        real = first < lengths[b]
        d_hs[first, b, k] = d_h[b, k] + d_y[first, b, k] if real else zero
    for n in range(steps_total):
        t = n if reverse else steps_total - 1 - n
        prev = t + 1 if reverse else t
        cur = t if reverse else t + 1
        grid.sync()
        if use_layer:
            for item in range(cuda.grid(1), batch * hidden, cuda.gridsize(1)):
                b = item // hidden
                j = item % hidden
                if t < lengths[b]:
                    d_u[t, b, j], d_gates[t, b, 3 * hidden + j] = use_gate_backward_ltm_stm(
                        u_seq[t, b, j], gates[t, b, 3 * hidden + j], d_hs[t, b, j]
                    )
                else:
                    d_u[t, b, j] = zero
            grid.sync()
        for item in range(cuda.threadIdx.x, batch * units, cuda.blockDim.x):
            b = item // units
            j = j_lo + item % units
            if j >= hidden:
                continue
            if t >= lengths[b]:
                for gate in range(4):
                    d_gates[t, b, gate * hidden + j] = zero
                continue
            if projecting:
                d_r = zero
                for p in range(n_out):
                    d_r += d_hs[t, b, p] * w_hr[p, j]
            else:
                d_r = d_hs[t, b, j]
            i = gates[t, b, j]
            f = gates[t, b, hidden + j]
            g = gates[t, b, 2 * hidden + j]
            o = gates[t, b, 3 * hidden + j]
            c_prev = c_seq[prev, b, j]
            if use_layer:
                d_m = zero
                for k in range(hidden):
                    d_m += d_u[t, b, k] * w_u[k, j]
                d_a_i, d_a_f, d_a_g, d_c[b, j] = cell_backward_ltm_stm(
                    i, f, g, c_prev, d_m, d_c[b, j]
                )
                d_a_o = d_gates[t, b, 3 * hidden + j]
            elif peepholes:
                d_a_i, d_a_f, d_a_g, d_a_o, d_c[b, j] = cell_backward_peephole(
                    i,
                    f,
                    g,
                    o,
                    c_prev,
                    c_seq[cur, b, j],
                    peephole[0, j],
                    peephole[1, j],
                    peephole[2, j],
                    d_r,
                    d_c[b, j],
                )
            else:
                d_a_i, d_a_f, d_a_g, d_a_o, d_c[b, j] = cell_backward(
                    i, f, g, o, c_prev, c_seq[cur, b, j], d_r, d_c[b, j]
                )
            d_gates[t, b, j] = d_a_i
            d_gates[t, b, hidden + j] = d_a_f
            d_gates[t, b, 2 * hidden + j] = d_a_g
            d_gates[t, b, 3 * hidden + j] = d_a_o
        grid.sync()
        following = t + 1 if reverse else t - 1
        if tiled:
            # Each thread: output k (neighbouring threads, neighbouring outputs) for
            # BATCH_TILE sequences, each weight it reads serving them all.
            for item in range(cuda.grid(1), groups * n_out, cuda.gridsize(1)):
                k = item % n_out
                b0 = (item // n_out) * BATCH_TILE
                for q in range(BATCH_TILE):
                    rows[q] = min(b0 + q, batch - 1)
                    acc[q] = zero
                for gj in range(four_hidden):
                    w = w_hh[gj, k]
                    for q in range(BATCH_TILE):
                        acc[q] += d_gates[t, rows[q], gj] * w
                for q in range(BATCH_TILE):
                    if b0 + q < batch:
                        _carry_d_h(
                            acc[q],
                            t,
                            following,
                            n + 1 < steps_total,
                            b0 + q,
                            k,
                            lengths,
                            d_y,
                            d_h,
                            d_hs,
                        )
        # Otherwise each (sequence, output) item of δa_t W_hh is a group of `split` threads.
        for base in range(0, 0 if tiled else products * split, cuda.gridsize(1)):
            item = (base + cuda.grid(1)) // split
            b = item // n_out
            k = item % n_out
            active = item < products
            real = active and t < lengths[b]
            total = zero
            if real and split == 1:  # neighbouring threads read neighbouring outputs
                for gj in range(four_hidden):
                    total += d_gates[t, b, gj] * w_hh[gj, k]
            elif real:  # neighbouring threads of a group read neighbouring weights
                for gj in range(tid % split, four_hidden, split):
                    total += d_gates[t, b, gj] * w_hh_t[k, gj]
            partial[0, tid] = total
            _sum_groups(partial, 1, split)
            if active and tid % split == 0:
                _carry_d_h(
                    partial[0, tid],
                    t,
                    following,
                    n + 1 < steps_total,
                    b,
                    k,
                    lengths,
                    d_y,
                    d_h,
                    d_hs,
                )
            cuda.syncthreads()  # the next round overwrites partial


@cuda.jit(device=True)
def _carry_d_h(product, t, following, more, b, k, lengths, d_y, d_h, d_hs):
    """``δh`` of sequence ``b``, output ``k``, after step ``t`` of :func:`backward_loop`:
    the recurrent product ``(δa_t W_hh)[b, k]`` where step ``t`` is real (``δh`` carries
    over a padded step), and, if ``more`` steps follow, ``δh`` at the ``following`` step."""
    if t < lengths[b]:
        d_h[b, k] = product
    if more:
        real = following < lengths[b]
        d_hs[following, b, k] = d_h[b, k] + d_y[following, b, k] if real else d_y.dtype.type(0)


@implements("d-peephole-weights", backend="cuda")
@cuda.jit
def peephole_gradient_kernel(d_gates, c_seq, reverse, d_peephole):
    """``δp`` of the peephole cell, summed over all steps: one thread per weight.

    Row 0 sums ``δa^i_t c_{t-1}``, row 1 ``δa^f_t c_{t-1}``, row 2 ``δa^o_t c_t`` over steps
    and sequences (``δa_t`` is zero at padded steps). ``d_peephole`` is ``(3, H)``.
    """
    k = cuda.grid(1)
    steps_total, batch, four_hidden = d_gates.shape
    hidden = four_hidden // 4
    if k >= 3 * hidden:
        return
    row = k // hidden
    j = k % hidden
    gate = 3 if row == 2 else row  # rows i, f, o are gate blocks 0, 1, 3
    total = d_gates.dtype.type(0)
    for t in range(steps_total):
        prev = t + 1 if reverse else t
        cur = t if reverse else t + 1
        slot = cur if row == 2 else prev
        for b in range(batch):
            total += d_gates[t, b, gate * hidden + j] * c_seq[slot, b, j]
    d_peephole[row, j] = total


#: Rows of threads per block of :func:`column_sum_kernel` (its blocks are 32 columns wide).
_SUM_ROWS = 8


@implements("d-weights", "d-use-weights", backend="cuda")
@cuda.jit
def column_sum_kernel(a, out):
    """``out[j] = sum_r a[r, j]``: the bias gradients ``δb = sum_t δa_t`` (rows are the
    (step, sequence) pairs). Blocks of ``(32, 8)`` threads on ``ceil(N / 32)`` blocks: a
    warp reads 32 neighbouring columns of a row, each of the 8 rows of threads every 8th
    row of ``a``, and the 8 partial sums are added in a fixed order (the result does not
    depend on timing)."""
    partial = cuda.shared.array((_SUM_ROWS, 32), dtype=out.dtype)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    rows, cols = a.shape
    j = cuda.blockIdx.x * 32 + tx
    total = out.dtype.type(0)
    if j < cols:
        for r in range(ty, rows, _SUM_ROWS):
            total += a[r, j]
    partial[ty, tx] = total
    cuda.syncthreads()
    if ty == 0 and j < cols:
        for k in range(1, _SUM_ROWS):
            total += partial[k, tx]
        out[j] = total


def _column_sums(a):
    """The sums of a 2-D device array's columns, as a 1-D device array."""
    out = cuda_array.empty(a.shape[1], a.dtype)
    column_sum_kernel[-(-a.shape[1] // 32), (32, _SUM_ROWS)](a, out)
    return out


@cuda.jit
def transpose_kernel(src, dst):
    """``dst = src.T`` for 2-D arrays."""
    k = cuda.grid(1)
    rows, cols = src.shape
    if k < rows * cols:
        dst[k % cols, k // cols] = src[k // cols, k % cols]


def _signature_gemm(f):
    return (f[:, ::1], f[:, ::1], f[::1], f[::1], f[:, ::1], types.boolean, types.boolean)


def _signature_forward(f):
    c1, c2, c3 = f[::1], f[:, ::1], f[:, :, ::1]
    steps = (types.int64[::1], types.boolean, types.int64, types.int64, types.int64, types.boolean)
    return (c2, c2, c2, c2, c2, c1, *steps, c2, c2, c3, c3, c3, c3, c3, c3, c3, c2, c2)


def _signature_backward(f):
    c2, c3 = f[:, ::1], f[:, :, ::1]
    loop = (types.int64[::1], types.boolean, types.boolean)
    return (c2, c2, c2, c2, c2, *loop, c3, c3, c3, c3, c2, c2, c2, c2, c3, c3, c3)


#: Every CUDA kernel of the backend, with its argument types for a float type ``f``
#: (``numba.types.float32`` or ``float64``): what the PTX test compiles. The test
#: cross-checks this table against the kernels defined in this module and in
#: :mod:`numlstm.backends.cuda_array`, so a new kernel cannot be left out.
KERNEL_SIGNATURES = {
    gemm_kernel: _signature_gemm,
    gemm_kernel_wide: _signature_gemm,
    forward_loop: _signature_forward,
    backward_loop: _signature_backward,
    peephole_gradient_kernel: lambda f: (f[:, :, ::1], f[:, :, ::1], types.boolean, f[:, ::1]),
    transpose_kernel: lambda f: (f[:, ::1], f[:, ::1]),
    column_sum_kernel: lambda f: (f[:, ::1], f[::1]),
    **cuda_array.ARRAY_KERNELS,
}


def _simulated():
    return bool(config.ENABLE_CUDASIM)


def gemm(a, b, c, bias=None, trans_a=False, trans_b=False, bias2=None):
    """``c[...] = op(a) @ op(b) (+ bias) (+ bias2)`` on the device; 2-D C-contiguous arrays.

    Runs :data:`gemm_kernel_wide` where its tiles still make :data:`GEMM_WIDE_MIN_BLOCKS`
    blocks, :data:`gemm_kernel` otherwise.
    """
    rows, cols = c.shape
    none = cuda_array.empty(0, c.dtype)
    bias = none if bias is None else bias
    bias2 = none if bias2 is None else bias2
    if not (rows and cols):
        return
    kernel = gemm_kernel_wide
    if _tiles(rows, cols, kernel.edge)[2] < GEMM_WIDE_MIN_BLOCKS:
        kernel = gemm_kernel
    n_x, n_y, _ = _tiles(rows, cols, kernel.edge)
    kernel[(n_x, n_y), (kernel.threads, kernel.threads)](a, b, bias, bias2, c, trans_a, trans_b)


def _tiles(rows, cols, edge):
    """Tiles of ``edge`` along the columns and the rows of an ``(rows, cols)`` array, and
    their product."""
    n_x, n_y = -(-cols // edge), -(-rows // edge)
    return n_x, n_y, n_x * n_y


def _transpose(array):
    out = cuda_array.empty(array.shape[::-1], array.dtype)
    if array.size:
        transpose_kernel[cuda_array._blocks(array.size), cuda_array.THREADS](array, out)
    return out


#: Co-resident blocks per kernel, dtype and block size: what a cooperative launch may use.
_COOPERATIVE_BLOCKS: dict[tuple, int] = {}


def _max_blocks(kernel, args):
    """The most blocks a cooperative launch of ``kernel`` with ``args`` may have: as many as
    can be co-resident (asked of the driver once per kernel, dtype and block size), at
    most :data:`MAX_BLOCKS`; one in the simulator."""
    if _simulated():
        return 1  # the simulator runs a cooperative grid of one block only
    key = (kernel, args[-1].dtype, THREADS)
    blocks = _COOPERATIVE_BLOCKS.get(key)
    if blocks is None:
        argtypes = tuple(kernel.typeof_pyval(arg) for arg in args)
        blocks = kernel.compile(argtypes).max_cooperative_grid_blocks(THREADS)
        _COOPERATIVE_BLOCKS[key] = blocks
    return max(1, min(blocks, MAX_BLOCKS or blocks))


def _forward_grid(batch, hidden, max_blocks):
    """Blocks, units per block and mode of :func:`forward_loop` for a batch and layer.

    Large batches run tiled: slices of :data:`UNIT_WIDTH` units times slices of the batch
    (a round of :data:`THREADS` threads each, :data:`BATCH_TILE` sequences a thread, where
    the blocks allow). Otherwise the blocks share the units among them, each with the
    whole batch.
    """
    if batch * hidden >= TILED_MIN_ITEMS:
        unit_width = max(min(UNIT_WIDTH, hidden), -(-hidden // max_blocks))
        unit_slices = -(-hidden // unit_width)
        per_block = BATCH_TILE * max(1, THREADS // unit_width)
        batch_slices = max(1, min(-(-batch // per_block), max_blocks // unit_slices))
        return unit_slices * batch_slices, unit_width, True
    blocks = min(max_blocks, hidden)
    unit_width = -(-hidden // blocks)
    return -(-hidden // unit_width), unit_width, False


class LayerTape(NamedTuple):
    """What the forward pass of one layer and direction saves for its backward pass.

    The fields of :class:`numlstm.backends.cpu.LayerTape` (device arrays, ``lengths`` on
    the host), plus ``d_lengths``, the lengths on the device.
    """

    x: object
    w_ih: object
    w_hh: object
    w_hr: object
    peephole: object
    w_u: object
    lengths: np.ndarray
    d_lengths: object
    reverse: bool
    gates: object
    c_seq: object
    h_seq: object
    r_seq: object
    m_seq: object
    u_seq: object


def run_directions(jobs, batch, loop_flops, weight_bytes):
    """Run the two directions of a layer one after the other (entry point shared by every
    backend; see :func:`numlstm.backends.cpu.run_directions`): each direction's kernels
    already spread over the whole GPU.

    Parameters
    ----------
    jobs : list of callable
        One per direction, functions of no arguments.
    batch, loop_flops, weight_bytes : int
        ``B``, the FLOPs of one direction's recurrent products and the bytes of its
        ``W_hh`` (unused here).

    Returns
    -------
    list
        What each job returned, in order.
    """
    return [job() for job in jobs]


def layer_forward(
    x,
    w_ih,
    w_hh,
    b_ih,
    b_hh,
    w_hr,
    h0,
    c0,
    lengths,
    reverse,
    save,
    peephole=None,
    w_u=None,
    b_u=None,
):
    """Run one layer and direction forward (entry point shared by every backend).

    Arguments and results as :func:`numlstm.backends.cpu.layer_forward`; arrays may be
    NumPy or CUDA arrays, results are device arrays.
    """
    x = cuda_array.ascontiguousarray(x)
    w_ih, w_hh = cuda_array.device_parameter(w_ih), cuda_array.device_parameter(w_hh)
    if b_ih is not None:
        b_ih, b_hh = cuda_array.device_parameter(b_ih), cuda_array.device_parameter(b_hh)
    steps_total, batch, n_inputs = x.shape
    hidden = w_hh.shape[0] // 4
    n_out = w_hh.shape[1]
    dtype = x.dtype
    none = cuda_array.empty((0, 0), dtype)  # an absent operand
    w_hr = none if w_hr is None else cuda_array.device_parameter(w_hr)
    peephole = none if peephole is None else cuda_array.device_parameter(peephole)
    if w_u is None:
        w_u, b_u = none, cuda_array.empty(0, dtype)
    else:
        w_u, b_u = cuda_array.device_parameter(w_u), cuda_array.ascontiguousarray(b_u)
    h0 = none if h0 is None else cuda_array.ascontiguousarray(h0)
    c0 = none if c0 is None else cuda_array.ascontiguousarray(c0)
    projecting = w_hr.shape[0] > 0
    use_layer = w_u.shape[0] > 0
    gates, c_seq, h_seq, r_seq, m_seq, u_seq, y, _, _ = _layout.allocate(
        cuda_array,
        x,
        hidden,
        n_out,
        save=save,
        reverse=reverse,
        projecting=projecting,
        use_layer=use_layer,
        chunk=INFERENCE_CHUNK,
    )
    h_n = cuda_array.empty((batch, n_out), dtype)
    c_n = cuda_array.empty((batch, hidden), dtype)
    chunk = gates.shape[0]
    d_lengths = cuda_array.device_lengths(lengths)
    w_hh_t = _transpose(w_hh)
    w_hr_t = _transpose(w_hr)
    w_u_t = _transpose(w_u)
    for n in range((steps_total + chunk - 1) // chunk):
        t_lo, t_hi = _layout.chunk_bounds(n, chunk, steps_total, reverse)
        x_chunk = x if t_hi - t_lo == steps_total else x[t_lo:t_hi]
        pre = gates if t_hi - t_lo == chunk else gates[: t_hi - t_lo]
        gemm(
            x_chunk.reshape(((t_hi - t_lo) * batch, n_inputs)),
            w_ih,
            pre.reshape(((t_hi - t_lo) * batch, 4 * hidden)),
            b_ih,
            trans_b=True,
            bias2=b_hh,
        )
        args = (w_hh, w_hh_t, w_hr_t, peephole, w_u_t, b_u, d_lengths, reverse, t_lo, t_hi)
        states = (h0, c0, gates, c_seq, h_seq, r_seq, m_seq, u_seq, y, h_n, c_n)
        if n == 0:
            max_blocks = _max_blocks(forward_loop, (*args, 1, False, *states))
            blocks, unit_width, tiled = _forward_grid(batch, hidden, max_blocks)
        forward_loop[blocks, THREADS](*args, unit_width, tiled, *states)
    tape = None
    if save:
        tape = LayerTape(
            x,
            w_ih,
            w_hh,
            w_hr,
            peephole,
            w_u,
            lengths,
            d_lengths,
            reverse,
            gates,
            c_seq,
            h_seq,
            r_seq,
            m_seq,
            u_seq,
        )
    return y, h_n, c_n, tape


def layer_backward(tape, d_y, d_h_n, d_c_n):
    """Backward of :func:`layer_forward` (entry point shared by every backend).

    Arguments and results as :func:`numlstm.backends.cpu.layer_backward`, on the device.
    """
    x, w_ih, w_hh, w_hr = tape.x, tape.w_ih, tape.w_hh, tape.w_hr
    steps_total, batch, n_inputs = x.shape
    hidden = w_hh.shape[0] // 4
    n_out = w_hh.shape[1]
    dtype = x.dtype
    projecting = w_hr.shape[0] > 0
    peepholes = tape.peephole.shape[0] > 0
    use_layer = tape.w_u.shape[0] > 0
    d_y = cuda_array.ascontiguousarray(d_y)
    none = cuda_array.empty((0, 0), dtype)  # zeros, for an absent gradient
    d_h_n = none if d_h_n is None else cuda_array.ascontiguousarray(d_h_n)
    d_c_n = none if d_c_n is None else cuda_array.ascontiguousarray(d_c_n)
    d_h = cuda_array.empty((batch, n_out), dtype)
    d_c = cuda_array.empty((batch, hidden), dtype)
    d_gates = cuda_array.empty(tape.gates.shape, dtype)
    d_hs = cuda_array.empty((steps_total, batch, n_out), dtype)
    d_u = cuda_array.empty(tape.u_seq.shape, dtype)
    w_hh_t = _transpose(w_hh)
    tiled = batch * hidden >= TILED_MIN_ITEMS
    args = (w_hh, w_hh_t, w_hr, tape.peephole, tape.w_u, tape.d_lengths, tape.reverse, tiled)
    args = (*args, tape.gates)
    args = (*args, tape.c_seq, tape.u_seq, d_y, d_h_n, d_c_n, d_h, d_c, d_gates, d_hs, d_u)
    backward_loop[min(_max_blocks(backward_loop, args), hidden), THREADS](*args)

    rows = steps_total * batch
    d_a = d_gates.reshape((rows, 4 * hidden))
    d_x = cuda_array.empty(x.shape, dtype)
    gemm(d_a, w_ih, d_x.reshape((rows, n_inputs)))
    d_w_ih = cuda_array.empty(w_ih.shape, dtype)
    gemm(d_a, x.reshape((rows, n_inputs)), d_w_ih, trans_a=True)
    h_prev = tape.h_seq[1:] if tape.reverse else tape.h_seq[:steps_total]
    d_w_hh = cuda_array.empty(w_hh.shape, dtype)
    gemm(d_a, h_prev.reshape((rows, n_out)), d_w_hh, trans_a=True)
    d_bias = _column_sums(d_a)
    d_w_hr = None
    if projecting:
        d_w_hr = cuda_array.empty(w_hr.shape, dtype)
        gemm(d_hs.reshape((rows, n_out)), tape.r_seq.reshape((rows, hidden)), d_w_hr, trans_a=True)
    d_peephole = d_w_u = d_b_u = None
    if peepholes:
        d_peephole = cuda_array.empty(tape.peephole.shape, dtype)
        peephole_gradient_kernel[cuda_array._blocks(3 * hidden), cuda_array.THREADS](
            d_gates, tape.c_seq, tape.reverse, d_peephole
        )
    if use_layer:
        d_a_u = d_u.reshape((rows, hidden))
        d_w_u = cuda_array.empty(tape.w_u.shape, dtype)
        gemm(d_a_u, tape.m_seq.reshape((rows, hidden)), d_w_u, trans_a=True)
        d_b_u = _column_sums(d_a_u)
    return LayerGrads(
        d_x,
        d_h,
        d_c,
        d_w_ih,
        d_w_hh,
        d_bias,
        d_w_hr,
        d_peephole,
        d_w_u,
        d_b_u,
    )
