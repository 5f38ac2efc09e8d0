"""The gate equations, written once as small scalar functions.

These are plain ``@njit`` functions of scalars. The CPU kernels (``@njit``) and the CUDA
kernels (``@cuda.jit``, which may call ``@njit`` functions) both compile them, so the math
of the cell exists in exactly one place. Each function names the equations it computes
(see :mod:`numlstm.equations`).

Derivatives are written in terms of the activations' outputs, which the forward pass
saves: ``σ'(a) = σ(a)(1 - σ(a))`` and ``tanh'(a) = 1 - tanh(a)^2``.
"""

from __future__ import annotations

import math

from numba import njit

from .equations import implements


@implements("input-gate", "forget-gate", "output-gate", backend="shared")
@njit(cache=True, nogil=True)
def sigmoid(a):
    """Logistic function, stable for any input: ``exp`` only ever sees ``-|a|``."""
    z = math.exp(-abs(a))
    s = 1.0 / (1.0 + z)
    return s if a >= 0 else z * s


@implements("cell-candidate", backend="shared")
@njit(cache=True, nogil=True)
def tanh(a):
    """Hyperbolic tangent (saturates to ±1 without overflow)."""
    return math.tanh(a)


@implements("d-input-gate", "d-forget-gate", "d-output-gate", backend="shared")
@njit(cache=True, nogil=True)
def d_sigmoid(s):
    """Derivative of the sigmoid, from its output ``s = σ(a)``."""
    return s * (1.0 - s)


@implements("d-cell-candidate", "d-cell", backend="shared")
@njit(cache=True, nogil=True)
def d_tanh(t):
    """Derivative of tanh, from its output ``t = tanh(a)``."""
    return 1.0 - t * t


@implements(
    "input-gate",
    "forget-gate",
    "cell-candidate",
    "output-gate",
    "cell-update",
    "hidden-update",
    backend="shared",
)
@njit(cache=True, nogil=True)
def cell_forward(a_i, a_f, a_g, a_o, c_prev):
    """One hidden unit of one step: the four gates and the two memory updates.

    Parameters
    ----------
    a_i, a_f, a_g, a_o : float
        Gate pre-activations ``a_t`` (input term, recurrent term and biases).
    c_prev : float
        The long-term memory ``c_{t-1}``.

    Returns
    -------
    i, f, g, o : float
        The gate activations, saved for the backward pass.
    c : float
        The new long-term memory ``c_t``.
    r : float
        ``o_t ⊙ tanh(c_t)``: the new short-term memory ``h_t``, before any projection.
    """
    i = sigmoid(a_i)
    f = sigmoid(a_f)
    g = tanh(a_g)
    o = sigmoid(a_o)
    c = f * c_prev + i * g
    r = o * tanh(c)
    return i, f, g, o, c, r


@implements(
    "d-output-gate",
    "d-cell",
    "d-input-gate",
    "d-forget-gate",
    "d-cell-candidate",
    backend="shared",
)
@njit(cache=True, nogil=True)
def cell_backward(i, f, g, o, c_prev, c, d_r, d_c_next):
    """Backward of :func:`cell_forward` for one hidden unit of one step.

    Parameters
    ----------
    i, f, g, o : float
        The gate activations saved by the forward pass.
    c_prev, c : float
        The long-term memory before and after the step, ``c_{t-1}`` and ``c_t``.
    d_r : float
        Gradient at ``r_t = o_t ⊙ tanh(c_t)`` (equal to ``δh_t`` without projection).
    d_c_next : float
        Gradient at ``c_t`` carried back from step ``t + 1`` (``δc_{t+1} ⊙ f_{t+1}``).

    Returns
    -------
    d_a_i, d_a_f, d_a_g, d_a_o : float
        Gradients at the gate pre-activations ``δa_t``.
    d_c_prev : float
        The gradient carried to ``c_{t-1}``, that is ``δc_t ⊙ f_t``.
    """
    tanh_c = tanh(c)
    d_c = d_c_next + d_r * o * d_tanh(tanh_c)
    d_a_i = d_c * g * d_sigmoid(i)
    d_a_f = d_c * c_prev * d_sigmoid(f)
    d_a_g = d_c * i * d_tanh(g)
    d_a_o = d_r * tanh_c * d_sigmoid(o)
    return d_a_i, d_a_f, d_a_g, d_a_o, d_c * f
