"""The buffers of one layer and direction, laid out the same way on every backend.

States live in a ring of ``S`` slots: the state at time boundary ``s`` (after ``s`` steps of
the forward direction, before step ``s`` of the reverse one) is slot ``s % S``. Training
keeps every boundary (``S = T + 1``) and every step's gates and intermediate values, which
is the tape the backward pass reads; inference keeps two slots, one step of intermediates
and ``C`` steps of gates, so its memory does not grow with ``T`` beyond the output.
"""

from __future__ import annotations

from typing import NamedTuple

from numba import njit


class LayerBuffers(NamedTuple):
    """Work and output arrays of one layer and direction (shapes: see :func:`allocate`)."""

    gates: object
    c_seq: object
    h_seq: object
    r_seq: object
    m_seq: object
    u_seq: object
    y: object
    first: int
    last: int


def allocate(xp, x, hidden, n_out, *, save, reverse, projecting, use_layer, chunk):
    """Allocate the ring, the tape and the output for one layer and direction.

    Parameters
    ----------
    xp : module
        The backend's array namespace (``empty(shape, dtype)`` is all it needs).
    x : (T, B, I) array
        The layer's input (its length, batch and dtype set the buffers').
    hidden, n_out : int
        ``H``, and ``P`` (``proj_size`` or ``H``).
    save : bool
        Keep what the backward pass needs; otherwise memory independent of ``T``.
    reverse : bool
        The direction: the initial state goes to slot ``T % S``, else to slot 0.
    projecting, use_layer : bool
        Keep ``r_t`` (projection) or ``m_t`` and ``U_t`` (the LTM/STM cell).
    chunk : int
        Steps of gates kept in inference.

    Returns
    -------
    LayerBuffers
        ``gates`` ``(C, B, 4H)``, ``c_seq`` ``(S, B, H)``, ``h_seq`` ``(S, B, P)``, then
        ``r_seq``, ``m_seq``, ``u_seq`` ``(R, B, H)`` (``R = 0`` where unused), ``y``
        ``(T, B, P)``, and the slots ``first`` and ``last`` of the initial and final states.
    """
    steps_total, batch, _ = x.shape
    dtype = x.dtype
    if save:
        chunk, slots, kept = steps_total, steps_total + 1, steps_total
    else:
        chunk, slots, kept = min(steps_total, chunk), 2, 1

    def steps(keep):
        return xp.empty((kept if keep else 0, batch, hidden), dtype)

    first, last = (steps_total % slots, 0) if reverse else (0, steps_total % slots)
    return LayerBuffers(
        gates=xp.empty((chunk, batch, 4 * hidden), dtype),
        c_seq=xp.empty((slots, batch, hidden), dtype),
        h_seq=xp.empty((slots, batch, n_out), dtype),
        r_seq=steps(projecting),
        m_seq=steps(use_layer),
        u_seq=steps(use_layer),
        y=xp.empty((steps_total, batch, n_out), dtype),
        first=first,
        last=last,
    )


@njit(cache=True, nogil=True)
def chunk_bounds(n, chunk, steps_total, reverse):
    """Steps ``[t_lo, t_hi)`` of the ``n``-th chunk of ``chunk`` steps, in running order
    (from the end of the sequences for the reverse direction)."""
    if reverse:
        return max(steps_total - (n + 1) * chunk, 0), steps_total - n * chunk
    return n * chunk, min(steps_total, (n + 1) * chunk)
