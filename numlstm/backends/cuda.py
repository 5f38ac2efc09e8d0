"""The CUDA backend: persistent ``@cuda.jit`` kernels for one layer and one direction.

A forward pass of one layer and direction is two launches, whatever the sequence length:

1. :func:`gemm_kernel` computes the input term of every step at once,
   ``a^x = x W_ih^T + b`` (``(T B, I) x (I, 4H)``);
2. :func:`forward_loop` runs the whole time loop in one cooperative launch. Each block owns
   a slice of hidden units, with all four gates of those units, so the cell update of a
   unit stays inside the thread that computes its gates; a grid-wide barrier
   (``cuda.cg.this_grid().sync()``) separates the steps (two with projection, whose
   product needs every unit of the step).

A backward pass is :func:`backward_loop` (one cooperative launch for the time loop, two
barriers per step) followed by GEMMs over all steps for ``d_x`` and the weight gradients.
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
from ..gates import cell_backward, cell_forward
from . import cuda_array
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
    backend="cuda",
)
@cuda.jit
def forward_loop(w_hh_t, w_hr_t, lengths, reverse, t_lo, t_hi, gates, c_seq, h_seq, r_seq, y):
    """Forward time loop of one layer and direction, steps ``t_lo`` to ``t_hi - 1``.

    A cooperative launch: block ``k`` of ``n`` owns hidden units ``[k u, (k + 1) u)`` with
    ``u = ceil(H / n)``, all four gates of each. Shapes as in
    :func:`numlstm.backends.cpu.forward_kernel` (``C`` steps of gates, ``S`` state slots,
    ``R`` kept projections); every array C-contiguous, none aliasing another.

    Parameters
    ----------
    w_hh_t : (P, 4H) array
        Transposed recurrent weights, so that neighbouring units read neighbouring words.
    w_hr_t : (H, P) array
        Transposed projection weights, or ``(0, 0)`` without projection.
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
    y : (T, B, P) array, out
        The output: ``h_t`` at real steps, zeros at padded ones.
    """
    grid = cuda.cg.this_grid()
    batch = gates.shape[1]
    hidden = c_seq.shape[2]
    n_out = h_seq.shape[2]
    slots = c_seq.shape[0]
    projecting = w_hr_t.shape[0] > 0
    zero = y.dtype.type(0)
    units = (hidden + cuda.gridDim.x - 1) // cuda.gridDim.x
    j_lo = cuda.blockIdx.x * units
    for n in range(t_hi - t_lo):
        t = t_hi - 1 - n if reverse else t_lo + n
        prev = (t + 1) % slots if reverse else t % slots
        cur = t % slots if reverse else (t + 1) % slots
        a = gates[t - t_lo]
        for item in range(cuda.threadIdx.x, batch * units, cuda.blockDim.x):
            b = item // units
            j = j_lo + item % units
            if j >= hidden:
                continue
            real = t < lengths[b]
            if real:
                a_i = a[b, j]
                a_f = a[b, hidden + j]
                a_g = a[b, 2 * hidden + j]
                a_o = a[b, 3 * hidden + j]
                for k in range(n_out):
                    h_k = h_seq[prev, b, k]
                    a_i += h_k * w_hh_t[k, j]
                    a_f += h_k * w_hh_t[k, hidden + j]
                    a_g += h_k * w_hh_t[k, 2 * hidden + j]
                    a_o += h_k * w_hh_t[k, 3 * hidden + j]
                i, f, g, o, c, r = cell_forward(a_i, a_f, a_g, a_o, c_seq[prev, b, j])
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
            else:
                h_seq[cur, b, j] = r if real else h_seq[prev, b, j]
                y[t, b, j] = r
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
    backend="cuda",
)
@cuda.jit
def backward_loop(w_hh, w_hr, lengths, reverse, gates, c_seq, d_y, d_h, d_c, d_gates, d_hs):
    """Backward time loop of one layer and direction, in one cooperative launch.

    Per step: every thread of the grid forms ``δh_t`` (its share of ``(b, p)``); after a
    barrier each block runs :func:`numlstm.gates.cell_backward` for its hidden units
    (the slices of :func:`forward_loop`); after another, the grid forms
    ``δa_t W_hh``, the recurrent part of the next ``δh``.

    Parameters
    ----------
    w_hh : (4H, P) array
    w_hr : (P, H) array, or ``(0, 0)`` without projection
    lengths : (B,) int64 array
    reverse : bool
    gates, c_seq : arrays
        The tape of a forward pass with ``C == T`` and ``S == T + 1``.
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
    """
    grid = cuda.cg.this_grid()
    steps_total, batch, four_hidden = gates.shape
    hidden = four_hidden // 4
    n_out = d_h.shape[1]
    projecting = w_hr.shape[0] > 0
    zero = d_y.dtype.type(0)
    units = (hidden + cuda.gridDim.x - 1) // cuda.gridDim.x
    j_lo = cuda.blockIdx.x * units
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
            (
                d_gates[t, b, j],
                d_gates[t, b, hidden + j],
                d_gates[t, b, 2 * hidden + j],
                d_gates[t, b, 3 * hidden + j],
                d_c[b, j],
            ) = cell_backward(
                gates[t, b, j],
                gates[t, b, hidden + j],
                gates[t, b, 2 * hidden + j],
                gates[t, b, 3 * hidden + j],
                c_seq[prev, b, j],
                c_seq[cur, b, j],
                d_r,
                d_c[b, j],
            )
        grid.sync()
        following = t + 1 if reverse else t - 1
        for item in range(cuda.grid(1), batch * n_out, cuda.gridsize(1)):
            b = item // n_out
            k = item % n_out
            if t < lengths[b]:
                total = zero
                for gj in range(four_hidden):
                    total += d_gates[t, b, gj] * w_hh[gj, k]
                d_h[b, k] = total
            if n + 1 < steps_total:
                real = following < lengths[b]
                d_hs[following, b, k] = d_h[b, k] + d_y[following, b, k] if real else zero


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
    c2, c3 = f[:, ::1], f[:, :, ::1]
    return (c2, c2, types.int64[::1], types.boolean, types.int64, types.int64, c3, c3, c3, c3, c3)


def _signature_backward(f):
    c2, c3 = f[:, ::1], f[:, :, ::1]
    return (c2, c2, types.int64[::1], types.boolean, c3, c3, c3, c2, c2, c3, c3)


#: Every CUDA kernel of the backend, with its argument types for a float type ``f``
#: (``numba.types.float32`` or ``float64``): what the PTX test compiles. The test
#: cross-checks this table against the kernels defined in this module and in
#: :mod:`numlstm.backends.cuda_array`, so a new kernel cannot be left out.
KERNEL_SIGNATURES = {
    gemm_kernel: _signature_gemm,
    forward_loop: _signature_forward,
    backward_loop: _signature_backward,
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
    lengths: np.ndarray
    d_lengths: object
    reverse: bool
    gates: object
    c_seq: object
    h_seq: object
    r_seq: object


def layer_forward(
    x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reverse, save, peephole=None, w_u=None, b_u=None
):
    """Run one layer and direction forward (entry point shared by every backend).

    Arguments and results as :func:`numlstm.backends.cpu.layer_forward`; arrays may be
    NumPy or CUDA arrays, results are device arrays.
    """
    if peephole is not None or w_u is not None:
        raise NotImplementedError(
            "the CUDA backend runs the standard cell only so far: use backend='cpu' for "
            "cell='peephole' or cell='ltm_stm'"
        )
    x = cuda_array.ascontiguousarray(x)
    w_ih, w_hh = cuda_array.device_parameter(w_ih), cuda_array.device_parameter(w_hh)
    bias = cuda_array.ascontiguousarray(bias)
    steps_total, batch, n_inputs = x.shape
    hidden = w_hh.shape[0] // 4
    n_out = w_hh.shape[1]
    dtype = x.dtype
    w_hr = cuda_array.empty((0, 0), dtype) if w_hr is None else cuda_array.device_parameter(w_hr)
    projecting = w_hr.shape[0] > 0
    if save:
        chunk, slots, kept = steps_total, steps_total + 1, steps_total
    else:
        chunk, slots, kept = min(steps_total, INFERENCE_CHUNK), 2, 1
    gates = cuda_array.empty((chunk, batch, 4 * hidden), dtype)
    c_seq = cuda_array.empty((slots, batch, hidden), dtype)
    h_seq = cuda_array.empty((slots, batch, n_out), dtype)
    r_seq = cuda_array.empty((kept if projecting else 0, batch, hidden), dtype)
    y = cuda_array.empty((steps_total, batch, n_out), dtype)
    first, last = (steps_total % slots, 0) if reverse else (0, steps_total % slots)
    c_seq[first] = cuda_array.ascontiguousarray(c0)
    h_seq[first] = cuda_array.ascontiguousarray(h0)
    d_lengths = cuda.to_device(lengths)
    w_hh_t = _transpose(w_hh)
    w_hr_t = _transpose(w_hr)
    for n in range((steps_total + chunk - 1) // chunk):
        if reverse:
            t_lo, t_hi = max(steps_total - (n + 1) * chunk, 0), steps_total - n * chunk
        else:
            t_lo, t_hi = n * chunk, min(steps_total, (n + 1) * chunk)
        pre = gates[: t_hi - t_lo]
        gemm(
            x[t_lo:t_hi].reshape(((t_hi - t_lo) * batch, n_inputs)),
            w_ih,
            pre.reshape(((t_hi - t_lo) * batch, 4 * hidden)),
            bias,
            trans_b=True,
        )
        args = (w_hh_t, w_hr_t, d_lengths, reverse, t_lo, t_hi, gates, c_seq, h_seq, r_seq, y)
        _launch_persistent(forward_loop, hidden, args)
    tape = None
    if save:
        tape = LayerTape(
            x, w_ih, w_hh, w_hr, lengths, d_lengths, reverse, gates, c_seq, h_seq, r_seq
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
    d_y = cuda_array.ascontiguousarray(d_y)
    d_h = cuda_array.copy(d_h_n)
    d_c = cuda_array.copy(d_c_n)
    d_gates = cuda_array.empty(tape.gates.shape, dtype)
    d_hs = cuda_array.empty((steps_total, batch, n_out), dtype)
    args = (w_hh, w_hr, tape.d_lengths, tape.reverse, tape.gates, tape.c_seq)
    _launch_persistent(backward_loop, hidden, (*args, d_y, d_h, d_c, d_gates, d_hs))

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
    return LayerGrads(d_x, d_h, d_c, d_w_ih, d_w_hh, d_bias.reshape(4 * hidden), d_w_hr)
