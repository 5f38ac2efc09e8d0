"""The gate equations, written once as small scalar functions.

These are plain ``@njit`` functions of scalars. The CPU kernels (``@njit``) and the CUDA
kernels (``@cuda.jit``, which may call ``@njit`` functions) both compile them, so the math
of the cell exists in exactly one place. Each function names the equations it computes
(see :mod:`numlstm.equations`).

Derivatives are written in terms of the activations' outputs, which the forward pass
saves: ``σ'(a) = σ(a)(1 - σ(a))`` and ``tanh'(a) = 1 - tanh(a)^2``.

The activations need ``exp``, and ``math.exp`` compiles to a call into libm, which stops
LLVM from vectorising the kernels' loop over hidden units (PyPI's llvmlite has no SVML).
:func:`exp` and :func:`expm1` are therefore written out in plain arithmetic, which LLVM
turns into AVX-512 code: Cody and Waite's range reduction ``x = n ln 2 + r`` with
``|r| <= ln(2)/2``, a degree-13 Taylor polynomial for ``e^r - 1`` (truncation error below
``1e-17``), and ``2^n`` built from its bits. They work in float64 whatever the input, so a
float32 kernel rounds once, at the store; in float64 they agree with libm to a few ulp
(``tests/test_gates.py`` measures it).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .equations import implements

#: Range-reduction constants: ``LN2_HI`` has its low bits zero, so ``n * LN2_HI`` is exact
#: for the ``|n| <= 1022`` used here.
LOG2E = 1.4426950408889634
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10

#: ``exp`` is only evaluated at or below zero; below ``EXP_FLOOR`` the result would leave
#: the normal float64 range (``2^-1022``), so it is flushed to 0.
EXP_FLOOR = -708.0

#: ``tanh(a)`` rounds to ``±1`` in float64 for ``|a| > 19.1``; clamping ``-2|a|`` here keeps
#: ``expm1`` in range without changing any result.
TANH_FLOOR = -40.0

#: Taylor coefficients ``1/k!`` of ``e^r - 1 = r (1 + r/2! + r^2/3! + ...)``, k = 2..13.
_C2 = 1.0 / 2.0
_C3 = 1.0 / 6.0
_C4 = 1.0 / 24.0
_C5 = 1.0 / 120.0
_C6 = 1.0 / 720.0
_C7 = 1.0 / 5040.0
_C8 = 1.0 / 40320.0
_C9 = 1.0 / 362880.0
_C10 = 1.0 / 3628800.0
_C11 = 1.0 / 39916800.0
_C12 = 1.0 / 479001600.0
_C13 = 1.0 / 6227020800.0


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _reduce(x):
    """Split ``x <= 0`` into ``2^n`` and ``e^r - 1`` with ``x = n ln 2 + r``."""
    n = np.floor(x * LOG2E + 0.5)
    r = (x - n * LN2_HI) - n * LN2_LO
    p = _C12 + r * _C13
    p = _C11 + r * p
    p = _C10 + r * p
    p = _C9 + r * p
    p = _C8 + r * p
    p = _C7 + r * p
    p = _C6 + r * p
    p = _C5 + r * p
    p = _C4 + r * p
    p = _C3 + r * p
    p = _C2 + r * p
    p = 1.0 + r * p
    scale = np.int64((np.int64(n) + 1023) << 52).view(np.float64)
    return scale, r * p


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def exp(x):
    """``e^x`` for ``x <= 0``, in float64, in arithmetic that LLVM vectorises.

    Below ``EXP_FLOOR`` it returns 0 (the exact result is subnormal or 0).
    """
    scale, p = _reduce(max(x, EXP_FLOOR))
    return scale + scale * p if x >= EXP_FLOOR else 0.0


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def expm1(x):
    """``e^x - 1`` for ``x <= 0`` with full relative accuracy near 0 (vectorisable)."""
    scale, p = _reduce(max(x, EXP_FLOOR))
    return scale * p + (scale - 1.0)


@implements("input-gate", "forget-gate", "output-gate", backend="shared")
@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def sigmoid(a):
    """Logistic function, stable for any input: ``exp`` only ever sees ``-|a|``."""
    z = exp(-abs(a))
    s = 1.0 / (1.0 + z)
    if a != a:  # NaN in, NaN out (the clamp in exp would hide it)
        return a + 0.0
    return s if a >= 0 else z * s


@implements("cell-candidate", backend="shared")
@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def tanh(a):
    """Hyperbolic tangent: ``-expm1(-2|a|) / (2 + expm1(-2|a|))`` with the sign of ``a``.

    ``expm1`` keeps full relative accuracy near 0, and ``|a|`` never overflows it.
    """
    m = expm1(max(-2.0 * abs(a), TANH_FLOOR))
    t = -m / (2.0 + m)
    if a != a:
        return a + 0.0
    return t if a >= 0 else -t


@implements("d-input-gate", "d-forget-gate", "d-output-gate", backend="shared")
@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def d_sigmoid(s):
    """Derivative of the sigmoid, from its output ``s = σ(a)``."""
    return s * (1.0 - s)


@implements("d-cell-candidate", "d-cell", backend="shared")
@njit(cache=True, nogil=True, error_model="numpy", inline="always")
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
@njit(cache=True, nogil=True, error_model="numpy", inline="always")
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
@njit(cache=True, nogil=True, error_model="numpy", inline="always")
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
