"""The CUDA backend: persistent ``@cuda.jit`` kernels for one layer and one direction.

A forward pass of one layer and direction is two launches, whatever the sequence length:

1. :func:`gemm_kernel` computes the input term of every step at once,
   ``a^x = x W_ih^T + b`` (``(T B, I) x (I, 4H)``);
2. :func:`forward_loop` runs the whole time loop in one cooperative launch. Each block owns
   a slice of hidden units, with all four gates of those units, so the cell update of a
   unit stays inside the thread that computes its gates; a grid-wide barrier
   (``cuda.cg.this_grid().sync()``) separates the steps (two with projection, or with the
   LTM/STM cell's use layer, whose products need every unit of the step). With fewer
   (sequence, unit) items than threads, as with small batches, a group of threads shares
   each item's dot products with ``W_hh`` and sums them in shared memory, so that every
   thread has work.

A backward pass is :func:`backward_loop` (one cooperative launch for the time loop, two
barriers per step, three for the LTM/STM cell) followed by GEMMs over all steps for ``d_x``
and the weight gradients (and :func:`peephole_gradient_kernel` for the peephole cell).
The gate math is :mod:`numlstm.gates`, the same ``@njit`` functions the CPU kernels call:
a CUDA kernel compiles them for the device.

The layout of every buffer is that of :mod:`numlstm.backends.cpu` (the same ring of state
slots, the same tape), so the two backends can be read side by side. Arrays: NumPy in,
NumPy out (parameters kept on the device between calls, see
:func:`numlstm.backends.cuda_array.device_parameter`); CUDA arrays in, device arrays out.

Tunables are module attributes: :data:`THREADS` and :data:`MAX_BLOCKS` (read at each
launch) and :data:`GEMM_TILE` (read when a kernel is compiled). Under the CUDA simulator a
cooperative grid has one block, so one block then runs every unit of a layer through the
same strided loops that share the units among many blocks on a GPU.
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

#: Upper bound on the blocks of a persistent kernel (None: as many as can be co-resident,
#: which a cooperative launch requires). Tests lower it to check uneven slices of units.
MAX_BLOCKS = None

#: Edge of the square tile of C that one block of the GEMM kernel computes.
GEMM_TILE = 16

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


@implements(
    "input-projection",
    "d-input",
    "d-weights",
    "d-projection-weights",
    backend="cuda",
)
@cuda.jit
def gemm_kernel(a, b, bias, c, trans_a, trans_b):
    """``c = op(a) @ op(b) + bias``: one tile of ``c`` per block, through shared memory.

    Launch with blocks of ``(GEMM_TILE, GEMM_TILE)`` threads and a grid of
    ``(ceil(N / GEMM_TILE), ceil(M / GEMM_TILE))`` blocks.

    Parameters
    ----------
    a : (M, K) array, or (K, M) with ``trans_a``
    b : (K, N) array, or (N, K) with ``trans_b``
    bias : (N,) array, or (0,) for none
        Added to every row of ``c``.
    c : (M, N) array, out
        Must not alias ``a`` or ``b``.
    trans_a, trans_b : bool
        Use the transpose of ``a`` (``b``). Tiles are read along the contiguous axis
        either way, so that neighbouring threads read neighbouring addresses.
    """
    tile_a = cuda.shared.array((GEMM_TILE, GEMM_TILE), dtype=c.dtype)
    tile_b = cuda.shared.array((GEMM_TILE, GEMM_TILE), dtype=c.dtype)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    row0 = cuda.blockIdx.y * GEMM_TILE
    col0 = cuda.blockIdx.x * GEMM_TILE
    rows, cols = c.shape
    depth = a.shape[0] if trans_a else a.shape[1]
    zero = c.dtype.type(0)
    total = zero
    for k0 in range(0, depth, GEMM_TILE):
        # tile_a[i, kk] = op(a)[row0 + i, k0 + kk]; tile_b[kk, jj] = op(b)[k0 + kk, col0 + jj]
        if trans_a:
            i, kk = tx, ty
            inside = row0 + i < rows and k0 + kk < depth
            tile_a[i, kk] = a[k0 + kk, row0 + i] if inside else zero
        else:
            i, kk = ty, tx
            inside = row0 + i < rows and k0 + kk < depth
            tile_a[i, kk] = a[row0 + i, k0 + kk] if inside else zero
        if trans_b:
            kk, jj = tx, ty
            inside = k0 + kk < depth and col0 + jj < cols
            tile_b[kk, jj] = b[col0 + jj, k0 + kk] if inside else zero
        else:
            kk, jj = ty, tx
            inside = k0 + kk < depth and col0 + jj < cols
            tile_b[kk, jj] = b[k0 + kk, col0 + jj] if inside else zero
        cuda.syncthreads()
        for k in range(GEMM_TILE):
            total += tile_a[ty, k] * tile_b[k, tx]
        cuda.syncthreads()
    row = row0 + ty
    col = col0 + tx
    if row < rows and col < cols:
        if bias.shape[0] > 0:
            total += bias[col]
        c[row, col] = total


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
    gates,
    c_seq,
    h_seq,
    r_seq,
    m_seq,
    u_seq,
    y,
):
    """Forward time loop of one layer and direction, steps ``t_lo`` to ``t_hi - 1``.

    A cooperative launch: block ``k`` of ``n`` owns hidden units ``[k u, (k + 1) u)`` with
    ``u = ceil(H / n)``, all four gates of each. Its ``B u`` (sequence, unit) items are
    shared among its threads, in groups of :func:`_threads_per_item` threads per item. Shapes as in
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
    gates : (C, B, 4H) array, in/out
        Enters with ``a^x_t`` (input term and biases), leaves with the activations
        i, f, g, o.
    c_seq, h_seq : (S, B, H), (S, B, P) arrays, in/out
        Rings of states; the state before the first step must be in its slot.
    r_seq : (R, B, H) array, out
        ``o_t * tanh(c_t)`` before projection (``R == 0`` without projection).
    m_seq, u_seq : (R, B, H) arrays, out
        The LTM/STM cell's kept memory and use layer (``R == 0`` for another cell).
    y : (T, B, P) array, out
        The output: ``h_t`` at real steps, zeros at padded ones.
    """
    grid = cuda.cg.this_grid()
    batch = gates.shape[1]
    hidden = c_seq.shape[2]
    n_out = h_seq.shape[2]
    slots = c_seq.shape[0]
    projecting = w_hr_t.shape[0] > 0
    peepholes = peephole.shape[0] > 0
    use_layer = w_u_t.shape[0] > 0
    zero = y.dtype.type(0)
    units = (hidden + cuda.gridDim.x - 1) // cuda.gridDim.x
    j_lo = cuda.blockIdx.x * units
    tid = cuda.threadIdx.x
    partial = cuda.shared.array((4, _MAX_BLOCK_THREADS), dtype=y.dtype)
    items = batch * units
    split = _threads_per_item(items, cuda.blockDim.x)
    for n in range(t_hi - t_lo):
        t = t_hi - 1 - n if reverse else t_lo + n
        prev = (t + 1) % slots if reverse else t % slots
        cur = t % slots if reverse else (t + 1) % slots
        a = gates[t - t_lo]
        # Each (sequence, unit) item is a group of `split` threads that share its four dot
        # products with W_hh, so that a few items still keep the block busy; the group's
        # first thread updates the unit.
        for base in range(0, items * split, cuda.blockDim.x):
            item = (base + tid) // split
            b = item // units
            j = j_lo + item % units
            active = item < items and j < hidden
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
                if real:
                    a_i = a[b, j] + partial[0, tid]
                    a_f = a[b, hidden + j] + partial[1, tid]
                    a_g = a[b, 2 * hidden + j] + partial[2, tid]
                    a_o = a[b, 3 * hidden + j] + partial[3, tid]
                    c_prev = c_seq[prev, b, j]
                    if peepholes:
                        i, f, g, o, c, r = cell_forward_peephole(
                            a_i,
                            a_f,
                            a_g,
                            a_o,
                            c_prev,
                            peephole[0, j],
                            peephole[1, j],
                            peephole[2, j],
                        )
                    elif use_layer:
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
                if projecting:
                    r_seq[t % r_seq.shape[0], b, j] = r
                elif use_layer:
                    m_seq[t % m_seq.shape[0], b, j] = r
                else:
                    h_seq[cur, b, j] = r if real else h_seq[prev, b, j]
                    y[t, b, j] = r
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
    gates,
    c_seq,
    u_seq,
    d_y,
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
    gates, c_seq, u_seq : arrays
        The tape of a forward pass with ``C == T``, ``S == T + 1`` (and ``R == T``).
    d_y : (T, B, P) array
        Gradient at the output; ignored at padded steps.
    d_h : (B, P) array, in/out
        Enters holding ``δh_n``, leaves holding ``δh_0``.
    d_c : (B, H) array, in/out
        Enters holding ``δc_n``, leaves holding ``δc_0``.
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
    first = 0 if reverse else steps_total - 1
    for item in range(cuda.grid(1), batch * n_out, cuda.gridsize(1)):
        b = item // n_out
        k = item % n_out
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
        # Each (sequence, output) item of δa_t W_hh is a group of `split` threads.
        for base in range(0, products * split, cuda.gridsize(1)):
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
                if real:
                    d_h[b, k] = partial[0, tid]
                if n + 1 < steps_total:
                    real = following < lengths[b]
                    d_hs[following, b, k] = d_h[b, k] + d_y[following, b, k] if real else zero
            cuda.syncthreads()  # the next round overwrites partial


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


@cuda.jit
def transpose_kernel(src, dst):
    """``dst = src.T`` for 2-D arrays."""
    k = cuda.grid(1)
    rows, cols = src.shape
    if k < rows * cols:
        dst[k % cols, k // cols] = src[k // cols, k % cols]


def _signature_gemm(f):
    return (f[:, ::1], f[:, ::1], f[::1], f[:, ::1], types.boolean, types.boolean)


def _signature_forward(f):
    c1, c2, c3 = f[::1], f[:, ::1], f[:, :, ::1]
    steps = (types.int64[::1], types.boolean, types.int64, types.int64)
    return (c2, c2, c2, c2, c2, c1, *steps, c3, c3, c3, c3, c3, c3, c3)


def _signature_backward(f):
    c2, c3 = f[:, ::1], f[:, :, ::1]
    return (c2, c2, c2, c2, c2, types.int64[::1], types.boolean, c3, c3, c3, c3, c2, c2, c3, c3, c3)


#: Every CUDA kernel of the backend, with its argument types for a float type ``f``
#: (``numba.types.float32`` or ``float64``): what the PTX test compiles. The test
#: cross-checks this table against the kernels defined in this module and in
#: :mod:`numlstm.backends.cuda_array`, so a new kernel cannot be left out.
KERNEL_SIGNATURES = {
    gemm_kernel: _signature_gemm,
    forward_loop: _signature_forward,
    backward_loop: _signature_backward,
    peephole_gradient_kernel: lambda f: (f[:, :, ::1], f[:, :, ::1], types.boolean, f[:, ::1]),
    transpose_kernel: lambda f: (f[:, ::1], f[:, ::1]),
    **cuda_array.ARRAY_KERNELS,
}


def _simulated():
    return bool(config.ENABLE_CUDASIM)


def gemm(a, b, c, bias=None, trans_a=False, trans_b=False):
    """``c[...] = op(a) @ op(b) (+ bias)`` on the device; 2-D C-contiguous arrays."""
    rows, cols = c.shape
    if bias is None:
        bias = cuda_array.empty(0, c.dtype)
    if rows and cols:
        tiles = ((cols + GEMM_TILE - 1) // GEMM_TILE, (rows + GEMM_TILE - 1) // GEMM_TILE)
        gemm_kernel[tiles, (GEMM_TILE, GEMM_TILE)](a, b, bias, c, trans_a, trans_b)


def _transpose(array):
    out = cuda_array.empty(array.shape[::-1], array.dtype)
    if array.size:
        transpose_kernel[cuda_array._blocks(array.size), cuda_array.THREADS](array, out)
    return out


def _launch_persistent(kernel, hidden, args):
    """Launch a time-loop kernel cooperatively, on as many blocks as can be co-resident.

    The blocks share the ``hidden`` units; more blocks than units would idle.
    """
    if _simulated():
        blocks = 1  # the simulator runs a cooperative grid of one block only
    else:
        argtypes = tuple(kernel.typeof_pyval(arg) for arg in args)
        blocks = kernel.compile(argtypes).max_cooperative_grid_blocks(THREADS)
    blocks = max(1, min(blocks, hidden, MAX_BLOCKS or blocks))
    kernel[blocks, THREADS](*args)


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


def layer_forward(
    x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reverse, save, peephole=None, w_u=None, b_u=None
):
    """Run one layer and direction forward (entry point shared by every backend).

    Arguments and results as :func:`numlstm.backends.cpu.layer_forward`; arrays may be
    NumPy or CUDA arrays, results are device arrays.
    """
    x = cuda_array.ascontiguousarray(x)
    w_ih, w_hh = cuda_array.device_parameter(w_ih), cuda_array.device_parameter(w_hh)
    bias = cuda_array.ascontiguousarray(bias)
    steps_total, batch, n_inputs = x.shape
    hidden = w_hh.shape[0] // 4
    n_out = w_hh.shape[1]
    dtype = x.dtype
    w_hr = cuda_array.empty((0, 0), dtype) if w_hr is None else cuda_array.device_parameter(w_hr)
    if peephole is None:
        peephole = cuda_array.empty((0, 0), dtype)
    else:
        peephole = cuda_array.device_parameter(peephole)
    if w_u is None:
        w_u, b_u = cuda_array.empty((0, 0), dtype), cuda_array.empty(0, dtype)
    else:
        w_u, b_u = cuda_array.device_parameter(w_u), cuda_array.ascontiguousarray(b_u)
    projecting = w_hr.shape[0] > 0
    use_layer = w_u.shape[0] > 0
    gates, c_seq, h_seq, r_seq, m_seq, u_seq, y, first, last = _layout.allocate(
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
    chunk = gates.shape[0]
    c_seq[first] = cuda_array.ascontiguousarray(c0)
    h_seq[first] = cuda_array.ascontiguousarray(h0)
    d_lengths = cuda.to_device(lengths)
    w_hh_t = _transpose(w_hh)
    w_hr_t = _transpose(w_hr)
    w_u_t = _transpose(w_u)
    for n in range((steps_total + chunk - 1) // chunk):
        t_lo, t_hi = _layout.chunk_bounds(n, chunk, steps_total, reverse)
        pre = gates[: t_hi - t_lo]
        gemm(
            x[t_lo:t_hi].reshape(((t_hi - t_lo) * batch, n_inputs)),
            w_ih,
            pre.reshape(((t_hi - t_lo) * batch, 4 * hidden)),
            bias,
            trans_b=True,
        )
        args = (w_hh, w_hh_t, w_hr_t, peephole, w_u_t, b_u, d_lengths, reverse, t_lo, t_hi)
        _launch_persistent(
            forward_loop, hidden, (*args, gates, c_seq, h_seq, r_seq, m_seq, u_seq, y)
        )
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
    return y, cuda_array.copy(h_seq[last]), cuda_array.copy(c_seq[last]), tape


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
    d_h = cuda_array.copy(d_h_n)
    d_c = cuda_array.copy(d_c_n)
    d_gates = cuda_array.empty(tape.gates.shape, dtype)
    d_hs = cuda_array.empty((steps_total, batch, n_out), dtype)
    d_u = cuda_array.empty(tape.u_seq.shape, dtype)
    w_hh_t = _transpose(w_hh)
    args = (w_hh, w_hh_t, w_hr, tape.peephole, tape.w_u, tape.d_lengths, tape.reverse, tape.gates)
    _launch_persistent(
        backward_loop,
        hidden,
        (*args, tape.c_seq, tape.u_seq, d_y, d_h, d_c, d_gates, d_hs, d_u),
    )

    rows = steps_total * batch
    d_a = d_gates.reshape((rows, 4 * hidden))
    d_x = cuda_array.empty(x.shape, dtype)
    gemm(d_a, w_ih, d_x.reshape((rows, n_inputs)))
    d_w_ih = cuda_array.empty(w_ih.shape, dtype)
    gemm(d_a, x.reshape((rows, n_inputs)), d_w_ih, trans_a=True)
    h_prev = tape.h_seq[1:] if tape.reverse else tape.h_seq[:steps_total]
    d_w_hh = cuda_array.empty(w_hh.shape, dtype)
    gemm(d_a, h_prev.reshape((rows, n_out)), d_w_hh, trans_a=True)
    ones = cuda_array.full((1, rows), 1, dtype)
    d_bias = cuda_array.empty((1, 4 * hidden), dtype)
    gemm(ones, d_a, d_bias)
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
        d_b_u = cuda_array.empty((1, hidden), dtype)
        gemm(ones, d_a_u, d_b_u)
        d_b_u = d_b_u.reshape(hidden)
    return LayerGrads(
        d_x,
        d_h,
        d_c,
        d_w_ih,
        d_w_hh,
        d_bias.reshape(4 * hidden),
        d_w_hr,
        d_peephole,
        d_w_u,
        d_b_u,
    )
