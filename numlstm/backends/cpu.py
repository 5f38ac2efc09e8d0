"""The CPU backend: ``@njit`` kernels for one layer and one direction.

Each kernel runs its whole time loop in compiled code, with the GIL released. Only the
recurrent product ``W_hh h_{t-1}`` (and ``W_hr r_t`` with projection) and the gate math run
per step; the input term of all steps, the input gradient and the weight gradients are
big GEMMs before or after the loop. The gate math is :mod:`numlstm.gates`, shared with the
CUDA kernels.

States live in a ring of ``S`` slots: the state at time boundary ``s`` (after ``s`` steps of
the forward direction, before step ``s`` of the reverse one) is slot ``s % S``. Training
keeps every boundary (``S = T + 1``) for the backward pass; inference keeps two.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from ..equations import implements
from ..gates import cell_backward, cell_forward

name = "cpu"

#: The array namespace the shared orchestration uses on this backend.
xp = np

#: Steps per input-projection GEMM in inference, where nothing is saved: bounds the memory
#: of the gate buffer by ``INFERENCE_CHUNK * B * 4H`` whatever the sequence length.
INFERENCE_CHUNK = 64


@njit(cache=True, nogil=True, inline="always")
def _split_gates(stacked, hidden):
    """The four gate blocks (i, f, g, o) of a stacked ``(4H,)`` row, as separate views."""
    return (
        stacked[:hidden],
        stacked[hidden : 2 * hidden],
        stacked[2 * hidden : 3 * hidden],
        stacked[3 * hidden :],
    )


@njit(cache=True, nogil=True, error_model="numpy")
def cell_forward_row(a, recurrent, bias, c_prev, c, r):
    """:func:`~numlstm.gates.cell_forward` over the ``H`` hidden units of one sequence.

    ``a`` enters holding the input term of the four gates and leaves holding their
    activations; ``c`` and ``r`` receive ``c_t`` and ``o_t * tanh(c_t)``. Each gate block
    is its own view so that LLVM can prove the loop free of overlap at run time and
    vectorise it (one 2-D array indexed at ``k H + j`` defeats that check).
    """
    hidden = c_prev.shape[0]
    a_i, a_f, a_g, a_o = _split_gates(a, hidden)
    w_i, w_f, w_g, w_o = _split_gates(recurrent, hidden)
    b_i, b_f, b_g, b_o = _split_gates(bias, hidden)
    for j in range(hidden):
        a_i[j], a_f[j], a_g[j], a_o[j], c[j], r[j] = cell_forward(
            a_i[j] + w_i[j] + b_i[j],
            a_f[j] + w_f[j] + b_f[j],
            a_g[j] + w_g[j] + b_g[j],
            a_o[j] + w_o[j] + b_o[j],
            c_prev[j],
        )


@njit(cache=True, nogil=True, error_model="numpy")
def cell_backward_row(gates, c_prev, c, d_r, d_c, d_a):
    """:func:`~numlstm.gates.cell_backward` over the ``H`` hidden units of one sequence.

    ``d_c`` enters holding ``δc`` carried from step ``t + 1`` and leaves holding the one
    carried to ``t - 1``; ``d_a`` receives ``δa_t`` for the four gates.
    """
    hidden = c_prev.shape[0]
    i, f, g, o = _split_gates(gates, hidden)
    d_a_i, d_a_f, d_a_g, d_a_o = _split_gates(d_a, hidden)
    for j in range(hidden):
        d_a_i[j], d_a_f[j], d_a_g[j], d_a_o[j], d_c[j] = cell_backward(
            i[j], f[j], g[j], o[j], c_prev[j], c[j], d_r[j], d_c[j]
        )


@implements(
    "input-projection",
    "recurrent-projection",
    "input-gate",
    "forget-gate",
    "cell-candidate",
    "output-gate",
    "cell-update",
    "hidden-update",
    "projection",
    "padding",
    backend="cpu",
)
@njit(cache=True, nogil=True)
def forward_kernel(x, w_ih, w_hh, bias, w_hr, lengths, reverse, gates, c_seq, h_seq, r_seq, y):
    """Forward time loop of one layer and one direction, over a padded batch.

    Shapes: ``T`` steps, ``B`` batch, ``I`` inputs, ``H`` hidden units, ``P`` outputs per
    step (``proj_size`` or ``H``). Every array is C-contiguous; none may alias another.

    Parameters
    ----------
    x : (T, B, I) array
        The layer's input.
    w_ih : (4H, I) array
        Input weights, gates stacked i, f, g, o.
    w_hh : (4H, P) array
        Recurrent weights.
    bias : (4H,) array
        ``b_ih + b_hh`` (zeros without bias).
    w_hr : (P, H) array
        Projection weights, or an empty ``(0, 0)`` array without projection.
    lengths : (B,) int64 array
        Real steps of each sequence, ``1 <= lengths[b] <= T``.
    reverse : bool
        Run from step ``T - 1`` down to 0 (from each sequence's last real step).
    gates : (C, B, 4H) array, out
        Work buffer for ``C`` steps of gate pre-activations; it receives the activations
        i, f, g, o. With ``C == T`` it is the tape the backward pass reads.
    c_seq : (S, B, H) array, in/out
        Ring of long-term memories; the initial state must be in slot ``T % S`` (reverse)
        or 0 (forward).
    h_seq : (S, B, P) array, in/out
        Ring of short-term memories, the same way.
    r_seq : (R, B, H) array, out
        ``o_t * tanh(c_t)`` before projection: ``R == T`` to keep every step for the
        backward pass, ``R == 1`` for inference; unused (``R == 0``) without projection.
    y : (T, B, P) array, out
        The output: ``h_t`` at real steps, zeros at padded ones.
    """
    steps_total, batch, n_inputs = x.shape
    hidden = c_seq.shape[2]
    chunk = gates.shape[0]
    slots = c_seq.shape[0]
    projecting = w_hr.shape[0] > 0
    recurrent = np.empty((batch, 4 * hidden), x.dtype)
    for n in range((steps_total + chunk - 1) // chunk):
        if reverse:
            t_lo = max(steps_total - (n + 1) * chunk, 0)
            t_hi = steps_total - n * chunk
        else:
            t_lo = n * chunk
            t_hi = min(steps_total, (n + 1) * chunk)
        pre = gates[: t_hi - t_lo]
        np.dot(x[t_lo:t_hi].reshape(-1, n_inputs), w_ih.T, pre.reshape(-1, 4 * hidden))
        times = range(t_hi - 1, t_lo - 1, -1) if reverse else range(t_lo, t_hi)
        for t in times:
            prev = (t + 1) % slots if reverse else t % slots
            cur = t % slots if reverse else (t + 1) % slots
            a = pre[t - t_lo]
            r = r_seq[t % r_seq.shape[0]] if projecting else h_seq[cur]
            np.dot(h_seq[prev], w_hh.T, recurrent)
            for b in range(batch):
                if t >= lengths[b]:
                    c_seq[cur, b] = c_seq[prev, b]
                    if projecting:
                        r[b] = 0.0  # read by the projection's weight gradient
                    continue
                cell_forward_row(a[b], recurrent[b], bias, c_seq[prev, b], c_seq[cur, b], r[b])
            if projecting:
                np.dot(r, w_hr.T, h_seq[cur])
            for b in range(batch):
                if t < lengths[b]:
                    y[t, b] = h_seq[cur, b]
                else:
                    h_seq[cur, b] = h_seq[prev, b]
                    y[t, b] = 0.0


@implements(
    "d-hidden",
    "d-projection",
    "d-output-gate",
    "d-cell",
    "d-input-gate",
    "d-forget-gate",
    "d-cell-candidate",
    "d-initial-state",
    "d-input",
    "d-weights",
    "d-projection-weights",
    backend="cpu",
)
@njit(cache=True, nogil=True)
def backward_kernel(
    x,
    w_ih,
    w_hh,
    w_hr,
    lengths,
    reverse,
    gates,
    c_seq,
    h_seq,
    r_seq,
    d_y,
    d_h,
    d_c,
    d_gates,
    d_hs,
    d_x,
    d_w_ih,
    d_w_hh,
    d_bias,
    d_w_hr,
):
    """Backward time loop of one layer and one direction, then the gradient GEMMs.

    Shapes and the first ten arguments are those of :func:`forward_kernel`, as saved by a
    forward pass with ``C == T``, ``S == T + 1`` and ``R == T`` (with projection).

    Parameters
    ----------
    d_y : (T, B, P) array
        Gradient at the output; ignored at padded steps.
    d_h : (B, P) array, in/out
        Enters holding ``δh_n``, leaves holding ``δh_0``.
    d_c : (B, H) array, in/out
        Enters holding ``δc_n``, leaves holding ``δc_0``.
    d_gates : (T, B, 4H) array, out
        ``δa_t``, the gradient at the gate pre-activations (zero at padded steps).
    d_hs : (T, B, P) array, out
        ``δh_t`` at every step, for the projection's weight gradient; ``(0, B, P)``
        without projection.
    d_x : (T, B, I) array, out
        Gradient at the input.
    d_w_ih, d_w_hh, d_bias, d_w_hr : arrays, out
        Gradients of the weights (shapes as the weights); ``d_bias`` is the gradient of
        ``b_ih`` and of ``b_hh`` alike. ``d_w_hr`` is ``(0, 0)`` without projection.
    """
    steps_total, batch, n_inputs = x.shape
    hidden = c_seq.shape[2]
    projecting = w_hr.shape[0] > 0
    d_r = np.empty((batch, hidden), x.dtype) if projecting else d_h
    d_h_recurrent = np.empty(d_h.shape, x.dtype)
    times = range(steps_total) if reverse else range(steps_total - 1, -1, -1)
    for t in times:
        prev = t + 1 if reverse else t
        cur = t if reverse else t + 1
        for b in range(batch):
            if t < lengths[b]:
                d_h[b] += d_y[t, b]
        if projecting:
            for b in range(batch):
                if t < lengths[b]:
                    d_hs[t, b] = d_h[b]
                else:
                    d_hs[t, b] = 0.0
            np.dot(d_hs[t], w_hr, d_r)
        for b in range(batch):
            if t >= lengths[b]:
                d_gates[t, b] = 0.0
                continue
            cell_backward_row(gates[t, b], c_seq[prev, b], c_seq[cur, b], d_r[b], d_c[b], d_gates[t, b])
        np.dot(d_gates[t], w_hh, d_h_recurrent)
        for b in range(batch):
            if t < lengths[b]:
                d_h[b] = d_h_recurrent[b]

    d_a = d_gates.reshape(-1, 4 * hidden)
    np.dot(d_a, w_ih, d_x.reshape(-1, n_inputs))
    np.dot(d_a.T, x.reshape(-1, n_inputs), d_w_ih)
    h_prev = h_seq[1:] if reverse else h_seq[:steps_total]
    np.dot(d_a.T, h_prev.reshape(-1, h_seq.shape[2]), d_w_hh)
    d_bias[:] = 0.0
    for row in range(d_a.shape[0]):
        d_bias += d_a[row]
    if projecting:
        np.dot(d_hs.reshape(-1, h_seq.shape[2]).T, r_seq.reshape(-1, hidden), d_w_hr)


class LayerTape(NamedTuple):
    """What the forward pass of one layer and direction saves for its backward pass."""

    x: np.ndarray
    w_ih: np.ndarray
    w_hh: np.ndarray
    w_hr: np.ndarray
    lengths: np.ndarray
    reverse: bool
    gates: np.ndarray
    c_seq: np.ndarray
    h_seq: np.ndarray
    r_seq: np.ndarray


class LayerGrads(NamedTuple):
    """Gradients of one layer and direction."""

    d_x: np.ndarray
    d_h0: np.ndarray
    d_c0: np.ndarray
    d_w_ih: np.ndarray
    d_w_hh: np.ndarray
    d_bias: np.ndarray
    d_w_hr: np.ndarray | None


def layer_forward(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reverse, save):
    """Run one layer and direction forward (entry point shared by every backend).

    Parameters
    ----------
    x : (T, B, I) array
    w_ih, w_hh : (4H, I), (4H, P) arrays
    bias : (4H,) array
        ``b_ih + b_hh``.
    w_hr : (P, H) array or None
        Projection weights.
    h0, c0 : (B, P), (B, H) arrays
        Initial states.
    lengths : (B,) int64 array
    reverse : bool
    save : bool
        Keep what the backward pass needs (the tape); otherwise use memory independent
        of ``T`` beyond the output.

    Returns
    -------
    y : (T, B, P) array
    h_n, c_n : (B, P), (B, H) arrays
    tape : LayerTape or None
    """
    steps_total, batch, _ = x.shape
    hidden = w_hh.shape[0] // 4
    n_out = w_hh.shape[1]
    dtype = x.dtype
    if w_hr is None:
        w_hr = np.empty((0, 0), dtype)
    projecting = w_hr.shape[0] > 0
    if save:
        chunk, slots, kept = steps_total, steps_total + 1, steps_total
    else:
        chunk, slots, kept = min(steps_total, INFERENCE_CHUNK), 2, 1
    gates = np.empty((chunk, batch, 4 * hidden), dtype)
    c_seq = np.empty((slots, batch, hidden), dtype)
    h_seq = np.empty((slots, batch, n_out), dtype)
    r_seq = np.empty((kept if projecting else 0, batch, hidden), dtype)
    y = np.empty((steps_total, batch, n_out), dtype)
    first, last = (steps_total % slots, 0) if reverse else (0, steps_total % slots)
    c_seq[first] = c0
    h_seq[first] = h0
    forward_kernel(x, w_ih, w_hh, bias, w_hr, lengths, reverse, gates, c_seq, h_seq, r_seq, y)
    tape = None
    if save:
        tape = LayerTape(x, w_ih, w_hh, w_hr, lengths, reverse, gates, c_seq, h_seq, r_seq)
    return y, h_seq[last].copy(), c_seq[last].copy(), tape


def layer_backward(tape, d_y, d_h_n, d_c_n):
    """Backward of :func:`layer_forward` (entry point shared by every backend).

    Parameters
    ----------
    tape : LayerTape
        What :func:`layer_forward` saved.
    d_y : (T, B, P) array
        Gradient at the layer's output.
    d_h_n, d_c_n : (B, P), (B, H) arrays
        Gradients at the final states.

    Returns
    -------
    LayerGrads
    """
    x, w_ih, w_hh, w_hr = tape.x, tape.w_ih, tape.w_hh, tape.w_hr
    dtype = x.dtype
    projecting = w_hr.shape[0] > 0
    d_h = np.array(d_h_n, dtype, copy=True)
    d_c = np.array(d_c_n, dtype, copy=True)
    d_gates = np.empty(tape.gates.shape, dtype)
    d_hs = np.empty((len(x) if projecting else 0, *d_h.shape), dtype)
    d_x = np.empty(x.shape, dtype)
    d_w_ih = np.empty(w_ih.shape, dtype)
    d_w_hh = np.empty(w_hh.shape, dtype)
    d_bias = np.empty(w_ih.shape[0], dtype)
    d_w_hr = np.empty(w_hr.shape, dtype)
    backward_kernel(
        x,
        w_ih,
        w_hh,
        w_hr,
        tape.lengths,
        tape.reverse,
        tape.gates,
        tape.c_seq,
        tape.h_seq,
        tape.r_seq,
        d_y,
        d_h,
        d_c,
        d_gates,
        d_hs,
        d_x,
        d_w_ih,
        d_w_hh,
        d_bias,
        d_w_hr,
    )
    return LayerGrads(d_x, d_h, d_c, d_w_ih, d_w_hh, d_bias, d_w_hr if projecting else None)
